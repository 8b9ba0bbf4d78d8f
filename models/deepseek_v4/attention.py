"""DeepSeek V4 attention: one K=V head of dim 512 shared by all query heads, attended over a 128-token window
plus (CSA) the compressed entries the indexer picks or (HCA) every complete compressed entry, with a learned
sink per head; partial interleaved RoPE, undone on the output; q through a low-rank latent; a grouped
low-rank output projection."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from runtime.forward import ForwardContext
from runtime.ops import RMSNorm
from runtime.parallel import SINGLE, ParallelContext

from . import kernels
from .cache_ops import Fp8Entry, dequantize_entries, request_entries, write_entries
from .compressor import Compressor, Indexer, Projection
from .config import AttentionKind
from .linear import DENSE, Fp8Rows, Linears, Rows
from .streams import side_stream
from .rope import TrailingRope


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def window_sparse_attention(q: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext, window_layer: int,
                            window: int, entry_layer: int | None, ratio: int, selected: list[torch.Tensor] | None,
                            sinks: torch.Tensor, scale: float, window_format: Fp8Entry | None = None,
                            entry_format: Fp8Entry | None = None) -> torch.Tensor:
    """Torch reference. q [num_tokens, heads, dim]; a query at position p reads the window entries
    (p - window, p] and compressed entries: those in `selected` (per request [query_len, k], -1 = none), else
    every entry closed by p. One softmax over both and the sink; values are the keys. -> [num_tokens, heads, dim].
    A cache with a format holds FP8 entries, dequantized as they are read."""
    window_cache, window_table, _ = ctx.layer_cache(window_layer)
    out = torch.empty_like(q)
    starts = ctx.query_start_loc_host
    for b in range(ctx.num_reqs):
        rows = slice(int(starts[b]), int(starts[b + 1]))
        if rows.start == rows.stop:
            continue
        seq_len = int(ctx.seq_lens_host[b])
        p = positions[rows, None]                                                 # [query_len, 1]
        first = max(0, int(positions[rows.start]) - window + 1)
        keys = request_entries(window_cache, window_table, b, first, seq_len, ctx.block_size)
        if window_format is not None:
            keys = dequantize_entries(keys, window_format, q.dtype)             # [n, dim]
        key_pos = torch.arange(first, seq_len, device=q.device)[None, :]
        visible = (key_pos <= p) & (key_pos > p - window)                         # [query_len, n]
        if entry_layer is not None:
            cache, table, _ = ctx.layer_cache(entry_layer)
            num_entries = seq_len // ratio
            entries = request_entries(cache, table, b, 0, num_entries, ctx.block_size, ratio)
            if entry_format is not None:
                entries = dequantize_entries(entries, entry_format, q.dtype)
            if selected is not None:
                picked = torch.zeros(p.shape[0], num_entries + 1, dtype=torch.bool, device=q.device)
                picked.scatter_(1, torch.where(selected[b] >= 0, selected[b], num_entries), True)
                entry_visible = picked[:, :num_entries]
            else:
                entry_visible = torch.arange(num_entries, device=q.device)[None, :] < (p + 1) // ratio
            keys = torch.cat([keys, entries])
            visible = torch.cat([visible, entry_visible], dim=1)
        scores = torch.einsum("qhd,kd->hqk", q[rows], keys.to(q.dtype)) * scale  # [heads, query_len, keys]
        scores = scores.masked_fill(~visible, float("-inf"))
        sink = sinks.to(scores.dtype)[:, None, None].expand(-1, scores.shape[1], 1)
        logits = torch.cat([scores, sink], dim=-1)
        probs = torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]
        out[rows] = torch.einsum("hqk,kd->qhd", probs, keys.to(q.dtype))
    return out


class DeepseekV4Attention(nn.Module):
    """With tensor parallelism a rank keeps its share of the query heads (with their sinks) and of the output
    groups; the single K=V head, the compressors and the indexer are replicated; wo_b sums the shards."""

    def __init__(self, config, kind: AttentionKind, rope: TrailingRope, parallel: ParallelContext = SINGLE,
                 linears: Linears = DENSE):
        super().__init__()
        self.kind = kind
        self.num_heads = parallel.split(config.num_attention_heads, "the number of attention heads")
        self.head_dim = config.head_dim
        self.window = config.sliding_window
        self.eps = config.rms_norm_eps
        self.o_groups, self.o_rank = parallel.split(config.o_groups, "o_groups"), config.o_lora_rank
        hidden = config.hidden_size
        # q's latent and the K=V head, both of x: one FP8 weight (one GEMV launch) where both are FP8
        self.wq_a_kv = linears.stacked(hidden, {"wq_a": config.q_lora_rank, "wkv": self.head_dim})
        if self.wq_a_kv is not None:
            self.wq_a, self.wkv = Fp8Rows(self.wq_a_kv, "wq_a"), Fp8Rows(self.wq_a_kv, "wkv")
        else:
            self.wq_a = linears(hidden, config.q_lora_rank)
            self.wkv = linears(hidden, self.head_dim)
        self.q_norm = RMSNorm(config.q_lora_rank, self.eps, weight_in_fp32=True)
        self.wq_b = linears(config.q_lora_rank, self.num_heads * self.head_dim)
        self.kv_norm = RMSNorm(self.head_dim, self.eps, weight_in_fp32=True)
        # block-diagonal: group g maps its heads' outputs [(heads / groups) * head_dim] to o_rank
        self.wo_a = linears(self.num_heads * self.head_dim // self.o_groups, self.o_groups * self.o_rank, self.o_groups)
        self.wo_b = linears.row_parallel(config.o_groups * self.o_rank, hidden, parallel)
        self.attn_sink = nn.Parameter(torch.zeros(self.num_heads, dtype=torch.float32))
        self.rope = rope
        self.compressor = Compressor(self.head_dim, kind.ratio, kind.sparse, self.eps, rope) \
            if kind.compressed else None
        self.indexer = Indexer(config, rope, linears) if kind.sparse else None
        self.wx = self._projection(hidden)
        self.window_layer = -1                                                    # cache layer, set by the model
        self.window_format: Fp8Entry | None = None                              # FP8 window entries, set by the model

    def _projection(self, hidden: int) -> Projection | None:
        """The bf16 projections of x (compressors' value and gate, the indexer's head weights) as one weight."""
        widths = {}
        if self.compressor is not None:
            widths.update({"compressor.wkv": self.compressor.width, "compressor.wgate": self.compressor.width})
        if self.indexer is not None:
            width = self.indexer.compressor.width
            widths.update({"indexer.compressor.wkv": width, "indexer.compressor.wgate": width,
                           "indexer.weights_proj": self.indexer.num_heads})
        if not widths:
            return None
        projection = Projection(hidden, widths)
        for name in widths:                                   # the checkpoint's modules: their rows
            owner, attribute = name.rsplit(".", 1)
            setattr(self.get_submodule(owner), attribute, Rows(projection, name))
        return projection

    def forward(self, x: torch.Tensor, positions: torch.Tensor, requests: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        fast = kernels.use_kernels(x)
        # On a GPU the compressed branch (the bf16 projection of x, the compressors, the indexer) runs on a side
        # stream beside the q path (wq_a / wkv, K's insert, wq_b): it reads x, and the indexer q's normed
        # latent (the side stream waits for it there); the attention waits for the side stream. Tensors the side
        # stream reads stay referenced until then; its outputs are reused only by it after a later wait.
        side = side_stream(x) if fast and self.wx is not None else None
        current = torch.cuda.current_stream(x.device) if side is not None else None
        if side is not None:
            side.wait_stream(current)
        entry_layer, selected = None, None
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            projected = self.wx(x) if self.wx is not None else None              # [num_tokens, parts]
            if self.compressor is not None:
                self.compressor(self.wx.columns(projected, "compressor.wkv", "compressor.wgate"), positions, requests,
                                ctx)
                entry_layer = self.compressor.entry_layer
        if self.wq_a_kv is not None:
            both = self.wq_a_kv(x)                                    # [num_tokens, q_lora_rank + head_dim]
            q_latent, kv = self.wq_a_kv.columns(both, "wq_a"), self.wq_a_kv.columns(both, "wkv")
        else:
            q_latent, kv = self.wq_a(x), self.wkv(x)                  # [num_tokens, q_lora_rank], [.., head_dim]
        kv = kv[:, None]                                                          # [num_tokens, 1, head_dim]
        cache, _, slots = ctx.layer_cache(self.window_layer)
        if fast:      # one launch: K's norm + RoPE + window insert, and q's latent norm
            q_latent = kernels.norm_rope(kv, positions, self.rope.inv_freq, eps=self.kv_norm.eps, cache=cache,
                                         slots=slots, fmt=self.window_format, weight=self.kv_norm.weight,
                                         latent=(q_latent, self.q_norm))
        else:
            q_latent = self.q_norm(q_latent)
        if self.indexer is not None:
            if side is not None:
                side.wait_stream(current)                             # q_latent
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                selected = self.indexer(self.wx.columns(projected, "indexer.compressor.wkv",
                                                        "indexer.compressor.wgate"),
                                        self.wx.columns(projected, "indexer.weights_proj"), q_latent, positions,
                                        requests, ctx)
        q = self.wq_b(q_latent).view(-1, self.num_heads, self.head_dim)          # normed and rotated in attention
        if not fast:
            kv = self.kv_norm(kv)
            q = self.rope(unweighted_rms_norm(q, self.eps), positions)            # [num_tokens, heads, head_dim]
            write_entries(cache, self.rope(kv, positions)[:, 0], slots, self.window_format)
        if side is not None:
            current.wait_stream(side)
        if fast:              # q's norm + RoPE as the attention loads it, the inverse RoPE in its split reduction
            out = self._attend_kernels(q, positions, requests, ctx, entry_layer, selected)
        else:
            out = window_sparse_attention(q, positions, ctx, self.window_layer, self.window, entry_layer,
                                          self.kind.ratio, selected, self.attn_sink, self.head_dim ** -0.5,
                                          self.window_format, self._entry_format)
            out = self.rope(out, positions, inverse=True)
        low_rank = self.wo_a(out.flatten(1))                                      # [num_tokens, groups * o_rank]
        return self.wo_b(low_rank)

    @property
    def _entry_format(self) -> Fp8Entry | None:
        return self.compressor.entry_format if self.compressor is not None else None

    def _attend_kernels(self, q: torch.Tensor, positions: torch.Tensor, requests: torch.Tensor,
                        ctx: ForwardContext, entry_layer: int | None, selected: torch.Tensor | None) -> torch.Tensor:
        window_cache, window_table, _ = ctx.layer_cache(self.window_layer)
        entry_cache = entry_table = None
        if entry_layer is not None:
            entry_cache, entry_table, _ = ctx.layer_cache(entry_layer)
        ratio = self.kind.ratio
        return kernels.sparse_attention(q, positions, requests, window_cache, window_table, self.window,
                                        entry_cache, entry_table, ratio, selected, self.attn_sink,
                                        self.head_dim ** -0.5, ctx.block_size,
                                        ctx.max_seq_len // ratio if ratio else 0, self.window_format,
                                        self._entry_format, self.rope.inv_freq, self.rope.inv_freq, self.eps)
