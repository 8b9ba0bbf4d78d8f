"""FP8 (E4M3) weights with per-block power-of-two scales, the format several families ship for their linears.

A weight [out, in] is stored as float8_e4m3fn with a scale grid [out / block_out, in / block_in]; each scale
multiplies one block_out x block_in tile. Scales are UE8M0 (`float8_e8m0fnu`, value 2^(byte - 127)) or fp32.
The block shape is read from the grid, so every dimension must divide evenly (as transformers requires).
`fp8_block_dequantize` is the CPU path; `fp8_block_quantize` writes test checkpoints."""
from __future__ import annotations

import torch

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
