"""The step from a fused QKV projection to attention, in one launch: split q/k/v, an optional per-head RMSNorm
of q and k, RoPE on q and k, and the K/V write into the paged cache. Returns the query heads; keys and
values are only ever read back from the cache.

The torch reference composes the separate ops (`rms_norm_ref`, `apply_rope`, `write_kv_ref`); the kernel
repeats each of their roundings, so in bf16 it agrees with them bit for bit except for the norm's fp32 sum
order (a rare one-unit tie)."""
from __future__ import annotations

import os

import torch

from runtime.ops.attention import QkvRope, is_fp8, kv_scales, paged_attention, paged_decode_triton, write_kv_ref
from runtime.ops.norm import rms_norm_ref
from runtime.ops.rope import RotaryEmbedding, apply_rope

try:
    import triton
    import triton.language as tl
except ImportError:                                  # the torch reference still works without Triton
    triton = None


def qkv_rope_write_kv(qkv: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, cache: torch.Tensor,
                      slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                      q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
                      eps: float = 1e-6, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [num_tokens, (heads + 2 * kv_heads) * head_dim] -> q [num_tokens, heads, head_dim] (normed, rotated);
    k (normed, rotated) and v are written to `cache` at `slot_mapping` (slot -1 writes nothing; an fp8 cache
    stores them divided by k_scale / v_scale). The norm weights are both given or both omitted. The Triton
    kernel on a GPU, the torch reference elsewhere."""
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("give both QK-norm weights or neither")
    if (qkv.is_cuda and triton is not None and os.environ.get("RUN_MODEL_TORCH_OPS") != "1"
            and rotary.rotary_dim == head_dim and (q_norm_weight is None or q_norm_weight.dtype == qkv.dtype)):
        return qkv_rope_write_kv_triton(qkv, positions, rotary.cos_sin, rotary.style, cache, slot_mapping,
                                        num_heads, num_kv_heads, head_dim, q_norm_weight, k_norm_weight, eps,
                                        k_scale, v_scale)
    return qkv_rope_write_kv_ref(qkv, positions, rotary.cos_sin, rotary.style, cache, slot_mapping,
                                 num_heads, num_kv_heads, head_dim, q_norm_weight, k_norm_weight, eps,
                                 k_scale, v_scale)


def qkv_rope_attention(qkv: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, cache: torch.Tensor,
                       block_table: torch.Tensor, slot_mapping: torch.Tensor, ctx, num_heads: int, num_kv_heads: int,
                       head_dim: int, scale: float, q_norm_weight: torch.Tensor | None = None,
                       k_norm_weight: torch.Tensor | None = None, eps: float = 1e-6, window: int | None = None,
                       sinks: torch.Tensor | None = None, softcap: float | None = None,
                       k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`paged_attention` of the queries `qkv_rope_write_kv` makes, after it wrote the keys and values: the
    attention output [num_tokens, heads, head_dim]. In a decode step on a GPU one launch does all of it (the
    decode kernel reads the projection's row itself); elsewhere the two ops run in turn."""
    if (ctx.is_decode and ctx.graph_break is None and qkv.is_cuda and triton is not None
            and os.environ.get("RUN_MODEL_TORCH_OPS") != "1" and rotary.rotary_dim == head_dim
            and head_dim >= 16 and not head_dim & (head_dim - 1) and qkv.stride(-1) == 1
            and (q_norm_weight is None or q_norm_weight.dtype == qkv.dtype)):
        fused = QkvRope(positions, rotary.cos_sin, rotary.style, slot_mapping, num_heads, q_norm_weight,
                        k_norm_weight, eps)
        return paged_decode_triton(qkv, cache, block_table, ctx.seq_lens, ctx.max_seq_len, scale, window, sinks,
                                   softcap, k_scale=k_scale, v_scale=v_scale, qkv_rope=fused)
    q = qkv_rope_write_kv(qkv, positions, rotary, cache, slot_mapping, num_heads, num_kv_heads, head_dim,
                          q_norm_weight, k_norm_weight, eps, k_scale, v_scale)
    return paged_attention(q, cache, block_table, ctx, scale, window=window, sinks=sinks, softcap=softcap,
                           k_scale=k_scale, v_scale=v_scale)


def qkv_rope_write_kv_ref(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, style: str,
                          cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
                          head_dim: int, q_norm_weight: torch.Tensor | None = None,
                          k_norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                          k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
    q = q.view(-1, num_heads, head_dim)
    k = k.view(-1, num_kv_heads, head_dim)
    v = v.view(-1, num_kv_heads, head_dim)
    if q_norm_weight is not None:
        q = rms_norm_ref(q, q_norm_weight, eps)
        k = rms_norm_ref(k, k_norm_weight, eps)
    cos, sin = cos_sin[positions].chunk(2, dim=-1)
    q, k = apply_rope(q, cos, sin, style), apply_rope(k, cos, sin, style)
    write_kv_ref(cache, k, v, slot_mapping, k_scale, v_scale)
    return q


# ---- Triton kernel ----------------------------------------------------------------------------------
# One program per token: it reads cos|sin of its position once, then handles all q heads, all k heads and
# all v heads of its row of qkv as [heads, head_dim / 2] halves. Roundings as in norm.py and rope.py (norm:
# fp32 normalize, round, weight product rounded; rope: cos/sin rounded, each product rounded, then the
# sum); compiled without FP fusion for the same reason as the RoPE kernel.

if triton is not None:
    from runtime.ops.attention import _to_cache

    @triton.jit
    def _norm_rope_heads(x_ptr, w_ptr, cos, sin, eps, num_heads,
                         HEAD_DIM: tl.constexpr, HALF: tl.constexpr, GPTJ: tl.constexpr, HAS_NORM: tl.constexpr,
                         BLOCK_HEADS: tl.constexpr):
        """(first, second, mask) halves of heads [0, num_heads) at x_ptr, normed and rotated, in x's dtype."""
        heads = tl.arange(0, BLOCK_HEADS)
        pairs = tl.arange(0, HALF)
        mask = (heads[:, None] < num_heads) & (pairs[None, :] < HALF)
        if GPTJ:
            first, second = 2 * pairs, 2 * pairs + 1
        else:
            first, second = pairs, pairs + HALF
        row = x_ptr + heads[:, None] * HEAD_DIM
        x1 = tl.load(row + first[None, :], mask=mask, other=0.0)
        x2 = tl.load(row + second[None, :], mask=mask, other=0.0)
        dtype = x1.dtype
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        if HAS_NORM:
            inv_rms = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM + eps)[:, None]
            w1 = tl.load(w_ptr + first).to(tl.float32)[None, :]
            w2 = tl.load(w_ptr + second).to(tl.float32)[None, :]
            x1 = (w1 * (x1 * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            x2 = (w2 * (x2 * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        out1 = (x1 * cos).to(dtype).to(tl.float32) - (x2 * sin).to(dtype).to(tl.float32)
        out2 = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
        return out1.to(dtype), out2.to(dtype), first, second, mask

    @triton.jit
    def _qkv_rope_write_kv_kernel(qkv_ptr, positions_ptr, cos_sin_ptr, q_norm_ptr, k_norm_ptr, q_out_ptr,
                                  cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr, num_heads, num_kv_heads, eps,
                                  stride_qkv, stride_table, stride_slot, stride_kv,
                                  HEAD_DIM: tl.constexpr, HALF: tl.constexpr, GPTJ: tl.constexpr,
                                  HAS_NORM: tl.constexpr, BLOCK_Q_HEADS: tl.constexpr,
                                  BLOCK_KV_HEADS: tl.constexpr, BLOCK_KV: tl.constexpr, IS_FP8: tl.constexpr,
                                  HAS_KV_SCALE: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        position = tl.load(positions_ptr + token).to(tl.int64)
        pairs = tl.arange(0, HALF)
        dtype = qkv_ptr.dtype.element_ty
        cos = tl.load(cos_sin_ptr + position * stride_table + pairs).to(dtype).to(tl.float32)[None, :]
        sin = tl.load(cos_sin_ptr + position * stride_table + HALF + pairs).to(dtype).to(tl.float32)[None, :]
        row = qkv_ptr + token * stride_qkv
        q1, q2, first, second, q_mask = _norm_rope_heads(row, q_norm_ptr, cos, sin, eps, num_heads,
                                                         HEAD_DIM, HALF, GPTJ, HAS_NORM, BLOCK_Q_HEADS)
        q_row = q_out_ptr + token * num_heads * HEAD_DIM + tl.arange(0, BLOCK_Q_HEADS)[:, None] * HEAD_DIM
        tl.store(q_row + first[None, :], q1, mask=q_mask)
        tl.store(q_row + second[None, :], q2, mask=q_mask)
        slot = tl.load(slot_ptr + token).to(tl.int64)
        if slot >= 0:
            k_ptr = row + num_heads * HEAD_DIM
            k1, k2, first, second, k_mask = _norm_rope_heads(k_ptr, k_norm_ptr, cos, sin, eps, num_kv_heads,
                                                             HEAD_DIM, HALF, GPTJ, HAS_NORM, BLOCK_KV_HEADS)
            cache_row = cache_ptr + slot * stride_slot
            k_dst = cache_row + tl.arange(0, BLOCK_KV_HEADS)[:, None] * HEAD_DIM
            cache_dtype = cache_ptr.dtype.element_ty
            tl.store(k_dst + first[None, :], _to_cache(k1, k_scale_ptr, cache_dtype, IS_FP8, HAS_KV_SCALE),
                     mask=k_mask)
            tl.store(k_dst + second[None, :], _to_cache(k2, k_scale_ptr, cache_dtype, IS_FP8, HAS_KV_SCALE),
                     mask=k_mask)
            offsets = tl.arange(0, BLOCK_KV)
            v_mask = offsets < num_kv_heads * HEAD_DIM
            v = tl.load(k_ptr + num_kv_heads * HEAD_DIM + offsets, mask=v_mask)
            tl.store(cache_row + stride_kv + offsets, _to_cache(v, v_scale_ptr, cache_dtype, IS_FP8, HAS_KV_SCALE),
                     mask=v_mask)


def qkv_rope_write_kv_triton(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, style: str,
                             cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
                             head_dim: int, q_norm_weight: torch.Tensor | None = None,
                             k_norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                             k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The same function as `qkv_rope_write_kv_ref` (full rotary: cos_sin [positions, head_dim])."""
    if triton is None:
        raise RuntimeError("qkv_rope_write_kv_triton needs the triton package")
    num_tokens = qkv.shape[0]
    if qkv.shape[-1] != (num_heads + 2 * num_kv_heads) * head_dim or qkv.stride(-1) != 1:
        raise ValueError(f"qkv {tuple(qkv.shape)} is not [tokens, (heads + 2 * kv_heads) * head_dim] "
                         f"with contiguous rows")
    if cos_sin.shape[-1] != head_dim or head_dim & (head_dim - 1):
        raise ValueError(f"the fused kernel needs full rotary and a power-of-two head_dim, got rotary dim "
                         f"{cos_sin.shape[-1]} and head_dim {head_dim}")
    if cache.stride(-1) != 1 or cache.stride(-2) != head_dim or cache.shape[-2:] != (num_kv_heads, head_dim):
        raise ValueError("the KV cache must be [blocks, block_size, 2, kv_heads, head_dim], contiguous in its "
                         "(kv_heads, head_dim) dims")
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q
    has_norm = q_norm_weight is not None
    k_scale, v_scale, has_scale = kv_scales(cache, k_scale, v_scale)
    _qkv_rope_write_kv_kernel[(num_tokens,)](
        qkv, positions, cos_sin, q_norm_weight if has_norm else qkv, k_norm_weight if has_norm else qkv, q,
        cache, slot_mapping, k_scale, v_scale, num_heads, num_kv_heads, eps, qkv.stride(0), cos_sin.stride(0),
        cache.stride(1), cache.stride(2), HEAD_DIM=head_dim, HALF=head_dim // 2, GPTJ=style == "gptj", HAS_NORM=has_norm,
        BLOCK_Q_HEADS=triton.next_power_of_2(num_heads), BLOCK_KV_HEADS=triton.next_power_of_2(num_kv_heads),
        BLOCK_KV=triton.next_power_of_2(num_kv_heads * head_dim), IS_FP8=is_fp8(cache.dtype),
        HAS_KV_SCALE=has_scale, num_warps=4, enable_fp_fusion=False)
    return q
