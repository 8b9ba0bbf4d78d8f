"""Dense projections: `y = x @ W.T + b`, with a Triton GEMV for the few-token (decode) case.

At a handful of rows a projection is a pass over the weight: cuBLAS picks split-K tilings for such shapes and
adds a reduction launch per projection, and its tiles are sized for rows it does not have. The GEMV streams
each weight row once and keeps the partial products of the few input rows in registers, one launch per
projection. Optionally it reads its input as `silu(gate) * up` from a [rows, 2 * K] (gate | up) tensor, so the
MLP's activation needs no launch of its own.

`linear` is the entry point (the GEMV on a GPU for at most GEMV_MAX_ROWS rows of bf16/fp16, torch elsewhere);
`Linear` is an nn.Linear whose forward calls it, so checkpoints keep their parameter names."""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from runtime.ops.activation import silu_and_mul, silu_and_mul_ref
from runtime.ops.norm import RMSNorm, rms_norm_ref

try:
    import triton
    import triton.language as tl
except ImportError:                                  # the torch reference still works without Triton
    triton = None

GEMV_MAX_ROWS = 1           # measured on an H200: at 2-4 rows cuBLAS's tiled GEMM beats this GEMV
GEMV_MAX_BYTES = 64 << 20   # past this (an LM head, a large gate_up) cuBLAS streams as fast unless a fusion pays


def _use_gemv(x: torch.Tensor, weight: torch.Tensor, fused: bool) -> bool:
    return (x.is_cuda and triton is not None and os.environ.get("RUN_MODEL_TORCH_OPS") != "1"
            and x.dtype in (torch.bfloat16, torch.float16) and x.dtype == weight.dtype and x.dim() == 2
            and 0 < x.shape[0] <= GEMV_MAX_ROWS
            and (fused or weight.numel() * weight.element_size() <= GEMV_MAX_BYTES))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           silu_mul_input: bool = False) -> torch.Tensor:
    """x [rows, K] (or [rows, 2 * K] gate | up with `silu_mul_input`) -> [rows, N]. The GEMV for a few rows on
    a GPU, torch elsewhere."""
    if _use_gemv(x, weight, silu_mul_input):
        return gemv_triton(x, weight, bias, silu_mul_input)
    return F.linear(silu_and_mul(x) if silu_mul_input else x, weight, bias)


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               silu_mul_input: bool = False) -> torch.Tensor:
    """Torch reference of `linear`; the activation rounds where `silu_and_mul` does."""
    return F.linear(silu_and_mul_ref(x) if silu_mul_input else x, weight, bias)


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm, weight: torch.Tensor,
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`linear(norm(x + residual))` and the new residual `x + residual` (x itself without one): the RMSNorm
    runs inside the GEMV for a single row on a GPU, as its own op elsewhere."""
    if _use_gemv(x, weight, True) and norm.weight.dtype == x.dtype:
        return gemv_triton(x, weight, bias, norm=norm, residual=residual)
    normed, residual = (norm(x), x) if residual is None else norm(x, residual)
    return linear(normed, weight, bias), residual


def norm_linear_ref(x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `norm_linear`."""
    normed, residual = (rms_norm_ref(x, norm.weight, norm.eps, None, norm.weight_in_fp32), x) if residual is None \
        else rms_norm_ref(x, norm.weight, norm.eps, residual, norm.weight_in_fp32)
    return F.linear(normed, weight, bias), residual


class Linear(nn.Linear):
    """nn.Linear (same parameters, same names) whose forward takes the GEMV path for a few rows."""

    def forward(self, x: torch.Tensor, silu_mul_input: bool = False) -> torch.Tensor:
        return linear(x, self.weight, self.bias, silu_mul_input)

    def forward_normed(self, x: torch.Tensor, residual: torch.Tensor | None,
                       norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(norm(x + residual)), x + residual), the norm fused where the GEMV runs."""
        return norm_linear(x, residual, norm, self.weight, self.bias)


# ---- Triton kernel ----------------------------------------------------------------------------------
# Program n owns BLOCK_N output columns for every input row (BLOCK_M >= rows, a power of two) over all of K.
# It multiplies [BLOCK_N, BLOCK_K] tiles of W (16-byte loads along K) by the
# [BLOCK_M, BLOCK_K] input slices into [BLOCK_M, BLOCK_N, BLOCK_K] fp32 partial products, reduced over K once
# at the end. The weight is read exactly once; the input (a few KB) comes from L2 for every program.
# At a few MB the kernel is bound by latency, not bytes. ONE_STEP (BLOCK_K >= K): the program loads
# its whole weight block first, all of it in flight at once, then the input once (the norm's statistics and the
# normalized values come from the same registers): no loop, one layout conversion. Otherwise it walks K
# in BLOCK_K steps, after a pass over the input for the norm's statistics.
# The output is rounded once, from fp32, as cuBLAS rounds it. With SILU_MUL the input element k is
# silu(gate[k]) * up[k], each rounded to the input dtype as the reference rounds it. (Splitting K over programs,
# with the last to arrive adding the partials, lost at every shape swept on an H200 on 2026-11-29: removed.)

if triton is not None:
    @triton.jit
    def _gemv_input(x_rows, res_rows, k, x_mask, HAS_RESIDUAL: tl.constexpr):
        """x (+ residual, the sum rounded to x's dtype as the reference adds) at columns k."""
        x = tl.load(x_rows + k[None, :], mask=x_mask, other=0.0)
        if HAS_RESIDUAL:
            x = (x.to(tl.float32) + tl.load(res_rows + k[None, :], mask=x_mask, other=0.0).to(tl.float32)).to(x.dtype)
        return x

    @triton.jit
    def _gemv_normed(x, inv_rms, norm_ptr, k, k_mask, WEIGHT_IN_FP32: tl.constexpr):
        """The RMSNorm of x's columns k (their rows' 1 / rms given), rounded where the reference rounds, in fp32."""
        normed = x.to(tl.float32) * inv_rms
        norm_weight = tl.load(norm_ptr + k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        if WEIGHT_IN_FP32:
            return (norm_weight * normed).to(x.dtype).to(tl.float32)
        return (norm_weight * normed.to(x.dtype).to(tl.float32)).to(x.dtype).to(tl.float32)

    @triton.jit
    def _gemv_silu_input(x_rows, k, x_mask, K):
        """silu(gate) * up at columns k of a (gate | up) input, each rounded to its dtype, in fp32."""
        gate = tl.load(x_rows + k[None, :], mask=x_mask, other=0.0)
        up = tl.load(x_rows + K + k[None, :], mask=x_mask, other=0.0)
        gate_f = gate.to(tl.float32)
        silu = (gate_f / (1.0 + tl.exp(-gate_f))).to(gate.dtype).to(tl.float32)
        return (silu * up.to(tl.float32)).to(gate.dtype).to(tl.float32)

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, res_ptr, norm_ptr, sum_ptr, M, N, K,
                     stride_xm, stride_wn, stride_om, eps,
                     HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, NORM: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr, WEIGHT_IN_FP32: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_STEP: tl.constexpr):
        pid = tl.program_id(0)
        m = tl.arange(0, BLOCK_M)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = m < M
        n_mask = n < N
        w_rows = w_ptr + n.to(tl.int64)[:, None] * stride_wn
        x_rows = x_ptr + m.to(tl.int64)[:, None] * stride_xm
        res_rows = res_ptr + m.to(tl.int64)[:, None] * K
        if ONE_STEP:
            k = tl.arange(0, BLOCK_K)
            k_mask = k < K
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                        eviction_policy="evict_first")
            x_mask = m_mask[:, None] & k_mask[None, :]
            if SILU_MUL:
                a = _gemv_silu_input(x_rows, k, x_mask, K)
            elif NORM:
                x = _gemv_input(x_rows, res_rows, k, x_mask, HAS_RESIDUAL)
                if HAS_RESIDUAL:
                    if pid == 0:
                        tl.store(sum_ptr + m.to(tl.int64)[:, None] * K + k[None, :], x, mask=x_mask)
                xf = x.to(tl.float32)
                inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=1) / K + eps)[:, None]
                a = _gemv_normed(x, inv_rms, norm_ptr, k, k_mask, WEIGHT_IN_FP32)
            else:
                a = tl.load(x_rows + k[None, :], mask=x_mask, other=0.0).to(tl.float32)
            out = tl.sum(a[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)      # [BLOCK_M, BLOCK_N]
        else:
            if NORM:                 # every program computes the rows' rms over all of K; one writes x + residual
                squares = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
                for k_start in range(0, K, BLOCK_K):
                    k = k_start + tl.arange(0, BLOCK_K)
                    x_mask = m_mask[:, None] & (k < K)[None, :]
                    x = _gemv_input(x_rows, res_rows, k, x_mask, HAS_RESIDUAL)
                    if HAS_RESIDUAL:
                        if pid == 0:
                            tl.store(sum_ptr + m.to(tl.int64)[:, None] * K + k[None, :], x, mask=x_mask)
                    squares += x.to(tl.float32) * x.to(tl.float32)
                inv_rms = tl.rsqrt(tl.sum(squares, axis=1) / K + eps)[:, None]
            acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
            for k_start in range(0, K, BLOCK_K):
                k = k_start + tl.arange(0, BLOCK_K)
                k_mask = k < K
                w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                            eviction_policy="evict_first")
                x_mask = m_mask[:, None] & k_mask[None, :]
                if SILU_MUL:
                    a = _gemv_silu_input(x_rows, k, x_mask, K)
                elif NORM:
                    a = _gemv_normed(_gemv_input(x_rows, res_rows, k, x_mask, HAS_RESIDUAL), inv_rms, norm_ptr, k,
                                     k_mask, WEIGHT_IN_FP32)
                else:
                    a = tl.load(x_rows + k[None, :], mask=x_mask, other=0.0).to(tl.float32)
                acc += a[:, None, :] * w.to(tl.float32)[None, :, :]
            out = tl.sum(acc, axis=2)                                          # [BLOCK_M, BLOCK_N]
        if HAS_BIAS:
            out += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + m.to(tl.int64)[:, None] * stride_om + n[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


class GemvTiles(NamedTuple):
    """A GEMV launch: BLOCK_N output columns and BLOCK_K inputs a step per program, and its warps."""
    block_n: int
    block_k: int
    num_warps: int = 4


# (N, K) -> tiles for one row: the fastest of `tools/decode_kernels.py --only gemv --write-table` on an H200
# (2026-11-29); other shapes: gemv_tiles' rule.
GEMV_TILE_TABLE: dict[tuple[int, int], GemvTiles] = {
    (256, 4096): GemvTiles(block_n=1, block_k=4096, num_warps=4),
    (1024, 2048): GemvTiles(block_n=4, block_k=2048, num_warps=4),
    (1024, 3072): GemvTiles(block_n=2, block_k=4096, num_warps=8),
    (1024, 4096): GemvTiles(block_n=2, block_k=4096, num_warps=4),
    (2624, 4096): GemvTiles(block_n=2, block_k=4096, num_warps=4),
    (4096, 1024): GemvTiles(block_n=8, block_k=1024, num_warps=4),
    (4096, 4096): GemvTiles(block_n=2, block_k=4096, num_warps=4),
    (4096, 12288): GemvTiles(block_n=8, block_k=1024, num_warps=4),
    (6144, 1024): GemvTiles(block_n=8, block_k=1024, num_warps=4),
    (6144, 4096): GemvTiles(block_n=16, block_k=512, num_warps=8),
}


def gemv_tiles(rows: int, n: int, k: int) -> GemvTiles:
    """The launch shape, a function of the shape only (graphs and eager agree). One row: the sweep's table, else
    for K of 1024, 2048 or 4096 (and a weight up to 64 MB) one step of ~8K weight elements a program (at least
    256 programs), which won at every such plain and SiLU shape swept on an H200. Otherwise steps of 256-512
    inputs and enough programs to cover the 132 SMs several times over."""
    block_m = triton.next_power_of_2(rows)
    if block_m == 1:
        if (n, k) in GEMV_TILE_TABLE:
            return GEMV_TILE_TABLE[(n, k)]
        if k in (1024, 2048, 4096) and n * k * 2 <= GEMV_MAX_BYTES:
            block_n = 8192 // k
            while block_n > 1 and triton.cdiv(n, block_n) < 256:
                block_n //= 2
            return GemvTiles(block_n, k, 4)
    block_k = 512 if block_m == 1 and n < 16384 else 256
    block_n = 16
    while block_n > 2 and triton.cdiv(n, block_n) < 512:
        block_n //= 2
    if block_m >= 4:
        block_n = min(block_n, 8)
    return GemvTiles(block_n, block_k, 4)


def gemv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                silu_mul_input: bool = False, tiles: tuple | None = None,
                norm: RMSNorm | None = None, residual: torch.Tensor | None = None):
    """The same function as `linear_ref` (or, with `norm`, as `norm_linear_ref`, returning (y, x + residual)),
    for a few rows (any count works; it is fast for one). `tiles`: a GemvTiles (or its fields as a tuple)."""
    if triton is None:
        raise RuntimeError("gemv_triton needs the triton package")
    rows, width = x.shape
    n, k = weight.shape
    if width != (2 * k if silu_mul_input else k):
        raise ValueError(f"input width {width} does not match the weight's {k} inputs"
                         f"{' (times 2: gate | up)' if silu_mul_input else ''}")
    if norm is not None and (silu_mul_input or norm.weight.shape != (k,)):
        raise ValueError("a fused norm needs a plain input of the weight's width")
    if residual is not None and (norm is None or residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError("a residual goes with a norm and must match x")
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    residual = residual.contiguous() if residual is not None else None
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    summed = torch.empty((rows, k), dtype=x.dtype, device=x.device) if residual is not None else x
    if rows and n:
        tiles = GemvTiles(*tiles) if tiles is not None else gemv_tiles(rows, n, k)
        _gemv_kernel[(triton.cdiv(n, tiles.block_n),)](
            x, weight, bias if bias is not None else weight, out, residual if residual is not None else x,
            norm.weight if norm is not None else weight, summed,
            rows, n, k, x.stride(0), weight.stride(0), out.stride(0),
            norm.eps if norm is not None else 0.0,
            HAS_BIAS=bias is not None, SILU_MUL=silu_mul_input, NORM=norm is not None,
            HAS_RESIDUAL=residual is not None, WEIGHT_IN_FP32=norm is not None and norm.weight_in_fp32,
            BLOCK_M=triton.next_power_of_2(rows), BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
            ONE_STEP=tiles.block_k >= k, num_warps=tiles.num_warps)
    return out if norm is None else (out, summed)
