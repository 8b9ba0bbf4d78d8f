"""DeepSeek V4's RoPE: interleaved (GPT-J) pairs on the trailing `rope_dim` channels of each vector
(`[nope | rope]`), a "main" base for window-only layers and a "compress" base with YaRN for compressed ones;
the inverse rotation (-sin) turns the attention output back to relative positions."""
from __future__ import annotations

import torch
from torch import nn

from runtime.ops import apply_rope, rope_inv_freq


class TrailingRope(nn.Module):
    def __init__(self, config, kind: str, rope_dim: int, max_positions: int):
        super().__init__()
        with torch.device("cpu"):        # real numbers even when the model is built on the meta device
            inv_freq, scale = rope_inv_freq(config, rope_dim, layer_type=kind)  # transformers' own numbers
            freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq.float()[None, :]
        self.rope_dim = rope_dim
        self.register_buffer("cos", (freqs.cos() * scale).float(), persistent=False)   # [max_positions, rope_dim / 2]
        self.register_buffer("sin", (freqs.sin() * scale).float(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """x [n, heads, dim] rotated at positions [n] (by -position with `inverse`)."""
        cos, sin = self.cos[positions], self.sin[positions]
        rotated = apply_rope(x[..., -self.rope_dim:], cos, -sin if inverse else sin, style="gptj")
        return torch.cat([x[..., :-self.rope_dim], rotated], dim=-1)
