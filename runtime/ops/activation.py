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


def silu_mul(gate: torch.Tensor, up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """silu(gate) * up for two [n, d] halves from separate projections; with `limit` the clamped SwiGLU:
    silu(min(gate, limit)) * clamp(up, -limit, limit)."""
    if _use_triton(gate):
        return silu_mul_triton(gate, up, limit)
    return silu_mul_ref(gate, up, limit)


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
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
    def _silu_and_mul_kernel(gate_ptr, up_ptr, out_ptr, d, stride_gate, stride_up, limit, BLOCK: tl.constexpr,
                             GELU_TANH: tl.constexpr, HAS_LIMIT: tl.constexpr):
        """out[row] = act(gate[row]) * up[row] over d columns; the halves may be one tensor's (gate | up)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < d
        gate = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0)
        up_f = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
        gate_f = gate.to(tl.float32)
        if HAS_LIMIT:                       # a limit the dtype holds exactly: the clamps round nothing
            gate_f = tl.minimum(gate_f, limit)
            up_f = tl.minimum(tl.maximum(up_f, -limit), limit)
        act = gated_activation(gate_f, GELU_TANH).to(gate.dtype)
        out = act.to(tl.float32) * up_f
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
    _launch(rows, rows[:, d:], out, d, rows.stride(0), rows.stride(0), None, activation == "gelu_tanh")
    return out


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """The same function as `silu_mul_ref` for gate, up [n, d] (rows of unit column stride); a new [n, d]."""
    if triton is None:
        raise RuntimeError("silu_mul_triton needs the triton package")
    if gate.shape != up.shape or gate.dim() != 2 or gate.stride(-1) != 1 or up.stride(-1) != 1:
        raise ValueError(f"silu_mul needs two [n, d] halves with unit column stride, got {tuple(gate.shape)} "
                         f"and {tuple(up.shape)}")
    n, d = gate.shape
    out = torch.empty(n, d, dtype=gate.dtype, device=gate.device)
    if n and d:
        _launch(gate, up, out, d, gate.stride(0), up.stride(0), limit, False)
    return out


def _launch(gate, up, out, d: int, stride_gate: int, stride_up: int, limit: float | None, gelu_tanh: bool) -> None:
    block = min(triton.next_power_of_2(d), 1024)
    _silu_and_mul_kernel[(gate.shape[0], triton.cdiv(d, block))](
        gate, up, out, d, stride_gate, stride_up, limit if limit is not None else 0.0, BLOCK=block,
        GELU_TANH=gelu_tanh, HAS_LIMIT=limit is not None, num_warps=4)
