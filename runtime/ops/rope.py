"""Rotary position embeddings: frequency tables from an HF config, and the rotation (neox, gptj, partial)."""
from __future__ import annotations

import torch
from torch import nn


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
