"""FP8 (E4M3) weights with per-block power-of-two scales, the format several families ship for their linears.

A weight [out, in] is stored as float8_e4m3fn with a scale grid [out / block_out, in / block_in]; each scale
multiplies one block_out x block_in tile. Scales are UE8M0 (`float8_e8m0fnu`, value 2^(byte - 127)) or fp32.
The block shape is read from the grid, so every dimension must divide evenly (as transformers requires).
`fp8_block_dequantize` is the CPU path; `fp8_block_quantize` writes test checkpoints; `fp8_gemv` multiplies a
few rows by such a weight without widening it (the weight is read once, in its 1-byte format)."""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
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


# ---- the few-row GEMV over FP8 block-scaled weights ----------------------------------------------------
# One program owns BLOCK_N output columns for every input row and walks K in steps of KSTEPS scale blocks: per
# scale block (BLOCK_K = block_in) it loads a [BLOCK_N, BLOCK_K] e4m3 tile (16-byte loads along K) and the
# BLOCK_N scales, widens the tile times its scale in fp32, and accumulates [BLOCK_M, BLOCK_N, BLOCK_K] partial
# products, reduced over K once at the end (KSTEPS > 1: more loads in flight per iteration). With GROUPS > 1 the weight is block-diagonal: output column n reads
# input columns of group n // (N / GROUPS) (BLOCK_N divides N / GROUPS).

if triton is not None:
    @triton.jit
    def _fp8_gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_om,
                         n_per_group, BLOCK_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, KSTEPS: tl.constexpr):
        pid = tl.program_id(0)
        m = tl.arange(0, BLOCK_M)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = m < M
        n_mask = n < N
        group = (pid * BLOCK_N) // n_per_group
        w_rows = w_ptr + n.to(tl.int64)[:, None] * stride_wn
        s_rows = s_ptr + (n // BLOCK_OUT).to(tl.int64) * stride_sn
        x_rows = x_ptr + m.to(tl.int64)[:, None] * stride_xm + group * K
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k_outer in range(0, K, KSTEPS * BLOCK_K):
            for j in tl.static_range(KSTEPS):
                k_start = k_outer + j * BLOCK_K
                k = k_start + tl.arange(0, BLOCK_K)
                w = tl.load(w_rows + k[None, :], mask=n_mask[:, None], other=0.0, eviction_policy="evict_first")
                scale = tl.load(s_rows + k_start // BLOCK_K, mask=n_mask, other=0.0)              # [BLOCK_N]
                a = tl.load(x_rows + k[None, :], mask=m_mask[:, None], other=0.0).to(tl.float32)   # [BLOCK_M, BLOCK_K]
                acc += a[:, None, :] * (w.to(tl.float32) * scale[:, None])[None, :, :]
        out = tl.sum(acc, axis=2)                                              # [BLOCK_M, BLOCK_N]
        tl.store(out_ptr + m.to(tl.int64)[:, None] * stride_om + n[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


def fp8_gemv_tiles(rows: int, n_per_group: int) -> int:
    """BLOCK_N: enough programs to cover an H200's 132 SMs several times over, dividing a group's columns."""
    block_n = 16 if rows <= 2 else 8
    while block_n > 2 and (n_per_group % block_n or n_per_group // block_n < 512):
        block_n //= 2
    return block_n


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, groups: int = 1,
             block_n: int | None = None, ksteps: int = 1, num_warps: int = 4) -> torch.Tensor:
    """The same function as `fp8_linear_ref` for a few rows: weight float8_e4m3fn [groups * out, in], scale an
    fp32 grid [groups * out / bo, in / bi] with bi a power of two that divides in."""
    rows = x.shape[0]
    n, k = weight.shape
    block_out, block_in = fp8_block_shape(tuple(weight.shape), tuple(scale.shape))
    if x.shape[1] != groups * k or n % groups or block_in & (block_in - 1) or k % (ksteps * block_in):
        raise ValueError(f"fp8_gemv: input {tuple(x.shape)}, weight {tuple(weight.shape)} in {groups} groups, "
                         f"blocks {block_out}x{block_in}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows and n:
        block_n = block_n or fp8_gemv_tiles(rows, n // groups)
        _fp8_gemv_kernel[(triton.cdiv(n, block_n),)](
            x, weight, scale, out, rows, n, k, x.stride(0), weight.stride(0), scale.stride(0), out.stride(0),
            n // groups, BLOCK_OUT=block_out, BLOCK_M=max(1, triton.next_power_of_2(rows)), BLOCK_N=block_n,
            BLOCK_K=block_in, KSTEPS=ksteps, num_warps=num_warps)
    return out
