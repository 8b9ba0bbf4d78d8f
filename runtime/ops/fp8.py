"""FP8 (E4M3) weights with per-block power-of-two scales, the format several families ship for their linears.

A weight [out, in] is stored as float8_e4m3fn with a scale grid [out / block_out, in / block_in]; each scale
multiplies one block_out x block_in tile. Scales are UE8M0 (`float8_e8m0fnu`, value 2^(byte - 127)) or fp32.
The block shape is read from the grid, so every dimension must divide evenly (as transformers requires).
`fp8_block_dequantize` is the CPU path; `fp8_block_quantize` writes test checkpoints. `Fp8Linear` keeps such a
weight in its 1-byte format on a GPU: `fp8_gemv` multiplies a few rows by it (decode: one pass over the bytes),
`fp8_gemm` many rows (prefill: widened tile by tile on the tensor cores); `fp8_linear_ref` is the torch reference
(and the CPU path) of both."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
from torch import nn

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
# A decode GEMV is a pass over the weight: its speed is the bytes in flight per SM. Program (n, s) owns BLOCK_N
# output columns for every input row and the s-th of SPLIT_K equal slices of K; it walks its slice BLOCK_K
# bytes per row at a time (BLOCK_K a multiple of the scale block BLOCK_IN, unrolled one scale block per step, so
# each thread has BLOCK_K / BLOCK_IN 16-byte loads outstanding). Per scale block it reduces the fp32 products
# over K and multiplies the [BLOCK_M, BLOCK_N] result by the block's scales once. With SPLIT_K > 1 each
# program writes its fp32 partial sums to `part` and bumps its column tile's arrival counter; the last to
# arrive adds the partials in split order (the same sum whatever the arrival order), writes the output and
# resets the counter to 0 for the next launch (so a CUDA graph replays it with no memset). With GROUPS > 1
# the weight is block-diagonal: output column n reads the input columns of group n // n_per_group.

if triton is not None:
    @triton.jit
    def _fp8_gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, part_ptr, count_ptr, M, N, K, stride_xm, stride_wn,
                         stride_sn, stride_om, n_per_group, k_per_split,
                         BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        m = tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = m < M
        n_mask = n < N
        group = (pid_n * BLOCK_N) // n_per_group
        w_rows = w_ptr + n.to(tl.int64)[:, None] * stride_wn
        s_rows = s_ptr + (n // BLOCK_OUT).to(tl.int64) * stride_sn
        x_rows = x_ptr + m.to(tl.int64)[:, None] * stride_xm + group * K
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        k_begin = pid_k * k_per_split
        k_end = tl.minimum(k_begin + k_per_split, K)
        for k_outer in range(k_begin, k_end, BLOCK_K):
            for j in tl.static_range(BLOCK_K // BLOCK_IN):
                k_start = k_outer + j * BLOCK_IN
                k = k_start + tl.arange(0, BLOCK_IN)
                w = tl.load(w_rows + k[None, :], mask=n_mask[:, None], other=0.0, eviction_policy="evict_first")
                a = tl.load(x_rows + k[None, :], mask=m_mask[:, None], other=0.0).to(tl.float32)   # [BLOCK_M, BLOCK_IN]
                scale = tl.load(s_rows + k_start // BLOCK_IN, mask=n_mask, other=0.0)             # [BLOCK_N]
                acc += tl.sum(a[:, None, :] * w.to(tl.float32)[None, :, :], axis=2) * scale[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        out_ptrs = out_ptr + m.to(tl.int64)[:, None] * stride_om + n[None, :]
        if SPLIT_K == 1:
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            parts = part_ptr + m.to(tl.int64)[:, None] * N + n[None, :]               # part [SPLIT_K, M, N]
            tl.store(parts + pid_k * M * N, acc, mask=mask)
            tl.debug_barrier()                                  # every thread's partial before the arrival
            arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:
                total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for split in tl.static_range(SPLIT_K):
                    total += tl.load(parts + split * M * N, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(count_ptr + pid_n, 0, sem="relaxed", scope="gpu")

    # Many rows: a W8A16 GEMM. Each [BLOCK_N, BLOCK_IN] weight tile is widened to the activation dtype (exact:
    # e4m3 fits bf16/fp16), multiplied on the tensor cores with fp32 accumulation, and the product of each
    # scale block is scaled once as it is added to the fp32 accumulator. Activations are not quantized.
    @triton.jit
    def _fp8_gemm_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_om,
                         n_per_group, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        per_band = GROUP_M * tiles_n                      # GROUP_M row tiles sweep the columns together (L2 reuse)
        first_m = (pid // per_band) * GROUP_M
        band = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_band) % band
        pid_n = (pid % per_band) // band
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = m < M
        n_mask = n < N
        group = (pid_n * BLOCK_N) // n_per_group
        kk = tl.arange(0, BLOCK_IN)
        a_ptrs = x_ptr + m.to(tl.int64)[:, None] * stride_xm + group * K + kk[None, :]
        w_ptrs = w_ptr + n.to(tl.int64)[None, :] * stride_wn + kk[:, None]            # [BLOCK_IN, BLOCK_N]
        s_ptrs = s_ptr + (n // BLOCK_OUT).to(tl.int64) * stride_sn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kb in range(0, K // BLOCK_IN):
            a = tl.load(a_ptrs, mask=m_mask[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_mask[None, :], other=0.0).to(a.dtype)
            scale = tl.load(s_ptrs + kb, mask=n_mask, other=0.0)
            acc += tl.dot(a, w) * scale[None, :]
            a_ptrs += BLOCK_IN
            w_ptrs += BLOCK_IN
        tl.store(out_ptr + m.to(tl.int64)[:, None] * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


@dataclass(frozen=True, slots=True)
class Fp8GemvTiles:
    block_n: int = 16                  # output columns (weight rows) per program
    block_k: int = 512                 # bytes of each weight row per loop step (a multiple of the scale block)
    split_k: int = 1                   # programs along K (the last to finish adds their sums)
    num_warps: int = 4

    @staticmethod
    def for_shape(n: int, k: int, rows: int = 1) -> "Fp8GemvTiles":
        """The table below for one group's [n, k] weight at `rows` <= 2 rows (4 rows: half the block_n);
        otherwise enough programs to cover an H200's 132 SMs about four times. A function of the shape only
        (eager runs and graph replays agree)."""
        tiles = FP8_GEMV_TILE_TABLE.get((n, k))
        if tiles is None:
            block_n = 16
            while block_n > 4 and n // block_n < 512:
                block_n //= 2
            split = 1
            while split < 8 and (n // block_n) * split < 512 and k // (2 * split) >= 1024:
                split *= 2
            tiles = Fp8GemvTiles(block_n, 512, split, 4)
        if rows > 2 and tiles.block_n > 4:
            tiles = replace(tiles, block_n=tiles.block_n // 2)
        return tiles


# From the tools/decode_kernels.py FP8 sweep on an H200; keyed by one group's (out, in).
FP8_GEMV_TILE_TABLE: dict[tuple[int, int], Fp8GemvTiles] = {
}


@dataclass(frozen=True, slots=True)
class Fp8GemmTiles:
    block_m: int = 64
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 4
    group_m: int = 8

    @staticmethod
    def for_shape(rows: int, n_per_group: int, block_in: int) -> "Fp8GemmTiles":
        block_n = 128
        while block_n > 16 and n_per_group % block_n:
            block_n //= 2
        block_m = 64 if rows <= 64 else 128
        return Fp8GemmTiles(block_m, block_n, 8 if block_m * block_n >= 128 * 128 else 4,
                            3 if block_in >= 128 else 4)


FP8_GEMV_MAX_ROWS = 4               # past this the GEMM (measured on an H200, tools/decode_kernels.py --only fp8)


def _check(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, groups: int) -> tuple[int, int]:
    block_out, block_in = fp8_block_shape(tuple(weight.shape), tuple(scale.shape))
    n, k = weight.shape
    if x.dim() != 2 or x.shape[1] != groups * k or n % groups or block_in & (block_in - 1) \
            or weight.stride(-1) != 1 or scale.dtype != torch.float32:
        raise ValueError(f"FP8 linear: input {tuple(x.shape)}, weight {tuple(weight.shape)} in {groups} groups, "
                         f"blocks {block_out}x{block_in} (a power of two along K), scale {scale.dtype} (fp32)")
    return block_out, block_in


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, groups: int = 1,
             tiles: Fp8GemvTiles | None = None, counters: torch.Tensor | None = None) -> torch.Tensor:
    """The same function as `fp8_linear_ref` for a few rows: weight float8_e4m3fn [groups * out, in], scale an
    fp32 grid [groups * out / bo, in / bi]. `counters`: int32 zeros, one per column tile, that split-K
    programs count their arrivals in (left at zero); made here when not given."""
    block_out, block_in = _check(x, weight, scale, groups)
    rows = x.shape[0]
    n, k = weight.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if not rows or not n:
        return out
    tiles = tiles or Fp8GemvTiles.for_shape(n // groups, k, rows)
    block_k = tiles.block_k if k % tiles.block_k == 0 and tiles.block_k % block_in == 0 else block_in
    steps = k // block_k
    split = max(1, min(tiles.split_k, steps))
    k_per_split = -(-steps // split) * block_k
    split = -(-k // k_per_split)
    grid = (triton.cdiv(n, tiles.block_n), split)
    if split > 1:
        part = torch.empty(split, rows, n, dtype=torch.float32, device=x.device)
        if counters is None:
            counters = torch.zeros(grid[0], dtype=torch.int32, device=x.device)
        elif counters.numel() < grid[0]:
            raise ValueError(f"fp8_gemv: {counters.numel()} counters for {grid[0]} column tiles")
    else:
        part = counters = out
    _fp8_gemv_kernel[grid](
        x, weight, scale, out, part, counters, rows, n, k, x.stride(0), weight.stride(0), scale.stride(0),
        out.stride(0), n // groups, k_per_split, BLOCK_OUT=block_out, BLOCK_IN=block_in,
        BLOCK_M=max(1, triton.next_power_of_2(rows)), BLOCK_N=tiles.block_n, BLOCK_K=block_k, SPLIT_K=split,
        num_warps=tiles.num_warps)
    return out


def fp8_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, groups: int = 1,
             tiles: Fp8GemmTiles | None = None) -> torch.Tensor:
    """The same function as `fp8_linear_ref` for many rows (bf16/fp16 x), on the tensor cores."""
    block_out, block_in = _check(x, weight, scale, groups)
    rows = x.shape[0]
    n, k = weight.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if not rows or not n:
        return out
    tiles = tiles or Fp8GemmTiles.for_shape(rows, n // groups, block_in)
    if block_in < 16 or (n // groups) % tiles.block_n:
        raise ValueError(f"fp8_gemm: a group's {n // groups} columns in tiles of {tiles.block_n}, K blocks of "
                         f"{block_in} (at least 16)")
    grid = (triton.cdiv(rows, tiles.block_m) * triton.cdiv(n, tiles.block_n),)
    _fp8_gemm_kernel[grid](
        x, weight, scale, out, rows, n, k, x.stride(0), weight.stride(0), scale.stride(0), out.stride(0),
        n // groups, BLOCK_OUT=block_out, BLOCK_IN=block_in, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        GROUP_M=tiles.group_m, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, groups: int = 1,
               counters: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., groups * in] -> [..., groups * out]: the GEMV for a few rows and the GEMM for more on a GPU
    (bf16/fp16), `fp8_linear_ref` elsewhere (the weight dequantized for the call, in x's dtype)."""
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    if x.is_cuda and triton is not None and x.dtype in (torch.bfloat16, torch.float16) \
            and os.environ.get("RUN_MODEL_TORCH_OPS") != "1":
        if x.shape[0] <= FP8_GEMV_MAX_ROWS:
            out = fp8_gemv(x, weight, scale, groups, counters=counters)
        else:
            out = fp8_gemm(x, weight, scale, groups)
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
