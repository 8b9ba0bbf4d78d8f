"""ForwardContext: the per-step tensors a model reads. Built by the runner, passed explicitly (no globals)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


@dataclass(slots=True)
class ForwardContext:
    positions: torch.Tensor              # [num_tokens] int64
    query_start_loc: torch.Tensor        # [num_reqs + 1] int32
    seq_lens: torch.Tensor               # [num_reqs] int32, tokens in the cache after this step
    num_computed: torch.Tensor           # [num_reqs] int32, tokens in the cache before this step
    logits_indices: torch.Tensor         # [num_logits] int64, rows of hidden_states that need logits
    block_tables: list[torch.Tensor]     # per cache group: [num_reqs, max_blocks] int32
    slot_mappings: list[torch.Tensor]    # per cache group: [num_tokens] int64 entry slot, -1 = write nothing
    caches: list[torch.Tensor]           # per layer (cache_specs order): [num_blocks, entries_per_block, *entry]
    layer_group: list[int]               # per layer: index into block_tables / slot_mappings
    block_size: int
    max_query_len: int
    max_seq_len: int
    query_start_loc_host: np.ndarray     # host copies, for reference ops and kernel launch choices
    seq_lens_host: np.ndarray
    # Set only while the runner captures piecewise CUDA graphs: graph_break(q, attend) ends the current
    # piece and returns the fixed buffer that attend(live_ctx, out) fills on every replay, between pieces.
    graph_break: Callable[[torch.Tensor, Callable], torch.Tensor] | None = None

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def is_decode(self) -> bool:
        """Every request brings exactly one new token (the case CUDA graphs capture)."""
        return self.max_query_len == 1

    def layer_cache(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cache, block_table, slot_mapping) of one layer, by its index in the model's cache_specs()."""
        group = self.layer_group[layer]
        return self.caches[layer], self.block_tables[group], self.slot_mappings[group]
