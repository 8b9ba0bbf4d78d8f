"""Rotary position embeddings: frequency tables from an HF config, and the rotation (neox, gptj, partial),
as a torch reference and its Triton twin."""
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


def rope_inv_freq(hf_config, rotary_dim: int, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim / 2] fp32, cos/sin scale) exactly as transformers computes them."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    if layer_type is not None and layer_type in params:
        params = params[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    kwargs = {"layer_type": layer_type} if layer_type is not None else {}
    with torch.device("cpu"):               # also under a meta default device (a model built only for its specs)
        inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"), **kwargs)
    return inv_freq.float(), float(scale)


class RotaryEmbedding(nn.Module):
    """Holds a [max_positions, rotary_dim] fp32 cos|sin table; rotates q and k in place of a copy."""

    def __init__(self, inv_freq: torch.Tensor, max_positions: int, scale: float = 1.0, style: str = "neox"):
        super().__init__()
        if style not in ("neox", "gptj"):
            raise ValueError(f"unknown rope style {style!r}; expected 'neox' or 'gptj'")
        self.style = style
        self.rotary_dim = 2 * inv_freq.numel()
        positions = torch.arange(max_positions, dtype=torch.float, device=inv_freq.device)
        freqs = positions[:, None] * inv_freq.float()[None, :]                  # [max_positions, rotary_dim / 2]
        table = torch.cat([freqs.cos() * scale, freqs.sin() * scale], dim=-1)   # [max_positions, rotary_dim]
        self.register_buffer("cos_sin", table.float(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [num_tokens, heads, head_dim], k [num_tokens, kv_heads, head_dim] -> rotated copies. The Triton
        kernel on a GPU, the torch reference elsewhere (or everywhere with RUN_MODEL_TORCH_OPS=1)."""
        if _use_triton(q):
            return rope_triton(positions, q, k, self.cos_sin, self.style)
        cos, sin = self.cos_sin[positions].chunk(2, dim=-1)                     # [num_tokens, rotary_dim / 2]
        return apply_rope(q, cos, sin, self.style), apply_rope(k, cos, sin, self.style)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str = "neox") -> torch.Tensor:
    """x [num_tokens, heads, head_dim]; cos/sin [num_tokens, rotary_dim / 2] fp32. Dims past rotary_dim pass
    through. cos/sin are cast to x's dtype first and the rotation runs in it, as transformers does."""
    half = cos.shape[-1]
    rot, rest = x[..., :2 * half], x[..., 2 * half:]
    cos = cos.to(x.dtype)[:, None, :]
    sin = sin.to(x.dtype)[:, None, :]
    if style == "neox":
        x1, x2 = rot[..., :half], rot[..., half:]
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, rest], dim=-1) if rest.numel() else rotated


# ---- Triton kernel ----------------------------------------------------------------------------------
# One program per token rotates all its q heads, then all its k heads, reading cos|sin once. The kernel
# repeats the reference's roundings instead of computing in fp32 and rounding once: cos and sin are rounded
# to x's dtype, each product is rounded, then the difference/sum. A single rounding would not be within one
# ulp of the reference: when x1*cos and x2*sin nearly cancel, the reference's product roundings (relative
# 2^-8 each in bf16) are large against the small result. Repeating them costs nothing in a memory-bound
# kernel and makes the bf16 output bit-identical to the reference, hence to transformers. It must be compiled
# without FP fusion: otherwise LLVM turns "bf16 product, rounded" into a bf16 multiply and contracts it with the
# difference into one bf16 FMA, skipping a product's rounding (seen on an H100 with triton 3.6: 21% of outputs
# one or two units off).

if triton is not None:
    @triton.jit
    def _rotate_heads(x_ptr, out_ptr, token, cos, sin, num_heads, stride_xt, stride_xh,
                      HEAD_DIM: tl.constexpr, HALF: tl.constexpr, GPTJ: tl.constexpr,
                      BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr):
        """Rotate the first 2 * HALF dims of heads [0, num_heads) of one token; copy the rest."""
        heads = tl.arange(0, BLOCK_HEADS)
        pairs = tl.arange(0, BLOCK_HALF)
        mask = (heads[:, None] < num_heads) & (pairs[None, :] < HALF)
        x_row = x_ptr + token * stride_xt + heads[:, None] * stride_xh
        out_row = out_ptr + (token * num_heads + heads[:, None]) * HEAD_DIM
        if GPTJ:
            first, second = 2 * pairs, 2 * pairs + 1
        else:
            first, second = pairs, pairs + HALF
        x1 = tl.load(x_row + first[None, :], mask=mask, other=0.0)
        x2 = tl.load(x_row + second[None, :], mask=mask, other=0.0)
        dtype = x1.dtype
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        out1 = (x1 * cos).to(dtype).to(tl.float32) - (x2 * sin).to(dtype).to(tl.float32)
        out2 = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
        tl.store(out_row + first[None, :], out1.to(dtype), mask=mask)
        tl.store(out_row + second[None, :], out2.to(dtype), mask=mask)
        if BLOCK_REST > 0:                                           # partial rotary: the tail passes through
            rest = 2 * HALF + tl.arange(0, BLOCK_REST)
            rest_mask = (heads[:, None] < num_heads) & (rest[None, :] < HEAD_DIM)
            tl.store(out_row + rest[None, :], tl.load(x_row + rest[None, :], mask=rest_mask), mask=rest_mask)

    @triton.jit
    def _rope_kernel(positions_ptr, cos_sin_ptr, q_ptr, k_ptr, q_out_ptr, k_out_ptr,
                     num_q_heads, num_k_heads, stride_qt, stride_qh, stride_kt, stride_kh, stride_table,
                     HEAD_DIM: tl.constexpr, HALF: tl.constexpr, GPTJ: tl.constexpr,
                     BLOCK_Q_HEADS: tl.constexpr, BLOCK_K_HEADS: tl.constexpr,
                     BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        position = tl.load(positions_ptr + token).to(tl.int64)
        pairs = tl.arange(0, BLOCK_HALF)
        table_row = cos_sin_ptr + position * stride_table
        cos = tl.load(table_row + pairs, mask=pairs < HALF, other=0.0)
        sin = tl.load(table_row + HALF + pairs, mask=pairs < HALF, other=0.0)
        dtype = q_ptr.dtype.element_ty
        cos = cos.to(dtype).to(tl.float32)[None, :]                 # rounded to x's dtype, as the reference
        sin = sin.to(dtype).to(tl.float32)[None, :]
        _rotate_heads(q_ptr, q_out_ptr, token, cos, sin, num_q_heads, stride_qt, stride_qh,
                      HEAD_DIM, HALF, GPTJ, BLOCK_Q_HEADS, BLOCK_HALF, BLOCK_REST)
        _rotate_heads(k_ptr, k_out_ptr, token, cos, sin, num_k_heads, stride_kt, stride_kh,
                      HEAD_DIM, HALF, GPTJ, BLOCK_K_HEADS, BLOCK_HALF, BLOCK_REST)


def rope_triton(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor,
                style: str = "neox") -> tuple[torch.Tensor, torch.Tensor]:
    """The same function as `RotaryEmbedding.forward`: q [num_tokens, heads, head_dim] and
    k [num_tokens, kv_heads, head_dim] (any token/head strides) rotated by the cos|sin rows of `positions`
    into new contiguous tensors."""
    if triton is None:
        raise RuntimeError("rope_triton needs the triton package")
    if q.dim() != 3 or k.dim() != 3 or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0] \
            or q.dtype != k.dtype:
        raise ValueError(f"rope expects q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim] of one "
                         f"dtype, got q {tuple(q.shape)} {q.dtype} and k {tuple(k.shape)} {k.dtype}")
    num_tokens, num_q_heads, head_dim = q.shape
    rotary_dim = cos_sin.shape[-1]
    if rotary_dim > head_dim or rotary_dim % 2:
        raise ValueError(f"rotary_dim {rotary_dim} must be even and at most head_dim {head_dim}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cos_sin = cos_sin if cos_sin.stride(-1) == 1 else cos_sin.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    half = rotary_dim // 2
    rest = head_dim - rotary_dim
    _rope_kernel[(num_tokens,)](
        positions, cos_sin, q, k, q_out, k_out, num_q_heads, k.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin.stride(0),
        HEAD_DIM=head_dim, HALF=half, GPTJ=style == "gptj",
        BLOCK_Q_HEADS=triton.next_power_of_2(num_q_heads), BLOCK_K_HEADS=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half), BLOCK_REST=triton.next_power_of_2(rest) if rest else 0,
        num_warps=4, enable_fp_fusion=False)
    return q_out, k_out
