"""ModelRunner: owns the model and its cache tensors; turns a scheduled batch into input tensors, runs the
forward, and samples. Inputs are built with numpy on the host and copied once per step."""
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
class StepInputs:
    input_ids: torch.Tensor              # [num_tokens]
    ctx: ForwardContext
    sampling_requests: list              # requests whose last scheduled token gets logits, in row order


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


class ModelRunner:
    def __init__(self, model: nn.Module, kv: KVCacheManager, caches: list[torch.Tensor], vocab_size: int,
                 device: torch.device):
        self.model = model
        self.kv = kv
        self.caches = caches
        self.vocab_size = vocab_size
        self.device = device
        self.block_size = kv.block_size
        self.ratios = [g.spec.tokens_per_entry for g in kv.groups]

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cpu":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def prepare_inputs(self, batch: ScheduledBatch) -> StepInputs:
        requests = batch.requests
        num_new = np.array(batch.num_new_tokens, dtype=np.int64)                     # [num_reqs]
        computed = np.array([r.num_computed_tokens for r in requests], dtype=np.int64)
        rows = np.array([self.kv.row(r.request_id) for r in requests], dtype=np.int64)
        query_start_loc = np.zeros(len(requests) + 1, dtype=np.int64)
        np.cumsum(num_new, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])
        token_ids: list[int] = []
        for r, start, n in zip(requests, computed.tolist(), batch.num_new_tokens):
            token_ids.extend(r.token_ids[start:start + n])
        # position of each token = computed[req] + its offset inside the request's chunk
        positions = np.arange(num_tokens, dtype=np.int64) + np.repeat(computed - query_start_loc[:-1], num_new)
        seq_lens = computed + num_new
        token_rows = np.repeat(rows, num_new)
        width = cdiv(int(seq_lens.max()), self.block_size)
        block_tables, slot_mappings = [], []
        for table, ratio in zip(self.kv.block_tables, self.ratios):
            block_tables.append(self._to_device(np.ascontiguousarray(table[rows, :width])))
            blocks = table[token_rows, positions // self.block_size].astype(np.int64)
            slots = blocks * (self.block_size // ratio) + (positions % self.block_size) // ratio
            if ratio > 1:                             # only the token that closes an entry writes it
                slots[(positions + 1) % ratio != 0] = -1
            slot_mappings.append(self._to_device(slots))
        samples = computed + num_new == np.array([r.num_tokens for r in requests])
        logits_indices = query_start_loc[1:][samples] - 1
        ctx = ForwardContext(
            positions=self._to_device(positions),
            query_start_loc=self._to_device(query_start_loc.astype(np.int32)),
            seq_lens=self._to_device(seq_lens.astype(np.int32)),
            num_computed=self._to_device(computed.astype(np.int32)),
            logits_indices=self._to_device(logits_indices),
            block_tables=block_tables,
            slot_mappings=slot_mappings,
            caches=self.caches,
            layer_group=self.kv.layout.layer_group,
            block_size=self.block_size,
            max_query_len=int(num_new.max()),
            max_seq_len=int(seq_lens.max()),
            query_start_loc_host=query_start_loc,
            seq_lens_host=seq_lens,
        )
        input_ids = self._to_device(np.array(token_ids, dtype=np.int64))
        sampling_requests = [r for r, s in zip(requests, samples.tolist()) if s]
        return StepInputs(input_ids, ctx, sampling_requests)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepOutput:
        inputs = self.prepare_inputs(batch)
        hidden = self.model(inputs.input_ids, inputs.ctx.positions, inputs.ctx)    # [num_tokens, hidden]
        if not inputs.sampling_requests:
            return StepOutput([], [], [])
        logits = self.model.compute_logits(hidden[inputs.ctx.logits_indices])      # [num_sampling, vocab]
        sampling = SamplingBatch.from_requests(inputs.sampling_requests, self.vocab_size, self.device)
        out = sample(logits[:, :self.vocab_size], sampling)
        token_ids = out.token_ids.tolist()                                           # the step's one host sync
        logprobs: list[dict[int, float] | None] = [None] * len(token_ids)
        if out.top_logprobs is not None:
            sampled_lp = out.sampled_logprobs.tolist()
            top_lp, top_ids = out.top_logprobs.tolist(), out.top_ids.tolist()
            for row, r in enumerate(inputs.sampling_requests):
                n = r.params.logprobs
                if n is None:
                    continue
                entry = {token_ids[row]: sampled_lp[row]}
                entry.update({t: lp for t, lp in zip(top_ids[row][:n], top_lp[row][:n]) if t not in entry})
                logprobs[row] = entry
        return StepOutput(inputs.sampling_requests, token_ids, logprobs)
