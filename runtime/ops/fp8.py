"""FP8 (E4M3) weights with per-block power-of-two scales, the format several families ship for their linears.

A weight [out, in] is stored as float8_e4m3fn with a scale grid [out / block_out, in / block_in]; each scale
multiplies one block_out x block_in tile. Scales are UE8M0 (`float8_e8m0fnu`, value 2^(byte - 127)) or fp32.
The block shape is read from the grid, so every dimension must divide evenly (as transformers requires).
`fp8_block_dequantize` is the CPU path; `fp8_block_quantize` writes test checkpoints. `Fp8Linear` keeps such a
weight in its 1-byte format on a GPU: `fp8_gemv` multiplies a few rows by it (decode: one pass over the bytes,
activations unquantized, up to 8 rows on the tensor cores; `fp8_linear_ref` is its torch reference and the CPU
path); more rows go to `fp8_w8a8_matmul` (activations quantized per 1 x 128 to E4M3 with power-of-two scales,
then cuBLAS's block-scaled FP8 GEMM on Hopper; reference `fp8_w8a8_ref`) where that measured faster, else to
`fp8_matmul` (the weight dequantized for the call, then cuBLAS)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from runtime.ops.activation import silu_mul, silu_mul_ref

try:
    import triton
    import triton.language as tl

    from runtime.ops.activation import gated_activation
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    except ImportError:                              # a Triton without programmatic dependent launch
        gdc_launch_dependents = gdc_wait = None
except ImportError:                                  # the torch path needs no triton
    triton = None

FP8_MAX = 448.0                     # largest finite float8_e4m3fn


def fp8_block_shape(weight_shape: tuple[int, ...], scale_shape: tuple[int, ...], name: str = "weight") -> tuple[int, int]:
    """(block_out, block_in) implied by a weight and its scale grid; a ValueError naming the tensor if they
    do not tile."""
    if len(weight_shape) != 2 or len(scale_shape) != 2:
        raise ValueError(f"FP8 tensor {name!r}: weight {tuple(weight_shape)} and scale {tuple(scale_shape)} "
                         f"must both be 2-D")
    (rows, cols), (grid_rows, grid_cols) = weight_shape, scale_shape
    if grid_rows == 0 or grid_cols == 0 or rows % grid_rows or cols % grid_cols:
        raise ValueError(f"FP8 tensor {name!r}: scale grid {tuple(scale_shape)} does not tile the weight "
                         f"{tuple(weight_shape)} into equal [out, in] blocks")
    return rows // grid_rows, cols // grid_cols


def fp8_block_dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                         name: str = "weight") -> torch.Tensor:
    """weight float8_e4m3fn [out, in], scale [out / bo, in / bi] (UE8M0 or float) -> [out, in] in `dtype`.
    The product is formed in fp32 (exact: a power of two times an E4M3 value)."""
    block_out, block_in = fp8_block_shape(tuple(weight.shape), tuple(scale.shape), name)
    expanded = scale.float().repeat_interleave(block_out, 0).repeat_interleave(block_in, 1)   # [out, in]
    return (weight.float() * expanded).to(dtype)


def fp8_block_quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (float8_e4m3fn weight, float8_e8m0fnu scale grid). Each block's scale is its
    amax / 448 rounded up to a power of two, so no element saturates."""
    block_out, block_in = block
    rows, cols = weight.shape
    if rows % block_out or cols % block_in:
        raise ValueError(f"weight {tuple(weight.shape)} does not tile into FP8 blocks of {block}")
    tiles = weight.float().reshape(rows // block_out, block_out, cols // block_in, block_in)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=2.0 ** -100)                  # [grid_rows, grid_cols]
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    quantized = (tiles / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
    return quantized, scale.to(torch.float8_e8m0fnu)


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Torch reference of `fp8_gemv`: x [rows, groups * in] times the dequantized weight [groups * out, in]
    block-diagonally (group g's inputs to its `out` rows) -> [rows, groups * out] in x's dtype."""
    w = fp8_block_dequantize(weight, scale, x.dtype)                           # [groups * out, in]
    if groups == 1:
        return torch.nn.functional.linear(x, w)
    rows = x.shape[0]
    w = w.view(groups, -1, w.shape[1])                                          # [groups, out, in]
    return torch.einsum("ngi,goi->ngo", x.view(rows, groups, -1), w).reshape(rows, -1)


def fp8_silu_mul_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, limit: float | None = None
                     ) -> torch.Tensor:
    """Torch reference of the GEMV's `silu_mul_output`: the weight is a gate projection's rows then an up
    projection's, [2 * d, in]; -> silu_mul_ref(gate, up, limit) of the two halves of `fp8_linear_ref` (each rounded
    to x's dtype first, as two linears' outputs are), [rows, d]."""
    y = fp8_linear_ref(x, weight, scale)
    d = y.shape[1] // 2
    return silu_mul_ref(y[:, :d], y[:, d:], limit)


# ---- the few-row GEMV over FP8 block-scaled weights ----------------------------------------------------
# A decode GEMV is a pass over the weight, bound by the instructions it spends per weight byte once enough
# bytes are in flight. The weight is read as int32 words, 16 bytes (4 words) per thread per load, the next
# step's words loading while this step's are decoded. An E4M3 byte becomes an fp32 bit pattern with integer
# operations only: bytes 0 and 2 of a word (16 bits apart) are placed by one shift-and-mask pair as two bf16
# patterns (magnitude bits to 4..10, sign to 15), bytes 1 and 3 by another; widening a bf16 half to fp32 is a
# shift or a mask. The pattern is the E4M3 value times 2^-120 (exact, subnormals included: both formats'
# subnormals scale the same way). The activations are pre-scaled by 2^64, so the products stay normal, and one
# FMA per weight accumulates. Each thread sums its 16 bytes in registers; their block scale multiplies that
# sum once; the sums are reduced across threads once, at the end, and times 2^56 undoes both powers of two.
#
# Program (n, s) owns BLOCK_N output columns for every input row and the s-th of SPLIT_K slices of K. With
# SPLIT_K > 1 each program writes its fp32 partial sums to `part` and bumps its column tile's arrival counter;
# the last to arrive adds the partials in split order (the same sum whatever the arrival order), writes the
# output and resets the counter to 0 for the next launch (so a CUDA graph replays it with no memset). With
# GROUPS > 1 the weight is block-diagonal: output column n reads the input columns of group n // n_per_group.
#
# Two layouts of a program's [BLOCK_N, BLOCK_K] step. N-major (above): each thread 16 bytes of one row, the
# warps over rows; its activations and scales are loaded in other layouts and moved into the weights' layout
# through shared memory (barriers) every step. K-major (LAYOUT_K): each thread 4 * W bytes of every one of the
# program's rows, the warps side by side along K, the activations read as one 64-bit load of 4 (bf16/fp16) in
# the weights' own layout, so the loop has no barrier; its E4M3 bytes are widened by the hardware (cvt e4m3x2
# -> f16x2, f16 -> f32: 1.5 instructions a weight, the N-major integer decode about 3). Measured on an H200,
# the N-major layout is faster at one row and the K-major one at 2-4 rows (the tile tables below).

if triton is not None:
    @triton.jit
    def _e4m3_pair_bits(words, ODD: tl.constexpr):
        """Bytes (0, 2) of each int32 word (ODD: bytes (1, 3)) -> one int32 holding them as two bf16 patterns (byte
        0 or 1 in the low half), the E4M3 values * 2^-120."""
        if ODD:
            pair = ((words >> 4) & 0x07F007F0) | (words & -2147450880)            # sign mask 0x80008000
        else:
            pair = ((words << 4) & 0x07F007F0) | ((words << 8) & -2147450880)
        return pair

    @triton.jit
    def _e4m3_pairs(words, ODD: tl.constexpr):
        """Bytes (0, 2) of each int32 word (ODD: bytes (1, 3)) -> two fp32 tensors, the E4M3 values * 2^-120."""
        pair = _e4m3_pair_bits(words, ODD)
        low = (pair << 16).to(tl.float32, bitcast=True)
        high = (pair & -65536).to(tl.float32, bitcast=True)                        # 0xFFFF0000
        return low, high

    @triton.jit
    def _fp8_gemv_row(w0, w1, w2, w3, x_ptrs, row, M, scale, acc):
        """acc [BLOCK_N, G] + the group sums of one activation row (x_ptrs [G, 4]: the first element of each
        word) times the decoded weights w0..w3 [BLOCK_N, G, 4] (byte p of each word), times their scales. Each
        activation is loaded in the layout of the weight byte it multiplies (no shuffle; they stay in L1)."""
        mask = (tl.zeros_like(x_ptrs.to(tl.int64, bitcast=True)) + row) < M                 # [G, 4]
        x0 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32) * 18446744073709551616.0       # x * 2^64
        sums = w0 * x0[None, :, :]
        x1 = tl.load(x_ptrs + 1, mask=mask, other=0.0).to(tl.float32) * 18446744073709551616.0
        sums += w1 * x1[None, :, :]
        x2 = tl.load(x_ptrs + 2, mask=mask, other=0.0).to(tl.float32) * 18446744073709551616.0
        sums += w2 * x2[None, :, :]
        x3 = tl.load(x_ptrs + 3, mask=mask, other=0.0).to(tl.float32) * 18446744073709551616.0
        sums += w3 * x3[None, :, :]
        return acc + tl.sum(sums, axis=2) * scale

    @triton.jit
    def _e4m3_word_cvt(words):
        """The 4 E4M3 bytes of each int32 word -> 4 fp32 tensors (byte 0 first), widened by the hardware:
        cvt e4m3x2 -> f16x2 twice, then f16 -> f32."""
        return tl.inline_asm_elementwise(
            """{
            .reg .b16 lo, hi, a, b, c, d;
            .reg .b32 h01, h23;
            mov.b32 {lo, hi}, $4;
            cvt.rn.f16x2.e4m3x2 h01, lo;
            cvt.rn.f16x2.e4m3x2 h23, hi;
            mov.b32 {a, b}, h01;
            mov.b32 {c, d}, h23;
            cvt.f32.f16 $0, a;
            cvt.f32.f16 $1, b;
            cvt.f32.f16 $2, c;
            cvt.f32.f16 $3, d;
            }""",
            "=r,=r,=r,=r,r", [words], dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True,
            pack=1)

    @triton.jit
    def _e4m3_word_bytes(words):
        """`_e4m3_word_cvt` by Triton's own casts (what the interpreter runs)."""
        w0 = (words & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        w1 = ((words >> 8) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        w2 = ((words >> 16) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        w3 = ((words >> 24) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        return w0, w1, w2, w3

    @triton.jit
    def _fp8_gemv_row_k(w0, w1, w2, w3, x_ptrs, x_stride, row, M, scale, acc, SHARED_SCALE: tl.constexpr,
                        X_PACKED: tl.constexpr, INT_DECODE: tl.constexpr):
        """acc [BLOCK_N, GV, W] + one activation row times the decoded weights w0..w3 [BLOCK_N, GV, W] (byte p of
        each word; with INT_DECODE times 2^-120), scale [1 or BLOCK_N, GV, 1]. X_PACKED (1: bf16, 2: fp16): x_ptrs
        [1, GV, W] address the 4 activations of each word as one 64-bit load; 0: the first of them (fp32, 4
        loads)."""
        mask = (tl.zeros_like(x_ptrs.to(tl.int64, bitcast=True)) + row) < M
        if X_PACKED == 1:                                              # bf16: the halves placed by shifts
            packed = tl.load(x_ptrs + row * x_stride, mask=mask, other=0)                    # int64
            x0 = (packed << 16).to(tl.int32).to(tl.float32, bitcast=True)
            x1 = (packed & 0xFFFF0000).to(tl.int32).to(tl.float32, bitcast=True)
            x2 = ((packed >> 16) & 0xFFFF0000).to(tl.int32).to(tl.float32, bitcast=True)
            x3 = ((packed >> 32) & 0xFFFF0000).to(tl.int32).to(tl.float32, bitcast=True)
        elif X_PACKED == 2:                                            # fp16
            packed = tl.load(x_ptrs + row * x_stride, mask=mask, other=0)
            x0 = packed.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            x1 = (packed >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            x2 = (packed >> 32).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            x3 = (packed >> 48).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        else:
            first = x_ptrs + row * x_stride
            x0 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
            x1 = tl.load(first + 1, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(first + 2, mask=mask, other=0.0).to(tl.float32)
            x3 = tl.load(first + 3, mask=mask, other=0.0).to(tl.float32)
        if SHARED_SCALE:                                     # the scale (and 2^64) folded into the activations
            if INT_DECODE:
                scale = scale * 18446744073709551616.0
            acc = acc + w0 * (x0 * scale)
            acc = acc + w1 * (x1 * scale)
            acc = acc + w2 * (x2 * scale)
            acc = acc + w3 * (x3 * scale)
        else:
            if INT_DECODE:                                   # products of normal numbers (see _e4m3_pairs)
                x0, x1, x2, x3 = (x0 * 18446744073709551616.0, x1 * 18446744073709551616.0,
                                  x2 * 18446744073709551616.0, x3 * 18446744073709551616.0)
            acc = acc + (w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3) * scale
        return acc

    @triton.jit
    def _fp8_gemv_store(acc, row, M, n, n_mask, out_ptr, stride_om, part_ptr, N, pid_k, SPLIT_K: tl.constexpr,
                        EXACT: tl.constexpr):
        """One row's [BLOCK_N] result (with the integer decode times 2^56, undoing 2^64 * 2^-120): the output, or
        this split's partial."""
        result = tl.sum(acc, axis=1)
        if not EXACT:
            result = result * 72057594037927936.0
        mask = n_mask & ((n * 0 + row) < M)
        if SPLIT_K == 1:
            tl.store(out_ptr + row * stride_om + n, result.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(part_ptr + (pid_k * M + row).to(tl.int64) * N + n, result, mask=mask)

    @triton.jit
    def _fp8_gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, part_ptr, count_ptr, M, N, K, stride_xm, stride_wn,
                         stride_sn, stride_om, n_per_group, words_per_split,
                         BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                         LAYOUT_K: tl.constexpr = False, W: tl.constexpr = 2, CVT_DECODE: tl.constexpr = False,
                         INTERPRET_DECODE: tl.constexpr = False, SHARED_SCALE: tl.constexpr = False,
                         X_PACKED: tl.constexpr = 0):
        # BLOCK_M rows (at most 4) in separate accumulators: every tensor stays 3-D in the weights' layout.
        # LAYOUT_K: see below; CVT_DECODE: the hardware widens E4M3 (else the integer decode, or with
        # INTERPRET_DECODE Triton's casts); X_PACKED: the activations' dtype (1 bf16, 2 fp16, 0 fp32).
        G: tl.constexpr = BLOCK_K // 16
        GV: tl.constexpr = BLOCK_K // (4 * W)
        EXACT: tl.constexpr = LAYOUT_K and (CVT_DECODE or INTERPRET_DECODE)      # sums not scaled by 2^56
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < N
        group = (pid_n * BLOCK_N) // n_per_group
        w_begin = pid_k * words_per_split
        w_end = tl.minimum(w_begin + words_per_split, K // 4)
        if LAYOUT_K:
            # W words (4 weights each) of a weight row per thread per step, the warps side by side along K: the
            # activations, their scales and the weights share one layout (no layout conversion in the loop)
            words_k = (tl.arange(0, GV) * W)[None, :, None] + tl.arange(0, W)[None, None, :]    # [1, GV, W]
            k_thread = (tl.arange(0, GV) * (4 * W))[None, :, None]                              # [1, GV, 1]
            word_ptrs = w_ptr + n.to(tl.int64)[:, None, None] * stride_wn + words_k             # [BLOCK_N, GV, W]
            if X_PACKED:
                x_vec = x_ptr.to(tl.pointer_type(tl.int64)) + (group * K) // 4 + words_k       # 4 activations
                x_stride = stride_xm // 4
            else:
                x_vec = x_ptr + group * K + words_k * 4
                x_stride = stride_xm
            if SHARED_SCALE:                             # the program's rows share one scale row
                s_vec = s_ptr + ((pid_n * BLOCK_N) // BLOCK_OUT) * stride_sn + k_thread * 0      # [1, GV, 1]
            else:
                s_vec = s_ptr + (n // BLOCK_OUT).to(tl.int64)[:, None, None] * stride_sn + k_thread * 0
            n_mask3 = n_mask[:, None, None]
            INT_DECODE: tl.constexpr = not CVT_DECODE and not INTERPRET_DECODE
            h0 = tl.zeros([BLOCK_N, GV, W], dtype=tl.float32)
            h1 = tl.zeros([BLOCK_N, GV, W], dtype=tl.float32)
            h2 = tl.zeros([BLOCK_N, GV, W], dtype=tl.float32)
            h3 = tl.zeros([BLOCK_N, GV, W], dtype=tl.float32)
            k_begin = w_begin * 4
            k_end = w_end * 4
            words = tl.load(word_ptrs + w_begin, mask=n_mask3 & (k_begin + k_thread < k_end), other=0,
                            eviction_policy="evict_first")
            for w_start in range(w_begin, w_end, BLOCK_K // 4):
                w_next = w_start + BLOCK_K // 4
                next_words = tl.load(word_ptrs + w_next, mask=n_mask3 & (4 * w_next + k_thread < k_end), other=0,
                                     eviction_policy="evict_first")
                if CVT_DECODE:
                    w0, w1, w2, w3 = _e4m3_word_cvt(words)
                elif INTERPRET_DECODE:
                    w0, w1, w2, w3 = _e4m3_word_bytes(words)
                else:                                      # the E4M3 values * 2^-120 (x below * 2^64)
                    w0, w2 = _e4m3_pairs(words, False)
                    w1, w3 = _e4m3_pairs(words, True)
                k_here = 4 * w_start + k_thread
                scale = tl.load(s_vec + k_here // BLOCK_IN, mask=k_here < k_end, other=0.0)
                x_step = x_vec + w_start if X_PACKED else x_vec + w_start * 4
                h0 = _fp8_gemv_row_k(w0, w1, w2, w3, x_step, x_stride, 0, M, scale, h0, SHARED_SCALE, X_PACKED,
                                     INT_DECODE)
                if BLOCK_M > 1:
                    h1 = _fp8_gemv_row_k(w0, w1, w2, w3, x_step, x_stride, 1, M, scale, h1, SHARED_SCALE,
                                         X_PACKED, INT_DECODE)
                if BLOCK_M > 2:
                    h2 = _fp8_gemv_row_k(w0, w1, w2, w3, x_step, x_stride, 2, M, scale, h2, SHARED_SCALE,
                                         X_PACKED, INT_DECODE)
                    h3 = _fp8_gemv_row_k(w0, w1, w2, w3, x_step, x_stride, 3, M, scale, h3, SHARED_SCALE,
                                         X_PACKED, INT_DECODE)
                words = next_words
            acc0 = tl.sum(h0, axis=2)
            acc1 = tl.sum(h1, axis=2)
            acc2 = tl.sum(h2, axis=2)
            acc3 = tl.sum(h3, axis=2)
        else:
            # offsets along K in int32 words (4 weights); stride_wn counts words; each group of 4 words is one
            # 16-byte load
            g = tl.arange(0, G)
            s_rows = s_ptr + (n // BLOCK_OUT).to(tl.int64)[:, None] * stride_sn             # [BLOCK_N, 1]
            word_ptrs = w_ptr + n.to(tl.int64)[:, None, None] * stride_wn + g[None, :, None] * 4 \
                + tl.arange(0, 4)[None, None, :]
            x_ptrs = x_ptr + group * K + g[:, None] * 16 + tl.arange(0, 4)[None, :] * 4          # [G, 4]
            acc0 = tl.zeros([BLOCK_N, G], dtype=tl.float32)
            acc1 = tl.zeros([BLOCK_N, G], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_N, G], dtype=tl.float32)
            acc3 = tl.zeros([BLOCK_N, G], dtype=tl.float32)
            words = tl.load(word_ptrs + w_begin, mask=n_mask[:, None, None], other=0, eviction_policy="evict_first")
            for w_start in range(w_begin, w_end, BLOCK_K // 4):
                w_next = w_start + BLOCK_K // 4
                next_words = tl.load(word_ptrs + w_next,
                                     mask=n_mask[:, None, None] & ((w_next + g * 4) < w_end)[None, :, None],
                                     other=0, eviction_policy="evict_first")
                w0, w2 = _e4m3_pairs(words, False)
                w1, w3 = _e4m3_pairs(words, True)
                scale = tl.load(s_rows + ((w_start + g * 4) // (BLOCK_IN // 4))[None, :], mask=n_mask[:, None],
                                other=0.0)                                                  # [BLOCK_N, G]
                x_step = x_ptrs + w_start * 4
                acc0 = _fp8_gemv_row(w0, w1, w2, w3, x_step, 0, M, scale, acc0)
                if BLOCK_M > 1:
                    acc1 = _fp8_gemv_row(w0, w1, w2, w3, x_step + stride_xm, 1, M, scale, acc1)
                if BLOCK_M > 2:
                    acc2 = _fp8_gemv_row(w0, w1, w2, w3, x_step + 2 * stride_xm, 2, M, scale, acc2)
                    acc3 = _fp8_gemv_row(w0, w1, w2, w3, x_step + 3 * stride_xm, 3, M, scale, acc3)
                words = next_words
        _fp8_gemv_store(acc0, 0, M, n, n_mask, out_ptr, stride_om, part_ptr, N, pid_k, SPLIT_K, EXACT)
        if BLOCK_M > 1:
            _fp8_gemv_store(acc1, 1, M, n, n_mask, out_ptr, stride_om, part_ptr, N, pid_k, SPLIT_K, EXACT)
        if BLOCK_M > 2:
            _fp8_gemv_store(acc2, 2, M, n, n_mask, out_ptr, stride_om, part_ptr, N, pid_k, SPLIT_K, EXACT)
            _fp8_gemv_store(acc3, 3, M, n, n_mask, out_ptr, stride_om, part_ptr, N, pid_k, SPLIT_K, EXACT)
        if SPLIT_K > 1:
            _fp8_split_k_finish(part_ptr, count_ptr, out_ptr, pid_n, n, n_mask, M, N, stride_om, SPLIT_K, BLOCK_M,
                                BLOCK_N)

    @triton.jit
    def _fp8_split_k_finish(part_ptr, count_ptr, out_ptr, pid_n, n, n_mask, M, N, stride_om, SPLIT_K: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """After a program wrote its split's partial sums of columns n: count its arrival; the last of the column
        tile's SPLIT_K programs adds the partials in split order, writes the output and resets the counter."""
        tl.debug_barrier()                                      # every thread's partial before the arrival
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            m = tl.arange(0, BLOCK_M)
            mask = (m < M)[:, None] & n_mask[None, :]
            parts = part_ptr + m.to(tl.int64)[:, None] * N + n[None, :]                # part [SPLIT_K, M, N]
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for split in tl.static_range(SPLIT_K):
                total += tl.load(parts + split * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + m.to(tl.int64)[:, None] * stride_om + n[None, :],
                     total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(count_ptr + pid_n, 0, sem="relaxed", scope="gpu")

    @triton.jit
    def _fp8_silu_mul_finish(part_ptr, count_ptr, out_ptr, pid_n, M, N, stride_om, limit, SPLIT_K: tl.constexpr,
                             BLOCK_N: tl.constexpr, HAS_LIMIT: tl.constexpr):
        """`silu_mul_output`: after a program wrote its split's partial sums of its column tile: column tile t of
        the gate half (columns < N / 2) and tile t of the up half count their 2 * SPLIT_K arrivals on counter t;
        the last adds each half's partials in split order, rounds them to the output dtype (two linears'
        outputs), and writes silu(min(gate, limit)) * clamp(up, -limit, limit) as runtime.ops.silu_mul does."""
        half = N // 2
        tile = pid_n % (half // BLOCK_N)
        tl.debug_barrier()                                      # every thread's partial before the arrival
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == 2 * SPLIT_K - 1:
            m = tl.arange(0, 8)
            o = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            mask = (m < M)[:, None] & (o < half)[None, :]
            parts = part_ptr + m.to(tl.int64)[:, None] * N + o[None, :]                 # part [SPLIT_K, M, N]
            gate = tl.zeros([8, BLOCK_N], dtype=tl.float32)
            up = tl.zeros([8, BLOCK_N], dtype=tl.float32)
            for split in tl.static_range(SPLIT_K):
                gate += tl.load(parts + split * M * N, mask=mask, other=0.0, cache_modifier=".cg")
                up += tl.load(parts + split * M * N + half, mask=mask, other=0.0, cache_modifier=".cg")
            dtype = out_ptr.dtype.element_ty
            gate = gate.to(dtype).to(tl.float32)
            up = up.to(dtype).to(tl.float32)
            if HAS_LIMIT:
                gate = tl.minimum(gate, limit)
                up = tl.minimum(tl.maximum(up, -limit), limit)
            act = gated_activation(gate, False).to(dtype).to(tl.float32)
            tl.store(out_ptr + m.to(tl.int64)[:, None] * stride_om + o[None, :], (act * up).to(dtype), mask=mask)
            tl.atomic_xchg(count_ptr + tile, 0, sem="relaxed", scope="gpu")

    # ---- the tensor-core GEMV (up to 8 rows) ----
    # The N-major loop above spends ~5.5 SASS instructions a weight byte (decode, widening, FMA, activations moved
    # through shared memory with barriers every step) and streamed at most 1.94 TB/s on the H200. Here the
    # K-reduction runs on the tensor cores (mma.sync m16n8k16, bf16 in, fp32 sums): the integer decode's bf16
    # pairs (bytes 0 and 2, 1 and 3 of a word: value * 2^-120, exact, subnormals included) are the A fragments
    # as they are, no widening and no FMA: ~2.6 instructions a byte in all (sm_90 SASS of the loop: 336 a
    # 128-byte step), 3.0 TB/s for the 32 MB weight. Lane (r, c) = (lane // 4, lane % 4) of warp w loads 16
    # bytes (4 words) of rows r and r + 8 of the warp's 16-row tile at byte 16c of a 64-byte chunk; word j's
    # pairs are k = (2c, 2c + 1) and (2c + 8, 2c + 9) of the chunk's j-th mma (the K order inside an mma is
    # free: the activations are permuted to match). The B fragment is activation row n = lane // 4 (rows past M
    # repeat row M - 1 and their sums are not stored, so 1-8 rows cost the same): its bf16 pairs (x[4j],
    # x[4j + 2]) and (x[4j + 1], x[4j + 3]) times 2^64 (exact; the products stay normal). D's 4 fp32 sums per
    # lane are rows (r, r + 8) x activation rows (2c, 2c + 1). One inline-asm call does a lane's 4 mma of a
    # chunk, its operands packed by 4 (a lane's 4 words, consecutive registers of the [32 warps, 4] layout), so
    # no data crosses lanes outside the tensor core: no shared memory, barrier or shuffle in the loop. Two
    # chunks (128 bytes, inside one scale block) chain in the accumulator, then their block scale multiplies
    # once. Each step's words and activations load one step ahead, into two alternating register sets. The
    # interpreter runs `_mma_emulated` (the same sums, from the same lanes' operands).
    # Optionally (FP8_GEMV_PDL) a programmatic dependent launch: it may start while the kernel before it finishes,
    # reads only weights before griddepcontrol.wait, and lets the next such launch start once all its programs run.

    _MMA_PTX = tl.constexpr("""{
    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32
        {$0, $1, $2, $3}, {$4, $8, $12, $16}, {$20, $24}, {$28, $29, $30, $31};
    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32
        {$0, $1, $2, $3}, {$5, $9, $13, $17}, {$21, $25}, {$0, $1, $2, $3};
    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32
        {$0, $1, $2, $3}, {$6, $10, $14, $18}, {$22, $26}, {$0, $1, $2, $3};
    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32
        {$0, $1, $2, $3}, {$7, $11, $15, $19}, {$23, $27}, {$0, $1, $2, $3};
    }""")

    _MMA_CONSTRAINTS = tl.constexpr(",".join(["=&r"] * 4 + ["r"] * 28))     # early clobber: D chains in place

    # activation words (x[2i], x[2i + 1]) for i = 0..7 of a lane's 16 -> B pairs of word j, times 2^64
    _MMA_B_PTX = tl.constexpr("""{
    .reg .b32 s, p;
    mov.b32 s, 0x5F805F80;
    prmt.b32 p, $8, $9, 0x5410;  mul.rn.bf16x2 $0, p, s;
    prmt.b32 p, $8, $9, 0x7632;  mul.rn.bf16x2 $4, p, s;
    prmt.b32 p, $10, $11, 0x5410;  mul.rn.bf16x2 $1, p, s;
    prmt.b32 p, $10, $11, 0x7632;  mul.rn.bf16x2 $5, p, s;
    prmt.b32 p, $12, $13, 0x5410;  mul.rn.bf16x2 $2, p, s;
    prmt.b32 p, $12, $13, 0x7632;  mul.rn.bf16x2 $6, p, s;
    prmt.b32 p, $14, $15, 0x5410;  mul.rn.bf16x2 $3, p, s;
    prmt.b32 p, $14, $15, 0x7632;  mul.rn.bf16x2 $7, p, s;
    }""")
    _MMA_B_CONSTRAINTS = tl.constexpr(",".join(["=r"] * 8 + ["r"] * 8))

    @triton.jit
    def _bf16_halves(pairs):
        """int32 bf16 pairs -> (low half, high half) as fp32."""
        return (pairs << 16).to(tl.float32, bitcast=True), (pairs & -65536).to(tl.float32, bitcast=True)

    @triton.jit
    def _mma_b_emulated(x_lo, x_hi):
        """`_MMA_B_PTX` in Triton ops (the interpreter): the pairs unscaled (`_mma_emulated` applies 2^64)."""
        rows: tl.constexpr = x_lo.shape[0]
        words = tl.permute(tl.join(x_lo, x_hi), [0, 1, 2, 4, 3])                     # [.., c, lo / hi, i % 4]
        even, odd = tl.split(tl.reshape(words, [rows, 8, 4, 4, 2]))                  # words 2j, 2j + 1
        return (even & 0xFFFF) | (odd << 16), ((even >> 16) & 0xFFFF) | (odd & -65536)

    @triton.jit
    def _mma_rows_emulated(a02, a13, b01, b23):
        """[T, 8 (r), 8 (n)]: the sums over (c, j) of rows r's pairs times activation rows n's pairs."""
        a0, a2 = _bf16_halves(a02)
        a1, a3 = _bf16_halves(a13)
        b0, b2 = _bf16_halves(b01)
        b1, b3 = _bf16_halves(b23)
        products = a0[:, :, None, :, :] * b0[:, None, :, :, :] + a2[:, :, None, :, :] * b2[:, None, :, :, :] \
            + a1[:, :, None, :, :] * b1[:, None, :, :, :] + a3[:, :, None, :, :] * b3[:, None, :, :, :]
        return tl.sum(tl.sum(products, axis=4), axis=3) * 18446744073709551616.0

    @triton.jit
    def _mma_emulated(a02_lo, a02_hi, a13_lo, a13_hi, b01, b23, acc):
        """`_MMA_PTX`'s function: acc [T, 8, 4, 4] (lane (r, c)'s e-th sum: row r + 8 * (e // 2), activation row
        2c + e % 2) plus the products of the chunk."""
        tiles: tl.constexpr = acc.shape[0]
        low = tl.reshape(_mma_rows_emulated(a02_lo, a13_lo, b01, b23), [tiles, 8, 4, 2])
        high = tl.reshape(_mma_rows_emulated(a02_hi, a13_hi, b01, b23), [tiles, 8, 4, 2])
        return acc + tl.reshape(tl.permute(tl.join(low, high), [0, 1, 2, 4, 3]), [tiles, 8, 4, 4])

    # `_e4m3_pair_bits` of both pairs in 6 instructions instead of 7: prmt places each byte of a pair in the low
    # byte of its half with the byte's sign replicated above it; << 4 and a mask keep the sign (bit 15) and the
    # 7 magnitude bits (10..4). 4-15% faster than the Triton ops on the H200 at every shape measured.
    _E4M3_PAIRS_PTX = tl.constexpr("""{
    .reg .b32 t;
    prmt.b32 t, $2, 0, 0xA280;  shl.b32 t, t, 4;  and.b32 $0, t, 0x87F087F0;
    prmt.b32 t, $2, 0, 0xB391;  shl.b32 t, t, 4;  and.b32 $1, t, 0x87F087F0;
    }""")

    @triton.jit
    def _e4m3_both_pairs(words, PRMT: tl.constexpr):
        """(`_e4m3_pair_bits(words, False)`, `_e4m3_pair_bits(words, True)`); PRMT: by `_E4M3_PAIRS_PTX`."""
        if PRMT:
            return tl.inline_asm_elementwise(_E4M3_PAIRS_PTX, "=r,=r,r", [words], dtype=(tl.int32, tl.int32),
                                             is_pure=True, pack=1)
        return _e4m3_pair_bits(words, False), _e4m3_pair_bits(words, True)

    @triton.jit
    def _fp8_mma_chunk(w_lo, w_hi, x_lo, x_hi, acc, EMULATE: tl.constexpr, PRMT: tl.constexpr):
        """acc + one 64-byte chunk: w_lo / w_hi [32 W, 4] the words of rows r / r + 8, x_lo / x_hi [32 W, 4]
        activation words 0-3 / 4-7 of each lane's 16 (lane 32 w + 4 r + c; its 4 words j in its registers)."""
        a02_lo, a13_lo = _e4m3_both_pairs(w_lo, PRMT and not EMULATE)
        a02_hi, a13_hi = _e4m3_both_pairs(w_hi, PRMT and not EMULATE)
        if EMULATE:                                          # as [W, 8 (r), 4 (c), 4]
            shape: tl.constexpr = [acc.shape[0] // 32, 8, 4, 4]
            b01, b23 = _mma_b_emulated(tl.reshape(x_lo, shape), tl.reshape(x_hi, shape))
            sums = _mma_emulated(tl.reshape(a02_lo, shape), tl.reshape(a02_hi, shape), tl.reshape(a13_lo, shape),
                                 tl.reshape(a13_hi, shape), b01, b23, tl.reshape(acc, shape))
            return tl.reshape(sums, acc.shape)
        b01, b23 = tl.inline_asm_elementwise(_MMA_B_PTX, _MMA_B_CONSTRAINTS, [x_lo, x_hi],
                                             dtype=(tl.int32, tl.int32), is_pure=True, pack=4)
        return tl.inline_asm_elementwise(_MMA_PTX, _MMA_CONSTRAINTS, [a02_lo, a02_hi, a13_lo, a13_hi, b01, b23, acc],
                                         dtype=tl.float32, is_pure=True, pack=4)

    @triton.jit
    def _fp8_mma_load_w(w_ptr, w_offsets, hi_offset, w_start, w_end):
        """One step's weight words (two chunks) of rows r and r + 8. Unmasked: a step past w_end reloads the last
        one (cached; its scale is zero)."""
        w_at = tl.minimum(w_start, w_end - 32)
        lo0 = tl.load(w_ptr + w_offsets + w_at, eviction_policy="evict_first")
        hi0 = tl.load(w_ptr + w_offsets + hi_offset + w_at, eviction_policy="evict_first")
        lo1 = tl.load(w_ptr + w_offsets + w_at + 16, eviction_policy="evict_first")
        hi1 = tl.load(w_ptr + w_offsets + hi_offset + w_at + 16, eviction_policy="evict_first")
        return lo0, hi0, lo1, hi1

    @triton.jit
    def _fp8_mma_load_x(x_ptr, x_offsets, w_start, w_end):
        """The activation words of the step `_fp8_mma_load_w` loads."""
        w_at = tl.minimum(w_start, w_end - 32)
        xl0 = tl.load(x_ptr + x_offsets + 2 * w_at)
        xh0 = tl.load(x_ptr + x_offsets + 2 * w_at + 4)
        xl1 = tl.load(x_ptr + x_offsets + 2 * w_at + 32)
        xh1 = tl.load(x_ptr + x_offsets + 2 * w_at + 36)
        return xl0, xh0, xl1, xh1

    @triton.jit
    def _fp8_mma_load(w_ptr, w_offsets, hi_offset, x_ptr, x_offsets, w_start, w_end):
        """One step's operands (two chunks): words of rows r and r + 8, activation words."""
        lo0, hi0, lo1, hi1 = _fp8_mma_load_w(w_ptr, w_offsets, hi_offset, w_start, w_end)
        xl0, xh0, xl1, xh1 = _fp8_mma_load_x(x_ptr, x_offsets, w_start, w_end)
        return lo0, hi0, lo1, hi1, xl0, xh0, xl1, xh1

    @triton.jit
    def _fp8_mma_step(lo0, hi0, lo1, hi1, xl0, xh0, xl1, xh1, acc, s_row, w_start, w_end, BLOCK_IN: tl.constexpr,
                      EMULATE: tl.constexpr, PRMT: tl.constexpr):
        """acc + one step (two chunks, 128 bytes of K at word w_start) times its block scale (0 past w_end)."""
        scale = tl.load(s_row + (4 * w_start) // BLOCK_IN, mask=w_start < w_end, other=0.0)
        sums = _fp8_mma_chunk(lo0, hi0, xl0, xh0, tl.zeros_like(acc), EMULATE, PRMT)
        sums = _fp8_mma_chunk(lo1, hi1, xl1, xh1, sums, EMULATE, PRMT)
        return acc + sums * scale

    @triton.jit
    def _fp8_gemv_mma_kernel(x_ptr, w_ptr, s_ptr, out_ptr, part_ptr, count_ptr, M, N, K, stride_xm, stride_wn,
                             stride_sn, stride_om, n_per_group, words_per_split, x_group_words,
                             BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr, WARPS: tl.constexpr,
                             SPLIT_K: tl.constexpr, EMULATE: tl.constexpr, PRMT: tl.constexpr = False,
                             SILU_MUL: tl.constexpr = False, HAS_LIMIT: tl.constexpr = False, limit=0.0,
                             PDL: tl.constexpr = False):
        # One 16-row tile a warp (WARPS = num_warps), all of a program's rows in one BLOCK_OUT row block (one
        # scale a step), N a multiple of BLOCK_N; words_per_split a multiple of 32 (128 bytes); x the bf16
        # activations as int32 pairs (stride_xm and x_group_words = K / 2 count them); M <= 8; BLOCK_IN % 128 == 0.
        # Every tensor is [32 * WARPS, 4]: 2-D with 4 contiguous words a row, whose blocked layout (a row a lane,
        # 32 rows a warp, the 4 words in the lane's registers) is the same whatever the compiler version orders
        # dimensions by: the mma needs lane 4r + c of warp w to hold row i = 32w + 4r + c.
        BLOCK_N: tl.constexpr = 16 * WARPS
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        i = tl.arange(0, 32 * WARPS)[:, None]
        j = tl.arange(0, 4)[None, :]
        r = (i % 32) // 4                                           # weight row in the tile; activation row
        c = i % 4
        rows = pid_n * BLOCK_N + 16 * (i // 32) + r                 # [32 W, 1]; rows + 8 the other half
        w_offsets = rows.to(tl.int64) * stride_wn + 4 * c + j                           # N % BLOCK_N == 0
        hi_offset = 8 * stride_wn.to(tl.int64)
        group = (pid_n * BLOCK_N) // n_per_group
        # activation rows past M repeat row M - 1: they only make sums of rows that are not stored
        x_offsets = group * x_group_words + tl.minimum(r, M - 1) * stride_xm + 8 * c + j
        s_row = s_ptr + ((pid_n * BLOCK_N) // BLOCK_OUT).to(tl.int64) * stride_sn
        w_begin = pid_k * words_per_split
        w_end = tl.minimum(w_begin + words_per_split, K // 4)
        acc = tl.zeros([32 * WARPS, 4], dtype=tl.float32)
        if PDL:                  # launched as a programmatic dependent: the next such launch may start now
            gdc_launch_dependents()
        # two steps an iteration, their operands in two sets of registers (no copies): set A loads step s + 2
        # while set B's step s + 1 computes. With PDL only the weights (and scales) are read before the wait for
        # the previous kernel: activations, partials, counters and the output all come after it.
        a_lo0, a_hi0, a_lo1, a_hi1 = _fp8_mma_load_w(w_ptr, w_offsets, hi_offset, w_begin, w_end)
        if PDL:
            gdc_wait()
        a_xl0, a_xh0, a_xl1, a_xh1 = _fp8_mma_load_x(x_ptr, x_offsets, w_begin, w_end)
        for w_start in range(w_begin, w_end, 64):
            b_lo0, b_hi0, b_lo1, b_hi1, b_xl0, b_xh0, b_xl1, b_xh1 = _fp8_mma_load(
                w_ptr, w_offsets, hi_offset, x_ptr, x_offsets, w_start + 32, w_end)
            acc = _fp8_mma_step(a_lo0, a_hi0, a_lo1, a_hi1, a_xl0, a_xh0, a_xl1, a_xh1, acc, s_row, w_start, w_end,
                                BLOCK_IN, EMULATE, PRMT)
            a_lo0, a_hi0, a_lo1, a_hi1, a_xl0, a_xh0, a_xl1, a_xh1 = _fp8_mma_load(
                w_ptr, w_offsets, hi_offset, x_ptr, x_offsets, w_start + 64, w_end)
            acc = _fp8_mma_step(b_lo0, b_hi0, b_lo1, b_hi1, b_xl0, b_xh0, b_xl1, b_xh1, acc, s_row, w_start + 32,
                                w_end, BLOCK_IN, EMULATE, PRMT)
        # lane (r, c)'s sum e = j: row rows + 8 * (e // 2), activation row 2c + e % 2; * 2^56 undoes 2^64 * 2^-120
        out_rows = rows + 8 * (j // 2)
        m = 2 * c + j % 2
        mask = (m < M) & (out_rows >= 0)
        result = acc * 72057594037927936.0
        if SILU_MUL:        # the output's columns pair the gate half's with the up half's: always the partials
            tl.store(part_ptr + (pid_k * M + m).to(tl.int64) * N + out_rows, result, mask=mask)
            _fp8_silu_mul_finish(part_ptr, count_ptr, out_ptr, pid_n, M, N, stride_om, limit, SPLIT_K, BLOCK_N,
                                 HAS_LIMIT)
        elif SPLIT_K == 1:
            tl.store(out_ptr + m * stride_om + out_rows, result.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(part_ptr + (pid_k * M + m).to(tl.int64) * N + out_rows, result, mask=mask)
            n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            _fp8_split_k_finish(part_ptr, count_ptr, out_ptr, pid_n, n, n < N, M, N, stride_om, SPLIT_K, 8,
                                BLOCK_N)

    # Many rows: the weight dequantized into the activation dtype (one pass: 1 byte read, 2 written per
    # weight), then cuBLAS. (A Triton GEMM widening tiles in registers ran 2.5-3x slower than cuBLAS on the
    # H200, tools/decode_kernels.py 2026-11-29.)
    @triton.jit
    def _fp8_dequantize_kernel(w_ptr, s_ptr, out_ptr, N, K, stride_sn, BLOCK_OUT: tl.constexpr,
                               BLOCK_IN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (r < N)[:, None] & (c < K)[None, :]
        offsets = r.to(tl.int64)[:, None] * K + c[None, :]
        w = tl.load(w_ptr + offsets, mask=mask, other=0.0)
        scale = tl.load(s_ptr + (r // BLOCK_OUT).to(tl.int64)[:, None] * stride_sn + (c // BLOCK_IN)[None, :],
                        mask=mask, other=0.0)
        tl.store(out_ptr + offsets, (w.to(tl.float32) * scale).to(out_ptr.dtype.element_ty), mask=mask)


    # W8A8: each activation row quantized per BLOCK_IN columns to E4M3 with a power-of-two fp32 scale (the
    # smallest 2^e >= amax / 448, amax at least 1e-4: the UE8M0 activation scales of the checkpoints' own FP8
    # GEMMs), for the tensor cores' block-scaled FP8 GEMM. Row m, column block c: q goes to group
    # c // blocks_per_group's [m_pad, in / groups] slab, its scale to s[c, m] (column-major per group, the
    # layout the GEMM takes). Rows m in [M, m_pad) are written as zeros (scale 2^-22).
    @triton.jit
    def _round_to_e4m3(v):
        """fp32 values of magnitude <= 448 rounded to the nearest E4M3 value (ties to even), still fp32. The cast
        that follows is then exact on every backend (the interpreter's emulated cast drops the carry of a
        mantissa that rounds up into the next power of two, e.g. 31.5 -> 16)."""
        bits = v.to(tl.int32, bitcast=True)
        sign = bits & -2147483648                                                        # 0x80000000
        magnitude = bits & 0x7FFFFFFF
        # normal E4M3 (>= 2^-6): 3 fraction bits kept, the 20 below rounded half to even
        normal = (magnitude + 0x7FFFF + ((magnitude >> 20) & 1)) & 0x7FF00000
        # subnormal E4M3: multiples of 2^-9, rounded by the fp32 addition at 1.5 * 2^14 (whose ulp is 2^-9)
        absolute = magnitude.to(tl.float32, bitcast=True)
        subnormal = ((absolute + 24576.0) - 24576.0).to(tl.int32, bitcast=True)
        rounded = tl.where(magnitude < 0x3C800000, subnormal, normal)                     # 0x3C800000 = 2^-6
        return (rounded | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def _fp8_act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, m_pad, blocks_per_group,
                              BLOCK_IN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCKS: tl.constexpr):
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        c = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)                          # column blocks
        j = tl.arange(0, BLOCK_IN)
        col = c[None, :, None] * BLOCK_IN + j[None, None, :]                           # [1, BLOCKS, BLOCK_IN]
        in_k = col < K
        x = tl.load(x_ptr + m.to(tl.int64)[:, None, None] * stride_xm + col,
                    mask=(m < M)[:, None, None] & in_k, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=2), 1e-4)                           # [BLOCK_M, BLOCKS]
        # amax = 1.f * 2^E: amax / 448 (448 = 1.75 * 2^8) needs 2^(E - 8), or 2^(E - 7) when 1.f > 1.75
        bits = amax.to(tl.int32, bitcast=True)
        exponent = ((bits >> 23) & 0xFF) - 8 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)        # biased
        scale = (exponent << 23).to(tl.float32, bitcast=True)
        inverse = ((254 - exponent) << 23).to(tl.float32, bitcast=True)            # 1 / scale, exact
        q = _round_to_e4m3(x * inverse[:, :, None]).to(tl.float8e4nv)                 # |values| <= 448
        group = c // blocks_per_group
        k_group = blocks_per_group * BLOCK_IN
        q_offsets = (group.to(tl.int64)[None, :, None] * m_pad + m[:, None, None]) * k_group \
            + (c % blocks_per_group)[None, :, None] * BLOCK_IN + j[None, None, :]
        tl.store(q_ptr + q_offsets, q, mask=(m < m_pad)[:, None, None] & in_k)
        tl.store(s_ptr + c.to(tl.int64)[None, :] * m_pad + m[:, None], scale,
                 mask=(m < m_pad)[:, None] & (c * BLOCK_IN < K)[None, :])


@dataclass(frozen=True, slots=True)
class Fp8GemvTiles:
    block_n: int = 16                  # output columns (weight rows) per program
    block_k: int = 512                 # bytes of each weight row per loop step (a power of two >= 16)
    split_k: int = 1                   # programs along K (the last to finish adds their sums)
    num_warps: int = 4
    layout_k: bool = False             # each thread `vec` bytes of each of its rows, the warps along K
    vec: int = 16
    cvt: bool = False                  # (layout_k) E4M3 widened by the hardware instead of the integer decode
    mma: bool = False                  # the tensor-core GEMV: block_n = 16 * num_warps, 128 bytes of K a step

    @staticmethod
    def for_shape(n: int, k: int, rows: int = 1, mma: bool = True) -> "Fp8GemvTiles":
        """The tables below for a weight of [n, k] (every group's rows) at `rows` rows: the tensor-core GEMV's
        (FP8_GEMV_MMA_TABLE, from FP8_GEMV_MMA_MIN_ROWS rows), else the CUDA-core one's; otherwise the
        tensor-core GEMV with about 512 programs (`mma_for_shape`), or with mma=False (a call it does not fit)
        enough CUDA-core programs to cover an H200's 132 SMs a few times. A function of the shape and the row
        count only (eager runs and graph replays agree)."""
        if mma and rows >= FP8_GEMV_MMA_MIN_ROWS.get((n, k), 1):
            return FP8_GEMV_MMA_TABLE.get((n, k)) or Fp8GemvTiles.mma_for_shape(n, k)
        tiles = (FP8_GEMV_TILE_TABLE if rows == 1 else FP8_GEMV_FEW_ROWS_TABLE).get((n, k))
        if tiles is None and rows > 1:
            tiles = FP8_GEMV_TILE_TABLE.get((n, k))
        if tiles is None:
            block_n = 16
            while block_n > 4 and n // block_n < 512:
                block_n //= 2
            split = 1
            while split < 8 and (n // block_n) * split < 512 and k // (2 * split) >= 1024:
                split *= 2
            tiles = Fp8GemvTiles(block_n, 512, split, 4)
        return tiles

    @staticmethod
    def mma_for_shape(n: int, k: int) -> "Fp8GemvTiles":
        """The tensor-core GEMV's tiles for a weight outside the table: 64 rows a program (4 warps), K split until
        about 512 programs run (at least two 128-byte steps a split), the shape of most of the table's entries."""
        split = 1
        while split < 32 and (n // 64) * split < 512 and k // 128 >= 4 * split:
            split *= 2
        return Fp8GemvTiles(64, split_k=split, num_warps=4, mma=True)


# From the tools/decode_kernels.py FP8 sweep on an H200 (2026-11-29, docs/PERFORMANCE.md); keyed by the whole
# weight's [out, in] (the linears of the largest FP8 block-scaled checkpoint served; [8192, 4096] is an 8-group
# grouped projection). One row: the N-major layout (the K-major one measured 0.6-0.96x of it there).
FP8_GEMV_TILE_TABLE: dict[tuple[int, int], Fp8GemvTiles] = {
    (512, 4096): Fp8GemvTiles(block_n=32, block_k=512, split_k=8, num_warps=4),
    (1024, 4096): Fp8GemvTiles(block_n=8, block_k=1024, split_k=1, num_warps=4),
    (2048, 4096): Fp8GemvTiles(block_n=8, block_k=1024, split_k=1, num_warps=4),
    (4096, 2048): Fp8GemvTiles(block_n=16, block_k=512, split_k=1, num_warps=4),
    (4096, 4096): Fp8GemvTiles(block_n=16, block_k=512, split_k=1, num_warps=4),
    (4096, 8192): Fp8GemvTiles(block_n=16, block_k=512, split_k=2, num_warps=4),
    (8192, 1024): Fp8GemvTiles(block_n=16, block_k=512, split_k=1, num_warps=4),
    (8192, 4096): Fp8GemvTiles(block_n=8, block_k=512, split_k=1, num_warps=4),
    (32768, 1024): Fp8GemvTiles(block_n=16, block_k=512, split_k=1, num_warps=4),
}

# 2-4 rows: the K-major layout where it measured faster (1.05-1.9x; the 1024-wide weights keep the table above).
FP8_GEMV_FEW_ROWS_TABLE: dict[tuple[int, int], Fp8GemvTiles] = {
    (512, 4096): Fp8GemvTiles(block_n=4, block_k=1024, split_k=4, num_warps=4, layout_k=True, vec=8, cvt=True),
    (1024, 4096): Fp8GemvTiles(block_n=4, block_k=1024, split_k=1, num_warps=4, layout_k=True, vec=8, cvt=True),
    (2048, 4096): Fp8GemvTiles(block_n=4, block_k=1024, split_k=1, num_warps=4, layout_k=True, vec=8, cvt=True),
    (4096, 2048): Fp8GemvTiles(block_n=4, block_k=1024, split_k=1, num_warps=4, layout_k=True, vec=8, cvt=True),
    (4096, 4096): Fp8GemvTiles(block_n=4, block_k=1024, split_k=1, num_warps=4, layout_k=True, vec=8, cvt=True),
    (4096, 8192): Fp8GemvTiles(block_n=4, block_k=1024, split_k=1, num_warps=4, layout_k=True, vec=8, cvt=True),
    (8192, 4096): Fp8GemvTiles(block_n=4, block_k=1024, split_k=1, num_warps=4, layout_k=True, vec=8, cvt=True),
}

# The tensor-core GEMV, 1-8 rows (its cost does not depend on the row count), from the H200 sweep of
# 2026-11-29 16:08 UTC (docs/PERFORMANCE.md, "FP8 GEMV on the tensor cores"): the fastest at one row, which also
# beat the path taken before at 2, 4 and 8 rows for every weight here.
FP8_GEMV_MMA_TABLE: dict[tuple[int, int], Fp8GemvTiles] = {
    (512, 4096): Fp8GemvTiles(block_n=64, split_k=16, num_warps=4, mma=True),
    (1024, 4096): Fp8GemvTiles(block_n=64, split_k=16, num_warps=4, mma=True),
    (2048, 4096): Fp8GemvTiles(block_n=128, split_k=16, num_warps=8, mma=True),
    (4096, 2048): Fp8GemvTiles(block_n=64, split_k=8, num_warps=4, mma=True),
    (4096, 4096): Fp8GemvTiles(block_n=64, split_k=8, num_warps=4, mma=True),
    (4096, 8192): Fp8GemvTiles(block_n=64, split_k=8, num_warps=4, mma=True),
    (8192, 1024): Fp8GemvTiles(block_n=64, split_k=4, num_warps=4, mma=True),
    (8192, 4096): Fp8GemvTiles(block_n=64, split_k=4, num_warps=4, mma=True),
    (32768, 1024): Fp8GemvTiles(block_n=128, split_k=1, num_warps=8, mma=True),
}
# where the CUDA-core GEMV measured faster at fewer rows: the row count from which the tensor-core one is taken
# (the 512 x 4096 weight at one row: 4.4 against 4.6 us, both latency-bound)
FP8_GEMV_MMA_MIN_ROWS: dict[tuple[int, int], int] = {(512, 4096): 2}


# Programmatic dependent launch of the tensor-core GEMV (Hopper): it is launched so that it may start while the
# kernel before it on the stream finishes, reads only its weights until that kernel is done
# (griddepcontrol.wait), and lets the next such launch start as soon as all its programs run. CUDA graphs keep
# the programmatic edges. Off unless RUN_MODEL_FP8_PDL=1 (kernels that a model launches the same way around it
# may follow this switch): on the H200 a 24-layer MoE model's batch-1 step took 3.86 ms with it against 3.72 ms
# without (2026-11-30, docs/PERFORMANCE.md), as the dense GEMV chains of 2026-11-29 had lost with it on large layers.
FP8_GEMV_PDL = os.environ.get("RUN_MODEL_FP8_PDL", "0") == "1"

FP8_GEMV_MAX_ROWS = 4               # the CUDA-core GEMV's limit (it beat dequantize + cuBLAS up to 4 rows)
FP8_GEMV_MMA_MAX_ROWS = 8           # the tensor-core GEMV's: the activation rows of one mma's B operand


def _check(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, groups: int) -> tuple[int, int]:
    block_out, block_in = fp8_block_shape(tuple(weight.shape), tuple(scale.shape))
    n, k = weight.shape
    if x.dim() != 2 or x.shape[1] != groups * k or n % groups or block_in & (block_in - 1) or block_in < 16 \
            or weight.stride(-1) != 1 or weight.stride(0) % 16 or scale.dtype != torch.float32:
        raise ValueError(f"FP8 linear: input {tuple(x.shape)}, weight {tuple(weight.shape)} in {groups} groups, "
                         f"blocks {block_out}x{block_in} (along K a power of two >= 16), rows 16-byte aligned, "
                         f"scale {scale.dtype} (fp32)")
    return block_out, block_in


def _split_k_workspace(split: int, rows: int, n: int, column_tiles: int, counters: torch.Tensor | None,
                       out: torch.Tensor, always: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 partials and arrival counters of a split-K GEMV launch (`out` stands in for both unsplit,
    unless `always`)."""
    if split == 1 and not always:
        return out, out
    if counters is None:
        counters = torch.zeros(column_tiles, dtype=torch.int32, device=out.device)
    elif counters.numel() < column_tiles:
        raise ValueError(f"fp8_gemv: {counters.numel()} counters for {column_tiles} column tiles")
    return torch.empty(split, rows, n, dtype=torch.float32, device=out.device), counters


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, groups: int = 1,
             tiles: Fp8GemvTiles | None = None, counters: torch.Tensor | None = None) -> torch.Tensor:
    """The same function as `fp8_linear_ref` for a few rows: weight float8_e4m3fn [groups * out, in], scale an
    fp32 grid [groups * out / bo, in / bi]. Tensor-core tiles (`tiles.mma`) run `_fp8_gemv_mma_kernel` where
    the call fits it (`fp8_gemv_mma_fits`: bf16, up to 8 rows), else the CUDA-core kernel (up to 4 rows).
    `counters`: int32 zeros, one per column tile, that split-K programs count their arrivals in (left at
    zero); made here when not given."""
    block_out, block_in = _check(x, weight, scale, groups)
    rows = x.shape[0]
    n, k = weight.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if not rows or not n:
        return out
    tiles = tiles or Fp8GemvTiles.for_shape(n, k, rows)
    if tiles.mma:
        if fp8_gemv_mma_fits(x, weight, scale, groups, tiles):
            return _fp8_gemv_mma(x, weight, scale, groups, tiles, counters, out)
        tiles = Fp8GemvTiles.for_shape(n, k, rows, mma=False)
    if rows > FP8_GEMV_MAX_ROWS:
        raise ValueError(f"fp8_gemv takes at most {FP8_GEMV_MAX_ROWS} rows here ({FP8_GEMV_MMA_MAX_ROWS} on the "
                         f"tensor-core path), got {rows}")
    if (n // groups) % tiles.block_n:
        raise ValueError(f"fp8_gemv: {tiles.block_n} columns a program do not divide a group's {n // groups}")
    block_k = tiles.block_k                            # a power of two >= 16 that divides K
    while k % block_k:
        block_k //= 2
    steps = k // block_k
    split = max(1, min(tiles.split_k, steps))
    k_per_split = -(-steps // split) * block_k
    split = -(-k // k_per_split)
    grid = (triton.cdiv(n, tiles.block_n), split)
    part, counters = _split_k_workspace(split, rows, n, grid[0], counters, out)
    x_packed = {torch.bfloat16: 1, torch.float16: 2}.get(x.dtype, 0) if tiles.layout_k else 0
    if x_packed and (x.data_ptr() % 8 or x.stride(0) % 4):                 # 64-bit loads of 4 activations
        x = torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x)
    _fp8_gemv_kernel[grid](
        x, weight.view(torch.int32), scale, out, part, counters, rows, n, k, x.stride(0), weight.stride(0) // 4,
        scale.stride(0), out.stride(0), n // groups, k_per_split // 4, BLOCK_OUT=block_out, BLOCK_IN=block_in,
        BLOCK_M=triton.next_power_of_2(rows), BLOCK_N=tiles.block_n, BLOCK_K=block_k, SPLIT_K=split,
        LAYOUT_K=tiles.layout_k, W=max(1, min(tiles.vec // 4, block_k // 4)), CVT_DECODE=tiles.cvt and x.is_cuda,
        INTERPRET_DECODE=tiles.cvt and not x.is_cuda, SHARED_SCALE=block_out % tiles.block_n == 0,
        X_PACKED=x_packed,
        num_warps=tiles.num_warps)
    return out


def fp8_gemv_silu_mul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, limit: float | None = None,
                      tiles: Fp8GemvTiles | None = None, counters: torch.Tensor | None = None) -> torch.Tensor:
    """The same function as `fp8_silu_mul_ref` for a few rows (the weight a gate projection's rows then an up
    projection's, each whole row blocks): in one launch where the tensor-core GEMV takes the call and a
    program's rows divide a half (`fp8_gemv_silu_mul_fits`: the last of a gate column tile's and its up tile's
    programs applies the activation), else `fp8_gemv` then `silu_mul`."""
    block_out, _ = _check(x, weight, scale, 1)
    rows = x.shape[0]
    n, k = weight.shape
    if n % (2 * block_out):
        raise ValueError(f"fp8_gemv_silu_mul: a weight of {n} rows is not two halves of whole {block_out}-row "
                         f"blocks")
    x = x if x.stride(-1) == 1 else x.contiguous()
    tiles = tiles or Fp8GemvTiles.for_shape(n, k, rows)
    if rows and fp8_gemv_silu_mul_fits(x, weight, scale, tiles):
        out = torch.empty(rows, n // 2, dtype=x.dtype, device=x.device)
        return _fp8_gemv_mma(x, weight, scale, 1, tiles, counters, out, silu_mul=True, limit=limit)
    y = fp8_gemv(x, weight, scale, 1, tiles, counters)
    return silu_mul(y[:, :n // 2], y[:, n // 2:], limit)


def fp8_gemv_silu_mul_fits(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, tiles: Fp8GemvTiles) -> bool:
    """Whether `fp8_gemv_silu_mul` runs in one launch: the tensor-core GEMV takes the call, and a program's
    rows divide each half of the weight."""
    return fp8_gemv_mma_fits(x, weight, scale, 1, tiles) and (weight.shape[0] // 2) % tiles.block_n == 0


def fp8_gemv_mma_fits(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, groups: int,
                      tiles: Fp8GemvTiles) -> bool:
    """Whether the tensor-core GEMV takes this call: bf16 activations, at most 8 rows, 128-byte steps inside
    one scale block, a program's 16 * num_warps rows (block_n) inside one scale row block and one group,
    16-byte aligned weight rows."""
    block_out, block_in = fp8_block_shape(tuple(weight.shape), tuple(scale.shape))
    block_n = tiles.block_n
    return tiles.mma and block_n == 16 * tiles.num_warps and x.dtype == torch.bfloat16 \
        and x.shape[0] <= FP8_GEMV_MMA_MAX_ROWS and block_in % 128 == 0 and block_out % block_n == 0 \
        and (weight.shape[0] // groups) % block_n == 0 and weight.data_ptr() % 16 == 0 \
        and weight.stride(0) % 128 == 0 and scale.stride(-1) == 1


def fp8_dependent_launch(x: torch.Tensor) -> bool:
    """Whether the tensor-core GEMV on x's device is a programmatic dependent launch (Hopper, FP8_GEMV_PDL, a
    Triton with griddepcontrol): kernels launched next to it may then be launched the same way."""
    return x.is_cuda and triton is not None and gdc_wait is not None and FP8_GEMV_PDL and _is_hopper(x.device)


def _fp8_gemv_mma(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, groups: int, tiles: Fp8GemvTiles,
                  counters: torch.Tensor | None, out: torch.Tensor, prmt: bool = True, silu_mul: bool = False,
                  limit: float | None = None) -> torch.Tensor:
    """`fp8_gemv` on the tensor cores (see `fp8_gemv_mma_fits`); prmt=False: the 7-instruction pair decode;
    `silu_mul`: `fp8_gemv_silu_mul`'s launch (out [rows, n / 2])."""
    block_out, block_in = fp8_block_shape(tuple(weight.shape), tuple(scale.shape))
    rows = x.shape[0]
    n, k = weight.shape
    # Each lane's 4 words must be one 16-byte load, or the asm's packs of 4 would not be a lane's words j: the
    # launch specializes the strides as multiples of 16 words (x is copied where its row stride is not; the
    # weight's, K / 4, is a multiple of 32) and the pointers as 16-byte aligned.
    if x.data_ptr() % 16 or x.stride(0) % 32:
        x = torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x)
    block_n = tiles.block_n
    steps = k // 128
    split = max(1, min(tiles.split_k, steps))
    words_per_split = -(-steps // split) * 32
    split = -(-(k // 4) // words_per_split)
    grid = (n // block_n, split)
    part, counters = _split_k_workspace(split, rows, n, grid[0], counters, out, always=silu_mul)
    pdl = {"launch_pdl": True} if fp8_dependent_launch(x) else {}
    _fp8_gemv_mma_kernel[grid](
        x.view(torch.int32), weight.view(torch.int32), scale, out, part, counters, rows, n, k, x.stride(0) // 2,
        weight.stride(0) // 4, scale.stride(0), out.stride(0), n // groups, words_per_split, k // 2,
        BLOCK_OUT=block_out, BLOCK_IN=block_in,
        WARPS=tiles.num_warps, SPLIT_K=split, EMULATE=not x.is_cuda, PRMT=prmt, SILU_MUL=silu_mul,
        HAS_LIMIT=limit is not None, limit=limit if limit is not None else 0.0, PDL=bool(pdl),
        num_warps=tiles.num_warps, **pdl)
    return out


def fp8_dequantize_triton(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`fp8_block_dequantize` in one launch: weight float8_e4m3fn [out, in], scale fp32 -> [out, in] in dtype."""
    block_out, block_in = fp8_block_shape(tuple(weight.shape), tuple(scale.shape))
    n, k = weight.shape
    weight = weight.contiguous()
    out = torch.empty(n, k, dtype=dtype, device=weight.device)
    if n and k:
        _fp8_dequantize_kernel[(triton.cdiv(n, 32), triton.cdiv(k, 256))](
            weight, scale, out, n, k, scale.stride(0), BLOCK_OUT=block_out, BLOCK_IN=block_in, BLOCK_R=32,
            BLOCK_C=256, num_warps=4)
    return out


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """The same function as `fp8_linear_ref` for many rows: the weight dequantized for the call, then cuBLAS."""
    w = fp8_dequantize_triton(weight, scale, x.dtype)
    if groups == 1:
        return torch.nn.functional.linear(x, w)
    rows = x.shape[0]
    return torch.einsum("ngi,goi->ngo", x.view(rows, groups, -1), w.view(groups, -1, w.shape[1])).reshape(rows, -1)


FP8_ACT_BLOCK = 128                 # activation columns a scale covers (the block-scaled GEMM's 1 x 128)
W8A8_ROW_MULTIPLE = 16              # rows padded to this for the GEMM (its scale layout's leading dimension)


def fp8_act_quant_ref(x: torch.Tensor, block_in: int = FP8_ACT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `fp8_act_quant`: x [rows, in] -> (float8_e4m3fn [rows, in], fp32 [rows, in / block_in]).
    Each row's block of `block_in` columns is divided by the smallest power of two >= max(amax, 1e-4) / 448."""
    rows, k = x.shape
    tiles = x.float().view(rows, k // block_in, block_in)
    mantissa, exponent = torch.frexp(tiles.abs().amax(-1).clamp(min=1e-4) / FP8_MAX)      # mantissa in [0.5, 1)
    scale = torch.exp2((exponent - (mantissa == 0.5).to(exponent.dtype)).float())
    return (tiles / scale[..., None]).to(torch.float8_e4m3fn).view(rows, k), scale


def fp8_w8a8_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Torch reference of `fp8_w8a8_matmul`: `fp8_linear_ref` of the activations quantized by
    `fp8_act_quant_ref` (per 1 x 128) and dequantized, in fp32, cast to x's dtype."""
    rows, k = x.shape
    q, x_scale = fp8_act_quant_ref(x)
    dequantized = (q.float().view(rows, -1, FP8_ACT_BLOCK) * x_scale[..., None]).view(rows, k)
    return fp8_linear_ref(dequantized, weight, scale, groups).to(x.dtype)


def fp8_act_quant(x: torch.Tensor, groups: int = 1, m_pad: int | None = None, block_in: int = FP8_ACT_BLOCK
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`fp8_act_quant_ref` in one launch, in the layout of the block-scaled GEMM: x [rows, groups * k] ->
    q float8_e4m3fn [groups, m_pad, k] (group g's columns, rows past `rows` zero) and scales fp32
    [groups * k / block_in, m_pad] (column block c of row m at [c, m]; group g's rows of it, transposed, are its
    column-major [m_pad, k / block_in] scales)."""
    rows, width = x.shape
    m_pad = rows if m_pad is None else m_pad
    if width % (groups * block_in) or block_in & (block_in - 1) or m_pad < rows:
        raise ValueError(f"fp8_act_quant: input {tuple(x.shape)} in {groups} groups of {block_in}-column blocks, "
                         f"{m_pad} rows")
    x = x if x.stride(-1) == 1 else x.contiguous()
    q = torch.empty(groups, m_pad, width // groups, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(width // block_in, m_pad, dtype=torch.float32, device=x.device)
    if m_pad and width:
        blocks = min(triton.next_power_of_2(width // block_in), max(1, 1024 // block_in))
        grid = (triton.cdiv(m_pad, 4), triton.cdiv(width // block_in, blocks))
        _fp8_act_quant_kernel[grid](x, q, scales, rows, width, x.stride(0), m_pad, width // groups // block_in,
                                    BLOCK_IN=block_in, BLOCK_M=4, BLOCKS=blocks, num_warps=4)
    return q, scales


def fp8_w8a8_supported(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether `fp8_w8a8_matmul` runs here: a Hopper GPU (cuBLAS's block-scaled FP8 GEMM), 128 x 128 weight
    blocks, a contiguous weight."""
    return x.is_cuda and triton is not None and hasattr(torch, "_scaled_mm") and _is_hopper(x.device) \
        and fp8_block_shape(tuple(weight.shape), tuple(scale.shape)) == (128, 128) and weight.is_contiguous() \
        and scale.is_contiguous()


_HOPPER: dict[int, bool] = {}


def _is_hopper(device: torch.device) -> bool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _HOPPER:
        _HOPPER[index] = torch.cuda.get_device_capability(index)[0] == 9
    return _HOPPER[index]


def fp8_w8a8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """The same function as `fp8_w8a8_ref` (see `fp8_w8a8_supported`): the activations quantized per 1 x 128
    (`fp8_act_quant`), then `torch._scaled_mm` with both block scales (fp32 sums), one call per group."""
    rows = x.shape[0]
    n, k = weight.shape
    m_pad = -(-rows // W8A8_ROW_MULTIPLE) * W8A8_ROW_MULTIPLE
    q, x_scales = fp8_act_quant(x, groups, m_pad)
    if groups == 1:
        out = torch._scaled_mm(q[0], weight.t(), scale_a=x_scales.t(), scale_b=scale.t(), out_dtype=x.dtype)
        return out[:rows]
    n_group, k_blocks, n_blocks = n // groups, k // FP8_ACT_BLOCK, n // groups // 128
    parts = [torch._scaled_mm(q[g], weight[g * n_group:(g + 1) * n_group].t(),
                              scale_a=x_scales[g * k_blocks:(g + 1) * k_blocks].t(),
                              scale_b=scale[g * n_blocks:(g + 1) * n_blocks].t(), out_dtype=x.dtype)
             for g in range(groups)]
    return torch.cat(parts, dim=1)[:rows]


def fp8_w8a8_preferred(rows: int, n: int, k: int, groups: int) -> bool:
    """Whether the W8A8 GEMM beats dequantize + cuBLAS at this shape, from the H200 measurements of
    tools/decode_kernels.py (docs/PERFORMANCE.md): cuBLAS's block-scaled GEMM costs about 16 us at any row
    count for narrow weights with a long K (no split K: [512 or 1024, 4096] lose to dequantize + cuBLAS below
    a thousand rows), and the grouped weight runs one GEMM a group."""
    out_per_group = n // groups
    return out_per_group >= 4096 or (out_per_group >= 2048 and rows >= 256) \
        or (out_per_group >= 1024 and rows >= 1024)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, groups: int = 1,
               counters: torch.Tensor | None = None, silu_mul_output: bool = False,
               limit: float | None = None) -> torch.Tensor:
    """x [..., groups * in] -> [..., groups * out]: on a GPU (bf16/fp16) the GEMV for a few rows (up to 8 where the
    tensor-core GEMV takes the call, else 4); for more, the W8A8 GEMM where supported and measured faster
    (RUN_MODEL_FP8_W8A8=0 turns it off), else dequantize then cuBLAS; `fp8_linear_ref` elsewhere (the weight
    dequantized for the call, in x's dtype). `silu_mul_output` (one group; the weight a gate projection's rows
    then an up projection's): -> silu_mul(gate, up, limit) [..., out / 2] (`fp8_silu_mul_ref`), in the GEMV's
    launch where `fp8_gemv_silu_mul_fits`."""
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    gpu = x.is_cuda and triton is not None and x.dtype in (torch.bfloat16, torch.float16) \
        and os.environ.get("RUN_MODEL_TORCH_OPS") != "1"
    rows = x.shape[0]
    tiles = Fp8GemvTiles.for_shape(*weight.shape, rows) if gpu and rows <= FP8_GEMV_MMA_MAX_ROWS else None
    if silu_mul_output:
        if groups != 1:
            raise ValueError("fp8_linear: silu_mul_output takes one group")
        if tiles is not None and fp8_gemv_silu_mul_fits(x, weight, scale, tiles):
            out = fp8_gemv_silu_mul(x, weight, scale, limit, tiles, counters)
        else:
            y = fp8_linear(x, weight, scale, 1, counters)
            out = silu_mul(y[:, :y.shape[1] // 2], y[:, y.shape[1] // 2:], limit)
    elif gpu:
        if rows <= FP8_GEMV_MAX_ROWS or (tiles is not None and fp8_gemv_mma_fits(x, weight, scale, groups, tiles)):
            out = fp8_gemv(x, weight, scale, groups, tiles, counters)
        elif os.environ.get("RUN_MODEL_FP8_W8A8") != "0" and fp8_w8a8_supported(x, weight, scale) \
                and fp8_w8a8_preferred(x.shape[0], weight.shape[0], weight.shape[1], groups):
            out = fp8_w8a8_matmul(x, weight, scale, groups)
        else:
            out = fp8_matmul(x, weight, scale, groups)
    else:
        out = fp8_linear_ref(x, weight, scale, groups)
    return out.view(*lead, out.shape[-1])


class Fp8Linear(nn.Module):
    """A linear layer (no bias) that keeps its weight in FP8: `weight` float8_e4m3fn [out, in] and `scale`, the
    fp32 block-scale grid [out / block_out, in / block_in]. With `groups` > 1 it is block-diagonal: the input is
    `groups` slices of `in` features, slice g feeding output rows [g * out / groups, (g + 1) * out / groups)
    (the weight is [out, in], out counting every group)."""

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int], groups: int = 1):
        super().__init__()
        block_out, block_in = block
        if out_features % (groups * block_out) or in_features % block_in:
            raise ValueError(f"FP8 linear [{out_features}, {in_features}] in {groups} groups does not tile into "
                             f"blocks of {list(block)}")
        self.in_features, self.out_features, self.groups, self.block = in_features, out_features, groups, block
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn),
                                   requires_grad=False)
        self.scale = nn.Parameter(torch.empty(out_features // block_out, in_features // block_in,
                                              dtype=torch.float32), requires_grad=False)
        # split-K arrival counters of the GEMV, one per column tile (at least 4 columns a tile); always zero
        # between launches
        self.register_buffer("counters", torch.zeros(-(-out_features // 4), dtype=torch.int32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.scale, self.groups, self.counters)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block={list(self.block)}"
                + (f", groups={self.groups}" if self.groups > 1 else ""))
