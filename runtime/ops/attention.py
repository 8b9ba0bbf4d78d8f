"""Paged attention: K/V live in a block-paged cache and are read through per-request block tables.

Cache layout of one layer: [num_blocks, block_size, 2, kv_heads, head_dim] (K and V of a token together).
Covers GQA, causal masking, an optional sliding window, learned sinks and logit softcapping.

The cache may be fp8 (e4m3): K and V are stored as x / scale (saturated to the e4m3 range) and read back as
stored * scale, with one fp32 scale per tensor (`k_scale`, `v_scale`, each a 1-element tensor; None = 1.0).
The kernels fold the scales into the softmax scale and the output. Prefill widens the fp8 entries to the query
dtype (everything past the load is the bf16 path); decode with 16-bit queries reads them as int32 words, widens
them to fp16 in registers and runs fp16 dots (`DecodeTiles.fp16_dot`)."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from runtime.ops.attention_cpu import paged_attention_sdpa

try:
    import triton
    import triton.language as tl
except ImportError:     # the CPU path needs no triton
    triton = None


FP8_DTYPES = (torch.float8_e4m3fn,)
FP8_MAX = 448.0                     # the largest finite e4m3fn value: stores saturate there


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """What a cache of `dtype` stores for x: x itself, or x / scale saturated to e4m3."""
    if not is_fp8(dtype):
        return x.to(dtype)
    x = x.float() if scale is None else x.float() / scale.float()
    return x.clamp(-FP8_MAX, FP8_MAX).to(dtype)


def from_cache(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Cache entries in fp32: fp8 entries times their scale."""
    if is_fp8(x.dtype) and scale is not None:
        return x.float() * scale.float()
    return x.float()


def write_kv_ref(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
                 k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """Store k, v [num_tokens, kv_heads, head_dim] at their slots; slot -1 writes nothing. Scales apply to
    an fp8 cache only."""
    flat = cache.view(-1, *cache.shape[2:])                       # [num_blocks * block_size, 2, kv_heads, head_dim]
    keep = slot_mapping >= 0
    kv = torch.stack([to_cache_dtype(k, cache.dtype, k_scale), to_cache_dtype(v, cache.dtype, v_scale)], dim=1)
    flat[slot_mapping[keep]] = kv[keep]


def paged_attention_ref(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                    query_start_loc: list[int], seq_lens: list[int], scale: float,
                    window: int | None = None, sinks: torch.Tensor | None = None,
                    softcap: float | None = None, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference. q [num_tokens, heads, head_dim] holds each request's newest tokens (the last
    `query_len` positions of its `seq_len`); returns [num_tokens, heads, head_dim] in q's dtype.

    A query at position p sees keys j <= p, and with a window only j > p - window. A sink adds one
    virtual key per head with logit sinks[h] and no value."""
    block_size = cache.shape[1]
    num_heads, kv_heads = q.shape[1], cache.shape[3]
    out = torch.empty_like(q)
    for b, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[b], query_start_loc[b + 1]
        if end == start:
            continue
        num_blocks = -(-seq_len // block_size)
        kv = cache[block_table[b, :num_blocks].long()].flatten(0, 1)[:seq_len]   # [seq_len, 2, kv_heads, head_dim]
        k = from_cache(kv[:, 0], k_scale).repeat_interleave(num_heads // kv_heads, dim=1)   # [seq_len, heads, head_dim]
        v = from_cache(kv[:, 1], v_scale).repeat_interleave(num_heads // kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), k) * scale  # [heads, query_len, seq_len]
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        visible = k_pos <= q_pos
        if window is not None:
            visible &= k_pos > q_pos - window
        scores = scores.masked_fill(~visible, float("-inf"))
        if sinks is not None:
            sink = sinks.float()[:, None, None].expand(-1, end - start, 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out


# ---- Triton kernels (CUDA path) -------------------------------------------------------------------------

def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and os.environ.get("RUN_MODEL_TORCH_OPS") != "1"


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """Store k, v [num_tokens, kv_heads, head_dim] at their slots; slot -1 writes nothing."""
    if _use_triton(k):
        write_kv_triton(cache, k, v, slot_mapping, k_scale, v_scale)
    else:
        write_kv_ref(cache, k, v, slot_mapping, k_scale, v_scale)


def paged_attention(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, ctx, scale: float,
                    window: int | None = None, sinks: torch.Tensor | None = None,
                    softcap: float | None = None, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the step's queries over the paged cache (one entry point; `ctx` is the ForwardContext).
    CUDA: the split-K decode kernel when every request brings one token, else the prefill kernel. While the
    runner captures piecewise CUDA graphs (`ctx.graph_break` set), the call is handed to it: attention runs
    between the captured pieces, with the live step's metadata. CPU: torch's fused SDPA per request (the
    reference where sinks, softcapping or an fp8 cache need it)."""
    if ctx.graph_break is not None:
        group = next((g for g, table in enumerate(ctx.block_tables) if table is block_table), None)
        if group is None:
            raise ValueError("piecewise CUDA graphs need the block table of ctx.layer_cache()")
        return ctx.graph_break(q, lambda live, out: _paged_attention(
            q[:out.shape[0]], cache, live.block_tables[group], live, scale, window, sinks, softcap, k_scale,
            v_scale, out))
    return _paged_attention(q, cache, block_table, ctx, scale, window, sinks, softcap, k_scale, v_scale)


def _paged_attention(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, ctx, scale: float,
                     window: int | None, sinks: torch.Tensor | None, softcap: float | None,
                     k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    if not _use_triton(q):
        if q.device.type == "cpu" and sinks is None and softcap is None and cache.dtype == q.dtype:
            result = paged_attention_sdpa(q, cache, block_table, ctx.query_start_loc_host, ctx.seq_lens_host,
                                          scale, window)
            return result if out is None else out.copy_(result)
        result = paged_attention_ref(q, cache, block_table, ctx.query_start_loc_host, ctx.seq_lens_host, scale,
                                     window, sinks, softcap, k_scale, v_scale)
        return result if out is None else out.copy_(result)
    if ctx.is_decode:
        return paged_decode_triton(q, cache, block_table, ctx.seq_lens, ctx.max_seq_len, scale, window, sinks,
                                   softcap, k_scale=k_scale, v_scale=v_scale, out=out)
    return paged_prefill_triton(q, cache, block_table, ctx.query_start_loc, ctx.seq_lens, ctx.max_query_len,
                                scale, window, sinks, softcap, k_scale=k_scale, v_scale=v_scale, out=out)


if triton is not None:
    @triton.jit
    def _to_cache(x, scale_ptr, dtype: tl.constexpr, IS_FP8: tl.constexpr, HAS_KV_SCALE: tl.constexpr):
        """x as the cache stores it: x / scale saturated to e4m3 in an fp8 cache (as `to_cache_dtype`)."""
        if IS_FP8:
            x = x.to(tl.float32)
            if HAS_KV_SCALE:
                x = x / tl.load(scale_ptr)
            x = tl.minimum(tl.maximum(x, -448.0), 448.0)
        return x.to(dtype)

    @triton.jit
    def _write_kv_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr, k_stride, v_stride,
                         slot_stride, kv_stride, ROW: tl.constexpr, BLOCK: tl.constexpr, IS_FP8: tl.constexpr,
                         HAS_KV_SCALE: tl.constexpr):
        token = tl.program_id(0)
        slot = tl.load(slot_ptr + token).to(tl.int64)
        if slot >= 0:
            offs = tl.arange(0, BLOCK)
            mask = offs < ROW
            dst = cache_ptr + slot * slot_stride + offs
            dtype = cache_ptr.dtype.element_ty
            k = tl.load(k_ptr + token * k_stride + offs, mask=mask)
            tl.store(dst, _to_cache(k, k_scale_ptr, dtype, IS_FP8, HAS_KV_SCALE), mask=mask)
            v = tl.load(v_ptr + token * v_stride + offs, mask=mask)
            tl.store(dst + kv_stride, _to_cache(v, v_scale_ptr, dtype, IS_FP8, HAS_KV_SCALE), mask=mask)

    @triton.jit
    def _softcapped(scores, softcap, HAS_SOFTCAP: tl.constexpr):
        if HAS_SOFTCAP:                                   # softcap * tanh(s / softcap), tanh via exp
            scores = softcap * (1.0 - 2.0 / (tl.exp(2.0 * scores / softcap) + 1.0))
        return scores

    @triton.jit
    def _e4m3_words_to_f16(words, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ASM: tl.constexpr):
        """[BLOCK_N, BLOCK_D // 4] int32 words of 4 e4m3 entries -> [BLOCK_N, BLOCK_D] fp16 (exact: fp16 holds
        every e4m3 value). ASM: the paired hardware conversion (cvt e4m3x2 -> f16x2, one instruction per two
        entries); else Triton's casts (what the interpreter runs)."""
        if ASM:
            b0, b1, b2, b3 = tl.inline_asm_elementwise(
                "{ .reg .b16 lo, hi; .reg .b32 h01, h23; mov.b32 {lo, hi}, $4; cvt.rn.f16x2.e4m3x2 h01, lo;"
                " cvt.rn.f16x2.e4m3x2 h23, hi; mov.b32 {$0, $1}, h01; mov.b32 {$2, $3}, h23; }",
                "=h,=h,=h,=h,r", [words], dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True,
                pack=1)
        else:
            b0 = (words & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32).to(tl.float16)
            b1 = ((words >> 8) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32).to(tl.float16)
            b2 = ((words >> 16) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32).to(tl.float16)
            b3 = ((words >> 24) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32).to(tl.float16)
        # byte j of word w is entry 4w + j; join's new axis is the last, so pair (0, 2) with (1, 3) to flatten
        # into the order 0, 1, 2, 3
        return tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), (BLOCK_N, BLOCK_D))

    @triton.jit
    def _page_numbers(table_row, n, hi, PAGE: tl.constexpr):
        """The cache page of each key n; keys >= hi get page 0 (and read nothing)."""
        return tl.load(table_row + n // PAGE, mask=n < hi, other=0)

    @triton.jit
    def _load_tile(cache_ptr, page, n, hi, cols, c_mask, block_stride, token_stride, kv_stride, head,
                   PAGE: tl.constexpr, WORDS: tl.constexpr):
        """K and V of keys n (in pages `page`) as [len(n), len(cols)]: int32 words of 4 fp8 entries (WORDS), else
        the entries themselves; keys >= hi read nothing."""
        row = cache_ptr + page.to(tl.int64) * block_stride + (n % PAGE) * token_stride + head
        mask = (n < hi)[:, None] & c_mask[None, :]
        if WORDS:
            k_row = row.to(tl.pointer_type(tl.int32), bitcast=True)
            v_row = (row + kv_stride).to(tl.pointer_type(tl.int32), bitcast=True)
            k = tl.load(k_row[:, None] + cols[None, :], mask=mask, other=0)
            v = tl.load(v_row[:, None] + cols[None, :], mask=mask, other=0)
        else:
            k = tl.load(row[:, None] + cols[None, :], mask=mask, other=0.0)
            v = tl.load((row + kv_stride)[:, None] + cols[None, :], mask=mask, other=0.0)
        return k, v

    @triton.jit
    def _tile_step(q, k, v, n, hi, m, l, acc, scale, softcap, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, WORDS: tl.constexpr, ASM: tl.constexpr, LAZY: tl.constexpr):
        """Fold one loaded key tile into (m, l, acc). WORDS: k, v are e4m3 words, widened to fp16 here, and q
        carries the scale in log2 units; else the entries widen to q's dtype and the scores are scaled here."""
        if WORDS:
            k = _dot_operand_fence(_e4m3_words_to_f16(k, BLOCK_N, BLOCK_D, ASM), ASM)   # [BLOCK_N, BLOCK_D]
            v = _dot_operand_fence(_e4m3_words_to_f16(v, BLOCK_N, BLOCK_D, ASM), ASM)
            scores = tl.dot(q, tl.trans(k))                                             # [BLOCK_G, BLOCK_N]
            if HAS_SOFTCAP:                                                             # in natural units
                scores = _softcapped(scores * 0.6931471805599453, softcap, HAS_SOFTCAP) * 1.4426950408889634
        else:
            k = k.to(q.dtype)
            v = v.to(q.dtype)
            scores = _softcapped(tl.dot(q, tl.trans(k)) * scale, softcap, HAS_SOFTCAP)
        return _online_softmax_step(scores, n < hi, v, m, l, acc, WORDS, LAZY)

    @triton.jit
    def _online_softmax_step(scores, n_mask, v, m, l, acc, LOG2: tl.constexpr, LAZY: tl.constexpr = False):
        """Fold one key tile into the running max m, sum l and output acc; LOG2: scores are in log2 units.
        LAZY: rescale acc only when some row's max grew (elsewhere alpha is exactly 1), which after the first
        tiles is rare; the first tile of a program always has a key, so m_new is finite from then on."""
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        if LOG2:
            p = tl.exp2(scores - m_new[:, None])
            alpha = tl.exp2(m - m_new)
        else:
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        if LAZY:
            if tl.max(m_new - m, axis=0) > 0:
                acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l, acc

    @triton.jit
    def _dot_operand_fence(x, ASM: tl.constexpr):
        """x unchanged, through a volatile move. Triton sizes a dot's operand fragments by the narrowest load
        it finds behind either operand (here the e4m3 bytes); that layout does not fit the 16-bit operands'
        shared-memory matrix loads (ldmatrix) and costs register shuffles of q and a shared-memory round trip
        of p every step. The volatile move ends that search, so the operands are laid out as 16-bit ones."""
        if ASM:
            x = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.float16, is_pure=False, pack=2)
        return x

    @triton.jit
    def _decode_kernel(q_ptr, cache_ptr, table_ptr, seq_lens_ptr, part_acc_ptr, part_ml_ptr, k_scale_ptr, v_scale_ptr,
                       q_stride_t, q_stride_h, table_stride, block_stride, token_stride, kv_stride, head_stride,
                       scale, softcap, window, num_splits,
                       GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       HAS_SOFTCAP: tl.constexpr, HAS_KV_SCALE: tl.constexpr, FP16_DOT: tl.constexpr,
                       ASM: tl.constexpr = True, AHEAD: tl.constexpr = 1, LAZY_RESCALE: tl.constexpr = False,
                       sinks_ptr=None, out_ptr=None, count_ptr=None, out_stride_t=0, out_stride_h=0,
                       FUSED_REDUCE: tl.constexpr = False, HAS_SINKS: tl.constexpr = False,
                       RED_G: tl.constexpr = 2, RED_S: tl.constexpr = 1,
                       positions_ptr=None, cos_sin_ptr=None, q_norm_ptr=None, k_norm_ptr=None, slot_ptr=None,
                       cos_sin_stride=0, eps=0.0, QKV: tl.constexpr = False, QK_NORM: tl.constexpr = False,
                       GPTJ: tl.constexpr = False, KV_FP8: tl.constexpr = False):
        """FP16_DOT (an fp8 cache, 16-bit queries): K and V are read as int32 words, widened to fp16 in
        registers and fed to fp16 dots; q carries the softmax scale (with k_scale and log2(e)), so the scores
        come out of the dot in log2 units and exp2 needs no multiply (fp16 rounds each q element by at most
        2^-11 relative or 2^-25 absolute: against e4m3 keys, |k| <= 448, under 2e-3 on any logit). Otherwise
        entries widen to q's dtype. AHEAD (1 or 2): key tiles loaded into registers ahead of the one computing,
        by hand; 0: Triton's pipeline (num_stages). LAZY_RESCALE: acc is rescaled only in steps where a row's
        running max grew.

        FUSED_REDUCE: one launch. Only the splits that hold keys run (`live` of them); with one, it writes the
        output itself; else each writes its partials and counts its arrival on the (request, KV head) counter,
        and the last to arrive adds the live splits' partials (and the sinks), writes the output and resets
        the counter (graph-safe: no host condition, no memset). Otherwise every split writes partials for
        `_decode_reduce_kernel`.

        QKV: q_ptr is the fused projection's row [heads | kv_heads | kv_heads] x head_dim: the program reads its
        query heads raw and applies the optional per-head RMSNorm (QK_NORM) and RoPE (cos|sin at the token's
        position) itself; the split holding the newest key normalizes and rotates that key, writes it and its
        value to the cache at the token's slot (slot -1 writes nothing) before it reads any key. Roundings as in
        runtime.ops.qkv's kernel."""
        req = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(seq_lens_ptr + req)
        start = 0
        if HAS_WINDOW:
            start = tl.maximum(seq_len - window, 0)
        step = BLOCK_N * (AHEAD + 1)                  # a split covers whole loop steps
        per_split = tl.maximum(tl.cdiv(tl.cdiv(seq_len - start, num_splits), step), 1) * step
        live = tl.maximum(tl.cdiv(seq_len - start, per_split), 1)     # splits that hold keys (at least one)
        if FUSED_REDUCE:
            limit = live
        else:
            limit = num_splits
        if split < limit:
            _decode_split(q_ptr, cache_ptr, table_ptr, part_acc_ptr, part_ml_ptr, k_scale_ptr, v_scale_ptr,
                          q_stride_t, q_stride_h, table_stride, block_stride, token_stride, kv_stride, head_stride,
                          scale, softcap, num_splits, req, kv_head, split, seq_len, start + split * per_split,
                          per_split, live, sinks_ptr, out_ptr, count_ptr, out_stride_t, out_stride_h,
                          positions_ptr, cos_sin_ptr, q_norm_ptr, k_norm_ptr, slot_ptr, cos_sin_stride, eps,
                          GROUP, BLOCK_G, HEAD_DIM, BLOCK_D, PAGE, BLOCK_N, HAS_SOFTCAP, HAS_KV_SCALE, FP16_DOT, ASM,
                          AHEAD, LAZY_RESCALE, FUSED_REDUCE, HAS_SINKS, RED_G, RED_S, QKV, QK_NORM, GPTJ, KV_FP8)

    @triton.jit
    def _norm_rope_rows(rows, mask, d, w_ptr, cos_row, eps, HEAD_DIM: tl.constexpr, GPTJ: tl.constexpr,
                        HAS_NORM: tl.constexpr):
        """Heads starting at `rows` ([R, 1] pointers), whole: the optional RMSNorm, then RoPE with cos|sin at
        cos_row, in the heads' dtype. Each element pairs with its rotation partner (loaded a second time), so
        the head stays one [R, BLOCK_D] tile; the roundings are those of `_norm_rope_heads` in runtime.ops.qkv
        (the sum of squares runs in another order)."""
        HALF: tl.constexpr = HEAD_DIM // 2
        if GPTJ:
            partner = d ^ 1
            pair = d // 2
            first = (d % 2) == 0
        else:
            partner = tl.where(d < HALF, d + HALF, d - HALF)
            pair = d % HALF
            first = d < HALF
        d_mask = d < HEAD_DIM
        x = tl.load(rows + d[None, :], mask=mask, other=0.0)
        dtype = x.dtype
        xf = x.to(tl.float32)
        xp = tl.load(rows + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_NORM:
            inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=1) / HEAD_DIM + eps)[:, None]
            w = tl.load(w_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
            wp = tl.load(w_ptr + partner, mask=d_mask, other=0.0).to(tl.float32)[None, :]
            xf = (w * (xf * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            xp = (wp * (xp * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        cos = tl.load(cos_row + pair, mask=d_mask, other=0.0).to(dtype).to(tl.float32)[None, :]
        sin = tl.load(cos_row + HALF + pair, mask=d_mask, other=0.0).to(dtype).to(tl.float32)[None, :]
        a = (xf * cos).to(dtype).to(tl.float32)
        b = (xp * sin).to(dtype).to(tl.float32)
        return tl.where(first[None, :], a - b, a + b).to(dtype)

    @triton.jit
    def _decode_split(q_ptr, cache_ptr, table_ptr, part_acc_ptr, part_ml_ptr, k_scale_ptr, v_scale_ptr,
                      q_stride_t, q_stride_h, table_stride, block_stride, token_stride, kv_stride, head_stride,
                      scale, softcap, num_splits, req, kv_head, split, seq_len, lo, per_split, live,
                      sinks_ptr, out_ptr, count_ptr, out_stride_t, out_stride_h,
                      positions_ptr, cos_sin_ptr, q_norm_ptr, k_norm_ptr, slot_ptr, cos_sin_stride, eps,
                      GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                      HAS_KV_SCALE: tl.constexpr, FP16_DOT: tl.constexpr, ASM: tl.constexpr, AHEAD: tl.constexpr,
                      LAZY_RESCALE: tl.constexpr, FUSED_REDUCE: tl.constexpr, HAS_SINKS: tl.constexpr,
                      RED_G: tl.constexpr, RED_S: tl.constexpr, QKV: tl.constexpr, QK_NORM: tl.constexpr,
                      GPTJ: tl.constexpr, KV_FP8: tl.constexpr):
        """One split of `_decode_kernel`: keys [lo, lo + per_split) of the request, for the query heads of one
        KV head."""
        hi = tl.minimum(lo + per_split, seq_len)
        num_heads = GROUP * tl.num_programs(1)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        heads = kv_head * GROUP + g
        g_mask = g < GROUP
        d_mask = d < HEAD_DIM
        if QKV:
            position = tl.load(positions_ptr + req).to(tl.int64)
            cos_row = cos_sin_ptr + position * cos_sin_stride
            row = q_ptr + req.to(tl.int64) * q_stride_t
            q = _norm_rope_rows(row + heads[:, None] * HEAD_DIM, g_mask[:, None] & d_mask[None, :], d, q_norm_ptr,
                                cos_row, eps, HEAD_DIM, GPTJ, QK_NORM)
            if split == live - 1:                     # the newest key is this split's: into the cache first
                slot = tl.load(slot_ptr + req).to(tl.int64)
                if slot >= 0:
                    one = tl.arange(0, 1)
                    k_row = row + (num_heads + kv_head) * HEAD_DIM + one[:, None] * 0
                    k = _norm_rope_rows(k_row, (one < 1)[:, None] & d_mask[None, :], d, k_norm_ptr, cos_row, eps,
                                        HEAD_DIM, GPTJ, QK_NORM)
                    v = tl.load(k_row + tl.num_programs(1) * HEAD_DIM + d[None, :],
                                mask=(one < 1)[:, None] & d_mask[None, :])
                    dst = (cache_ptr + (slot // PAGE) * block_stride + (slot % PAGE) * token_stride
                           + kv_head * head_stride + one[:, None] * 0 + d[None, :])
                    cache_dtype = cache_ptr.dtype.element_ty
                    mask = (one < 1)[:, None] & d_mask[None, :]
                    tl.store(dst, _to_cache(k, k_scale_ptr, cache_dtype, KV_FP8, HAS_KV_SCALE),
                             mask=mask)
                    tl.store(dst + kv_stride, _to_cache(v, v_scale_ptr, cache_dtype, KV_FP8,
                                                        HAS_KV_SCALE), mask=mask)
                tl.debug_barrier()                    # the block's stores visible to its own key loads
        else:
            q = tl.load(q_ptr + req * q_stride_t + heads[:, None] * q_stride_h + d[None, :],
                        mask=g_mask[:, None] & d_mask[None, :], other=0.0)             # [BLOCK_G, BLOCK_D]
        if HAS_KV_SCALE:                              # fp8 entries: k * k_scale folds into the softmax scale
            scale = scale * tl.load(k_scale_ptr)
        if FP16_DOT:
            q = (q.to(tl.float32) * (scale * 1.4426950408889634)).to(tl.float16)
            words = tl.arange(0, BLOCK_D // 4)
            w_mask = words < HEAD_DIM // 4
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        table_row = table_ptr + req * table_stride
        keys = tl.arange(0, BLOCK_N)
        head = kv_head * head_stride
        if FP16_DOT:
            cols = words
            c_mask = w_mask
        else:
            cols = d
            c_mask = d_mask
        if AHEAD == 0:                                # Triton's pipeline (num_stages)
            for n0 in range(lo, hi, BLOCK_N):
                n = n0 + keys
                k, v = _load_tile(cache_ptr, _page_numbers(table_row, n, hi, PAGE), n, hi, cols, c_mask,
                                  block_stride, token_stride, kv_stride, head, PAGE, FP16_DOT)
                m, l, acc = _tile_step(q, k, v, n, hi, m, l, acc, scale, softcap, BLOCK_N, BLOCK_D, HAS_SOFTCAP,
                                       FP16_DOT, ASM, LAZY_RESCALE)
        else:
            # A software pipeline by hand (run with num_stages=1): Triton's own waits for a tile's copies right
            # after issuing them. Here AHEAD tiles of K/V are in flight into registers while one computes, and
            # their page numbers load a step before them. The loop is unrolled AHEAD + 1 times so each tile keeps
            # its registers from load to use: a loop-carried copy of a tile still in flight would wait for it.
            k0, v0 = _load_tile(cache_ptr, _page_numbers(table_row, lo + keys, hi, PAGE), lo + keys, hi, cols,
                                c_mask, block_stride, token_stride, kv_stride, head, PAGE, FP16_DOT)
            if AHEAD == 1:
                p1 = _page_numbers(table_row, lo + BLOCK_N + keys, hi, PAGE)
                for n0 in range(lo, hi, 2 * BLOCK_N):
                    n = n0 + keys
                    k1, v1 = _load_tile(cache_ptr, p1, n + BLOCK_N, hi, cols, c_mask, block_stride, token_stride,
                                        kv_stride, head, PAGE, FP16_DOT)
                    p0 = _page_numbers(table_row, n + 2 * BLOCK_N, hi, PAGE)
                    m, l, acc = _tile_step(q, k0, v0, n, hi, m, l, acc, scale, softcap, BLOCK_N, BLOCK_D,
                                           HAS_SOFTCAP, FP16_DOT, ASM, LAZY_RESCALE)
                    k0, v0 = _load_tile(cache_ptr, p0, n + 2 * BLOCK_N, hi, cols, c_mask, block_stride, token_stride,
                                        kv_stride, head, PAGE, FP16_DOT)
                    p1 = _page_numbers(table_row, n + 3 * BLOCK_N, hi, PAGE)
                    m, l, acc = _tile_step(q, k1, v1, n + BLOCK_N, hi, m, l, acc, scale, softcap, BLOCK_N, BLOCK_D,
                                           HAS_SOFTCAP, FP16_DOT, ASM, LAZY_RESCALE)
            else:                                     # AHEAD == 2
                k1, v1 = _load_tile(cache_ptr, _page_numbers(table_row, lo + BLOCK_N + keys, hi, PAGE),
                                    lo + BLOCK_N + keys, hi, cols, c_mask, block_stride, token_stride, kv_stride,
                                    head, PAGE, FP16_DOT)
                p2 = _page_numbers(table_row, lo + 2 * BLOCK_N + keys, hi, PAGE)
                for n0 in range(lo, hi, 3 * BLOCK_N):
                    n = n0 + keys
                    k2, v2 = _load_tile(cache_ptr, p2, n + 2 * BLOCK_N, hi, cols, c_mask, block_stride, token_stride,
                                        kv_stride, head, PAGE, FP16_DOT)
                    p0 = _page_numbers(table_row, n + 3 * BLOCK_N, hi, PAGE)
                    m, l, acc = _tile_step(q, k0, v0, n, hi, m, l, acc, scale, softcap, BLOCK_N, BLOCK_D,
                                           HAS_SOFTCAP, FP16_DOT, ASM, LAZY_RESCALE)
                    k0, v0 = _load_tile(cache_ptr, p0, n + 3 * BLOCK_N, hi, cols, c_mask, block_stride, token_stride,
                                        kv_stride, head, PAGE, FP16_DOT)
                    p1 = _page_numbers(table_row, n + 4 * BLOCK_N, hi, PAGE)
                    m, l, acc = _tile_step(q, k1, v1, n + BLOCK_N, hi, m, l, acc, scale, softcap, BLOCK_N, BLOCK_D,
                                           HAS_SOFTCAP, FP16_DOT, ASM, LAZY_RESCALE)
                    k1, v1 = _load_tile(cache_ptr, p1, n + 4 * BLOCK_N, hi, cols, c_mask, block_stride, token_stride,
                                        kv_stride, head, PAGE, FP16_DOT)
                    p2 = _page_numbers(table_row, n + 5 * BLOCK_N, hi, PAGE)
                    m, l, acc = _tile_step(q, k2, v2, n + 2 * BLOCK_N, hi, m, l, acc, scale, softcap, BLOCK_N,
                                           BLOCK_D, HAS_SOFTCAP, FP16_DOT, ASM, LAZY_RESCALE)
        if HAS_KV_SCALE:
            acc = acc * tl.load(v_scale_ptr)
        if FP16_DOT:                                  # the reduction takes maxima in natural units
            m = m * 0.6931471805599453
        if FUSED_REDUCE:
            if live == 1:                             # the only split: finish here
                m_max = m
                if HAS_SINKS:
                    sink = tl.load(sinks_ptr + heads, mask=g_mask, other=0.0).to(tl.float32)
                    m_max = tl.maximum(m_max, sink)
                weight = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)
                denominator = weight * l
                if HAS_SINKS:
                    denominator += tl.exp(sink - m_max)
                result = acc * weight[:, None] / denominator[:, None]
                tl.store(out_ptr + req * out_stride_t + heads[:, None] * out_stride_h + d[None, :],
                         result.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
            else:
                _store_partials(part_acc_ptr, part_ml_ptr, acc, m, l, req, heads, g_mask, d, d_mask, split,
                                num_splits, num_heads, HEAD_DIM)
                tl.debug_barrier()                    # every thread's partials before the arrival
                counter = count_ptr + req * tl.num_programs(1) + kv_head
                arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
                if arrived == live - 1:
                    _reduce_splits(part_acc_ptr, part_ml_ptr, sinks_ptr, out_ptr, out_stride_t, out_stride_h,
                                   req, kv_head, live, num_splits, num_heads, d, d_mask, GROUP, HEAD_DIM, BLOCK_D,
                                   HAS_SINKS, RED_G, RED_S)
                    tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
        else:
            _store_partials(part_acc_ptr, part_ml_ptr, acc, m, l, req, heads, g_mask, d, d_mask, split, num_splits,
                            num_heads, HEAD_DIM)

    @triton.jit
    def _store_partials(part_acc_ptr, part_ml_ptr, acc, m, l, req, heads, g_mask, d, d_mask, split, num_splits,
                        num_heads, HEAD_DIM: tl.constexpr):
        out = (req * num_heads + heads) * num_splits + split
        tl.store(part_acc_ptr + out[:, None] * HEAD_DIM + d[None, :], acc, mask=g_mask[:, None] & d_mask[None, :])
        tl.store(part_ml_ptr + out * 2, m, mask=g_mask)
        tl.store(part_ml_ptr + out * 2 + 1, l, mask=g_mask)

    @triton.jit
    def _reduce_splits(part_acc_ptr, part_ml_ptr, sinks_ptr, out_ptr, out_stride_t, out_stride_h, req, kv_head, live,
                       num_splits, num_heads, d, d_mask, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_D: tl.constexpr, HAS_SINKS: tl.constexpr, RED_G: tl.constexpr, RED_S: tl.constexpr):
        """The output of one KV head's query heads from the partials of splits [0, live): the same sums as
        `_decode_reduce_kernel`, RED_S splits at a time, read past L1 (other programs wrote them)."""
        g = tl.arange(0, RED_G)
        s = tl.arange(0, RED_S)
        g_mask = g < GROUP
        heads = kv_head * GROUP + g
        base = (req * num_heads + heads) * num_splits                                    # [RED_G]
        m_max = tl.full([RED_G], float("-inf"), tl.float32)
        for s0 in range(0, live, RED_S):
            mask = g_mask[:, None] & ((s0 + s) < live)[None, :]
            m = tl.load(part_ml_ptr + (base[:, None] + s0 + s[None, :]) * 2, mask=mask, other=float("-inf"),
                        cache_modifier=".cg")
            m_max = tl.maximum(m_max, tl.max(m, axis=1))
        if HAS_SINKS:
            sink = tl.load(sinks_ptr + heads, mask=g_mask, other=0.0).to(tl.float32)
            m_max = tl.maximum(m_max, sink)
        denominator = tl.zeros([RED_G], tl.float32)
        total = tl.zeros([RED_G, BLOCK_D], tl.float32)
        for s0 in range(0, live, RED_S):
            mask = g_mask[:, None] & ((s0 + s) < live)[None, :]
            part = base[:, None] + s0 + s[None, :]                                       # [RED_G, RED_S]
            m = tl.load(part_ml_ptr + part * 2, mask=mask, other=float("-inf"), cache_modifier=".cg")
            l = tl.load(part_ml_ptr + part * 2 + 1, mask=mask, other=0.0, cache_modifier=".cg")
            weight = tl.where(m > float("-inf"), tl.exp(m - m_max[:, None]), 0.0)
            denominator += tl.sum(weight * l, axis=1)
            acc = tl.load(part_acc_ptr + (part * HEAD_DIM)[:, :, None] + d[None, None, :],
                          mask=mask[:, :, None] & d_mask[None, None, :], other=0.0, cache_modifier=".cg")
            total += tl.sum(acc * weight[:, :, None], axis=1)
        if HAS_SINKS:
            denominator += tl.exp(sink - m_max)
        result = total / denominator[:, None]
        tl.store(out_ptr + req * out_stride_t + heads[:, None] * out_stride_h + d[None, :],
                 result.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])

    @triton.jit
    def _decode_reduce_kernel(part_acc_ptr, part_ml_ptr, sinks_ptr, out_ptr, out_stride_t, out_stride_h, num_splits,
                              NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_S: tl.constexpr, HAS_SINKS: tl.constexpr):
        req = tl.program_id(0)
        head = tl.program_id(1)
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        base = (req * NUM_HEADS + head) * num_splits
        s_mask = s < num_splits
        m = tl.load(part_ml_ptr + (base + s) * 2, mask=s_mask, other=float("-inf"))
        l = tl.load(part_ml_ptr + (base + s) * 2 + 1, mask=s_mask, other=0.0)
        m_max = tl.max(m, axis=0)
        if HAS_SINKS:
            sink = tl.load(sinks_ptr + head).to(tl.float32)
            m_max = tl.maximum(m_max, sink)
        weight = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)
        denominator = tl.sum(weight * l, axis=0)
        if HAS_SINKS:
            denominator += tl.exp(sink - m_max)
        acc = tl.load(part_acc_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :],
                      mask=s_mask[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
        out = tl.sum(acc * weight[:, None], axis=0) / denominator
        tl.store(out_ptr + req * out_stride_t + head * out_stride_h + d, out.to(out_ptr.dtype.element_ty),
                 mask=d < HEAD_DIM)

    @triton.jit
    def _prefill_kernel(q_ptr, cache_ptr, table_ptr, query_start_ptr, seq_lens_ptr, sinks_ptr, out_ptr,
                        k_scale_ptr, v_scale_ptr, q_stride_t, q_stride_h, out_stride_t, out_stride_h,
                        table_stride, block_stride, token_stride, kv_stride, head_stride,
                        scale, softcap, window,
                        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
                        HAS_SINKS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KV_SCALE: tl.constexpr):
        m_block = tl.program_id(0)
        req = tl.program_id(1)
        head = tl.program_id(2)
        q_start = tl.load(query_start_ptr + req)
        q_len = tl.load(query_start_ptr + req + 1) - q_start
        if m_block * BLOCK_M < q_len:
            seq_len = tl.load(seq_lens_ptr + req)
            computed = seq_len - q_len
            rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
            row_mask = rows < q_len
            positions = computed + rows                                             # [BLOCK_M]
            d = tl.arange(0, BLOCK_D)
            d_mask = d < HEAD_DIM
            q = tl.load(q_ptr + (q_start + rows)[:, None] * q_stride_t + head * q_stride_h + d[None, :],
                        mask=row_mask[:, None] & d_mask[None, :], other=0.0)        # [BLOCK_M, BLOCK_D]
            kv_head = head // GROUP
            if HAS_KV_SCALE:                          # fp8 entries: k * k_scale folds into the softmax scale
                scale = scale * tl.load(k_scale_ptr)
            hi = tl.minimum(seq_len, computed + (m_block + 1) * BLOCK_M)
            lo = 0
            if HAS_WINDOW:
                lo = tl.maximum(computed + m_block * BLOCK_M - window + 1, 0) // BLOCK_N * BLOCK_N
            m = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            for n0 in range(lo, hi, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)
                n_mask = n < hi
                page = tl.load(table_ptr + req * table_stride + n // PAGE, mask=n_mask, other=0).to(tl.int64)
                row = cache_ptr + page * block_stride + (n % PAGE) * token_stride + kv_head * head_stride
                kv_mask = n_mask[:, None] & d_mask[None, :]
                k = tl.load(row[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
                v = tl.load(row[:, None] + kv_stride + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
                scores = tl.dot(q, tl.trans(k)) * scale                             # [BLOCK_M, BLOCK_N]
                scores = _softcapped(scores, softcap, HAS_SOFTCAP)
                visible = (n[None, :] <= positions[:, None]) & n_mask[None, :]
                if HAS_WINDOW:
                    visible = visible & (n[None, :] > positions[:, None] - window)
                scores = tl.where(visible, scores, float("-inf"))
                m_new = tl.maximum(m, tl.max(scores, axis=1))
                m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)                # rows with nothing visible yet
                p = tl.exp(scores - m_safe[:, None])
                alpha = tl.exp(m - m_safe)
                l = l * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m = m_new
            if HAS_SINKS:
                l += tl.exp(tl.load(sinks_ptr + head).to(tl.float32) - m)
            if HAS_KV_SCALE:
                acc = acc * tl.load(v_scale_ptr)
            out = acc / tl.where(row_mask, l, 1.0)[:, None]                        # padding rows: l == 0
            tl.store(out_ptr + (q_start + rows)[:, None] * out_stride_t + head * out_stride_h + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def _check_cache_layout(cache: torch.Tensor) -> None:
    if cache.stride(-1) != 1 or cache.stride(-2) != cache.shape[-1]:
        raise ValueError("the KV cache must be contiguous in its (kv_heads, head_dim) dims")


def kv_scales(cache: torch.Tensor, k_scale: torch.Tensor | None,
              v_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Kernel arguments for the scales: (k_scale, v_scale, HAS_KV_SCALE); they apply to an fp8 cache only
    (an unused pointer argument gets the cache)."""
    if is_fp8(cache.dtype) and k_scale is not None and v_scale is not None:
        return k_scale, v_scale, True
    if (k_scale is None) != (v_scale is None):
        raise ValueError("give both KV scales or neither")
    return cache, cache, False


def write_kv_triton(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
                    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    _check_cache_layout(cache)
    num_tokens, kv_heads, head_dim = k.shape
    assert k.stride(1) == head_dim and v.stride(1) == head_dim and k.stride(2) == 1 and v.stride(2) == 1
    row = kv_heads * head_dim
    k_scale, v_scale, has_scale = kv_scales(cache, k_scale, v_scale)
    _write_kv_kernel[(num_tokens,)](k, v, cache, slot_mapping, k_scale, v_scale, k.stride(0), v.stride(0),
                                    cache.stride(1), cache.stride(2), ROW=row, BLOCK=triton.next_power_of_2(row),
                                    IS_FP8=is_fp8(cache.dtype), HAS_KV_SCALE=has_scale)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count if torch.cuda.is_available() else 8


@dataclass(frozen=True, slots=True)
class DecodeTiles:
    """Launch shape of the split-K decode kernel, chosen from shapes alone (nothing is tuned inside a graph)."""
    block_n: int               # keys per loop step
    num_warps: int
    num_stages: int            # Triton's software pipelining depth of the key loop
    programs_per_sm: int       # splits are chosen so the grid covers the chip about this many times
    fp16_dot: bool = False     # an fp8 cache and 16-bit queries: entries read as words, widened to fp16 in
                               # registers, fp16 dots (q and p in fp16) rather than q's dtype
    ahead: int = 0             # key tiles loaded into registers ahead of the one computing, by hand (1 or 2,
                               # with num_stages 1); 0: Triton's pipeline of num_stages
    max_registers: int = 0     # registers per thread the compiler may use (ptxas maxnreg; 0: its choice), so
                               # programs_per_sm programs fit in the register file at once
    max_splits: int = 64
    lazy_rescale: bool = False # rescale the output accumulator only in steps where a running max grew
    fused_reduce: bool = True  # one launch: the last split of a (request, KV head) to finish adds the partials


def decode_tiles(head_dim: int, cache_dtype: torch.dtype, num_reqs: int = 1) -> DecodeTiles:
    """From the `tools/decode_kernels.py --only attention` sweep on an H200 (dim 128, 8 KV heads, contexts 4K
    and 32K): bf16 entries stream at 3.4-4.2 TB/s with 64-key steps and 4 programs per SM (2.1-2.5 TB/s with the
    earlier 32 and 2). fp8 entries (words widened in registers, tiles prefetched by hand) are fastest in the
    smallest programs, as many per SM as the register file holds (each program's loads are its only bytes in
    flight): one warp, 16 keys a step, 8 programs per SM (240-255 registers each), up to 128 splits. Two tiles
    ahead wins at 4 x 32K (98.3 us, 2.7 TB/s of fp8 bytes; 32 keys / 2 warps / one ahead / 6 per SM: 107.5); one
    ahead wins with a single request (1 x 32K 29.8 us against 31.9, 1 x 4K 8.4 against 9.9: shorter splits, whose
    two-tile prologue and 48-key rounding cost more). `num_reqs` is the launch's batch (a CUDA graph's is fixed).
    Wider heads keep the earlier shape.

    The reduction runs in the decode launch (`fused_reduce`) for bf16 entries below 8 requests: from the QKV
    output to the attention output (`tools/decode_kernels.py --only step`, 16 query / 8 KV heads of 128, the graphs' 64
    splits, H200 2026-11-30) 1 x 300 keys took 9.3 us against 10.1 with the reduce kernel, but 1 x 32K 45.2
    against 43.3 and 8 x 1024 14.2 against 13.6 (the last split's serial reduction grows with the live splits and
    no longer hides behind a launch); fp8's one-warp programs reduce too slowly (1 x 32K 48.7 against 34.7)."""
    if head_dim > 128:
        return DecodeTiles(block_n=16 if head_dim > 256 else 32, num_warps=8, num_stages=3, programs_per_sm=2,
                           fused_reduce=False)
    if is_fp8(cache_dtype):
        return DecodeTiles(block_n=16, num_warps=1, num_stages=1, programs_per_sm=8, fp16_dot=True,
                           ahead=2 if num_reqs >= 4 else 1, max_splits=128, fused_reduce=False)
    return DecodeTiles(block_n=64, num_warps=4, num_stages=3, programs_per_sm=4, fused_reduce=num_reqs < 8)


def decode_num_splits(num_reqs: int, kv_heads: int, max_seq_len: int, num_sms: int, block_n: int = 16,
                      programs_per_sm: int = 2, max_splits: int = 64) -> int:
    """Enough programs to cover the chip `programs_per_sm` times, never a split shorter than `block_n` keys."""
    wanted = max(1, (programs_per_sm * num_sms) // max(1, num_reqs * kv_heads))
    return max(1, min(wanted, max_splits, -(-max_seq_len // block_n)))


_DECODE_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}
DECODE_COUNTERS = 1 << 16        # (request, KV head) pairs a one-launch decode covers with the first counters made


def _decode_counters(device: torch.device, count: int) -> torch.Tensor | None:
    """int32 arrival counters of the one-launch decode, kept per device: zero when made, and every launch leaves
    them at zero (the last split of a (request, KV head) resets its counter), so no launch clears them. None
    while a CUDA graph is being captured before an eager call made enough of them (a zeroing captured there
    would not run before another graph's replay): the launch then takes the two-launch path. A larger set made
    later never frees the earlier one (a captured graph may still use it)."""
    kept = _DECODE_COUNTERS.setdefault(device, [])
    if not kept or kept[-1].numel() < count:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        kept.append(torch.zeros(max(count, DECODE_COUNTERS), dtype=torch.int32, device=device))
    return kept[-1]


@dataclass(frozen=True, slots=True)
class QkvRope:
    """What the decode kernel needs to take the fused QKV projection's row instead of finished queries: the
    tokens' positions and cos|sin table (full rotary: [positions, head_dim]), the RoPE style ("neox" or
    "gptj"), the optional per-head QK-norm weights (in the projection's dtype) and eps, the K/V slots and
    the number of query heads."""
    positions: torch.Tensor
    cos_sin: torch.Tensor
    style: str
    slot_mapping: torch.Tensor
    num_heads: int
    q_norm_weight: torch.Tensor | None = None
    k_norm_weight: torch.Tensor | None = None
    eps: float = 1e-6


def paged_decode_triton(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                        max_seq_len: int, scale: float, window: int | None = None, sinks: torch.Tensor | None = None,
                        softcap: float | None = None, num_splits: int | None = None,
                        k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                        out: torch.Tensor | None = None, tiles: DecodeTiles | None = None,
                        qkv_rope: QkvRope | None = None) -> torch.Tensor:
    """One query token per request: split-K over the keys, reduced in the same launch (`DecodeTiles.fused_reduce`)
    or by a second one that also adds the sink. With `qkv_rope`, q is the fused QKV projection [num_reqs,
    (heads + 2 * kv_heads) * head_dim]: the kernel applies the QK-norm and RoPE and writes the new K/V itself
    (`runtime.ops.qkv.qkv_rope_write_kv_ref` followed by attention)."""
    _check_cache_layout(cache)
    page, kv_heads, head_dim = cache.shape[1], cache.shape[3], cache.shape[4]
    num_reqs = q.shape[0]
    if qkv_rope is None:
        num_heads = q.shape[1]
        if q.shape[2] != head_dim:
            raise ValueError(f"q's head_dim {q.shape[2]} does not match the cache's {head_dim}")
    else:
        num_heads = qkv_rope.num_heads
        if q.dim() != 2 or q.shape[1] != (num_heads + 2 * kv_heads) * head_dim or q.stride(1) != 1:
            raise ValueError(f"qkv {tuple(q.shape)} is not [num_reqs, (heads + 2 * kv_heads) * head_dim], rows "
                             f"contiguous")
        if qkv_rope.cos_sin.shape[-1] != head_dim or head_dim & (head_dim - 1) or head_dim < 16:
            raise ValueError("the fused QKV decode needs full rotary and a power-of-two head_dim >= 16")
        if (qkv_rope.q_norm_weight is None) != (qkv_rope.k_norm_weight is None):
            raise ValueError("give both QK-norm weights or neither")
    group = num_heads // kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    tiles = tiles or decode_tiles(head_dim, cache.dtype, num_reqs)
    if num_splits is None:
        num_sms = _num_sms(q.device.index or 0) if q.is_cuda else 8
        num_splits = decode_num_splits(num_reqs, kv_heads, max_seq_len, num_sms, tiles.block_n,
                                       tiles.programs_per_sm, tiles.max_splits)
    counters = _decode_counters(q.device, num_reqs * kv_heads) if tiles.fused_reduce else None
    part_acc = torch.empty(num_reqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(num_reqs, num_heads, num_splits, 2, dtype=torch.float32, device=q.device)
    k_scale, v_scale, has_scale = kv_scales(cache, k_scale, v_scale)
    fp16_dot = (tiles.fp16_dot and is_fp8(cache.dtype) and q.dtype in (torch.bfloat16, torch.float16)
                and head_dim % 4 == 0)
    if out is None:
        out = q.new_empty(num_reqs, num_heads, head_dim)
    red_g = max(2, triton.next_power_of_2(group))
    red_s = max(1, min(triton.next_power_of_2(num_splits), 2048 * tiles.num_warps // (red_g * block_d)))
    if qkv_rope is not None:
        has_norm = qkv_rope.q_norm_weight is not None
        fused = dict(positions_ptr=qkv_rope.positions, cos_sin_ptr=qkv_rope.cos_sin,
                     q_norm_ptr=qkv_rope.q_norm_weight if has_norm else q,
                     k_norm_ptr=qkv_rope.k_norm_weight if has_norm else q, slot_ptr=qkv_rope.slot_mapping,
                     cos_sin_stride=qkv_rope.cos_sin.stride(0), eps=qkv_rope.eps, QKV=True, QK_NORM=has_norm,
                     GPTJ=qkv_rope.style == "gptj", KV_FP8=is_fp8(cache.dtype))
        q_strides = (q.stride(0), head_dim)
    else:
        fused = dict(positions_ptr=seq_lens, cos_sin_ptr=part_ml, q_norm_ptr=q, k_norm_ptr=q, slot_ptr=seq_lens,
                     cos_sin_stride=0, eps=0.0)
        q_strides = (q.stride(0), q.stride(1))
    _decode_kernel[(num_reqs, kv_heads, num_splits)](
        q, cache, block_table, seq_lens, part_acc, part_ml, k_scale, v_scale,
        *q_strides, block_table.stride(0), cache.stride(0), cache.stride(1), cache.stride(2),
        cache.stride(3), scale, softcap or 0.0, window or 0, num_splits,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        PAGE=page, BLOCK_N=tiles.block_n, HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
        HAS_KV_SCALE=has_scale, FP16_DOT=fp16_dot, ASM=q.is_cuda, AHEAD=tiles.ahead,
        LAZY_RESCALE=tiles.lazy_rescale,
        sinks_ptr=sinks if sinks is not None else part_ml, out_ptr=out,
        count_ptr=counters if counters is not None else seq_lens, out_stride_t=out.stride(0),
        out_stride_h=out.stride(1), FUSED_REDUCE=counters is not None, HAS_SINKS=sinks is not None,
        RED_G=red_g, RED_S=red_s, **fused,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        **({"maxnreg": tiles.max_registers} if tiles.max_registers else {}))
    if counters is None:
        _decode_reduce_kernel[(num_reqs, num_heads)](
            part_acc, part_ml, sinks if sinks is not None else part_ml, out, out.stride(0), out.stride(1),
            num_splits, NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=block_d,
            BLOCK_S=max(2, triton.next_power_of_2(num_splits)), HAS_SINKS=sinks is not None)
    return out


def paged_prefill_triton(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                         query_start_loc: torch.Tensor, seq_lens: torch.Tensor, max_query_len: int, scale: float,
                         window: int | None = None, sinks: torch.Tensor | None = None,
                         softcap: float | None = None, k_scale: torch.Tensor | None = None,
                         v_scale: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Queries of any length per request (chunked prefill, extends after prefix hits), causal."""
    _check_cache_layout(cache)
    num_heads, head_dim = q.shape[1], q.shape[2]
    page, kv_heads = cache.shape[1], cache.shape[3]
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = 64 if block_d <= 128 else 32 if block_d <= 256 else 16
    block_n = 64 if block_d <= 128 else 32
    out = torch.empty_like(q) if out is None else out
    num_reqs = seq_lens.shape[0]
    grid = (triton.cdiv(max_query_len, block_m), num_reqs, num_heads)
    k_scale, v_scale, has_scale = kv_scales(cache, k_scale, v_scale)
    _prefill_kernel[grid](
        q, cache, block_table, query_start_loc, seq_lens, sinks if sinks is not None else q, out,
        k_scale, v_scale, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        block_table.stride(0), cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3),
        scale, softcap or 0.0, window or 0,
        GROUP=num_heads // kv_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, PAGE=page, BLOCK_M=block_m,
        BLOCK_N=block_n, HAS_WINDOW=window is not None, HAS_SINKS=sinks is not None,
        HAS_SOFTCAP=softcap is not None, HAS_KV_SCALE=has_scale, num_warps=4 if block_d <= 128 else 8,
        num_stages=2)
    return out
