"""RMSNorm, optionally fused with the residual add that precedes it."""
from __future__ import annotations

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             weight_in_fp32: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`weight * normalize(x)`; with `residual`, normalizes `x + residual` and also returns that sum.

    weight_in_fp32=False: normalize in fp32, cast, then multiply (Llama/Qwen order).
    weight_in_fp32=True: multiply in fp32, then cast (gpt-oss order)."""
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
