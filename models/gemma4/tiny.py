"""The tiny Gemma 4 checkpoints: weights that exercise every path, written as the released archives are (the
multimodal class's names where the config is multimodal, the unused K/V tensors of KV-sharing layers kept,
the chat stop tokens in generation_config.json)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .chat import SPECIAL_TOKENS, STOP_TOKENS

# transformers initialises these to one; drawn around one instead so that a missing or misapplied one shows.
_AROUND_ONE = {"layer_scalar": 0.2, "router.scale": 0.2}
# With attention scale 1, q/k-norm weights near one make transformers' own fp32 rounding (vs fp64) reach
# 1e-3 on a 200-token prompt; at a quarter it stays under 1e-5 (spec errata 6).
_QK_NORM_SCALE = 0.25


def tiny_init(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)

    def around(center: float, std: float, shape: torch.Size) -> torch.Tensor:
        return center + std * torch.randn(shape, generator=generator)

    # layer_scalar is a buffer in transformers, so buffers are drawn too
    for name, param in [*model.named_parameters(), *model.named_buffers()]:
        if any(tower in name for tower in ("vision_tower", "embed_vision", "audio_tower", "embed_audio")):
            continue
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            param.copy_(_QK_NORM_SCALE * around(1.0, 0.1, param.shape))
        elif name.endswith("norm.weight") or "layernorm" in name:
            param.copy_(around(1.0, 0.1, param.shape))
        elif name.endswith("router.per_expert_scale"):     # only their ratios matter (spec errata 5)
            param.copy_(torch.exp(0.5 * torch.randn(param.shape, generator=generator)))
        elif (suffix := next((s for s in _AROUND_ONE if name.endswith(s)), None)) is not None:
            param.copy_(around(1.0, _AROUND_ONE[suffix], param.shape))


def tiny_save(model: nn.Module, out_dir: str | Path) -> None:
    """save_pretrained, plus what released archives carry that transformers does not write: random K/V weights
    for the KV-sharing layers (transformers and our loader skip them) and the chat stop tokens."""
    from safetensors.torch import load_file, save_file
    out = Path(out_dir)
    model.save_pretrained(out)
    text = model.config.get_text_config()
    tensors = load_file(out / "model.safetensors")
    prefix = "model.language_model." if any(k.startswith("model.language_model.") for k in tensors) else "model."
    generator = torch.Generator().manual_seed(2)
    first_shared = text.num_hidden_layers - text.num_kv_shared_layers
    for layer in range(first_shared, text.num_hidden_layers):
        config = text.per_layer_config[layer]
        rows = config.num_key_value_heads * config.head_dim
        base = f"{prefix}layers.{layer}.self_attn."
        tensors[base + "k_proj.weight"] = torch.randn(rows, text.hidden_size, generator=generator)
        tensors[base + "v_proj.weight"] = torch.randn(rows, text.hidden_size, generator=generator)
        tensors[base + "k_norm.weight"] = torch.randn(config.head_dim, generator=generator)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    generation = json.loads((out / "generation_config.json").read_text())
    generation["eos_token_id"] = [SPECIAL_TOKENS.index(token) for token in STOP_TOKENS]
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
