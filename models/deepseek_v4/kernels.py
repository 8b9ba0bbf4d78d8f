"""Triton kernels of DeepSeek V4's attention path (the CUDA path). Each computes the same function as a torch
reference beside it in the package, and reads the batch layout only from device tensors, so a step that uses
them can be captured in a CUDA graph:

- `store_rows`: rows into a paged cache at slot indices, -1 skipped (reference: cache_ops.write_entries);
- `compress`: every token's compressor state row (value, gate + window bias), and at every token that closes an
  entry its window's rows gathered, softmax per channel, summed, RMSNorm, RoPE at the window's first position,
  stored (reference: Compressor.forward);
- `indexer_scores` + `indexer_topk`: `sum_h w_h relu(q_h . k)` over each query's closed compressed keys (q
  rotated as it is loaded), then a top-k over a fixed width (reference: Indexer.forward);
- `sparse_attention`: one softmax over the window, the selected (CSA) or all closed (HCA) compressed entries
  and the sink, one K=V head shared by all query heads, optionally split along the keys for small batches; q's
  head norm + RoPE as it is loaded, the output's inverse RoPE in the split reduction (reference:
  attention.window_sparse_attention);
- `norm_rope`: a per-head RMS norm + RoPE (q's, outside the decode path), K's norm + RoPE + window insert with
  the q latent's RMSNorm in the same launch, the output's inverse RoPE (references:
  attention.unweighted_rms_norm, RMSNorm, rope.TrailingRope);
- `hc_pre` / `hc_post`: mHC's connection weights with Sinkhorn and the collapse, and the streams' update, the
  sublayer's output optionally given as two parts to add (reference: mhc.HyperConnection).

Every program works unconditionally from its token's position: nothing is skipped on the host, no length is
read there, and a padded row (position < 0, or slot -1) reads nothing past its own start and writes nothing.
Where the reference rounds to the activation dtype between ops (bf16), the kernels round at the same
places (`ROUND`)."""
from __future__ import annotations

import os

import torch

from .cache_ops import Fp8Entry

try:
    import triton
    import triton.language as tl
except ImportError:     # the CPU path needs no triton
    triton = None


def use_kernels(x: torch.Tensor) -> bool:
    """The kernels on a GPU (the CUDA-graph path), the torch references elsewhere or with
    RUN_MODEL_TORCH_OPS=1. Tests patch this to run the kernels in Triton's interpreter on the CPU."""
    return x.is_cuda and triton is not None and os.environ.get("RUN_MODEL_TORCH_OPS") != "1"


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ---- rows into a paged cache --------------------------------------------------------------------------

if triton is not None:
    @triton.jit
    def _store_rows_kernel(src_ptr, cache_ptr, slots_ptr, src_stride, ROW: tl.constexpr, BLOCK: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        slot = tl.load(slots_ptr + token).to(tl.int64)
        if slot >= 0:
            offs = chunk * BLOCK + tl.arange(0, BLOCK)
            mask = offs < ROW
            row = tl.load(src_ptr + token * src_stride + offs, mask=mask)
            tl.store(cache_ptr + slot * ROW + offs, row.to(cache_ptr.dtype.element_ty), mask=mask)


def store_rows(cache: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> None:
    """cache [blocks, entries_per_block, *entry]; rows [n, *entry] (any dtype, each row contiguous);
    slots [n] flat entry index, -1 writes nothing."""
    n = rows.shape[0]
    if n == 0:
        return
    rows = rows.reshape(n, -1)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    row = rows.shape[1]
    block = min(1024, _pow2(row))
    _store_rows_kernel[(n, triton.cdiv(row, block))](rows, cache, slots, rows.stride(0), ROW=row, BLOCK=block)


# ---- FP8 cache entries (the layout of cache_ops.Fp8Entry) -----------------------------------------------

def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _fp8_layout(fmt: Fp8Entry | None, dim: int) -> dict:
    """The constants the kernels read an entry layout from: bf16 / fp32 rows of `dim` without `fmt`."""
    if fmt is None:
        return dict(NOPE=dim, QBLOCK=dim, NUM_SCALES=1, SCALES_AT=dim, ENTRY=dim)
    if fmt.dim != dim:
        raise ValueError(f"an FP8 entry of {fmt.dim} dims for rows of {dim}")
    return dict(NOPE=fmt.nope, QBLOCK=fmt.block, NUM_SCALES=fmt.num_scales, SCALES_AT=fmt.scales_at,
                ENTRY=fmt.num_bytes)


def _fp8_groups(layout: dict, dim: int) -> dict:
    """The tiles sparse attention reads an FP8 entry in: GROUPS scale groups of GROUP_D e4m3 dims, TAIL_D bf16
    dims (each at least 16 wide, a dot's smallest; the dims past the entry's masked)."""
    return dict(GROUPS=_pow2(layout["NUM_SCALES"]), GROUP_D=max(16, _pow2(min(layout["QBLOCK"], layout["NOPE"]))),
                TAIL_D=max(16, _pow2(dim - layout["NOPE"])))


if triton is not None:
    @triton.jit
    def _e4m3_round(v):
        """v (|v| <= 448) rounded to the nearest e4m3 number, ties to even, by fp32 adds: at |v| the spacing is
        2^s, s = max(exponent, -6) - 3, and adding then subtracting 1.5 * 2^(23 + s) rounds to it. The cast to
        e4m3 after is then exact (Triton's interpreter rounds that cast wrongly; the GPU agrees with this)."""
        a = tl.abs(v)
        step = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6) - 3
        magic = (((step + 150) << 23) | 0x400000).to(tl.float32, bitcast=True)
        r = (a + magic) - magic
        return tl.where(v < 0, -r, r)

    @triton.jit
    def _bf16_round(v):
        """v rounded to bf16 (to nearest, ties to even) and kept in fp32, on its bits: the interpreter's own
        cast truncates."""
        bits = v.to(tl.int32, bitcast=True)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)

    @triton.jit
    def _scale_exponent(amax):
        """cache_ops.scale_exponents from the float's bits: the smallest k with amax / 2^k <= 448 (amax
        floored at 2^-64). amax = 1.f * 2^(E - 127); 448 = 1.75 * 2^8."""
        bits = tl.maximum(amax, 5.421010862427522e-20).to(tl.int32, bitcast=True)
        return ((bits >> 23) & 0xFF) - 135 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)

    @triton.jit
    def _store_fp8_entries(dst, even, odd, i, mask, row_mask, NOPE: tl.constexpr, QBLOCK: tl.constexpr,
                           NUM_SCALES: tl.constexpr, SCALES_AT: tl.constexpr):
        """Entries given as channel pairs (even, odd) fp32 [rows, pairs] (pair index i [pairs]) stored at their
        entries' first bytes dst [rows, 1] (an e4m3 pointer): the first NOPE channels in e4m3 with a UE8M0 scale
        per QBLOCK of them, the rest in bf16, then the scales (cache_ops.quantize_entries)."""
        is_fp8 = mask & (2 * i < NOPE)[None, :]
        magnitude = tl.where(is_fp8, tl.maximum(tl.abs(even), tl.abs(odd)), 0.0)
        group = ((2 * i) // QBLOCK)[None, :]
        scale_bytes = dst.to(tl.pointer_type(tl.uint8)) + SCALES_AT
        inverse = tl.zeros_like(even)
        for b in tl.static_range(NUM_SCALES):
            k = _scale_exponent(tl.max(tl.where(group == b, magnitude, 0.0), axis=1))[:, None]   # [rows, 1]
            tl.store(scale_bytes + b, (k + 127).to(tl.uint8), mask=row_mask)
            inverse = tl.where(group == b, ((127 - k) << 23).to(tl.float32, bitcast=True), inverse)
        fp8 = dst.dtype.element_ty
        tl.store(dst + 2 * i[None, :], _e4m3_round(even * inverse).to(fp8), mask=is_fp8)
        tl.store(dst + 2 * i[None, :] + 1, _e4m3_round(odd * inverse).to(fp8), mask=is_fp8)
        tail = (dst + NOPE).to(tl.pointer_type(tl.bfloat16))
        j = tl.maximum(2 * i - NOPE, 0)[None, :]
        is_tail = mask & (2 * i >= NOPE)[None, :]
        tl.store(tail + j, _bf16_round(even).to(tl.bfloat16), mask=is_tail)
        tl.store(tail + j + 1, _bf16_round(odd).to(tl.bfloat16), mask=is_tail)

    @triton.jit
    def _load_entries(cache_ptr, rows, d, mask, FP8: tl.constexpr, NOPE: tl.constexpr, QBLOCK: tl.constexpr,
                      SCALES_AT: tl.constexpr, ENTRY: tl.constexpr, OUT: tl.constexpr):
        """Entries at rows [n] of a cache, channels d [dims] -> [n, dims] in OUT (masked: 0). FP8: dequantized
        exactly (cache_ops.dequantize_entries); else the cache's rows of ENTRY values as stored."""
        if FP8:
            # an entry starts only ENTRY & -ENTRY bytes aligned (584: 8, 132: 4): say so, or Triton may infer
            # more from how `rows` was formed (a run of entry indices) and issue misaligned vector loads
            base = cache_ptr + tl.multiple_of(rows[:, None] * ENTRY, [ENTRY & -ENTRY, ENTRY & -ENTRY])   # [n, 1]
            is_fp8 = (d < NOPE)[None, :]
            values = tl.load(base + d[None, :], mask=mask & is_fp8, other=0.0).to(tl.float32)
            exponent = tl.load(base.to(tl.pointer_type(tl.uint8)) + SCALES_AT + (d // QBLOCK)[None, :],
                               mask=mask & is_fp8, other=127).to(tl.int32)
            tail = tl.load((base + NOPE).to(tl.pointer_type(tl.bfloat16)) + tl.maximum(d - NOPE, 0)[None, :],
                           mask=mask & ~is_fp8, other=0.0).to(tl.float32)
            out = tl.where(is_fp8, values * (exponent << 23).to(tl.float32, bitcast=True), tail).to(OUT)
        else:
            out = tl.load(cache_ptr + rows[:, None] * ENTRY + d[None, :], mask=mask, other=0.0)
        return out


if triton is not None:
    @triton.jit
    def _rope_pairs(even, odd, i, position, inv_freq_ptr, HALF: tl.constexpr, ROPE_HALF: tl.constexpr,
                    INVERSE: tl.constexpr, ROUND: tl.constexpr, dtype: tl.constexpr):
        """Interleaved RoPE on channel pairs (even, odd) [rows, pairs] (pair index i [pairs]) at `position`,
        the trailing ROPE_HALF pairs of HALF rotated (by -position with INVERSE), rounding as rope.TrailingRope
        does in the dtype."""
        freq = i - (HALF - ROPE_HALF)
        is_rope = (freq >= 0) & (i < HALF)
        inv_freq = tl.load(inv_freq_ptr + tl.maximum(freq, 0), mask=is_rope, other=0.0)
        angle = position.to(tl.float32) * inv_freq
        cos = _rounded(tl.cos(angle), ROUND, dtype)[None, :]
        sin = _rounded(tl.sin(angle), ROUND, dtype)[None, :]
        if INVERSE:
            sin = -sin
        r_even = _rounded(_rounded(even * cos, ROUND, dtype) - _rounded(odd * sin, ROUND, dtype), ROUND, dtype)
        r_odd = _rounded(_rounded(odd * cos, ROUND, dtype) + _rounded(even * sin, ROUND, dtype), ROUND, dtype)
        return tl.where(is_rope[None, :], r_even, even), tl.where(is_rope[None, :], r_odd, odd)

    @triton.jit
    def _unweighted_rms(squares, size, eps, ROUND: tl.constexpr, dtype: tl.constexpr):
        """attention.unweighted_rms_norm's factor from a row's sum of squares: rsqrt(mean + eps) in the dtype."""
        return _rounded(tl.rsqrt(squares / size + eps), ROUND, dtype)

    @triton.jit
    def _rope_in_place(x, rows, d, mask, position, inv_freq_ptr, rms, DIM: tl.constexpr, ROPE_HALF: tl.constexpr,
                       NORMALIZE: tl.constexpr, ROUND: tl.constexpr):
        """x [rows, dims] (loaded from rows[:, None] + d[None, :], dims in order) with interleaved RoPE at
        `position` on the trailing 2 * ROPE_HALF of DIM dims, as _rope_pairs rounds it: each dim's partner
        (d ^ 1) is loaded again rather than shuffled in. With NORMALIZE, x and the partners are first
        multiplied by rms [rows] (_unweighted_rms) and rounded, as norm_rope(normalize=True) does. -> x's
        dtype."""
        dtype = x.dtype
        value = x.to(tl.float32)
        partner = tl.load(rows + (d ^ 1)[None, :], mask=mask, other=0.0).to(tl.float32)
        if NORMALIZE:
            value = _rounded(value * rms[:, None], ROUND, dtype)
            partner = _rounded(partner * rms[:, None], ROUND, dtype)
        freq = d // 2 - (DIM // 2 - ROPE_HALF)
        is_rope = (freq >= 0) & (d < DIM)
        inv_freq = tl.load(inv_freq_ptr + tl.maximum(freq, 0), mask=is_rope, other=0.0)
        angle = position.to(tl.float32) * inv_freq
        cos = _rounded(tl.cos(angle), ROUND, dtype)[None, :]
        sin = _rounded(tl.sin(angle), ROUND, dtype)[None, :]
        sign = tl.where(d % 2 == 0, -1.0, 1.0)[None, :]                  # even: e cos - o sin; odd: o cos + e sin
        rotated = _rounded(_rounded(value * cos, ROUND, dtype) + sign * _rounded(partner * sin, ROUND, dtype),
                           ROUND, dtype)
        return tl.where(is_rope[None, :], rotated, value).to(dtype)


# ---- the compressor: entries at closing positions ------------------------------------------------------

if triton is not None:
    @triton.jit
    def _rounded(x, ROUND: tl.constexpr, DTYPE: tl.constexpr):
        if ROUND:
            x = x.to(DTYPE).to(tl.float32)
        return x

    @triton.jit
    def _state_row(state_ptr, table_ptr, request, table_stride, block_size, source,
                   WIDTH: tl.constexpr):
        """Pointer to the state row of position `source` (>= 0) of a request: [value | logit], 2 * WIDTH fp32."""
        block = tl.load(table_ptr + request * table_stride + source // block_size).to(tl.int64)
        return state_ptr + (block * block_size + source % block_size) * (2 * WIDTH)

    @triton.jit
    def _second_half(j, RATIO: tl.constexpr, HEAD_DIM: tl.constexpr, OVERLAP: tl.constexpr):
        """Channel offset of window slot j: with overlap, the previous window's tokens (j < RATIO) give
        their first half, this window's their second."""
        if OVERLAP:
            return (j // RATIO) * HEAD_DIM                  # j < 2 * RATIO
        return 0

    @triton.jit
    def _gate_logit(gate, bias, ROUND: tl.constexpr, dtype: tl.constexpr):
        """A state row's logit: the gate projection plus the window-position bias, added in the dtype."""
        return _rounded(gate.to(tl.float32) + _rounded(bias, ROUND, dtype), ROUND, dtype)

    @triton.jit
    def _window_row(proj_ptr, proj_stride, ape_ptr, state_ptr, table_ptr, request, table_stride, block_size,
                    source, step_first, step_row, offset, i, mask, WIDTH: tl.constexpr, RATIO: tl.constexpr,
                    ROUND: tl.constexpr, dtype: tl.constexpr, VALUES: tl.constexpr):
        """(value, logit) channel pairs (even, odd) at `offset` of position `source`'s state row: for a position
        of this step (>= step_first, the request's first in the step, at batch row step_row) formed from its
        projection as the state row stored in this launch is, else read from the state cache. Without VALUES
        the values are zeros (not read)."""
        v_even = tl.zeros_like(i).to(tl.float32)
        v_odd = tl.zeros_like(i).to(tl.float32)
        if source >= step_first:
            projected = proj_ptr + (step_row + (source - step_first)) * proj_stride + offset
            bias = ape_ptr + (source % RATIO) * WIDTH + offset
            z_even = _gate_logit(tl.load(projected + WIDTH + 2 * i, mask=mask, other=0.0),
                                 tl.load(bias + 2 * i, mask=mask, other=0.0), ROUND, dtype)
            z_odd = _gate_logit(tl.load(projected + WIDTH + 2 * i + 1, mask=mask, other=0.0),
                                tl.load(bias + 2 * i + 1, mask=mask, other=0.0), ROUND, dtype)
            if VALUES:
                v_even = tl.load(projected + 2 * i, mask=mask, other=0.0).to(tl.float32)
                v_odd = tl.load(projected + 2 * i + 1, mask=mask, other=0.0).to(tl.float32)
        else:
            stored = _state_row(state_ptr, table_ptr, request, table_stride, block_size, source, WIDTH) + offset
            z_even = _rounded(tl.load(stored + WIDTH + 2 * i, mask=mask, other=0.0), ROUND, dtype)
            z_odd = _rounded(tl.load(stored + WIDTH + 2 * i + 1, mask=mask, other=0.0), ROUND, dtype)
            if VALUES:
                v_even = _rounded(tl.load(stored + 2 * i, mask=mask, other=0.0), ROUND, dtype)
                v_odd = _rounded(tl.load(stored + 2 * i + 1, mask=mask, other=0.0), ROUND, dtype)
        return v_even, v_odd, z_even, z_odd

    @triton.jit
    def _compress_kernel(proj_ptr, ape_ptr, state_ptr, state_slots_ptr, table_ptr, slots_ptr, positions_ptr,
                         requests_ptr, query_start_ptr, norm_ptr, inv_freq_ptr, cache_ptr, proj_stride,
                         table_stride, block_size, eps,
                         HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                         ROPE_HALF: tl.constexpr, WIDTH: tl.constexpr, BLOCK_W: tl.constexpr, RATIO: tl.constexpr,
                         WINDOW: tl.constexpr, OVERLAP: tl.constexpr, ROUND: tl.constexpr, DTYPE: tl.constexpr,
                         FP8: tl.constexpr, NOPE: tl.constexpr, QBLOCK: tl.constexpr, NUM_SCALES: tl.constexpr,
                         SCALES_AT: tl.constexpr, ENTRY: tl.constexpr):
        # a program a token: its state row, then, if it closes an entry, the entry; the window's rows of
        # positions in this step come from the projection (another program stores them in this launch)
        token = tl.program_id(0).to(tl.int64)
        dtype = DTYPE                                   # the activations' (the cache may be FP8)
        state_slot = tl.load(state_slots_ptr + token).to(tl.int64)
        if state_slot >= 0:
            position = tl.load(positions_ptr + token).to(tl.int64)
            c = tl.arange(0, BLOCK_W)
            c_mask = c < WIDTH
            row = proj_ptr + token * proj_stride
            value = tl.load(row + c, mask=c_mask, other=0.0).to(tl.float32)
            logit = _gate_logit(tl.load(row + WIDTH + c, mask=c_mask, other=0.0),
                                tl.load(ape_ptr + (position % RATIO) * WIDTH + c, mask=c_mask, other=0.0),
                                ROUND, dtype)
            tl.store(state_ptr + state_slot * 2 * WIDTH + c, value, mask=c_mask)
            tl.store(state_ptr + state_slot * 2 * WIDTH + WIDTH + c, logit, mask=c_mask)
        slot = tl.load(slots_ptr + token).to(tl.int64)
        if slot >= 0:
            position = tl.load(positions_ptr + token).to(tl.int64)
            request = tl.load(requests_ptr + token).to(tl.int64)
            step_row = tl.load(query_start_ptr + request).to(tl.int64)
            step_first = tl.load(positions_ptr + step_row).to(tl.int64)
            i = tl.arange(0, BLOCK_HALF)
            mask = i < HALF
            # channels as (even, odd) pairs, so that RoPE can pair them without a shuffle
            m_even = tl.full([BLOCK_HALF], float("-inf"), tl.float32)
            m_odd = tl.full([BLOCK_HALF], float("-inf"), tl.float32)
            for j in range(WINDOW):                     # pass 1: the max logit per channel
                source = position - WINDOW + 1 + j
                if source >= 0:
                    _, _, z_even, z_odd = _window_row(
                        proj_ptr, proj_stride, ape_ptr, state_ptr, table_ptr, request, table_stride, block_size,
                        source, step_first, step_row, _second_half(j, RATIO, HEAD_DIM, OVERLAP), i, mask, WIDTH,
                        RATIO, ROUND, dtype, False)
                    m_even = tl.maximum(m_even, z_even)
                    m_odd = tl.maximum(m_odd, z_odd)
            l_even = tl.zeros([BLOCK_HALF], tl.float32)
            l_odd = tl.zeros([BLOCK_HALF], tl.float32)
            for j in range(WINDOW):                     # pass 2: the softmax denominators
                source = position - WINDOW + 1 + j
                if source >= 0:
                    _, _, z_even, z_odd = _window_row(
                        proj_ptr, proj_stride, ape_ptr, state_ptr, table_ptr, request, table_stride, block_size,
                        source, step_first, step_row, _second_half(j, RATIO, HEAD_DIM, OVERLAP), i, mask, WIDTH,
                        RATIO, ROUND, dtype, False)
                    l_even += tl.exp(z_even - m_even)
                    l_odd += tl.exp(z_odd - m_odd)
            acc_even = tl.zeros([BLOCK_HALF], tl.float32)
            acc_odd = tl.zeros([BLOCK_HALF], tl.float32)
            for j in range(WINDOW):                     # pass 3: weights (rounded as the reference) times values
                source = position - WINDOW + 1 + j
                if source >= 0:
                    v_even, v_odd, z_even, z_odd = _window_row(
                        proj_ptr, proj_stride, ape_ptr, state_ptr, table_ptr, request, table_stride, block_size,
                        source, step_first, step_row, _second_half(j, RATIO, HEAD_DIM, OVERLAP), i, mask, WIDTH,
                        RATIO, ROUND, dtype, True)
                    w_even = _rounded(tl.exp(z_even - m_even) / l_even, ROUND, dtype)
                    w_odd = _rounded(tl.exp(z_odd - m_odd) / l_odd, ROUND, dtype)
                    acc_even += _rounded(w_even * v_even, ROUND, dtype)
                    acc_odd += _rounded(w_odd * v_odd, ROUND, dtype)
            acc_even = tl.where(mask, _rounded(acc_even, ROUND, dtype), 0.0)
            acc_odd = tl.where(mask, _rounded(acc_odd, ROUND, dtype), 0.0)
            # RMSNorm with an fp32 weight, then the dtype
            rms = tl.rsqrt((tl.sum(acc_even * acc_even, 0) + tl.sum(acc_odd * acc_odd, 0)) / HEAD_DIM + eps)
            w_e = tl.load(norm_ptr + 2 * i, mask=mask, other=0.0).to(tl.float32)
            w_o = tl.load(norm_ptr + 2 * i + 1, mask=mask, other=0.0).to(tl.float32)
            x_even = _rounded(w_e * (acc_even * rms), ROUND, dtype)
            x_odd = _rounded(w_o * (acc_odd * rms), ROUND, dtype)
            # interleaved RoPE on the trailing pairs at the window's first position, in the dtype
            freq = i - (HALF - ROPE_HALF)
            is_rope = (freq >= 0) & mask
            inv_freq = tl.load(inv_freq_ptr + tl.maximum(freq, 0), mask=is_rope, other=0.0)
            angle = (position + 1 - RATIO).to(tl.float32) * inv_freq
            cos = _rounded(tl.cos(angle), ROUND, dtype)
            sin = _rounded(tl.sin(angle), ROUND, dtype)
            r_even = _rounded(x_even * cos, ROUND, dtype) - _rounded(x_odd * sin, ROUND, dtype)
            r_odd = _rounded(x_odd * cos, ROUND, dtype) + _rounded(x_even * sin, ROUND, dtype)
            out_even = tl.where(is_rope, r_even, x_even)
            out_odd = tl.where(is_rope, r_odd, x_odd)
            if FP8:                                     # the entry in the dtype, then quantized
                _store_fp8_entries(cache_ptr + slot * ENTRY + tl.zeros([1, 1], tl.int64),
                                   _rounded(out_even, ROUND, dtype)[None, :], _rounded(out_odd, ROUND, dtype)[None, :],
                                   i, mask[None, :], tl.full([1, 1], 1, tl.int1), NOPE, QBLOCK, NUM_SCALES, SCALES_AT)
            else:
                tl.store(cache_ptr + slot * HEAD_DIM + 2 * i, out_even.to(dtype), mask=mask)
                tl.store(cache_ptr + slot * HEAD_DIM + 2 * i + 1, out_odd.to(dtype), mask=mask)


def compress(projected: torch.Tensor, ape: torch.Tensor, state: torch.Tensor, state_table: torch.Tensor,
             state_slots: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
             requests: torch.Tensor, query_start: torch.Tensor, norm_weight: torch.Tensor, eps: float,
             inv_freq: torch.Tensor, ratio: int, overlap: bool, block_size: int,
             fmt: Fp8Entry | None = None) -> None:
    """The compressor's step in one launch (reference: Compressor.forward). projected [n, 2 * width] each
    token's value | gate projection (rows of any stride); ape [ratio, width] fp32 the window-position bias of
    the gate. Every token's state row (value, gate + bias; fp32 [blocks, block_size, 2, width]) goes to its
    state slot (-1: nowhere); every token with an entry slot (-1 unless it closes an entry that is written)
    gathers its window's rows, softmax per channel, sums, RMSNorm, RoPE at the window's first position, and
    stores the entry: cache [blocks, entries, dim] in the activations' dtype, or with `fmt` FP8 entries.
    query_start: the batch's first row per request (the positions of this step's rows come from
    `projected`, not from the state another program is storing)."""
    n = positions.shape[0]
    if n == 0:
        return
    dtype = projected.dtype
    head_dim = fmt.dim if fmt is not None else cache.shape[-1]
    width = state.shape[-1]
    if projected.shape[1] != 2 * width or projected.stride(1) != 1:
        raise ValueError(f"projected rows must be value | gate, 2 x {width} contiguous columns")
    rope_half = inv_freq.shape[0]
    _compress_kernel[(n,)](
        projected, ape, state, state_slots, state_table, slots, positions, requests, query_start, norm_weight,
        inv_freq, cache, projected.stride(0), state_table.stride(0), block_size, eps,
        HEAD_DIM=head_dim, HALF=head_dim // 2, BLOCK_HALF=_pow2(head_dim // 2), ROPE_HALF=rope_half,
        WIDTH=width, BLOCK_W=_pow2(width), RATIO=ratio, WINDOW=(2 if overlap else 1) * ratio, OVERLAP=overlap,
        ROUND=dtype != torch.float32, DTYPE=_tl_dtype(dtype), FP8=fmt is not None, **_fp8_layout(fmt, head_dim),
        num_warps=4, enable_fp_fusion=False)


# ---- the lightning indexer ---------------------------------------------------------------------------

if triton is not None:
    @triton.jit
    def _indexer_kernel(q_ptr, weights_ptr, keys_ptr, table_ptr, positions_ptr, requests_ptr, out_ptr, inv_freq_ptr,
                        q_stride_t, q_stride_h, weights_stride, table_stride, out_stride, width,
                        scale, weight_scale, num_programs, PER_BLOCK: tl.constexpr,
                        HEADS: tl.constexpr, BLOCK_HEADS: tl.constexpr, DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        RATIO: tl.constexpr, BLOCK_N: tl.constexpr, FP32: tl.constexpr, ROPE_HALF: tl.constexpr,
                        FP8: tl.constexpr, NOPE: tl.constexpr, QBLOCK: tl.constexpr, NUM_SCALES: tl.constexpr,
                        SCALES_AT: tl.constexpr, ENTRY: tl.constexpr):
        # a program scores the key tiles pid, pid + num_programs, ... of its query: q (rotated here with
        # ROPE_HALF) and the head weights are loaded once for all of them
        token = tl.program_id(0).to(tl.int64)
        position = tl.load(positions_ptr + token).to(tl.int32)        # < 2^31: index math in 32 bits
        visible = tl.maximum(position + 1, 0) // RATIO               # entries closed at this query
        request = tl.load(requests_ptr + token).to(tl.int64)
        h = tl.arange(0, BLOCK_HEADS)
        d = tl.arange(0, BLOCK_D)
        h_mask = h < HEADS
        d_mask = d < DIM
        q_rows = q_ptr + token * q_stride_t + h[:, None] * q_stride_h
        q = tl.load(q_rows + d[None, :], mask=h_mask[:, None] & d_mask[None, :], other=0.0)   # [BLOCK_HEADS, BLOCK_D]
        if ROPE_HALF > 0:
            q = _rope_in_place(q, q_rows, d, h_mask[:, None] & d_mask[None, :], position, inv_freq_ptr, 1.0, DIM,
                               ROPE_HALF, False, not FP32)
        w = tl.load(weights_ptr + token * weights_stride + h, mask=h_mask, other=0.0).to(tl.float32) * weight_scale
        for tile in range(tl.program_id(1), tl.cdiv(width, BLOCK_N), num_programs):
            n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            scores = tl.full([BLOCK_N], float("-inf"), tl.float32)
            if tile * BLOCK_N < visible:
                n_mask = n < visible
                block = tl.load(table_ptr + request * table_stride + n // PER_BLOCK, mask=n_mask,
                                other=0).to(tl.int64)
                rows = block * PER_BLOCK + n % PER_BLOCK
                key_scale = tl.full([BLOCK_N], 1.0, tl.float32)
                if FP8 and NOPE == DIM and NUM_SCALES == 1:
                    # every dim e4m3 under one scale (the indexer's keys): the e4m3 values into the dot, the
                    # scale (a power of two, so exactly) onto its result
                    base = keys_ptr + tl.multiple_of(rows * ENTRY, ENTRY & -ENTRY)                  # [BLOCK_N]
                    keys = tl.load(base[:, None] + d[None, :], mask=n_mask[:, None] & d_mask[None, :],
                                   other=0.0).to(q_ptr.dtype.element_ty)                            # [BLOCK_N, BLOCK_D]
                    exponent = tl.load(base.to(tl.pointer_type(tl.uint8)) + SCALES_AT, mask=n_mask, other=127)
                    key_scale = (exponent.to(tl.int32) << 23).to(tl.float32, bitcast=True)
                else:
                    keys = _load_entries(keys_ptr, rows, d, n_mask[:, None] & d_mask[None, :], FP8, NOPE, QBLOCK,
                                         SCALES_AT, ENTRY, q_ptr.dtype.element_ty)                 # [BLOCK_N, BLOCK_D]
                if FP32:
                    dots = tl.dot(q, tl.trans(keys), input_precision="ieee")
                else:
                    dots = tl.dot(q, tl.trans(keys))                  # [BLOCK_HEADS, BLOCK_N] fp32
                per_head = tl.maximum(dots * key_scale[None, :], 0.0) * scale * w[:, None]
                scores = tl.where(n_mask, tl.sum(per_head, axis=0), float("-inf"))
            tl.store(out_ptr + token * out_stride + n, scores, mask=n < width)


INDEXER_BLOCK_N = 64
INDEXER_PROGRAMS = 528       # four per SM on an H200 (as many as their registers allow): each walks a run of tiles


def indexer_scores(q: torch.Tensor, head_weights: torch.Tensor, keys: torch.Tensor, table: torch.Tensor,
                   positions: torch.Tensor, requests: torch.Tensor, ratio: int, width: int,
                   block_size: int, key_format: Fp8Entry | None = None, weight_scale: float = 1.0,
                   rope: torch.Tensor | None = None) -> torch.Tensor:
    """q [n, heads, dim]; head_weights [n, heads] (any float dtype, times `weight_scale` in fp32); keys
    [blocks, block_size / ratio, dim] (or FP8 entries of `key_format`, dequantized to q's dtype) -> scores
    [n, width] fp32: -inf at entries the query cannot see (not closed by its position, or past width). With
    `rope` (inv_freq) q is rotated at its position first, as norm_rope(q, positions, rope) would."""
    n, heads, dim = q.shape
    out = torch.empty(n, width, dtype=torch.float32, device=q.device)
    if n == 0 or width == 0:
        return out
    block_n = INDEXER_BLOCK_N
    tiles = triton.cdiv(width, block_n)
    programs = max(1, min(tiles, triton.cdiv(INDEXER_PROGRAMS, n)))     # host sizes only: fixed for a graph
    _indexer_kernel[(n, programs)](
        q, head_weights, keys, table, positions, requests, out, rope if rope is not None else out,
        q.stride(0), q.stride(1), head_weights.stride(0), table.stride(0), out.stride(0), width,
        dim ** -0.5, weight_scale, programs, PER_BLOCK=block_size // ratio,
        HEADS=heads, BLOCK_HEADS=max(16, _pow2(heads)), DIM=dim, BLOCK_D=max(16, _pow2(dim)), RATIO=ratio,
        BLOCK_N=block_n, FP32=q.dtype == torch.float32, ROPE_HALF=rope.shape[0] if rope is not None else 0,
        FP8=key_format is not None, **_fp8_layout(key_format, dim), num_warps=4)
    return out


if triton is not None:
    @triton.jit
    def _indexer_topk_kernel(scores_ptr, positions_ptr, out_ptr, scores_stride, out_stride, width,
                             RATIO: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr):
        # one program a query. With at most K entries visible it keeps them all (no score is read); else the
        # K-th largest score is found bit by bit on order-preserving integer keys (32 counts over the row,
        # held in registers), and the entries above it, then the first of its ties, are written in index order
        token = tl.program_id(0).to(tl.int64)
        visible = tl.maximum(tl.load(positions_ptr + token).to(tl.int32) + 1, 0) // RATIO
        out = out_ptr + token * out_stride
        if visible <= K:
            j = tl.arange(0, BLOCK_K)
            tl.store(out + j, tl.where(j < visible, j, -1), mask=j < K)
        else:
            w = tl.arange(0, BLOCK_W)
            seen = (w < visible) & (w < width)
            bits = tl.load(scores_ptr + token * scores_stride + w, mask=seen, other=0.0).to(tl.int32, bitcast=True)
            # float order as integer order: negative floats have their magnitude bits flipped; then offset to
            # [0, 2^32) so that 0 is below every key (the entries not visible)
            key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648
            key = tl.where(seen, key, 0)
            threshold = tl.zeros([], tl.int64)
            for b in tl.static_range(31, -1, -1):         # the largest t with count(key >= t) >= K
                candidate = threshold | (1 << b)
                count = tl.sum((key >= candidate).to(tl.int32), axis=0)
                threshold = tl.where(count >= K, candidate, threshold)
            above = key > threshold
            ties = key == threshold
            room = K - tl.sum(above.to(tl.int32), axis=0)
            take = above | (ties & (tl.cumsum(ties.to(tl.int32), axis=0) <= room))
            slot = tl.cumsum(take.to(tl.int32), axis=0) - 1
            tl.store(out + slot, w, mask=take)

    @triton.jit
    def _radix_digit(counts, need, BINS: tl.constexpr):
        """counts [BINS] of the keys still in play, by their next digit -> (the digit of the need-th largest,
        how many keys with that digit are still needed: those of a higher digit are all kept)."""
        at_or_above = tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts        # non-increasing
        digit = tl.sum((at_or_above >= need).to(tl.int32), axis=0) - 1
        return digit, need - tl.sum(tl.where(tl.arange(0, BINS) > digit, counts, 0), axis=0)

    @triton.jit
    def _add_digit_counts(hist, digit, selected):
        # hist[digit] += 1 for each selected key. The keys that share the chunk's largest selected digit are
        # added with one atomic, the rest one atomic each: atomics a key serialise on one address when the keys
        # agree (a row of equal scores, as zero caches give: 262,144 atomics on one bin a pass).
        top = tl.max(tl.where(selected, digit, -1), axis=0)
        same = selected & (digit == top)
        tl.atomic_add(hist + tl.maximum(top, 0), tl.sum(same.to(tl.int32), axis=0), mask=top >= 0, sem="relaxed")
        tl.atomic_add(hist + digit, 1, mask=selected & (digit != top), sem="relaxed")

    @triton.jit
    def _topk_radix_kernel(scores_ptr, positions_ptr, out_ptr, hist1_ptr, hist23_ptr, state_ptr, counts_ptr,
                           scores_stride, out_stride, width, num_chunks, RATIO: tl.constexpr, K: tl.constexpr,
                           BLOCK_K: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, PASS: tl.constexpr,
                           LOOKBACK: tl.constexpr):
        # a wide row's top-k with a program per CHUNK entries, in launches over one grid (PASS 1-5). The K-th
        # largest key T is found a digit at a time (bits 31-24, 23-12, 11-0 of the order-preserving key):
        # pass 1 counts the high digits per chunk; pass 2 adds those up, finds the digit of the K-th key and
        # counts the next digit of the keys that have it (atomics into a row's 4,096 bins); pass 3 likewise
        # for the low digit; pass 4 counts per chunk the keys above T and equal to it; pass 5 writes, in index
        # order as _indexer_topk_kernel does, the keys above T and the first ties, each chunk at the offset the
        # counts of the chunks before it give. With LOOKBACK pass 5 counts too (no pass 4): a program takes its
        # chunk by ticket, publishes its counts, then waits for those of the chunks before it, whose programs
        # took earlier tickets so are running and publish without waiting (no deadlock, whatever the grid).
        # Only chunks holding visible entries work; a row with at most K visible keeps them all (pass 5, no
        # score read). Every buffer a pass reads was written (or zeroed, pass 1) earlier in the same call.
        token = tl.program_id(0).to(tl.int64)
        visible = tl.maximum(tl.load(positions_ptr + token).to(tl.int32) + 1, 0) // RATIO
        seen = tl.minimum(visible, width)
        out = out_ptr + token * out_stride
        hist1 = hist1_ptr + token * num_chunks * 256                            # [num_chunks, 256]
        hist2 = hist23_ptr + token * 8192                                       # [4096], then hist3 [4096]
        hist3 = hist2 + 4096
        state = state_ptr + token * 8                 # high digit, need; middle digit, need; ticket
        counts = counts_ptr + token * num_chunks * 2                            # [num_chunks, 2]
        chunk = tl.program_id(1)
        if LOOKBACK and PASS == 5:
            if visible > K:
                chunk = tl.atomic_add(state + 4, 1, sem="relaxed")
        if visible <= K:
            if PASS == 5 and tl.program_id(1) == 0:
                j = tl.arange(0, BLOCK_K)
                tl.store(out + j, tl.where(j < visible, j, -1), mask=j < K)
        elif chunk * CHUNK < seen:
            w = chunk * CHUNK + tl.arange(0, CHUNK)
            mask = w < seen
            bits = tl.load(scores_ptr + token * scores_stride + w, mask=mask, other=0.0).to(tl.int32, bitcast=True)
            key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648     # as in _indexer_topk_kernel
            c = tl.arange(0, BLOCK_C)
            if PASS == 1:
                high = tl.where(mask, key >> 24, 0).to(tl.int32)
                digits = tl.histogram(high, 256)
                digits -= tl.where(tl.arange(0, 256) == 0, CHUNK - tl.sum(mask.to(tl.int32), axis=0), 0)
                tl.store(hist1 + chunk * 256 + tl.arange(0, 256), digits)
                if chunk == 0:                   # what the later passes add into
                    tl.store(hist2 + tl.arange(0, 8192), tl.zeros([8192], tl.int32))
                    tl.store(state + 4, 0)
                    for c0 in range(0, num_chunks, BLOCK_C):
                        tl.store(counts + (c0 + c) * 2, tl.zeros([BLOCK_C], tl.int32), mask=c0 + c < num_chunks)
            elif PASS == 2:
                b = tl.arange(0, 256)
                chunks = tl.cdiv(seen, CHUNK)
                total = tl.zeros([256], tl.int32)
                for c0 in range(0, chunks, BLOCK_C):
                    rows = hist1 + (c0 + c)[:, None] * 256 + b[None, :]
                    total += tl.sum(tl.load(rows, mask=(c0 + c < chunks)[:, None], other=0), axis=0)
                high, need = _radix_digit(total, K, 256)
                if chunk == 0:
                    tl.store(state, high)
                    tl.store(state + 1, need)
                _add_digit_counts(hist2, (key >> 12) & 4095, mask & ((key >> 24) == high))
            else:
                high = tl.load(state).to(tl.int64)
                if PASS == 3:
                    middle, need = _radix_digit(tl.load(hist2 + tl.arange(0, 4096)), tl.load(state + 1), 4096)
                    if chunk == 0:
                        tl.store(state + 2, middle)
                        tl.store(state + 3, need)
                    _add_digit_counts(hist3, key & 4095, mask & ((key >> 12) == (high << 12) + middle))
                else:
                    low, room = _radix_digit(tl.load(hist3 + tl.arange(0, 4096)), tl.load(state + 3), 4096)
                    threshold = (high << 24) + (tl.load(state + 2).to(tl.int64) << 12) + low
                    above = mask & (key > threshold)
                    ties = mask & (key == threshold)                  # room of them are kept, the first ones
                    num_above = tl.sum(above.to(tl.int32), axis=0)
                    num_ties = tl.sum(ties.to(tl.int32), axis=0)
                    if PASS == 4:
                        tl.store(counts + chunk * 2, num_above)
                        tl.store(counts + chunk * 2 + 1, num_ties)
                    else:
                        if LOOKBACK:       # published: a flag bit over the two counts (each <= CHUNK < 2^15)
                            tl.atomic_xchg(counts + chunk * 2, (1 << 30) | (num_above << 15) | num_ties,
                                           sem="relaxed")
                        above_before = tl.zeros([], tl.int32)
                        ties_before = tl.zeros([], tl.int32)
                        for c0 in range(0, chunk, BLOCK_C):
                            before = c0 + c < chunk
                            if LOOKBACK:
                                got = tl.atomic_add(counts + (c0 + c) * 2, 0, mask=before, sem="relaxed")
                                while tl.sum((before & (got < (1 << 30))).to(tl.int32), axis=0) > 0:
                                    got = tl.atomic_add(counts + (c0 + c) * 2, 0, mask=before, sem="relaxed")
                                got = tl.where(before, got, 0)
                                above_before += tl.sum((got >> 15) & 0x7FFF, axis=0)
                                ties_before += tl.sum(got & 0x7FFF, axis=0)
                            else:
                                above_before += tl.sum(tl.load(counts + (c0 + c) * 2, mask=before, other=0), axis=0)
                                ties_before += tl.sum(tl.load(counts + (c0 + c) * 2 + 1, mask=before, other=0),
                                                      axis=0)
                        tie_rank = ties_before + tl.cumsum(ties.to(tl.int32), axis=0) - 1
                        take = above | (ties & (tie_rank < room))
                        slot = above_before + tl.minimum(ties_before, room) + tl.cumsum(take.to(tl.int32), axis=0) - 1
                        tl.store(out + slot, w, mask=take)


TOPK_MAX_WIDTH = 8192        # the one-program kernel keeps a row in registers; wider rows take the radix kernel
def indexer_topk_exact(scores: torch.Tensor, positions: torch.Tensor, ratio: int, k: int) -> torch.Tensor:
    """The kernels' selection, in torch (their tests' and sweeps' reference; `indexer_topk`'s CPU path takes
    torch.topk, whose set differs only among ties): the entries above the k-th largest visible score and the
    first of its ties, in index order (a visible -inf above every entry not visible); every visible entry in
    order, then -1, when at most k are visible."""
    width = scores.shape[1]
    visible = (positions.clamp(min=-1) + 1) // ratio                                  # [n]
    index = torch.arange(width, device=scores.device)
    seen = index[None, :] < visible[:, None]
    bits = scores.view(torch.int32).long()
    key = torch.where(seen, (bits ^ ((bits >> 31) & 0x7FFFFFFF)) + 2**31, -1)       # order-preserving
    threshold = key.topk(k, dim=-1).values[:, -1:]
    above, ties = key > threshold, key == threshold
    room = k - above.sum(dim=-1, keepdim=True)
    take = above | (ties & (ties.cumsum(dim=-1) <= room))
    picked = torch.where(take, index, width).sort(dim=-1).values[:, :k]
    everything = torch.where(index[:k] < visible[:, None], index[:k], -1)
    return torch.where((visible <= k)[:, None], everything, picked).to(torch.int32)


TOPK_CHUNK = 4096            # entries a program of the radix kernel (a power of two, < 2^15)
TOPK_CHUNK_WARPS = 8
TOPK_LOOKBACK = True         # four launches (pass 5 counts and looks back), else five
TOPK_BLOCK_C = 64            # chunks' histograms / counts read at a time


def indexer_topk(scores: torch.Tensor, positions: torch.Tensor, ratio: int, top_k: int) -> torch.Tensor:
    """[n, min(top_k, width)] int32 entry indices per query (the kernels': in index order), -1 where fewer
    entries are visible. A fixed-shape top-k: no length is read on the host, nothing is reset between calls (every
    score is written each call). On a GPU one launch up to TOPK_MAX_WIDTH entries, four (or five) launches of
    a program per TOPK_CHUNK entries beyond (the torch reference elsewhere)."""
    n, width = scores.shape
    k = min(top_k, width)
    if not use_kernels(scores):
        top = torch.topk(scores, k, dim=-1, sorted=False).indices                  # [n, k]
        visible = (positions.clamp(min=-1) + 1) // ratio
        return torch.where(top >= visible[:, None], -1, top).to(torch.int32)
    out = torch.empty(n, k, dtype=torch.int32, device=scores.device)
    if n == 0 or k == 0:
        return out
    if width <= TOPK_MAX_WIDTH:
        _indexer_topk_kernel[(n,)](scores, positions, out, scores.stride(0), out.stride(0), width,
                                   RATIO=ratio, K=k, BLOCK_K=_pow2(k), BLOCK_W=_pow2(width),
                                   num_warps=8 if width > 2048 else 4)
        return out
    chunks = triton.cdiv(width, TOPK_CHUNK)
    work = torch.empty(n * (chunks * 258 + 8200), dtype=torch.int32, device=scores.device)
    hist1, hist23, state, counts = work.split([n * chunks * 256, n * 8192, n * 8, n * chunks * 2])
    for step in (1, 2, 3, 5) if TOPK_LOOKBACK else (1, 2, 3, 4, 5):
        _topk_radix_kernel[(n, chunks)](scores, positions, out, hist1, hist23, state, counts,
                                        scores.stride(0), out.stride(0), width, chunks, RATIO=ratio, K=k,
                                        BLOCK_K=_pow2(k), CHUNK=TOPK_CHUNK, BLOCK_C=TOPK_BLOCK_C, PASS=step,
                                        LOOKBACK=TOPK_LOOKBACK, num_warps=TOPK_CHUNK_WARPS)
    return out


# ---- sparse attention over window + compressed entries ----------------------------------------------------

if triton is not None:
    @triton.jit
    def _sparse_attention_kernel(q_ptr, positions_ptr, requests_ptr, window_ptr, window_table_ptr,
                                 entries_ptr, entries_table_ptr, selected_ptr, sinks_ptr, out_ptr,
                                 part_acc_ptr, part_ml_ptr, q_inv_freq_ptr,
                                 q_stride_t, q_stride_h, out_stride_t, out_stride_h,
                                 window_table_stride, entries_table_stride, selected_stride,
                                 window, scale, num_selected, num_splits, q_eps,
                                 HEADS: tl.constexpr, BLOCK_H: tl.constexpr, DIM: tl.constexpr,
                                 BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, RATIO: tl.constexpr,
                                 BLOCK_SIZE: tl.constexpr, PER_BLOCK: tl.constexpr,
                                 HAS_ENTRIES: tl.constexpr, SELECTED: tl.constexpr, SPLIT: tl.constexpr,
                                 FP32: tl.constexpr, WINDOW_FP8: tl.constexpr, ENTRY_FP8: tl.constexpr,
                                 NOPE: tl.constexpr, QBLOCK: tl.constexpr, NUM_SCALES: tl.constexpr,
                                 SCALES_AT: tl.constexpr, ENTRY: tl.constexpr, GROUPS: tl.constexpr,
                                 GROUP_D: tl.constexpr, TAIL_D: tl.constexpr, Q_ROPE_HALF: tl.constexpr,
                                 PREFETCH: tl.constexpr = False, FLAT: tl.constexpr = False):
        # sizes that change from step to step (selection width, splits) are arguments, not constants: a
        # constant would compile a kernel per value. With Q_ROPE_HALF q is raw: each program normalizes its
        # heads (unweighted RMS) and rotates them at the token's position as it loads them
        token = tl.program_id(0).to(tl.int64)
        head_block = tl.program_id(1)
        split = tl.program_id(2)
        # index math in 32 bits (positions < 2^31; divisions by the constant block sizes), offsets in 64
        position = tl.load(positions_ptr + token).to(tl.int32)
        request = tl.load(requests_ptr + token).to(tl.int64)
        first = tl.maximum(position - window + 1, 0)
        num_window = tl.maximum(position + 1 - first, 0)              # 0 for a padded row (position < 0)
        num_entries = position * 0
        if HAS_ENTRIES:
            if SELECTED:
                num_entries += num_selected
            else:
                num_entries += tl.maximum(position + 1, 0) // RATIO
        total = num_window + num_entries
        per_split = tl.cdiv(tl.cdiv(total, num_splits), BLOCK_N) * BLOCK_N
        lo = split * per_split
        hi = tl.minimum(lo + per_split, total)

        h = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
        h_mask = h < HEADS
        m = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_H], tl.float32)
        if WINDOW_FP8 and (ENTRY_FP8 or not HAS_ENTRIES):
            _sparse_attention_fp8(q_ptr, window_ptr, window_table_ptr, entries_ptr, entries_table_ptr, selected_ptr,
                                  sinks_ptr, out_ptr, part_acc_ptr, part_ml_ptr, token, request, split, h, h_mask,
                                  m, l, lo, hi, first, num_window, q_stride_t, q_stride_h, out_stride_t,
                                  out_stride_h, window_table_stride, entries_table_stride, selected_stride,
                                  scale, num_splits, position, q_inv_freq_ptr, q_eps, BLOCK_SIZE, PER_BLOCK, HEADS,
                                  BLOCK_H, DIM, BLOCK_N, HAS_ENTRIES, SELECTED, SPLIT, FP32, NOPE, QBLOCK, NUM_SCALES,
                                  SCALES_AT, ENTRY, GROUPS, GROUP_D, TAIL_D, Q_ROPE_HALF, PREFETCH, FLAT)
        else:
            _sparse_attention_wide(q_ptr, window_ptr, window_table_ptr, entries_ptr, entries_table_ptr, selected_ptr,
                                   sinks_ptr, out_ptr, part_acc_ptr, part_ml_ptr, token, request, split, h, h_mask,
                                   m, l, lo, hi, first, num_window, q_stride_t, q_stride_h, out_stride_t,
                                   out_stride_h, window_table_stride, entries_table_stride, selected_stride,
                                   scale, num_splits, position, q_inv_freq_ptr, q_eps, BLOCK_SIZE, PER_BLOCK, HEADS,
                                   BLOCK_H, DIM, BLOCK_D, BLOCK_N, HAS_ENTRIES, SELECTED, SPLIT, FP32, WINDOW_FP8,
                                   ENTRY_FP8, NOPE, QBLOCK, SCALES_AT, ENTRY, Q_ROPE_HALF)

    @triton.jit
    def _key_rows(window_table_ptr, entries_table_ptr, selected_ptr, token, request, u, hi, first, num_window,
                  window_table_stride, entries_table_stride, selected_stride, BLOCK_SIZE: tl.constexpr,
                  PER_BLOCK: tl.constexpr, HAS_ENTRIES: tl.constexpr, SELECTED: tl.constexpr):
        """Keys u [BLOCK_N] of a query (the window's, then its compressed entries) -> (in_window, window rows,
        in_entries, entry rows): rows are indices into the caches' flat entries, 0 where not in."""
        in_range = u < hi
        in_window = in_range & (u < num_window)
        key_pos = first + tl.where(in_window, u, 0)
        w_block = tl.load(window_table_ptr + request * window_table_stride + key_pos // BLOCK_SIZE,
                          mask=in_window, other=0).to(tl.int64)
        w_rows = w_block * BLOCK_SIZE + key_pos % BLOCK_SIZE
        in_entries = u < 0
        e_rows = w_rows * 0
        if HAS_ENTRIES:
            c = u - num_window
            in_entries = in_range & (c >= 0)
            if SELECTED:
                entry = tl.load(selected_ptr + token * selected_stride + tl.where(in_entries, c, 0),
                                mask=in_entries, other=-1)
            else:
                entry = c
            in_entries = in_entries & (entry >= 0)
            entry = tl.where(in_entries, entry, 0)
            e_block = tl.load(entries_table_ptr + request * entries_table_stride + entry // PER_BLOCK,
                              mask=in_entries, other=0).to(tl.int64)
            e_rows = e_block * PER_BLOCK + entry % PER_BLOCK
        return in_window, w_rows, in_entries, e_rows

    @triton.jit
    def _sink_factor(sinks_ptr, h, h_mask, m, l):
        """[BLOCK_H] what one program's accumulator is multiplied by: one softmax over its keys and the sink."""
        sink = tl.load(sinks_ptr + h, mask=h_mask, other=0.0).to(tl.float32)
        m_all = tl.maximum(m, sink)
        scale_acc = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_all))
        return scale_acc / (l * scale_acc + tl.exp(sink - m_all))

    @triton.jit
    def _sparse_attention_wide(q_ptr, window_ptr, window_table_ptr, entries_ptr, entries_table_ptr, selected_ptr,
                               sinks_ptr, out_ptr, part_acc_ptr, part_ml_ptr, token, request, split, h, h_mask,
                               m, l, lo, hi, first, num_window, q_stride_t, q_stride_h, out_stride_t,
                               out_stride_h, window_table_stride, entries_table_stride, selected_stride,
                               scale, num_splits, position, q_inv_freq_ptr, q_eps, BLOCK_SIZE: tl.constexpr,
                               PER_BLOCK: tl.constexpr, HEADS: tl.constexpr, BLOCK_H: tl.constexpr, DIM: tl.constexpr,
                               BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ENTRIES: tl.constexpr,
                               SELECTED: tl.constexpr, SPLIT: tl.constexpr, FP32: tl.constexpr,
                               WINDOW_FP8: tl.constexpr, ENTRY_FP8: tl.constexpr, NOPE: tl.constexpr,
                               QBLOCK: tl.constexpr, SCALES_AT: tl.constexpr, ENTRY: tl.constexpr,
                               Q_ROPE_HALF: tl.constexpr):
        """Keys in the model dtype (or one of the two caches FP8, dequantized element by element)."""
        d = tl.arange(0, BLOCK_D)
        d_mask = d < DIM
        q_rows = q_ptr + token * q_stride_t + h[:, None] * q_stride_h
        q_mask = h_mask[:, None] & d_mask[None, :]
        q = tl.load(q_rows + d[None, :], mask=q_mask, other=0.0)              # [BLOCK_H, BLOCK_D]
        if Q_ROPE_HALF > 0:
            q_f = q.to(tl.float32)
            rms = _unweighted_rms(tl.sum(q_f * q_f, axis=1), DIM, q_eps, not FP32, q.dtype)
            q = _rope_in_place(q, q_rows, d, q_mask, position, q_inv_freq_ptr, rms, DIM, Q_ROPE_HALF, True, not FP32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        for u0 in range(lo, hi, BLOCK_N):
            u = u0 + tl.arange(0, BLOCK_N)                                        # index into window ++ entries
            in_window, w_rows, in_entries, e_rows = _key_rows(
                window_table_ptr, entries_table_ptr, selected_ptr, token, request, u, hi, first, num_window,
                window_table_stride, entries_table_stride, selected_stride, BLOCK_SIZE, PER_BLOCK, HAS_ENTRIES,
                SELECTED)
            keys = _load_entries(window_ptr, w_rows, d, in_window[:, None] & d_mask[None, :], WINDOW_FP8, NOPE,
                                 QBLOCK, SCALES_AT, ENTRY if WINDOW_FP8 else DIM, q.dtype)   # [BLOCK_N, BLOCK_D]
            valid = in_window
            if HAS_ENTRIES:
                keys += _load_entries(entries_ptr, e_rows, d, in_entries[:, None] & d_mask[None, :], ENTRY_FP8, NOPE,
                                      QBLOCK, SCALES_AT, ENTRY if ENTRY_FP8 else DIM, q.dtype)
                valid = valid | in_entries
            if FP32:
                scores = tl.dot(q, tl.trans(keys), input_precision="ieee") * scale
            else:
                scores = tl.dot(q, tl.trans(keys)) * scale                      # [BLOCK_H, BLOCK_N]
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m - m_safe)
            l = l * alpha + tl.sum(p, axis=1)
            if FP32:
                acc = acc * alpha[:, None] + tl.dot(p, keys, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(keys.dtype), keys)
            m = m_new
        out_mask = h_mask[:, None] & d_mask[None, :]
        if not SPLIT:
            out = acc * _sink_factor(sinks_ptr, h, h_mask, m, l)[:, None]
            tl.store(out_ptr + token * out_stride_t + h[:, None] * out_stride_h + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            part = (token * HEADS + h) * num_splits + split                     # [BLOCK_H]
            tl.store(part_acc_ptr + part[:, None] * DIM + d[None, :], acc, mask=out_mask)
            tl.store(part_ml_ptr + part * 2, m, mask=h_mask)
            tl.store(part_ml_ptr + part * 2 + 1, l, mask=h_mask)

    @triton.jit
    def _fp8_tile(window_ptr, window_table_ptr, entries_ptr, entries_table_ptr, selected_ptr, token, request, u0, hi,
                  first, num_window, window_table_stride, entries_table_stride, selected_stride, g, col, col_mask, t,
                  tail_mask, BLOCK_SIZE: tl.constexpr, PER_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_ENTRIES: tl.constexpr, SELECTED: tl.constexpr, NOPE: tl.constexpr, NUM_SCALES: tl.constexpr,
                  SCALES_AT: tl.constexpr, ENTRY: tl.constexpr, FLAT: tl.constexpr):
        """The FP8 entries of keys u0 .. u0 + BLOCK_N (past hi: none, nothing read) as stored -> (valid [BLOCK_N],
        e4m3 values, scale exponents, bf16 tails [BLOCK_N, TAIL_D]): values [GROUPS, BLOCK_N, GROUP_D] and
        exponents [GROUPS, BLOCK_N] group-major, or with FLAT key-major: [BLOCK_N, GROUPS, GROUP_D], [BLOCK_N,
        GROUPS]."""
        u = u0 + tl.arange(0, BLOCK_N)                                          # index into window ++ entries
        in_window, w_rows, in_entries, e_rows = _key_rows(
            window_table_ptr, entries_table_ptr, selected_ptr, token, request, u, hi, first, num_window,
            window_table_stride, entries_table_stride, selected_stride, BLOCK_SIZE, PER_BLOCK, HAS_ENTRIES, SELECTED)
        # an entry starts only ENTRY & -ENTRY bytes aligned (584: 8): say so (see _load_entries)
        ALIGN: tl.constexpr = ENTRY & -ENTRY
        entry = window_ptr + tl.multiple_of(w_rows * ENTRY, ALIGN)               # [BLOCK_N] the entries' first bytes
        valid = in_window
        if HAS_ENTRIES:
            entry = tl.multiple_of(tl.where(in_entries, entries_ptr + e_rows * ENTRY, entry), ALIGN)
            valid = valid | in_entries
        if FLAT:
            keys = tl.load(entry[:, None, None] + col[None, :, :], mask=valid[:, None, None] & col_mask[None, :, :],
                           other=0.0)
            exponent = tl.load(entry.to(tl.pointer_type(tl.uint8))[:, None] + SCALES_AT + g[None, :],
                               mask=valid[:, None] & (g < NUM_SCALES)[None, :], other=127)
        else:
            keys = tl.load(entry[None, :, None] + col[:, None, :], mask=valid[None, :, None] & col_mask[:, None, :],
                           other=0.0)
            exponent = tl.load(entry.to(tl.pointer_type(tl.uint8))[None, :] + SCALES_AT + g[:, None],
                               mask=valid[None, :] & (g < NUM_SCALES)[:, None], other=127)
        tail = tl.load((entry + NOPE).to(tl.pointer_type(tl.bfloat16))[:, None] + t[None, :],
                       mask=valid[:, None] & tail_mask[None, :], other=0.0)
        return valid, keys, exponent, tail

    @triton.jit
    def _sparse_attention_fp8(q_ptr, window_ptr, window_table_ptr, entries_ptr, entries_table_ptr, selected_ptr,
                              sinks_ptr, out_ptr, part_acc_ptr, part_ml_ptr, token, request, split, h, h_mask,
                              m, l, lo, hi, first, num_window, q_stride_t, q_stride_h, out_stride_t,
                              out_stride_h, window_table_stride, entries_table_stride, selected_stride,
                              scale, num_splits, position, q_inv_freq_ptr, q_eps, BLOCK_SIZE: tl.constexpr,
                              PER_BLOCK: tl.constexpr, HEADS: tl.constexpr, BLOCK_H: tl.constexpr,
                              DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ENTRIES: tl.constexpr,
                              SELECTED: tl.constexpr, SPLIT: tl.constexpr, FP32: tl.constexpr, NOPE: tl.constexpr,
                              QBLOCK: tl.constexpr, NUM_SCALES: tl.constexpr, SCALES_AT: tl.constexpr,
                              ENTRY: tl.constexpr, GROUPS: tl.constexpr, GROUP_D: tl.constexpr,
                              TAIL_D: tl.constexpr, Q_ROPE_HALF: tl.constexpr, PREFETCH: tl.constexpr,
                              FLAT: tl.constexpr):
        """Every key an FP8 entry (cache_ops.Fp8Entry): the e4m3 dims read as bytes in groups of QBLOCK, their
        scales once per group and key, the RoPE dims as one bf16 tile [BLOCK_N, TAIL_D]. Two ways to apply the
        scales (each a power of two, so either is exact):
        - grouped: values [GROUPS, BLOCK_N, GROUP_D]; scores per group the dot of q's dims with the e4m3
          values, times the group's scale, summed, plus the RoPE dims' dot; values per group P times the scale
          dotted with the e4m3 values, one accumulator [GROUPS, BLOCK_H, GROUP_D];
        - FLAT: each group's scale multiplied into its values as they are widened, so that a tile is one
          [BLOCK_N, GROUPS * GROUP_D] operand: 2-D dots as the model-dtype tile has (fewer barriers a tile:
          faster over many tiles, slower for a tile or two, where q's load and the widening dominate)."""
        dtype = q_ptr.dtype.element_ty
        WIDE: tl.constexpr = GROUPS * GROUP_D
        g = tl.arange(0, GROUPS)
        j = tl.arange(0, GROUP_D)
        t = tl.arange(0, TAIL_D)
        col = g[:, None] * QBLOCK + j[None, :]                                  # [GROUPS, GROUP_D] e4m3 dim
        col_mask = (col < NOPE) & (j < QBLOCK)[None, :]
        tail_mask = t < DIM - NOPE
        q_row = q_ptr + token * q_stride_t + h * q_stride_h                     # [BLOCK_H]
        if FLAT:
            flat_col = tl.reshape(col, [WIDE])
            flat_mask = h_mask[:, None] & tl.reshape(col_mask, [WIDE])[None, :]     # [BLOCK_H, WIDE]
            q_nope = tl.load(q_row[:, None] + flat_col[None, :], mask=flat_mask, other=0.0)     # [BLOCK_H, WIDE]
        else:
            q_nope = tl.load(q_row[None, :, None] + col[:, None, :], mask=h_mask[None, :, None] & col_mask[:, None, :],
                             other=0.0)                                         # [GROUPS, BLOCK_H, GROUP_D]
        q_tail = tl.load(q_row[:, None] + NOPE + t[None, :], mask=h_mask[:, None] & tail_mask[None, :],
                         other=0.0)                                             # [BLOCK_H, TAIL_D]
        if Q_ROPE_HALF > 0:       # the RoPE dims are the bf16 tail (sparse_attention checks)
            n_f = q_nope.to(tl.float32)
            t_f = q_tail.to(tl.float32)
            if FLAT:
                squares = tl.sum(n_f * n_f, axis=1)
            else:
                squares = tl.sum(tl.sum(n_f * n_f, axis=2), axis=0)
            rms = _unweighted_rms(squares + tl.sum(t_f * t_f, axis=1), DIM, q_eps, not FP32, dtype)   # [BLOCK_H]
            if FLAT:
                q_nope = _rounded(n_f * rms[:, None], not FP32, dtype).to(dtype)
            else:
                q_nope = _rounded(n_f * rms[None, :, None], not FP32, dtype).to(dtype)
            q_tail = _rope_in_place(q_tail, q_row[:, None] + NOPE, t, h_mask[:, None] & tail_mask[None, :], position,
                                    q_inv_freq_ptr, rms, DIM - NOPE, Q_ROPE_HALF, True, not FP32)
        if FLAT:
            acc = tl.zeros([BLOCK_H, WIDE], tl.float32)
        else:
            acc = tl.zeros([GROUPS, BLOCK_H, GROUP_D], tl.float32)
        acc_tail = tl.zeros([BLOCK_H, TAIL_D], tl.float32)
        if PREFETCH:           # each tile's loads issued a tile ahead: their latency under the previous tile's math
            next_valid, next_keys, next_exponent, next_tail = _fp8_tile(
                window_ptr, window_table_ptr, entries_ptr, entries_table_ptr, selected_ptr, token, request, lo, hi,
                first, num_window, window_table_stride, entries_table_stride, selected_stride, g, col, col_mask, t,
                tail_mask, BLOCK_SIZE, PER_BLOCK, BLOCK_N, HAS_ENTRIES, SELECTED, NOPE, NUM_SCALES, SCALES_AT, ENTRY,
                FLAT)
        for u0 in range(lo, hi, BLOCK_N):
            if PREFETCH:
                valid, keys, exponent, tail = next_valid, next_keys, next_exponent, next_tail
                next_valid, next_keys, next_exponent, next_tail = _fp8_tile(
                    window_ptr, window_table_ptr, entries_ptr, entries_table_ptr, selected_ptr, token, request,
                    u0 + BLOCK_N, hi, first, num_window, window_table_stride, entries_table_stride, selected_stride,
                    g, col, col_mask, t, tail_mask, BLOCK_SIZE, PER_BLOCK, BLOCK_N, HAS_ENTRIES, SELECTED, NOPE,
                    NUM_SCALES, SCALES_AT, ENTRY, FLAT)
            else:
                valid, keys, exponent, tail = _fp8_tile(
                    window_ptr, window_table_ptr, entries_ptr, entries_table_ptr, selected_ptr, token, request, u0,
                    hi, first, num_window, window_table_stride, entries_table_stride, selected_stride, g, col,
                    col_mask, t, tail_mask, BLOCK_SIZE, PER_BLOCK, BLOCK_N, HAS_ENTRIES, SELECTED, NOPE, NUM_SCALES,
                    SCALES_AT, ENTRY, FLAT)
            if FLAT:
                tail = tail.to(dtype)                                           # [BLOCK_N, TAIL_D]
                key_scale = (exponent.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # [BLOCK_N, GROUPS]
                keys = tl.reshape((keys.to(tl.float32) * key_scale[:, :, None]).to(dtype), [BLOCK_N, WIDE])
                if FP32:
                    scores = tl.dot(q_nope, tl.trans(keys), input_precision="ieee")
                    scores += tl.dot(q_tail, tl.trans(tail), input_precision="ieee")
                else:
                    scores = tl.dot(q_nope, tl.trans(keys))                     # [BLOCK_H, BLOCK_N] fp32
                    scores = tl.dot(q_tail, tl.trans(tail), scores)
                scores = scores * scale
            else:
                keys = keys.to(dtype)                                           # [GROUPS, BLOCK_N, GROUP_D]
                tail = tail.to(dtype)                                           # [BLOCK_N, TAIL_D]
                key_scale = (exponent.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # [GROUPS, BLOCK_N]
                if FP32:
                    partial = tl.dot(q_nope, tl.permute(keys, (0, 2, 1)), input_precision="ieee")
                    scores = tl.dot(q_tail, tl.trans(tail), input_precision="ieee")
                else:
                    partial = tl.dot(q_nope, tl.permute(keys, (0, 2, 1)))      # [GROUPS, BLOCK_H, BLOCK_N] fp32
                    scores = tl.dot(q_tail, tl.trans(tail))                     # [BLOCK_H, BLOCK_N]
                scores = (scores + tl.sum(partial * key_scale[:, None, :], axis=0)) * scale
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m - m_safe)
            l = l * alpha + tl.sum(p, axis=1)
            if FLAT:
                if FP32:
                    acc = acc * alpha[:, None] + tl.dot(p, keys, input_precision="ieee")
                    acc_tail = acc_tail * alpha[:, None] + tl.dot(p, tail, input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(dtype), keys)
                    acc_tail = acc_tail * alpha[:, None] + tl.dot(p.to(dtype), tail)
            else:
                scaled_p = p[None, :, :] * key_scale[:, None, :]                # [GROUPS, BLOCK_H, BLOCK_N]
                if FP32:
                    acc = acc * alpha[None, :, None] + tl.dot(scaled_p, keys, input_precision="ieee")
                    acc_tail = acc_tail * alpha[:, None] + tl.dot(p, tail, input_precision="ieee")
                else:
                    acc = acc * alpha[None, :, None] + tl.dot(scaled_p.to(dtype), keys)
                    acc_tail = acc_tail * alpha[:, None] + tl.dot(p.to(dtype), tail)
            m = m_new
        tail_out_mask = h_mask[:, None] & tail_mask[None, :]
        if not SPLIT:
            factor = _sink_factor(sinks_ptr, h, h_mask, m, l)
            rows = out_ptr + token * out_stride_t + h * out_stride_h             # [BLOCK_H]
            if FLAT:
                acc = acc * factor[:, None]
            else:
                acc = acc * factor[None, :, None]
            acc_tail = acc_tail * factor[:, None]
        else:
            part = (token * HEADS + h) * num_splits + split                     # [BLOCK_H]
            rows = part_acc_ptr + part * DIM
        out_dtype = rows.dtype.element_ty
        if FLAT:
            tl.store(rows[:, None] + flat_col[None, :], acc.to(out_dtype), mask=flat_mask)
        else:
            tl.store(rows[None, :, None] + col[:, None, :], acc.to(out_dtype),
                     mask=h_mask[None, :, None] & col_mask[:, None, :])
        tl.store(rows[:, None] + NOPE + t[None, :], acc_tail.to(out_dtype), mask=tail_out_mask)
        if SPLIT:
            tl.store(part_ml_ptr + part * 2, m, mask=h_mask)
            tl.store(part_ml_ptr + part * 2 + 1, l, mask=h_mask)

    @triton.jit
    def _sparse_attention_reduce_kernel(part_acc_ptr, part_ml_ptr, sinks_ptr, out_ptr, positions_ptr,
                                        inv_freq_ptr, out_stride_t, out_stride_h, num_splits,
                                        HEADS: tl.constexpr, DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                        BLOCK_S: tl.constexpr, ROPE: tl.constexpr, ROPE_HALF: tl.constexpr,
                                        ROUND: tl.constexpr):
        # the splits BLOCK_S at a time (a [splits, dim] tile of all 64 would spill): their largest max first,
        # then the weighted sums; channels as (even, odd) pairs, so the inverse RoPE (ROPE) needs no shuffle
        token = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        s = tl.arange(0, BLOCK_S)
        i = tl.arange(0, BLOCK_D // 2)
        i_mask = i < DIM // 2
        base = (token * HEADS + head) * num_splits
        sink = tl.load(sinks_ptr + head).to(tl.float32)
        m_all = sink
        for s0 in range(0, num_splits, BLOCK_S):
            m = tl.load(part_ml_ptr + (base + s0 + s) * 2, mask=s0 + s < num_splits, other=float("-inf"))
            m_all = tl.maximum(m_all, tl.max(m, axis=0))
        denominator = tl.exp(sink - m_all)
        acc_even = tl.zeros([BLOCK_D // 2], tl.float32)
        acc_odd = tl.zeros([BLOCK_D // 2], tl.float32)
        for s0 in range(0, num_splits, BLOCK_S):
            s_mask = s0 + s < num_splits
            m = tl.load(part_ml_ptr + (base + s0 + s) * 2, mask=s_mask, other=float("-inf"))
            l = tl.load(part_ml_ptr + (base + s0 + s) * 2 + 1, mask=s_mask, other=0.0)
            weight = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_all))
            denominator += tl.sum(weight * l, axis=0)
            part = part_acc_ptr + (base + s0 + s)[:, None] * DIM + 2 * i[None, :]
            part_mask = s_mask[:, None] & i_mask[None, :]
            acc_even += tl.sum(tl.load(part, mask=part_mask, other=0.0) * weight[:, None], axis=0)
            acc_odd += tl.sum(tl.load(part + 1, mask=part_mask, other=0.0) * weight[:, None], axis=0)
        dtype = out_ptr.dtype.element_ty
        even = acc_even / denominator
        odd = acc_odd / denominator
        if ROPE:            # the output rounded as stored, then rotated back as norm_rope(inverse=True) does
            even, odd = _rope_pairs(_rounded(even, ROUND, dtype)[None, :], _rounded(odd, ROUND, dtype)[None, :],
                                    i, tl.load(positions_ptr + token), inv_freq_ptr, DIM // 2, ROPE_HALF, True,
                                    ROUND, dtype)
            even = tl.reshape(even, [BLOCK_D // 2])
            odd = tl.reshape(odd, [BLOCK_D // 2])
        dst = out_ptr + token * out_stride_t + head * out_stride_h + 2 * i
        tl.store(dst, even.to(dtype), mask=i_mask)
        tl.store(dst + 1, odd.to(dtype), mask=i_mask)


BLOCK_HEADS = 16
ATTENTION_BLOCK_N = 32       # keys a tile
ATTENTION_PREFETCH = True    # FP8 HCA tiles: a tile's loads issued during the previous tile's math
ATTENTION_PREFETCH_SELECTED = False   # CSA: one tile a program at batch 1, where it only costs
ATTENTION_FLAT = True        # FP8 HCA / window tiles with the scales folded into the widened keys (2-D dots, 10
                             # barriers a tile instead of 32 in the SASS): H200, HCA at 1M 41.6 us vs 64.1 grouped
                             # (at 4K 17.6 vs 17.0)
ATTENTION_FLAT_SELECTED = False   # CSA (one tile a program at batch 1): grouped 15.2 us vs 18.3 flat
ATTENTION_WARPS = 8          # at head dim > 128
ATTENTION_STAGES = 1         # FP8 tiles: Triton's pipeliner finds nothing to overlap in the gathered tiles; 1 is
                             # ~1 us faster (bf16 tiles keep the default: not measured)
MAX_SPLITS = 64
TARGET_PROGRAMS = 132        # one per SM on an H200 (a program takes most of its registers): split the keys until a
                             # small batch fills it


def attention_splits(num_tokens: int, num_heads: int, max_keys: int, block_n: int = 32) -> int:
    """Key splits per (token, head block): 1 for batches that fill the GPU, more for small ones, each split
    at least one key block long. Depends only on host sizes fixed for a captured graph."""
    programs = num_tokens * -(-num_heads // BLOCK_HEADS)
    splits = min(-(-TARGET_PROGRAMS // max(programs, 1)), -(-max_keys // block_n), MAX_SPLITS)
    return max(1, splits)


def sparse_attention(q: torch.Tensor, positions: torch.Tensor, requests: torch.Tensor,
                     window_cache: torch.Tensor, window_table: torch.Tensor, window: int,
                     entry_cache: torch.Tensor | None, entry_table: torch.Tensor | None, ratio: int,
                     selected: torch.Tensor | None, sinks: torch.Tensor, scale: float, block_size: int,
                     max_entries: int, window_format: Fp8Entry | None = None,
                     entry_format: Fp8Entry | None = None, inverse_rope: torch.Tensor | None = None,
                     q_rope: torch.Tensor | None = None, q_eps: float = 0.0) -> torch.Tensor:
    """q [n, heads, dim] -> [n, heads, dim]. Keys = values: the window entries (p - window, p] of the token's
    request, then (CSA) the entries in `selected` [n, k] (-1 = none) or (HCA) every entry closed by p.
    With `q_rope` (inv_freq) q is raw: normalized per head (unweighted RMS, `q_eps`) and rotated at p as
    norm_rope(q, positions, q_rope, normalize=True, eps=q_eps) would, as the kernel loads it.
    With `inverse_rope` (inv_freq) the output is rotated back by -p as norm_rope(inverse=True) does, inside the
    split reduction when there is one.
    `max_entries` bounds the HCA entries (sizes the key splits only). A cache with a format holds FP8 entries,
    dequantized to q's dtype as they are read."""
    n, heads, dim = q.shape
    out = torch.empty_like(q)
    if n == 0:
        return out
    has_entries = entry_cache is not None
    num_selected = selected.shape[1] if selected is not None else 0
    max_keys = window + (num_selected if selected is not None else (max_entries if has_entries else 0))
    block_n = ATTENTION_BLOCK_N
    splits = attention_splits(n, heads, max_keys, block_n)
    head_blocks = triton.cdiv(heads, BLOCK_HEADS)
    if splits > 1:
        part_acc = torch.empty(n * heads * splits, dim, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(n * heads * splits, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out
    dummy = window_table
    layout = _fp8_layout(window_format or entry_format, dim)
    q_rope_half = q_rope.shape[0] if q_rope is not None else 0
    fp8_tiles = window_format is not None and (entry_format is not None or not has_entries)
    if q_rope_half and fp8_tiles and dim - layout["NOPE"] != 2 * q_rope_half:
        raise ValueError(f"q's RoPE in the FP8 tiles needs the entries' bf16 tail ({dim - layout['NOPE']} dims) "
                         f"to be the RoPE dims ({2 * q_rope_half})")
    if q.stride(2) != 1:
        q = q.contiguous()
    _sparse_attention_kernel[(n, head_blocks, splits)](
        q, positions, requests, window_cache, window_table,
        entry_cache if has_entries else window_cache, entry_table if has_entries else dummy,
        selected if selected is not None else dummy, sinks, out, part_acc, part_ml,
        q_rope if q_rope is not None else sinks,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        window_table.stride(0), entry_table.stride(0) if has_entries else 0,
        selected.stride(0) if selected is not None else 0,
        window, scale, num_selected, splits, q_eps,
        HEADS=heads, BLOCK_H=BLOCK_HEADS, DIM=dim, BLOCK_D=_pow2(dim), BLOCK_N=block_n, RATIO=max(ratio, 1),
        BLOCK_SIZE=block_size, PER_BLOCK=block_size // max(ratio, 1),
        HAS_ENTRIES=has_entries, SELECTED=selected is not None, SPLIT=splits > 1,
        FP32=q.dtype == torch.float32, WINDOW_FP8=window_format is not None,
        ENTRY_FP8=has_entries and entry_format is not None, **layout, **_fp8_groups(layout, dim),
        Q_ROPE_HALF=q_rope_half, PREFETCH=ATTENTION_PREFETCH_SELECTED if selected is not None else ATTENTION_PREFETCH,
        FLAT=ATTENTION_FLAT_SELECTED if selected is not None else ATTENTION_FLAT,
        num_warps=4 if dim <= 128 else ATTENTION_WARPS,
        **({"num_stages": ATTENTION_STAGES} if fp8_tiles and ATTENTION_STAGES is not None else {}))
    if splits > 1:
        _sparse_attention_reduce_kernel[(n, heads)](
            part_acc, part_ml, sinks, out, positions, inverse_rope if inverse_rope is not None else sinks,
            out.stride(0), out.stride(1), splits,
            HEADS=heads, DIM=dim, BLOCK_D=_pow2(dim), BLOCK_S=8, ROPE=inverse_rope is not None,
            ROPE_HALF=inverse_rope.shape[0] if inverse_rope is not None else 0, ROUND=q.dtype != torch.float32,
            num_warps=4, enable_fp_fusion=False)
    elif inverse_rope is not None:
        out = norm_rope(out, positions, inverse_rope, inverse=True)
    return out


# ---- mHC: the connection's weights and the collapsed input, in one launch --------------------------------
# Two kinds of program a token. The collapse programs (SPAN channels each) form `pre` from the projection and
# write the sublayer's input; one more program forms `post` and the Sinkhorn-balanced `comb`, which nothing in
# the launch waits for: the two chains (a few hundred floats from L2, then ~40 dependent row / column sums of
# a 4 x 4 tile) run side by side instead of one after the other in every program. The Sinkhorn program holds
# the tile as [N, N, LANES], a copy of the whole tile per lane (LANES = the program's threads), so its sums
# are register adds: no shuffle, no shared memory, no barrier.

if triton is not None:
    @triton.jit
    def _hc_weights(mix_row, k, cells, OFFSET: tl.constexpr, SQUARE: tl.constexpr, PARTIALS: tl.constexpr,
                    M: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_C: tl.constexpr):
        """The projection's columns OFFSET.. as [N] (SQUARE: [N, N]): hc_post's per-chunk partial sums added up
        (PARTIALS), or the GEMM's row."""
        if PARTIALS:
            ch = tl.arange(0, BLOCK_C)
            parts = mix_row + ch * M                                                  # [BLOCK_C] rows
            if SQUARE:
                weights = tl.sum(tl.load(parts[:, None, None] + OFFSET + cells[None, :, :],
                                         mask=(ch < CHUNKS)[:, None, None], other=0.0), axis=0)
            else:
                weights = tl.sum(tl.load(parts[:, None] + OFFSET + k[None, :], mask=(ch < CHUNKS)[:, None],
                                         other=0.0), axis=0)
        elif SQUARE:
            weights = tl.load(mix_row + OFFSET + cells)
        else:
            weights = tl.load(mix_row + OFFSET + k)
        return weights

    @triton.jit
    def _hc_squares(streams_row, mix_row, k, cells, GRAM: tl.constexpr, N: tl.constexpr, HIDDEN: tl.constexpr,
                    BLOCK: tl.constexpr, PARTIALS: tl.constexpr, M: tl.constexpr, CHUNKS: tl.constexpr,
                    BLOCK_C: tl.constexpr):
        """(the streams' sum of squares, with GRAM their Gram matrix [N, N]): from hc_post's partial sums
        (PARTIALS; the squares are the Gram matrix's trace), else a walk over the streams (no Gram matrix)."""
        if PARTIALS:
            if GRAM:
                gram = _hc_weights(mix_row, k, cells, (2 + N) * N, True, True, M, CHUNKS, BLOCK_C)
                squares = tl.sum(tl.sum(tl.where(k[:, None] == k[None, :], gram, 0.0), axis=1), axis=0)
            else:           # the diagonal only
                gram = tl.zeros([N, N], tl.float32)
                squares = tl.sum(_hc_weights(mix_row, k * (N + 1), cells, (2 + N) * N, False, True, M, CHUNKS,
                                             BLOCK_C), axis=0)
        else:
            c = tl.arange(0, BLOCK)
            acc = tl.zeros([N, BLOCK], tl.float32)
            for c0 in range(0, HIDDEN, BLOCK):
                mask = (c0 + c) < HIDDEN
                x = tl.load(streams_row + k[:, None] * HIDDEN + c0 + c[None, :], mask=mask[None, :],
                            other=0.0).to(tl.float32)
                acc += x * x
            squares = tl.sum(tl.sum(acc, axis=1), axis=0)
            gram = tl.zeros([N, N], tl.float32)
        return squares, gram

    @triton.jit
    def _hc_collapse(x, pre, inv_rms, norm_ptr, out_ptr, c0, c, mask, NORM: tl.constexpr,
                     WEIGHT_IN_FP32: tl.constexpr):
        """Store channels c0 + c of the sublayer's input: the streams x [N, BLOCK] weighted by pre, through the
        norm (inv_rms) if NORM, as runtime.ops.rms_norm_ref: on the rounded row, the weight before or after the
        cast."""
        dtype = out_ptr.dtype.element_ty
        collapsed = tl.sum(x * pre[:, None], axis=0)
        if NORM:
            normed = collapsed.to(dtype).to(tl.float32) * inv_rms
            weight = tl.load(norm_ptr + c0 + c, mask=mask, other=0.0).to(tl.float32)
            if WEIGHT_IN_FP32:
                collapsed = weight * normed
            else:
                collapsed = weight * normed.to(dtype).to(tl.float32)
        tl.store(out_ptr + c0 + c, collapsed.to(dtype), mask=mask)

    @triton.jit
    def _hc_pre_kernel(streams_ptr, mix_ptr, base_ptr, scale_ptr, post_ptr, comb_ptr, out_ptr, norm_ptr,
                       streams_stride, mix_stride, norm_eps, hc_eps, sinkhorn_iters, out_eps,
                       N: tl.constexpr, HIDDEN: tl.constexpr, BLOCK: tl.constexpr, SPAN: tl.constexpr,
                       PARTIALS: tl.constexpr, M: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_C: tl.constexpr,
                       NORM: tl.constexpr, WEIGHT_IN_FP32: tl.constexpr, LANES: tl.constexpr,
                       PDL: tl.constexpr = False):
        if PDL:                      # see _pdl: the next launch may start; this one waits for the last to end
            gdc_launch_dependents()
            gdc_wait()
        # programs (token, part): part < cdiv(HIDDEN, SPAN) collapses SPAN channels (with PARTIALS, SPAN = BLOCK:
        # its streams load first, under the partial sums' latency; without, SPAN = HIDDEN and the program walks
        # the row for the RMS too); the last part forms post and comb
        token = tl.program_id(0).to(tl.int64)
        part = tl.program_id(1)
        k = tl.arange(0, N)
        c = tl.arange(0, BLOCK)
        cells = k[:, None] * N + k[None, :]
        row = streams_ptr + token * streams_stride
        mix_row = mix_ptr + token * mix_stride
        if part == (HIDDEN + SPAN - 1) // SPAN:
            post_w = _hc_weights(mix_row, k, cells, N, False, PARTIALS, M, CHUNKS, BLOCK_C)
            comb_w = _hc_weights(mix_row, k, cells, 2 * N, True, PARTIALS, M, CHUNKS, BLOCK_C)
            squares, _ = _hc_squares(row, mix_row, k, cells, False, N, HIDDEN, BLOCK, PARTIALS, M, CHUNKS, BLOCK_C)
            rms = tl.rsqrt(squares / (N * HIDDEN) + norm_eps)   # RMS of all streams together, after the GEMM
            post = post_w * rms * tl.load(scale_ptr + 1) + tl.load(base_ptr + N + k)
            tl.store(post_ptr + token * N + k, 2.0 * tl.sigmoid(post))
            logits = comb_w * rms * tl.load(scale_ptr + 2) + tl.load(base_ptr + 2 * N + cells)       # [N, N]
            comb = logits[:, :, None] + tl.zeros([N, N, LANES], tl.float32)     # [N, N, LANES]: a copy a lane
            comb = tl.exp(comb - tl.max(comb, axis=1)[:, None, :])
            # each division by a row's (column's) sum as one reciprocal and N products: 2N, not 2N^2, special-
            # function instructions an iteration, which a warp issues at a quarter of the lanes a clock
            comb = comb * (1.0 / tl.sum(comb, axis=1))[:, None, :] + hc_eps
            comb = comb * (1.0 / (tl.sum(comb, axis=0) + hc_eps))[None, :, :]
            for _ in range(sinkhorn_iters - 1):
                comb = comb * (1.0 / (tl.sum(comb, axis=1) + hc_eps))[:, None, :]
                comb = comb * (1.0 / (tl.sum(comb, axis=0) + hc_eps))[None, :, :]
            lane = tl.arange(0, LANES)[None, None, :]
            tl.store(comb_ptr + token * N * N + cells[:, :, None] + lane * 0, comb, mask=lane == 0)
        else:
            c0 = part * SPAN
            mask = (c0 + c) < HIDDEN
            x = tl.load(row + k[:, None] * HIDDEN + c0 + c[None, :], mask=mask[None, :], other=0.0).to(tl.float32)
            pre_w = _hc_weights(mix_row, k, cells, 0, False, PARTIALS, M, CHUNKS, BLOCK_C)
            squares, gram = _hc_squares(row, mix_row, k, cells, NORM, N, HIDDEN, BLOCK, PARTIALS, M, CHUNKS, BLOCK_C)
            rms = tl.rsqrt(squares / (N * HIDDEN) + norm_eps)
            pre = tl.sigmoid(pre_w * rms * tl.load(scale_ptr) + tl.load(base_ptr + k)) + hc_eps
            dtype = out_ptr.dtype.element_ty
            inv_rms = 1.0
            if NORM:            # the sublayer's RMSNorm of the collapsed row: its sum of squares first
                if PARTIALS:    # pre^T G pre: the collapsed row's squares before its rounding to the dtype
                    total = tl.sum(tl.sum(pre[:, None] * gram * pre[None, :], axis=1), axis=0)
                else:           # of the rounded row, as the reference
                    acc_total = tl.zeros([BLOCK], tl.float32)
                    for b0 in range(0, HIDDEN, BLOCK):
                        b_mask = (b0 + c) < HIDDEN
                        xb = tl.load(row + k[:, None] * HIDDEN + b0 + c[None, :], mask=b_mask[None, :],
                                     other=0.0).to(tl.float32)
                        collapsed = tl.sum(xb * pre[:, None], axis=0).to(dtype).to(tl.float32)
                        acc_total += collapsed * collapsed
                    total = tl.sum(acc_total, axis=0)
                inv_rms = tl.rsqrt(total / HIDDEN + out_eps)
            out_row = out_ptr + token * HIDDEN
            _hc_collapse(x, pre, inv_rms, norm_ptr, out_row, c0, c, mask, NORM, WEIGHT_IN_FP32)
            for b0 in range(c0 + BLOCK, c0 + SPAN, BLOCK):         # the rest of the span (without PARTIALS)
                b_mask = (b0 + c) < HIDDEN
                xb = tl.load(row + k[:, None] * HIDDEN + b0 + c[None, :], mask=b_mask[None, :],
                             other=0.0).to(tl.float32)
                _hc_collapse(xb, pre, inv_rms, norm_ptr, out_row, b0, c, b_mask, NORM, WEIGHT_IN_FP32)


HC_PRE_SPAN = 256            # channels a program of hc_pre collapses when hc_post summed the projection for it
HC_PRE_WARPS = 1             # with the partials (4 without): H200, batch 1, in a graph: 3.97 us a call at 1 warp,
                             # 5.10 at 2, 5.06 at 4 (one program for all: 5.95 at 2)


try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:     # no triton, or one without programmatic dependent launch
    gdc_launch_dependents = gdc_wait = None


def _pdl(x: torch.Tensor) -> dict:
    """The launch options of mHC's kernels and the norm + RoPE on Hopper, where runtime.ops.fp8 launches its
    GEMV as a programmatic dependent (FP8_GEMV_PDL, RUN_MODEL_FP8_PDL): they are launched that way too, let
    the next such launch start at once (griddepcontrol.launch_dependents), and wait for the kernel before them
    to end (griddepcontrol.wait) before touching memory, so a chain hc_post -> hc_pre -> wq_a+wkv -> norm_rope
    -> wq_b overlaps each launch with the end of the kernel before. Safe whatever the neighbours: a kernel not
    launched that way waits for this one's end as usual; each of these waits before its first access, the GEMV
    before anything but its weights. {} elsewhere."""
    from runtime.ops.fp8 import fp8_dependent_launch

    return {"PDL": True, "launch_pdl": True} if gdc_wait is not None and fp8_dependent_launch(x) else {}


def hc_pre(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_eps: float,
           hc_eps: float, sinkhorn_iters: int, mix: torch.Tensor | None = None,
           norm: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same function as mhc.HyperConnection.pre: streams [n, hc, hidden] -> (post [n, hc], comb
    [n, hc, hc], input [n, hidden]), the input through `norm` (a runtime RMSNorm) if given. The projection is
    the sum of `mix`, hc_post's partial sums for these streams (`next_fn`: then the norm's sum of squares comes
    from their Gram matrix, before the row's rounding to the dtype, and a program collapses HC_PRE_SPAN
    channels), or else one GEMM of the unnormalized streams (the RMS factor is a per-token scalar, applied
    after it) and a program a token. Sinkhorn included, all the rest is that one launch."""
    n, hc, hidden = streams.shape
    streams = streams.contiguous()
    partials = mix is not None
    if partials:
        chunks, width = mix.shape[1], mix.shape[2]
        span = min(HC_PRE_SPAN, _pow2(hidden))
        block = span
        warps = HC_PRE_WARPS
    else:
        mix = torch.nn.functional.linear(streams.view(n, -1).float(), fn)       # [n, (2 + hc) * hc]
        chunks, width = 1, mix.shape[1]
        block = min(1024, _pow2(hidden))
        span = triton.cdiv(hidden, block) * block
        warps = 4
    post = torch.empty(n, hc, dtype=torch.float32, device=streams.device)
    comb = torch.empty(n, hc, hc, dtype=torch.float32, device=streams.device)
    out = torch.empty(n, hidden, dtype=streams.dtype, device=streams.device)
    if n:
        _hc_pre_kernel[(n, triton.cdiv(hidden, span) + 1)](
            streams, mix, base, scale, post, comb, out, norm.weight if norm is not None else base,
            streams.stride(0), mix.stride(0), norm_eps, hc_eps, sinkhorn_iters, norm.eps if norm is not None else 0.0,
            N=hc, HIDDEN=hidden, BLOCK=block, SPAN=span, PARTIALS=partials, M=width, CHUNKS=chunks,
            BLOCK_C=_pow2(chunks), NORM=norm is not None, WEIGHT_IN_FP32=norm is not None and norm.weight_in_fp32,
            LANES=32 * warps, num_warps=warps, **_pdl(streams))
    return post, comb, out


# ---- per-head RMS norm + RoPE (+ insert into the window cache) ------------------------------------------

if triton is not None:
    @triton.jit
    def _latent_norm(x_ptr, out_ptr, weight_ptr, eps, DIM: tl.constexpr, BLOCK: tl.constexpr):
        """One row's RMSNorm with an fp32 weight multiplied before the cast (runtime RMSNorm, weight_in_fp32)."""
        c = tl.arange(0, BLOCK)
        mask = c < DIM
        x = tl.load(x_ptr + c, mask=mask, other=0.0).to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / DIM + eps)
        weight = tl.load(weight_ptr + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + c, (weight * (x * inv_rms)).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _norm_rope_kernel(x_ptr, out_ptr, positions_ptr, inv_freq_ptr, slots_ptr, weight_ptr,
                          latent_ptr, latent_out_ptr, latent_weight_ptr,
                          x_stride_t, x_stride_h, out_stride_t, out_stride_h, latent_stride, eps, latent_eps,
                          HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr,
                          BLOCK_HALF: tl.constexpr, ROPE_HALF: tl.constexpr, NORMALIZE: tl.constexpr,
                          WEIGHTED: tl.constexpr,
                          INVERSE: tl.constexpr, TO_SLOTS: tl.constexpr, ROUND: tl.constexpr,
                          FP8: tl.constexpr, NOPE: tl.constexpr, QBLOCK: tl.constexpr, NUM_SCALES: tl.constexpr,
                          SCALES_AT: tl.constexpr, ENTRY: tl.constexpr, LATENT_DIM: tl.constexpr,
                          BLOCK_LATENT: tl.constexpr, PDL: tl.constexpr = False):
        if PDL:                      # see _pdl: the next launch may start; this one waits for the last to end
            gdc_launch_dependents()
            gdc_wait()
        # with LATENT_DIM the last program of a token normalizes its row of another tensor (the q latent's
        # RMSNorm riding along with K's insert); the others take their heads
        token = tl.program_id(0).to(tl.int64)
        if tl.program_id(1) >= (HEADS + BLOCK_H - 1) // BLOCK_H:         # launched only with LATENT_DIM
            if LATENT_DIM > 0:
                _latent_norm(latent_ptr + token * latent_stride, latent_out_ptr + token * LATENT_DIM,
                             latent_weight_ptr, latent_eps, LATENT_DIM, BLOCK_LATENT)
        else:
            h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
            i = tl.arange(0, BLOCK_HALF)
            mask = (h < HEADS)[:, None] & (i < HALF)[None, :]
            dtype = x_ptr.dtype.element_ty
            src = x_ptr + token * x_stride_t + h[:, None] * x_stride_h
            even = tl.load(src + 2 * i[None, :], mask=mask, other=0.0).to(tl.float32)
            odd = tl.load(src + 2 * i[None, :] + 1, mask=mask, other=0.0).to(tl.float32)
            if NORMALIZE:
                rms = tl.rsqrt((tl.sum(even * even, axis=1) + tl.sum(odd * odd, axis=1)) / (2 * HALF) + eps)
                if WEIGHTED:        # an RMSNorm whose fp32 weight multiplies in fp32, then the dtype
                    w_even = tl.load(weight_ptr + 2 * i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
                    w_odd = tl.load(weight_ptr + 2 * i + 1, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
                    even = _rounded(w_even * (even * rms[:, None]), ROUND, dtype)
                    odd = _rounded(w_odd * (odd * rms[:, None]), ROUND, dtype)
                else:               # unweighted: x * rsqrt(mean(x^2) + eps), in x's dtype
                    rms = _rounded(rms, ROUND, dtype)[:, None]
                    even = _rounded(even * rms, ROUND, dtype)
                    odd = _rounded(odd * rms, ROUND, dtype)
            even, odd = _rope_pairs(even, odd, i, tl.load(positions_ptr + token), inv_freq_ptr, HALF, ROPE_HALF, INVERSE,
                                    ROUND, dtype)
            if TO_SLOTS:                                       # one head, stored at the token's cache slot
                slot = tl.load(slots_ptr + token).to(tl.int64)
                if slot >= 0:
                    dst = out_ptr + slot * out_stride_t + h[:, None] * out_stride_h
                    if FP8:
                        _store_fp8_entries(dst, even, odd, i, mask, (h < HEADS)[:, None], NOPE, QBLOCK, NUM_SCALES,
                                           SCALES_AT)
                    else:
                        tl.store(dst + 2 * i[None, :], even.to(out_ptr.dtype.element_ty), mask=mask)
                        tl.store(dst + 2 * i[None, :] + 1, odd.to(out_ptr.dtype.element_ty), mask=mask)
            else:
                dst = out_ptr + token * out_stride_t + h[:, None] * out_stride_h
                tl.store(dst + 2 * i[None, :], even.to(out_ptr.dtype.element_ty), mask=mask)
                tl.store(dst + 2 * i[None, :] + 1, odd.to(out_ptr.dtype.element_ty), mask=mask)


def norm_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, normalize: bool = False,
              eps: float = 0.0, inverse: bool = False, cache: torch.Tensor | None = None,
              slots: torch.Tensor | None = None, fmt: Fp8Entry | None = None,
              weight: torch.Tensor | None = None,
              latent: tuple[torch.Tensor, torch.nn.Module] | None = None) -> torch.Tensor | None:
    """x [n, heads, dim]: optionally the per-head RMS norm (unweighted, or with `weight` [dim] that of a
    runtime RMSNorm with weight_in_fp32), then interleaved RoPE on the trailing
    2 * len(inv_freq) dims at `positions` (by -position with `inverse`), rounding as the references
    (attention.unweighted_rms_norm, RMSNorm, rope.TrailingRope) do. Returns a new tensor, or with `cache` and `slots`
    (one head) stores each token's row at its slot (-1: nowhere), quantized into `fmt` if given, and returns
    None. With `latent` (rows [n, d], a runtime RMSNorm with weight_in_fp32) the same launch also normalizes
    those rows, and returns them (a new tensor) instead of None."""
    n, heads, dim = x.shape
    to_slots = cache is not None
    layout = _fp8_layout(fmt, dim)
    if to_slots:
        out = cache.view(-1, 1, layout["ENTRY"])
    else:
        out = torch.empty(n, heads, dim, dtype=x.dtype, device=x.device)
    latent_out = None
    if latent is not None:
        rows, latent_norm = latent
        if not to_slots or not latent_norm.weight_in_fp32 or rows.stride(-1) != 1:
            raise ValueError("a latent norm rides with a cache insert: an fp32-weight RMSNorm of contiguous rows")
        latent_out = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
    if n == 0:
        return latent_out if to_slots else out
    block_h = min(4, _pow2(heads))                     # many small programs: a decode step has few tokens
    latent_dim = latent_out.shape[1] if latent is not None else 0
    _norm_rope_kernel[(n, triton.cdiv(heads, block_h) + (latent is not None))](
        x, out, positions, inv_freq, slots if to_slots else positions, weight if weight is not None else inv_freq,
        rows if latent is not None else x, latent_out if latent is not None else out,
        latent_norm.weight if latent is not None else inv_freq,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), rows.stride(0) if latent is not None else 0,
        eps, latent_norm.eps if latent is not None else 0.0,
        HEADS=heads, BLOCK_H=block_h, HALF=dim // 2, BLOCK_HALF=_pow2(dim // 2), ROPE_HALF=inv_freq.shape[0],
        NORMALIZE=normalize or weight is not None, WEIGHTED=weight is not None, INVERSE=inverse, TO_SLOTS=to_slots,
        ROUND=x.dtype != torch.float32,
        FP8=fmt is not None, **layout, LATENT_DIM=latent_dim, BLOCK_LATENT=_pow2(max(latent_dim, 1)),
        num_warps=4, enable_fp_fusion=False, **_pdl(x))
    return latent_out if to_slots else out


if triton is not None:
    @triton.jit
    def _hc_post_kernel(out_ptr, addend_ptr, streams_ptr, post_ptr, comb_ptr, new_ptr, fn_ptr, mix_ptr, out_stride,
                        addend_stride, streams_stride, N: tl.constexpr, HIDDEN: tl.constexpr, BLOCK: tl.constexpr,
                        ROUND: tl.constexpr, ADD: tl.constexpr, MIX: tl.constexpr, M: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_FN: tl.constexpr, PDL: tl.constexpr = False):
        if PDL:                      # see _pdl: the next launch may start; this one waits for the last to end
            gdc_launch_dependents()
            gdc_wait()
        token = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        c = chunk * BLOCK + tl.arange(0, BLOCK)
        mask = c < HIDDEN
        k = tl.arange(0, N)
        dtype = new_ptr.dtype.element_ty
        streams = tl.load(streams_ptr + token * streams_stride + k[:, None] * HIDDEN + c[None, :],
                          mask=mask[None, :], other=0.0).to(tl.float32)                 # [N, BLOCK]
        comb = _rounded(tl.load(comb_ptr + token * N * N + k[:, None] * N + k[None, :]), ROUND, dtype)  # [j, k]
        mixed = _rounded(tl.sum(comb[:, :, None] * streams[:, None, :], axis=0), ROUND, dtype)   # [k, BLOCK]
        post = _rounded(tl.load(post_ptr + token * N + k), ROUND, dtype)
        out = tl.load(out_ptr + token * out_stride + c, mask=mask, other=0.0).to(tl.float32)
        if ADD:             # the sublayer's output is the sum of two, added in the dtype
            out = _rounded(out + tl.load(addend_ptr + token * addend_stride + c, mask=mask, other=0.0).to(tl.float32),
                           ROUND, dtype)
        new = (_rounded(post[:, None] * out[None, :], ROUND, dtype) + mixed).to(dtype)
        tl.store(new_ptr + token * N * HIDDEN + k[:, None] * HIDDEN + c[None, :], new, mask=mask[None, :])
        if MIX:
            # the next connection's projection of these channels of the new streams (unnormalized) and their
            # Gram matrix (its trace: the sum of squares): M + N * N partial sums a chunk, which hc_pre adds up
            # (no GEMM, no fp32 copy)
            x = new.to(tl.float32)                                                      # 0 past HIDDEN
            m = tl.arange(0, BLOCK_FN)                  # the projection's rows (a mix row is BLOCK_M wide)
            w = tl.load(fn_ptr + m[:, None, None] * (N * HIDDEN) + k[None, :, None] * HIDDEN + c[None, None, :],
                        mask=(m < M)[:, None, None] & mask[None, None, :], other=0.0)  # [BLOCK_FN, N, BLOCK]
            partial = tl.sum(tl.sum(w * x[None, :, :], axis=2), axis=1)
            dst = mix_ptr + (token * tl.num_programs(1) + chunk) * BLOCK_M
            tl.store(dst + m, partial, mask=m < M)
            gram = tl.sum(x[:, None, :] * x[None, :, :], axis=2)                       # [N, N]
            tl.store(dst + M + k[:, None] * N + k[None, :], gram)


HC_MIX_BLOCK = 64            # channels a program of hc_post projects for the next connection (64 programs at 4096)
HC_MIX_MAX_TOKENS = 8        # past this a GEMM reads the connection's weight once for all tokens


def hc_post(output: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
            next_fn: torch.Tensor | None = None,
            addend: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The same function as mhc.HyperConnection.post: new streams [n, hc, hidden], each
    post_k * output + sum_j comb[j, k] * stream_j, in one launch; with `addend` the output is output + addend
    (added in their dtype). With `next_fn` (the next connection's [(2 + hc) * hc, hc * hidden] fp32
    projection) also -> the partial sums hc_pre reads as `mix` [n, chunks, pow2((2 + hc) * hc + hc * hc)]:
    each chunk's projection of the new streams and their Gram matrix."""
    n, hc, hidden = streams.shape
    streams = streams.contiguous()
    output = output.contiguous()
    addend = addend.contiguous() if addend is not None else None
    new = torch.empty_like(streams)
    m = (2 + hc) * hc
    block = HC_MIX_BLOCK if next_fn is not None else min(512, _pow2(hidden))
    chunks = triton.cdiv(hidden, block)
    mix = torch.empty(n, chunks, _pow2(m + hc * hc), dtype=torch.float32, device=streams.device) \
        if next_fn is not None else None
    if n:
        _hc_post_kernel[(n, chunks)](
            output, addend if addend is not None else output, streams, post.contiguous(), comb.contiguous(), new,
            next_fn if next_fn is not None else post, mix if mix is not None else post,
            output.stride(0), addend.stride(0) if addend is not None else 0, streams.stride(0),
            N=hc, HIDDEN=hidden, BLOCK=block, ROUND=streams.dtype != torch.float32, ADD=addend is not None,
            MIX=next_fn is not None, M=m, BLOCK_M=_pow2(m + hc * hc), BLOCK_FN=_pow2(m), num_warps=4,
            enable_fp_fusion=False, **_pdl(streams))
    return new if next_fn is None else (new, mix)


# ---- mHC's head: the streams collapsed once after the last layer (and after the MTP block) ---------------
# Two launches: programs (token, chunk) form the N projections and the sum of squares of a chunk of each
# stream's channels (fn read once, in parallel); programs (token, chunk) then add those partials (in chunk
# order), form pre = sigmoid(mix * scale + base) + hc_eps and collapse their channels.

if triton is not None:
    @triton.jit
    def _hc_head_mix_kernel(streams_ptr, fn_ptr, part_ptr, streams_stride, N: tl.constexpr, HIDDEN: tl.constexpr,
                            BLOCK: tl.constexpr, CHUNKS: tl.constexpr, WIDTH: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        k = tl.arange(0, N)
        h = chunk * BLOCK + tl.arange(0, BLOCK)
        mask = (h < HIDDEN)[None, :] & (k < N)[:, None]
        x = tl.load(streams_ptr + token * streams_stride + k[:, None] * HIDDEN + h[None, :], mask=mask,
                    other=0.0).to(tl.float32)                                                     # [s, h]
        f = tl.load(fn_ptr + (k[:, None, None] * N + k[None, :, None]) * HIDDEN + h[None, None, :],
                    mask=mask[None, :, :], other=0.0)                                             # [j, s, h]
        dots = tl.sum(tl.sum(f * x[None, :, :], axis=2), axis=1)                                   # [j]
        squares = tl.sum(tl.sum(x * x, axis=1), axis=0)
        w = tl.arange(0, WIDTH)
        part = tl.where(w == N, squares, tl.sum(tl.where(w[:, None] == k[None, :], dots[None, :], 0.0), axis=1))
        tl.store(part_ptr + (token * CHUNKS + chunk) * WIDTH + w, part, mask=w <= N)

    @triton.jit
    def _hc_head_collapse_kernel(streams_ptr, part_ptr, base_ptr, scale_ptr, out_ptr, streams_stride, norm_eps,
                                 hc_eps, N: tl.constexpr, HIDDEN: tl.constexpr, BLOCK: tl.constexpr,
                                 CHUNKS: tl.constexpr, BLOCK_C: tl.constexpr, WIDTH: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        k = tl.arange(0, N)
        w = tl.arange(0, WIDTH)
        chunks = tl.arange(0, BLOCK_C)
        parts = tl.load(part_ptr + (token * CHUNKS + chunks[:, None]) * WIDTH + w[None, :],
                        mask=(chunks < CHUNKS)[:, None] & (w <= N)[None, :], other=0.0)
        total = tl.sum(parts, axis=0)                                                              # [WIDTH]
        inv_rms = tl.rsqrt(tl.sum(tl.where(w == N, total, 0.0), axis=0) / (N * HIDDEN) + norm_eps)
        mix = tl.sum(tl.where(w[None, :] == k[:, None], total[None, :], 0.0), axis=1) * inv_rms          # [N]
        pre = tl.sigmoid(mix * tl.load(scale_ptr) + tl.load(base_ptr + k)) + hc_eps
        h = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = (h < HIDDEN)[None, :] & (k < N)[:, None]
        x = tl.load(streams_ptr + token * streams_stride + k[:, None] * HIDDEN + h[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        tl.store(out_ptr + token * HIDDEN + h, tl.sum(pre[:, None] * x, axis=0).to(out_ptr.dtype.element_ty),
                 mask=h < HIDDEN)


HC_HEAD_BLOCK = 256          # channels of each stream a program of hc_head projects or collapses


def hc_head(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_eps: float,
            hc_eps: float) -> torch.Tensor:
    """The same function as mhc.HyperHead: streams [n, hc, hidden] -> [n, hidden] in their dtype, in two
    launches (fn [hc, hc * hidden], base [hc], scale [1], fp32)."""
    n, hc, hidden = streams.shape
    streams = streams.contiguous()
    out = torch.empty(n, hidden, dtype=streams.dtype, device=streams.device)
    block = min(HC_HEAD_BLOCK, _pow2(hidden))
    chunks = triton.cdiv(hidden, block)
    width = _pow2(hc + 1)
    part = torch.empty(n, chunks, width, dtype=torch.float32, device=streams.device)
    if n:
        _hc_head_mix_kernel[(n, chunks)](streams, fn.contiguous(), part, streams.stride(0), N=hc, HIDDEN=hidden,
                                         BLOCK=block, CHUNKS=chunks, WIDTH=width, num_warps=4)
        _hc_head_collapse_kernel[(n, chunks)](streams, part, base, scale, out, streams.stride(0), norm_eps, hc_eps,
                                              N=hc, HIDDEN=hidden, BLOCK=block, CHUNKS=chunks,
                                              BLOCK_C=_pow2(chunks), WIDTH=width, num_warps=4,
                                              enable_fp_fusion=False)
    return out
