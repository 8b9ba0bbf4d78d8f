"""RMSNorm, optionally fused with the residual add that precedes it: the torch reference and its Triton twin."""
from __future__ import annotations

import os

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:                                  # the torch reference still works without Triton
    triton = None


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and triton is not None and os.environ.get("RUN_MODEL_TORCH_OPS") != "1"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             weight_in_fp32: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`weight * normalize(x)`; with `residual`, normalizes `x + residual` and also returns that sum.
    The Triton kernel on a GPU, the torch reference elsewhere (or everywhere with RUN_MODEL_TORCH_OPS=1)."""
    if _use_triton(x):
        return rms_norm_triton(x, weight, eps, residual, weight_in_fp32)
    return rms_norm_ref(x, weight, eps, residual, weight_in_fp32)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 weight_in_fp32: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `rms_norm`.

    weight_in_fp32=False: normalize in fp32, cast, then multiply (the usual order).
    weight_in_fp32=True: multiply in fp32, then cast."""
    if residual is not None:
        x = x + residual
        residual = x
    dtype = x.dtype
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = (weight.float() * normed).to(dtype) if weight_in_fp32 else weight * normed.to(dtype)
    return out if residual is None else (out, residual)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, weight_in_fp32: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.weight_in_fp32 = weight_in_fp32

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, residual, self.weight_in_fp32)


# ---- Triton kernel ----------------------------------------------------------------------------------
# Each program normalizes BLOCK_R rows of BLOCK_H >= hidden columns. The rows are those of a [A, B, hidden]
# view with any strides (last dim contiguous), so per-head norms read q/k straight out of the fused qkv
# projection without a copy. Every rounding of the reference is repeated (the residual sum and the
# normalized value are rounded to x's dtype where it rounds them); what differs is only the order of the
# fp32 sum of squares and rsqrt, which moves a bf16 result by one unit in rare ties.

if triton is not None:
    @triton.jit
    def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr,
                         num_rows, B, H, eps,
                         stride_xa, stride_xb, stride_ra, stride_rb,
                         HAS_RESIDUAL: tl.constexpr, WEIGHT_IN_FP32: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_H)
        row_mask = rows < num_rows
        mask = row_mask[:, None] & (cols[None, :] < H)
        a = (rows // B).to(tl.int64)
        b = (rows % B).to(tl.int64)
        x = tl.load(x_ptr + (a * stride_xa + b * stride_xb)[:, None] + cols[None, :], mask=mask, other=0.0)
        out_offsets = rows.to(tl.int64)[:, None] * H + cols[None, :]
        if HAS_RESIDUAL:
            residual = tl.load(residual_ptr + (a * stride_ra + b * stride_rb)[:, None] + cols[None, :],
                               mask=mask, other=0.0)
            x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)     # the sum lives in x's dtype
            tl.store(sum_ptr + out_offsets, x, mask=mask)
        xf = x.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=1) / H + eps)
        normed = xf * inv_rms[:, None]
        weight = tl.load(weight_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
        if WEIGHT_IN_FP32:
            out = weight[None, :] * normed
        else:
            out = weight[None, :] * normed.to(x.dtype).to(tl.float32)
        tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as [A, B, hidden] with a contiguous last dim, without a copy where the strides allow it."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x if x.dim() == 3 else x.reshape(-1, x.shape[-2], x.shape[-1])


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                    weight_in_fp32: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The same function as `rms_norm_ref`, in one pass. Outputs are new contiguous tensors."""
    if triton is None:
        raise RuntimeError("rms_norm_triton needs the triton package")
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"RMSNorm weight has shape {tuple(weight.shape)} but x has hidden size {hidden}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} does not match x "
                         f"{tuple(x.shape)} {x.dtype}")
    out_dtype = x.dtype if weight_in_fp32 else torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    summed = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else out
    rows = _as_rows(x)
    residual_rows = _as_rows(residual) if residual is not None else rows
    num_rows = rows.shape[0] * rows.shape[1]
    if num_rows == 0:
        return out if residual is None else (out, summed)
    block_h = triton.next_power_of_2(hidden)
    block_r = max(1, min(16, 2048 // block_h))          # small hidden sizes (per-head norms): several rows each
    _rms_norm_kernel[(triton.cdiv(num_rows, block_r),)](
        rows, residual_rows, weight, out, summed, num_rows, rows.shape[1], hidden, eps,
        rows.stride(0), rows.stride(1), residual_rows.stride(0), residual_rows.stride(1),
        HAS_RESIDUAL=residual is not None, WEIGHT_IN_FP32=weight_in_fp32,
        BLOCK_R=block_r, BLOCK_H=block_h, num_warps=min(max(block_r * block_h // 256, 1), 8))
    return out if residual is None else (out, summed)
