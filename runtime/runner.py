"""ModelRunner: owns the model and its cache tensors; turns a scheduled batch into input tensors, runs the
forward, and samples.

Inputs are built with numpy in host staging buffers (pinned on CUDA) and copied once per step, non-blocking,
into device buffers whose addresses never change. Decode batches on CUDA replay a CUDA graph captured for the
next larger batch size; the rows past the real batch are padding that writes nothing."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from runtime.forward import ForwardContext
from runtime.kv_cache import CacheLayout, KVCacheManager, cdiv
from runtime.sampler import SamplingBatch, sample
from runtime.scheduler import ScheduledBatch


@dataclass(slots=True)
class StepOutput:
    requests: list                       # the requests that sampled, in row order
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]


def allocate_caches(layout: CacheLayout, num_blocks: list[int], block_size: int,
                    device: torch.device) -> list[torch.Tensor]:
    """One tensor per group [layers_in_group, blocks, entries_per_block, *entry_shape]; per layer a view."""
    group_tensors = []
    for group, blocks in zip(layout.groups, num_blocks):
        spec = group.spec
        shape = (len(group.layers), blocks, block_size // spec.tokens_per_entry, *spec.entry_shape)
        group_tensors.append(torch.zeros(shape, dtype=spec.dtype, device=device))
    return [group_tensors[g][slot] for g, slot in zip(layout.layer_group, layout.layer_slot)]


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 256, 16)) + list(range(256, 1025, 64))
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


class InputBuffers:
    """Step inputs at fixed addresses: `host` numpy views (pinned on CUDA) and their device twins."""

    NAMES = ("input_ids", "positions", "query_start_loc", "seq_lens", "num_computed", "logits_indices")

    def __init__(self, max_tokens: int, max_reqs: int, num_groups: int, max_blocks: int, device: torch.device):
        pin = device.type == "cuda"
        sizes = dict(input_ids=max_tokens, positions=max_tokens, query_start_loc=max_reqs + 1, seq_lens=max_reqs,
                     num_computed=max_reqs, logits_indices=max_reqs)
        dtypes = dict(query_start_loc=torch.int32, seq_lens=torch.int32, num_computed=torch.int32)
        self.host_tensors = {n: torch.zeros(sizes[n], dtype=dtypes.get(n, torch.int64), pin_memory=pin)
                             for n in self.NAMES}
        self.host_tensors.update({f"slots{g}": torch.zeros(max_tokens, dtype=torch.int64, pin_memory=pin)
                                  for g in range(num_groups)})
        self.host_tensors.update({f"table{g}": torch.zeros(max_reqs, max_blocks, dtype=torch.int32, pin_memory=pin)
                                  for g in range(num_groups)})
        self.host = {n: t.numpy() for n, t in self.host_tensors.items()}
        self.device = {n: t.to(device) if pin else t for n, t in self.host_tensors.items()}
        self.on_cuda = pin

    def upload(self, name: str, rows: int) -> torch.Tensor:
        """Copy the first `rows` rows host -> device (non-blocking) and return the device view."""
        if self.on_cuda:
            self.device[name][:rows].copy_(self.host_tensors[name][:rows], non_blocking=True)
        return self.device[name][:rows]


class ModelRunner:
    def __init__(self, model: nn.Module, kv: KVCacheManager, caches: list[torch.Tensor], vocab_size: int,
                 device: torch.device, max_num_batched_tokens: int = 8192, use_cuda_graphs: bool = False):
        self.model = model
        self.kv = kv
        self.caches = caches
        self.vocab_size = vocab_size
        self.device = device
        self.block_size = kv.block_size
        self.ratios = [g.spec.tokens_per_entry for g in kv.groups]
        max_reqs = kv.block_tables[0].shape[0] if kv.block_tables else 1
        self.max_blocks = kv.max_blocks_per_seq
        self.buffers = InputBuffers(max(max_num_batched_tokens, max_reqs), max_reqs, len(kv.groups),
                                    self.max_blocks, device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if use_cuda_graphs and device.type == "cuda":
            self.capture_graphs(graph_batch_sizes(max_reqs))

    # ---- inputs ---------------------------------------------------------------------------------------

    def _fill_host(self, batch: ScheduledBatch, pad_to: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        """Write the step's inputs into the host buffers. Rows past the batch (graph padding) read the null
        block, write nothing (slot -1) and see one key."""
        h = self.buffers.host
        requests = batch.requests
        num_reqs = len(requests)
        num_new = np.array(batch.num_new_tokens, dtype=np.int64)                     # [num_reqs]
        computed = np.array([r.num_computed_tokens for r in requests], dtype=np.int64)
        rows = np.array([self.kv.row(r.request_id) for r in requests], dtype=np.int64)
        query_start_loc = h["query_start_loc"][:num_reqs + 1]
        query_start_loc[0] = 0
        np.cumsum(num_new, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])
        token_ids: list[int] = []
        for r, start, n in zip(requests, computed.tolist(), batch.num_new_tokens):
            token_ids.extend(r.token_ids[start:start + n])
        h["input_ids"][:num_tokens] = token_ids
        # position of each token = computed[req] + its offset inside the request's chunk
        positions = h["positions"][:num_tokens]
        positions[:] = np.arange(num_tokens) + np.repeat(computed - query_start_loc[:-1], num_new)
        seq_lens = computed + num_new
        h["seq_lens"][:num_reqs] = seq_lens
        h["num_computed"][:num_reqs] = computed
        token_rows = np.repeat(rows, num_new)
        for g, (table, ratio) in enumerate(zip(self.kv.block_tables, self.ratios)):
            h[f"table{g}"][:num_reqs] = table[rows]
            blocks = table[token_rows, positions // self.block_size].astype(np.int64)
            slots = h[f"slots{g}"][:num_tokens]
            slots[:] = blocks * (self.block_size // ratio) + (positions % self.block_size) // ratio
            if ratio > 1:                             # only the token that closes an entry writes it
                slots[(positions + 1) % ratio != 0] = -1
        if pad_to > num_reqs:                         # decode graph padding: one token per padded row
            pad = slice(num_reqs, pad_to)
            h["input_ids"][pad] = 0
            h["positions"][pad] = 0
            h["seq_lens"][pad] = 1
            h["num_computed"][pad] = 0
            h["query_start_loc"][num_reqs:pad_to + 1] = np.arange(num_tokens, num_tokens + pad_to - num_reqs + 1)
            for g in range(len(self.kv.block_tables)):
                h[f"table{g}"][pad] = 0
                h[f"slots{g}"][pad] = -1
        samples = seq_lens == np.array([r.num_tokens for r in requests])
        logits_indices = query_start_loc[1:num_reqs + 1][samples] - 1
        h["logits_indices"][:len(logits_indices)] = logits_indices
        sampling_requests = [r for r, s in zip(requests, samples.tolist()) if s]
        return num_new, seq_lens, logits_indices, sampling_requests

    def prepare_inputs(self, batch: ScheduledBatch, pad_to: int = 0) -> tuple[torch.Tensor, ForwardContext, list]:
        """(input_ids, ctx, requests that sample) for one step; `pad_to` rows for a decode graph."""
        num_new, seq_lens, logits_indices, sampling_requests = self._fill_host(batch, pad_to)
        num_reqs = max(len(batch.requests), pad_to)
        num_tokens = int(num_new.sum()) + max(0, pad_to - len(batch.requests))
        up = self.buffers.upload
        graphed = pad_to > 0
        width = self.max_blocks if graphed else cdiv(int(seq_lens.max()), self.block_size)
        for g in range(len(self.kv.block_tables)):
            up(f"table{g}", num_reqs)
        ctx = ForwardContext(
            positions=up("positions", num_tokens),
            query_start_loc=up("query_start_loc", num_reqs + 1),
            seq_lens=up("seq_lens", num_reqs),
            num_computed=up("num_computed", num_reqs),
            logits_indices=up("logits_indices", len(logits_indices)),
            block_tables=[self.buffers.device[f"table{g}"][:num_reqs, :width] for g in range(len(self.kv.block_tables))],
            slot_mappings=[up(f"slots{g}", num_tokens) for g in range(len(self.kv.block_tables))],
            caches=self.caches,
            layer_group=self.kv.layout.layer_group,
            block_size=self.block_size,
            max_query_len=int(num_new.max()) if len(num_new) else 1,
            # a graph serves every decode batch it is replayed for: kernels must size for the worst case
            max_seq_len=self.max_blocks * self.block_size if graphed else int(seq_lens.max()),
            query_start_loc_host=self.buffers.host["query_start_loc"][:num_reqs + 1],
            seq_lens_host=self.buffers.host["seq_lens"][:num_reqs],
        )
        return up("input_ids", num_tokens), ctx, sampling_requests

    # ---- CUDA graphs ----------------------------------------------------------------------------------

    def _graph_size(self, batch: ScheduledBatch) -> int:
        if not self.graphs or batch.num_tokens != len(batch):        # graphs serve pure decode batches only
            return 0
        return next((size for size in self.graphs if size >= len(batch)), 0)

    @torch.inference_mode()
    def capture_graphs(self, sizes: list[int]) -> None:
        """Capture forward + logits for decode batches of each size, largest first, sharing one memory pool."""
        pool = None
        for size in sorted(sizes, reverse=True):
            input_ids, ctx, _ = self.prepare_inputs(ScheduledBatch(), pad_to=size)   # every row is padding
            for _ in range(2):                                    # warm up: compile kernels, settle allocator
                self.model.compute_logits(self.model(input_ids, ctx.positions, ctx))
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.model.compute_logits(self.model(input_ids, ctx.positions, ctx))
            pool = graph.pool()
            self.graphs[size] = (graph, logits)
        self.graphs = dict(sorted(self.graphs.items()))

    # ---- the step -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepOutput:
        graph_size = self._graph_size(batch)
        input_ids, ctx, sampling_requests = self.prepare_inputs(batch, pad_to=graph_size)
        # host work for the sampler before the launch, so that it overlaps the forward on the device
        sampling = SamplingBatch.from_requests(sampling_requests, self.vocab_size, self.device) \
            if sampling_requests else None
        if graph_size:
            graph, graph_logits = self.graphs[graph_size]
            graph.replay()
            logits = graph_logits[:len(batch)]
        else:
            hidden = self.model(input_ids, ctx.positions, ctx)                    # [num_tokens, hidden]
            if not sampling_requests:
                return StepOutput([], [], [])
            logits = self.model.compute_logits(hidden[ctx.logits_indices])       # [num_sampling, vocab]
        out = sample(logits[:, :self.vocab_size], sampling)
        token_ids = out.token_ids.tolist()                                         # the step's one host sync
        return StepOutput(sampling_requests, token_ids, self._logprobs(out, sampling_requests, token_ids))

    @staticmethod
    def _logprobs(out, requests: list, token_ids: list[int]) -> list[dict[int, float] | None]:
        logprobs: list[dict[int, float] | None] = [None] * len(token_ids)
        if out.top_logprobs is None:
            return logprobs
        sampled_lp = out.sampled_logprobs.tolist()
        top_lp, top_ids = out.top_logprobs.tolist(), out.top_ids.tolist()
        for row, r in enumerate(requests):
            n = r.params.logprobs
            if n is None:
                continue
            entry = {token_ids[row]: sampled_lp[row]}
            entry.update({t: lp for t, lp in zip(top_ids[row][:n], top_lp[row][:n]) if t not in entry})
            logprobs[row] = entry
        return logprobs
