"""ModelRunner: owns the model and its cache tensors; turns a scheduled batch into input tensors, runs the
forward, and samples.

Inputs are built with numpy in host staging buffers (pinned on CUDA) and copied once per step, non-blocking,
into device buffers whose addresses never change. Decode batches on CUDA replay a CUDA graph captured for the
next larger batch size; the rows past the real batch are padding that writes nothing.

A step is launched without waiting for it (`launch`), and waited on later (`wait`), so that the host can
prepare the next step while the device runs this one. Tokens the host has not read yet appear in the next
batch as placeholders, filled on the device from the previous launch's sampled tokens. Host buffers come in
two slots, used by alternate steps: a step's buffers are written again only after it was waited on."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from runtime.forward import ForwardContext
from runtime.kv_cache import CacheLayout, KVCacheManager, cdiv
from runtime.request import PLACEHOLDER_TOKEN_ID
from runtime.sampler import SamplingBatch, SamplerOutput, sample
from runtime.scheduler import ScheduledBatch


@dataclass(slots=True)
class StepOutput:
    requests: list                       # the requests that sampled, in row order
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]


@dataclass(slots=True, eq=False)
class PendingStep:
    """A launched step whose sampled tokens are on their way to the host (a non-blocking copy)."""
    requests: list                       # the requests that sample, in row order
    token_ids: torch.Tensor | None       # [rows] host copy (pinned on CUDA), valid once `ready` has fired
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None   # host copies: sampled, top, top ids
    ready: torch.cuda.Event | None       # recorded after the copies; None on CPU, where nothing is deferred
    uses_penalties: bool                 # its requests need host token values to sample again
    waited: bool = False


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
    """Step inputs at fixed addresses: `host` numpy views (pinned on CUDA) and their device twins. The host
    side has NUM_SLOTS copies, one per step in flight: a step's non-blocking uploads may still be reading its
    slot while the next step is being prepared in the other. (On CPU the device twin is the host slot.)"""

    NAMES = ("input_ids", "positions", "query_start_loc", "seq_lens", "num_computed", "logits_indices",
             "placeholder_dst", "placeholder_src")
    NUM_SLOTS = 2

    def __init__(self, max_tokens: int, max_reqs: int, num_groups: int, max_blocks: int, device: torch.device):
        pin = device.type == "cuda"
        sizes = dict(input_ids=max_tokens, positions=max_tokens, query_start_loc=max_reqs + 1, seq_lens=max_reqs,
                     num_computed=max_reqs, logits_indices=max_reqs, placeholder_dst=max_reqs,
                     placeholder_src=max_reqs)
        dtypes = dict(query_start_loc=torch.int32, seq_lens=torch.int32, num_computed=torch.int32)

        def host_slot() -> dict[str, torch.Tensor]:
            tensors = {n: torch.zeros(sizes[n], dtype=dtypes.get(n, torch.int64), pin_memory=pin)
                       for n in self.NAMES}
            tensors.update({f"slots{g}": torch.zeros(max_tokens, dtype=torch.int64, pin_memory=pin)
                            for g in range(num_groups)})
            tensors.update({f"table{g}": torch.zeros(max_reqs, max_blocks, dtype=torch.int32, pin_memory=pin)
                            for g in range(num_groups)})
            return tensors

        self.slots = [host_slot() for _ in range(self.NUM_SLOTS)]
        self.slot_views = [{n: t.numpy() for n, t in tensors.items()} for tensors in self.slots]
        self.on_cuda = pin
        self.device = {n: t.to(device) for n, t in self.slots[0].items()} if pin else {}
        self.use_slot(0)

    def use_slot(self, slot: int) -> None:
        self.host_tensors, self.host = self.slots[slot], self.slot_views[slot]
        if not self.on_cuda:
            self.device = self.host_tensors

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
        on_cuda = device.type == "cuda"
        # per host slot: where the step's sampled tokens land, the event that says they have, and its step
        self.sampled_host = [torch.zeros(max_reqs, dtype=torch.int64, pin_memory=on_cuda)
                             for _ in range(InputBuffers.NUM_SLOTS)]
        self.step_ready = [torch.cuda.Event() if on_cuda else None for _ in range(InputBuffers.NUM_SLOTS)]
        self.slot_step: list[PendingStep | None] = [None] * InputBuffers.NUM_SLOTS
        self.slot = 0
        # the last launch's sampled tokens, still on the device, and each sampling request's row in them:
        # the source of the next step's placeholders
        self.last_sampled: torch.Tensor | None = None            # [rows] int64
        self.last_sample_row: dict = {}
        if use_cuda_graphs and on_cuda:
            self.capture_graphs(graph_batch_sizes(max_reqs))

    # ---- inputs ---------------------------------------------------------------------------------------

    def _fill_host(self, batch: ScheduledBatch, pad_to: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list, int]:
        """Write the step's inputs into the host buffers. Rows past the batch (graph padding) read the null
        block, write nothing (slot -1) and see one key. Placeholder tokens are listed for the device fill."""
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
        num_placeholders = self._list_placeholders(requests, query_start_loc, num_tokens)
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
        return num_new, seq_lens, logits_indices, sampling_requests, num_placeholders

    def _list_placeholders(self, requests: list, query_start_loc: np.ndarray, num_tokens: int) -> int:
        """Write where this step's placeholder tokens sit (`placeholder_dst`) and their rows in the last
        launch's sampled tokens (`placeholder_src`); returns how many there are."""
        h = self.buffers.host
        dst = np.flatnonzero(h["input_ids"][:num_tokens] == PLACEHOLDER_TOKEN_ID)
        if not len(dst):
            return 0
        owners = np.searchsorted(query_start_loc[1:], dst, side="right")          # request of each placeholder
        try:
            src = [self.last_sample_row[requests[i]] for i in owners.tolist()]
        except KeyError as missing:
            raise RuntimeError(f"request {missing.args[0].request_id} has a placeholder token that the last "
                               f"launched step did not sample") from None
        h["placeholder_dst"][:len(dst)] = dst
        h["placeholder_src"][:len(dst)] = src
        return len(dst)

    def prepare_inputs(self, batch: ScheduledBatch, pad_to: int = 0) -> tuple[torch.Tensor, ForwardContext, list]:
        """(input_ids, ctx, requests that sample) for one step; `pad_to` rows for a decode graph."""
        num_new, seq_lens, logits_indices, sampling_requests, num_placeholders = self._fill_host(batch, pad_to)
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
        input_ids = up("input_ids", num_tokens)
        if num_placeholders:
            # the last launch's tokens go straight into this step's inputs, without a trip through the host
            sampled = self.last_sampled.index_select(0, up("placeholder_src", num_placeholders))
            input_ids.index_copy_(0, up("placeholder_dst", num_placeholders), sampled)
        return input_ids, ctx, sampling_requests

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
    def launch(self, batch: ScheduledBatch) -> PendingStep:
        """Queue the batch's forward and sampling on the device and return without waiting for them.
        Every launched step must be `wait`ed on before the launch after next: that one reuses its buffers."""
        self._next_slot()
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
                return self._pending(sampling_requests, None, sampling)
            logits = self.model.compute_logits(hidden[ctx.logits_indices])       # [num_sampling, vocab]
        out = sample(logits[:, :self.vocab_size], sampling)
        return self._pending(sampling_requests, out, sampling)

    def _next_slot(self) -> None:
        self.slot = (self.slot + 1) % InputBuffers.NUM_SLOTS
        previous = self.slot_step[self.slot]
        if previous is not None and not previous.waited:
            # Only after a failed engine step, which dropped it: let its copies land before its buffers are
            # reused, and make sure nothing reads its tokens from them afterwards.
            if previous.ready is not None:
                previous.ready.synchronize()
            previous.waited = True
            previous.requests, previous.token_ids, previous.logprobs = [], None, None
        self.buffers.use_slot(self.slot)

    def _pending(self, requests: list, out: SamplerOutput | None, sampling: SamplingBatch | None) -> PendingStep:
        """Start the copies of the sampled tokens (and logprobs) to the host, and mark when they land."""
        token_ids = logprobs = None
        if out is not None:
            token_ids = self._to_host(out.token_ids, self.sampled_host[self.slot][:len(requests)])
            if out.top_logprobs is not None:
                logprobs = tuple(self._to_host(t) for t in (out.sampled_logprobs, out.top_logprobs, out.top_ids))
        ready = self.step_ready[self.slot]
        if ready is not None:
            ready.record()
        self.last_sampled = out.token_ids if out is not None else None
        self.last_sample_row = {request: row for row, request in enumerate(requests)}
        step = PendingStep(requests, token_ids, logprobs, ready,
                           uses_penalties=sampling is not None and sampling.penalties is not None)
        self.slot_step[self.slot] = step
        return step

    def _to_host(self, tensor: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """A non-blocking device -> pinned host copy (the tensor itself on CPU)."""
        if self.device.type != "cuda":
            return tensor
        if into is None:
            into = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return into.copy_(tensor, non_blocking=True)

    def wait(self, step: PendingStep) -> StepOutput:
        """Block until the step's tokens are on the host: the one host sync per step."""
        if step.ready is not None:
            step.ready.synchronize()
        step.waited = True
        if step.token_ids is None:
            return StepOutput([], [], [])
        token_ids = step.token_ids.tolist()
        return StepOutput(step.requests, token_ids, self._logprobs(step.logprobs, step.requests, token_ids))

    @staticmethod
    def _logprobs(host: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, requests: list,
                  token_ids: list[int]) -> list[dict[int, float] | None]:
        logprobs: list[dict[int, float] | None] = [None] * len(token_ids)
        if host is None:
            return logprobs
        sampled_lp, top_lp, top_ids = (t.tolist() for t in host)
        for row, r in enumerate(requests):
            n = r.params.logprobs
            if n is None:
                continue
            entry = {token_ids[row]: sampled_lp[row]}
            entry.update({t: lp for t, lp in zip(top_ids[row][:n], top_lp[row][:n]) if t not in entry})
            logprobs[row] = entry
        return logprobs
