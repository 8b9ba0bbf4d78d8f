"""The compressors (CSA: ratio 4, overlapping windows; HCA: ratio 128) and the lightning indexer.

A compressor turns every `ratio` token positions into one cache entry: a per-channel softmax over the tokens'
gate logits (plus a learned bias per position in the window) weights their projected values. CSA entries
overlap: entry w mixes the first half-projection of window w-1's tokens with the second half of window w's, so
it covers 2 * ratio tokens. An entry is written when the last token of its window arrives.

Each token's (value, gate + bias) rows go to a small window group of the paged cache (the compressor state),
so an entry can be finished in a later step than its first tokens, and preemption and prefix hits need
nothing special: the state is KV like any other."""
from __future__ import annotations

import torch
from torch import nn

from runtime.forward import ForwardContext
from runtime.ops import RMSNorm
from runtime.ops.linear import Linear

from . import kernels
from .cache_ops import Fp8Entry, dequantize_entries, gather_entries, request_entries, write_entries
from .linear import DENSE, Linears, row_blocks
from .rope import TrailingRope


class Projection(Linear):
    """The layer's bf16 projections of its input, as one weight over named row blocks (`parts`: checkpoint
    module name -> rows): the compressors' value and gate projections and the indexer's head weights. One GEMV
    at decode instead of one a block; the loader fills the blocks (a concatenation at load, not a view: the
    weight is one tensor)."""

    def __init__(self, in_features: int, widths: dict[str, int]):
        super().__init__(in_features, sum(widths.values()), bias=False)
        self.parts = row_blocks(widths)

    def columns(self, y: torch.Tensor, first: str, last: str | None = None) -> torch.Tensor:
        """The output columns of parts first .. last (adjacent blocks), a view of y [n, out_features]."""
        return y[:, self.parts[first].start:self.parts[last or first].stop]


class Compressor(nn.Module):
    """Reads its value and gate projections from the layer's Projection (`wkv` / `wgate`: those rows)."""

    def __init__(self, head_dim: int, ratio: int, overlap: bool, eps: float, rope: TrailingRope):
        super().__init__()
        self.head_dim, self.ratio, self.overlap = head_dim, ratio, overlap
        self.width = (2 if overlap else 1) * head_dim
        self.ape = nn.Parameter(torch.zeros(ratio, self.width, dtype=torch.float32))   # bias per position in a window
        self.norm = RMSNorm(head_dim, eps, weight_in_fp32=True)
        self.rope = rope
        self.wkv = self.wgate = None                                              # Rows, set by the owner
        self.state_layer = self.entry_layer = -1                                  # cache layers, set by the model
        self.entry_format: Fp8Entry | None = None                                # FP8 entries, set by the model

    @property
    def window(self) -> int:
        """Token positions an entry reads: its window, and with overlap the window before."""
        return (2 if self.overlap else 1) * self.ratio

    def forward(self, projected: torch.Tensor, positions: torch.Tensor, requests: torch.Tensor,
                ctx: ForwardContext) -> None:
        """projected [num_tokens, 2 * width]: each token's value | gate projection. Store each token's state,
        and write the entries whose window closes."""
        state, state_table, state_slots = ctx.layer_cache(self.state_layer)
        cache, _, slots = ctx.layer_cache(self.entry_layer)
        if kernels.use_kernels(projected):       # every state row and every closing entry: one launch
            kernels.compress(projected, self.ape, state, state_table, state_slots, cache, slots, positions, requests,
                             ctx.query_start_loc, self.norm.weight, self.norm.eps, self.rope.inv_freq, self.ratio,
                             self.overlap, ctx.block_size, self.entry_format)
            return
        kv, gate = projected[:, :self.width], projected[:, self.width:]
        gate = gate + self.ape[positions % self.ratio].to(gate.dtype)
        write_entries(state, torch.stack([kv, gate], dim=1), state_slots)
        closing = ((positions + 1) % self.ratio == 0).nonzero().flatten()
        if not len(closing):
            return
        dtype = projected.dtype
        ends = positions[closing]                                                 # [num_entries]
        source = ends[:, None] - self.window + 1 + torch.arange(self.window, device=positions.device)
        valid = source >= 0                                                       # [num_entries, window]
        rows = gather_entries(state, state_table, requests[closing, None].expand_as(source),
                              source.clamp(min=0), ctx.block_size).to(dtype)     # [num_entries, window, 2, width]
        values, logits = rows[:, :, 0], rows[:, :, 1]
        if self.overlap:                  # previous window: first half; this window: second half
            d, r = self.head_dim, self.ratio
            values = torch.cat([values[:, :r, :d], values[:, r:, d:]], dim=1)    # [num_entries, window, head_dim]
            logits = torch.cat([logits[:, :r, :d], logits[:, r:, d:]], dim=1)
        values = values.masked_fill(~valid[..., None], 0.0)
        logits = logits.masked_fill(~valid[..., None], float("-inf"))
        weights = logits.softmax(dim=1, dtype=torch.float32).to(values.dtype)
        entries = self.norm((values * weights).sum(dim=1))                        # [num_entries, head_dim]
        entries = self.rope(entries[:, None], ends + 1 - self.ratio)[:, 0]       # at the window's first token
        write_entries(cache, entries, slots[closing], self.entry_format)


def indexer_scores_ref(q: torch.Tensor, head_weights: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                       ratio: int) -> torch.Tensor:
    """One request's queries q [query_len, heads, dim] (head_weights [query_len, heads]) against its entries
    keys [entries, dim]: sum_h w_h * relu(q_h . k) / sqrt(dim), fp32 [query_len, entries], -inf at entries not
    yet closed at the query's position."""
    scores = torch.einsum("qhd,kd->qhk", q.float(), keys.float())                # [query_len, heads, entries]
    scores = torch.relu(scores) * q.shape[-1] ** -0.5
    scores = (scores * head_weights[:, :, None]).sum(dim=1)                      # [query_len, entries]
    visible = (positions[:, None] + 1) // ratio                                   # entries closed at each query
    future = torch.arange(keys.shape[0], device=q.device)[None, :] >= visible
    return scores.masked_fill(future, float("-inf"))


class Indexer(nn.Module):
    """Scores the compressed entries for each query, `sum_h w_h * relu(q_h . k)`, and keeps the top k."""

    def __init__(self, config, rope: TrailingRope, linears: Linears = DENSE):
        super().__init__()
        self.num_heads, self.head_dim = config.index_n_heads, config.index_head_dim
        self.top_k = config.index_topk
        self.wq_b = linears(config.q_lora_rank, self.num_heads * self.head_dim)
        self.weights_proj = None                                                  # Rows, set by the owner
        self.compressor = Compressor(self.head_dim, 4, True, config.rms_norm_eps, rope)
        self.rope = rope

    @property
    def ratio(self) -> int:
        return self.compressor.ratio

    def forward(self, projected: torch.Tensor, head_weights: torch.Tensor, q_latent: torch.Tensor,
                positions: torch.Tensor, requests: torch.Tensor, ctx: ForwardContext) -> list[torch.Tensor] | torch.Tensor:
        """projected [num_tokens, 2 * width] its compressor's value | gate projections, head_weights
        [num_tokens, heads] (the layer's Projection gives both). Per request: [query_len, k'] entry indices
        each query reads, -1 = none (k' = min(k, entries)). The kernel path returns one [num_tokens,
        min(k, width)] int32 tensor instead, width being the most entries any request of the step can have
        (fixed for a captured graph)."""
        self.compressor(projected, positions, requests, ctx)
        q = self.wq_b(q_latent).view(-1, self.num_heads, self.head_dim)
        keys_cache, table, _ = ctx.layer_cache(self.compressor.entry_layer)
        if kernels.use_kernels(q):    # q's RoPE, the fp32 weights and their scale in the scoring kernel
            return self._select_kernels(q, head_weights, keys_cache, table, positions, requests, ctx)
        head_weights = head_weights.float() * self.num_heads ** -0.5
        key_format = self.compressor.entry_format
        q = self.rope(q, positions)                                               # [num_tokens, heads, head_dim]
        starts = ctx.query_start_loc_host
        selected = []
        for b in range(ctx.num_reqs):
            rows = slice(int(starts[b]), int(starts[b + 1]))
            num_entries = int(ctx.seq_lens_host[b]) // self.ratio
            keys = request_entries(keys_cache, table, b, 0, num_entries, ctx.block_size, self.ratio)
            if key_format is not None:
                keys = dequantize_entries(keys, key_format, q.dtype)
            scores = indexer_scores_ref(q[rows], head_weights[rows], keys, positions[rows], self.ratio)
            visible = (positions[rows, None] + 1) // self.ratio                  # entries closed at each query
            top = scores.topk(min(self.top_k, num_entries), dim=-1).indices
            selected.append(torch.where(top >= visible, -1, top))
        return selected

    # scores of at most this many (query, entry) pairs at once (1 GiB of fp32): long prefill chunks go in parts
    MAX_SCORES = 1 << 28

    def _select_kernels(self, q: torch.Tensor, head_weights: torch.Tensor, keys_cache: torch.Tensor,
                        table: torch.Tensor, positions: torch.Tensor, requests: torch.Tensor,
                        ctx: ForwardContext) -> torch.Tensor:
        width = ctx.max_seq_len // self.ratio
        rows = max(1, self.MAX_SCORES // max(width, 1))
        picked = []
        for start in range(0, q.shape[0], rows):
            part = slice(start, start + rows)
            scores = kernels.indexer_scores(q[part], head_weights[part], keys_cache, table, positions[part],
                                            requests[part], self.ratio, width, ctx.block_size,
                                            self.compressor.entry_format, self.num_heads ** -0.5, self.rope.inv_freq)
            picked.append(kernels.indexer_topk(scores, positions[part], self.ratio, self.top_k))
        return picked[0] if len(picked) == 1 else torch.cat(picked)
