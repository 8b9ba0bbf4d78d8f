"""Gated activations: the torch reference and its Triton twin."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:                                  # the torch reference still works without Triton
    triton = None


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and triton is not None and os.environ.get("RUN_MODEL_TORCH_OPS") != "1"


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2 * d] (gate | up) -> silu(gate) * up [..., d]. The Triton kernel on a GPU, the torch reference
    elsewhere (or everywhere with RUN_MODEL_TORCH_OPS=1)."""
    if _use_triton(x):
        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2 * d] (gate | up) -> gelu_tanh(gate) * up [..., d] (GeGLU with the tanh approximation)."""
    if _use_triton(x):
        return silu_and_mul_triton(x, activation="gelu_tanh")
    return gelu_tanh_and_mul_ref(x)


def gelu_tanh_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


GATED_ACTIVATIONS = {"silu": silu_and_mul_ref, "gelu_tanh": gelu_tanh_and_mul_ref}


# ---- Triton kernel ----------------------------------------------------------------------------------
# Rounds where the reference rounds: act(gate) to x's dtype, then the product. exp is the only difference
# (Triton's vs torch's), an fp32-ulp-level one that moves a bf16 result by one unit in rare ties.

if triton is not None:
    @triton.jit
    def gated_activation(gate_f, GELU_TANH: tl.constexpr):
        """silu(gate), or gelu with the tanh approximation, of an fp32 tile. 0.5 * (1 + tanh(u)) is written
        as 1 / (1 + exp(-2u)), which does not cancel for negative u."""
        if GELU_TANH:
            inner = 0.7978845608028654 * (gate_f + 0.044715 * gate_f * gate_f * gate_f)
            return gate_f / (1.0 + tl.exp(-2.0 * inner))
        return gate_f / (1.0 + tl.exp(-gate_f))

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x, BLOCK: tl.constexpr, GELU_TANH: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < d
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
        gate_f = gate.to(tl.float32)
        act = gated_activation(gate_f, GELU_TANH).to(gate.dtype)
        out = act.to(tl.float32) * up.to(tl.float32)
        tl.store(out_ptr + row * d + cols, out.to(gate.dtype), mask=mask)


def silu_and_mul_triton(x: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """The same function as `silu_and_mul_ref` (activation "gelu_tanh": `gelu_tanh_and_mul_ref`); the output is
    a new contiguous tensor."""
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(f"unknown gated activation {activation!r}; expected one of {sorted(GATED_ACTIVATIONS)}")
    if triton is None:
        raise RuntimeError("silu_and_mul_triton needs the triton package")
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension (gate | up), got {x.shape[-1]}")
    d = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * d)                       # a view for the usual contiguous projection output
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device)
    if rows.shape[0] == 0 or d == 0:
        return out
    block = min(triton.next_power_of_2(d), 1024)
    _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(d, block))](rows, out, d, rows.stride(0), BLOCK=block,
                                                                 GELU_TANH=activation == "gelu_tanh", num_warps=4)
    return out
