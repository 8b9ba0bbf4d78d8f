"""The tiny gpt-oss checkpoint: weights that exercise every path, written in the released on-disk layout
(MXFP4 experts, a quantization_config, harmony stop tokens in generation_config.json)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from runtime.ops.mxfp4 import mxfp4_quantize

from .harmony import SPECIAL_TOKENS, STOP_TOKENS

# What the released config.json says is left unquantized.
MODULES_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]

# Per parameter-name suffix: the std of a fresh normal draw (transformers zero-initialises biases and draws
# sinks and routers at std 0.02, which leaves them inert). The values were tuned against two constraints:
# every feature moves the logits far more than the 1e-4 parity tolerance (the sinks, window and YaRN by
# more than 0.1; see tests/models/gpt_oss/test_gpt_oss_parity.py), while transformers' own fp32 rounding (fp32 vs fp64
# forward of a 200-token prompt) stays near 2e-6.
_STD = {
    "embed_tokens.weight": 1.0,              # token identity, not the biases, dominates the residual stream
    "self_attn.sinks": 1.5,                  # comparable with the log-sum-exp of a small window
    "self_attn.q_proj.bias": 0.2, "self_attn.k_proj.bias": 0.2, "self_attn.v_proj.bias": 0.2,
    "self_attn.o_proj.bias": 0.2,
    "mlp.router.weight": 0.25,               # router logits of a few units: the top-k is far from ties
    "mlp.router.bias": 1.0,
    "mlp.experts.gate_up_proj": 0.3,         # |gate| and |up| pass the clamp at 7 for a few percent of units
    "mlp.experts.gate_up_proj_bias": 1.0,
    "mlp.experts.down_proj_bias": 0.2,
}
_QK_SCALE = 4.0                              # sharper attention, so window and RoPE changes show


def tiny_init(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        std = next((s for suffix, s in _STD.items() if name.endswith(suffix)), None)
        if std is not None:
            param.copy_(std * torch.randn(param.shape, generator=generator))
        elif name.endswith("norm.weight"):
            param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=generator))
        elif name.endswith(("q_proj.weight", "k_proj.weight")):
            param.mul_(_QK_SCALE)


def tiny_save(model: nn.Module, out_dir: str | Path) -> None:
    """Write model.safetensors with the experts as MXFP4 `*_blocks` / `*_scales` (transformers keeps them
    transposed, [E, in, out]; on disk they are [E, out, in / 32, 16]), the config with its
    quantization_config, and a generation_config whose eos ids are harmony's stop tokens."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            blocks, scales = mxfp4_quantize(tensor.transpose(1, 2))
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
        else:
            tensors[name] = tensor.contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})

    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": MODULES_NOT_CONVERTED}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    generation = {"bos_token_id": model.config.bos_token_id, "pad_token_id": model.config.pad_token_id,
                  "eos_token_id": [SPECIAL_TOKENS.index(token) for token in STOP_TOKENS]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
