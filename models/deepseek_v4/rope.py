"""DeepSeek V4's RoPE: interleaved (GPT-J) pairs on the trailing `rope_dim` channels of each vector
(`[nope | rope]`), a "main" base for window-only layers and a "compress" base with YaRN for compressed ones;
the inverse rotation (-sin) turns the attention output back to relative positions."""
from __future__ import annotations

import torch
from torch import nn

from runtime.ops import apply_rope, rope_inv_freq


class TrailingRope(nn.Module):
    def __init__(self, config, kind: str, rope_dim: int):
        super().__init__()
        with torch.device("cpu"):        # real numbers even when the model is built on the meta device
            inv_freq, scale = rope_inv_freq(config, rope_dim, layer_type=kind)  # transformers' own numbers
        if scale != 1.0:
            raise ValueError(f"DeepSeek V4's {kind} RoPE scales cos/sin by {scale}; the release uses none")
        self.rope_dim = rope_dim
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)   # [rope_dim / 2]

    def forward(self, x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """x [n, heads, dim] rotated at positions [n] (by -position with `inverse`). The angles are formed
        per call (no 1M-position table), with the same fp32 ops as transformers."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]              # [n, rope_dim / 2]
        sin = freqs.sin()
        rotated = apply_rope(x[..., -self.rope_dim:], freqs.cos(), -sin if inverse else sin, style="gptj")
        return torch.cat([x[..., :-self.rope_dim], rotated], dim=-1)
