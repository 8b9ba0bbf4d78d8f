"""The tiny DeepSeek V4 checkpoint: weights that make every path matter, written in the released layout (FP8
block-scaled linears, MXFP4 experts, BF16/FP32 elsewhere, two shards and an index, an `mtp.*` layer)."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
from torch import nn

from runtime.ops.fp8 import fp8_block_quantize
from runtime.ops.mxfp4 import mxfp4_quantize

from .weights import native_name

FP8_BLOCK = (16, 32)      # [out, in]; not square, so a transposed scale grid cannot pass
QUANTIZATION = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "activation_scheme": "dynamic",
                "weight_block_size": list(FP8_BLOCK)}
_FP8 = re.compile(r"\.(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|ffn\.shared_experts\.w[123])\.weight$")
_FP32 = re.compile(r"(hc_(attn|ffn|head)_(fn|base|scale)|attn_sink|\.ape|gate\.bias)$")

# Per parameter-name suffix (transformers' names): the std of a fresh normal draw. transformers zero-initialises
# sinks, window biases, routing biases and the hash table, and draws the rest at std 0.02, which leaves the
# mHC mixing, the sinks and the routing inert. These make each move the logits far beyond the 1e-4 tolerance
# (tests/models/deepseek_v4/test_deepseek_v4_parity.py checks that), with fp32 rounding staying near 1e-6.
_STD = {
    "embed_tokens.weight": 1.0,
    "self_attn.sinks": 2.0,                 # comparable with the log-sum-exp of the window and entries
    "position_bias": 1.0,                   # per-position gate bias of the compressors
    "mlp.gate.weight": 0.3,
    "mlp.gate.e_score_correction_bias": 0.3,
    "attn_hc.fn": 0.1, "ffn_hc.fn": 0.1, "hc_head.hc_fn": 0.1,
    "attn_hc.base": 0.5, "ffn_hc.base": 0.5, "hc_head.hc_base": 0.5,
    "mlp.experts.gate_up_proj": 0.3, "mlp.experts.down_proj": 0.1,
    "compressor.gate_proj.weight": 0.3,
    "self_attn.q_a_proj.weight": 0.2, "self_attn.kv_proj.weight": 0.2,
}


def tiny_init(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    config = model.config
    for name, param in model.named_parameters():
        std = next((s for suffix, s in _STD.items() if name.endswith(suffix)), None)
        if std is not None:
            param.copy_(std * torch.randn(param.shape, generator=generator))
        elif name.endswith("norm.weight"):
            param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
    experts = config.n_routed_experts
    for name, buffer in model.named_buffers():
        if name.endswith("tid2eid"):            # distinct random experts per token
            ranks = torch.rand(buffer.shape[0], experts, generator=generator).argsort(dim=-1)
            buffer.copy_(ranks[:, :buffer.shape[1]])
        elif name.endswith("e_score_correction_bias"):
            buffer.copy_(0.3 * torch.randn(buffer.shape, generator=generator))


def _expert_dtype(config) -> str:
    """"fp4" (the instruct releases) unless the tiny config asks for the Base releases' "fp8"."""
    quantization = getattr(config, "quantization_config", None) or {}
    return getattr(config, "expert_dtype", None) or quantization.get("expert_dtype") or "fp4"


def _quantized_expert(part: torch.Tensor, expert_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    if expert_dtype == "fp8":
        return fp8_block_quantize(part, FP8_BLOCK)
    blocks, scales = mxfp4_quantize(part)                                       # [out, in/32, 16], [out, in/32]
    return blocks.flatten(-2).view(torch.int8), scales.view(torch.float8_e8m0fnu)


def _to_native(named: dict[str, torch.Tensor], config, quantize: bool = True) -> dict[str, torch.Tensor]:
    """DeepSeek's names (and, with `quantize`, the release's formats) for tensors under transformers' names."""
    inter = config.moe_intermediate_size
    expert_dtype = _expert_dtype(config)
    tensors: dict[str, torch.Tensor] = {}
    for hf_name, tensor in named.items():
        name = native_name(hf_name)
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            prefix = name.rsplit(".", 1)[0]
            for e, weight in enumerate(tensor):
                parts = {"w1": weight[:inter], "w3": weight[inter:]} if "gate_up" in name else {"w2": weight}
                for which, part in parts.items():
                    weight_name = f"{prefix}.{e}.{which}.weight"
                    if quantize:
                        tensors[weight_name], tensors[weight_name[:-len("weight")] + "scale"] = \
                            _quantized_expert(part, expert_dtype)
                    else:
                        tensors[weight_name] = part.contiguous()
        elif not quantize or tensor.dtype == torch.long or _FP32.search(name):
            tensors[name] = tensor.contiguous()
        elif _FP8.search(name):
            weight, scale = fp8_block_quantize(tensor, FP8_BLOCK)
            tensors[name], tensors[name[:-len("weight")] + "scale"] = weight, scale
        else:
            tensors[name] = tensor.to(torch.bfloat16).contiguous()
    return tensors


def mtp_modules(config, seed: int = 2) -> nn.ModuleDict:
    """A random MTP layer built from transformers' own modules (the block is its decoder layer, made
    window-only and score-routed, as the release's MTP layer is): the test oracle and what tiny_save writes."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import (DeepseekV4DecoderLayer, DeepseekV4HyperHead,
                                                                      DeepseekV4RMSNorm)
    n = config.num_hidden_layers
    extended = copy.deepcopy(config)
    extended.num_hidden_layers = n + 1
    extended.layer_types = list(config.layer_types) + ["sliding_attention"]
    extended.mlp_layer_types = list(config.mlp_layer_types) + ["moe"]
    hidden, eps = config.hidden_size, config.rms_norm_eps
    modules = nn.ModuleDict({
        "block": DeepseekV4DecoderLayer(extended, n), "hc_head": DeepseekV4HyperHead(config),
        "norm": DeepseekV4RMSNorm(hidden, eps), "enorm": DeepseekV4RMSNorm(hidden, eps),
        "hnorm": DeepseekV4RMSNorm(hidden, eps),
        "e_proj": nn.Linear(hidden, hidden, bias=False), "h_proj": nn.Linear(hidden, hidden, bias=False)})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*modules.named_parameters(), *modules.named_buffers()]:
            if name.endswith("inv_freq") or tensor.dtype == torch.long:
                continue
            if name.endswith("scale"):
                tensor.fill_(1.0)
            elif name.endswith("norm.weight"):
                tensor.copy_(1.0 + 0.2 * torch.randn(tensor.shape, generator=generator))
            else:
                std = 0.3 if tensor.dim() < 2 or "experts" in name else 0.15
                tensor.copy_(std * torch.randn(tensor.shape, generator=generator))
    return modules.float()


def mtp_native_tensors(modules: nn.ModuleDict, config, quantize: bool = True) -> dict[str, torch.Tensor]:
    """The MTP layer under its release names (mtp.0.*)."""
    n = config.num_hidden_layers
    named = {f"model.layers.{n}.{k}": v for k, v in modules["block"].state_dict().items()}
    named.update({f"model.hc_head.{k}": v for k, v in modules["hc_head"].state_dict().items()})
    tensors = {}
    for name, tensor in _to_native(named, config, quantize).items():
        tensors["mtp.0." + name.removeprefix(f"layers.{n}.")] = tensor
    for key in ("norm", "enorm", "hnorm", "e_proj", "h_proj"):
        name, tensor = f"mtp.0.{key}.weight", modules[key].weight.detach()
        if quantize and key.endswith("proj"):
            tensors[name], tensors[f"mtp.0.{key}.scale"] = fp8_block_quantize(tensor, FP8_BLOCK)
        else:
            tensors[name] = tensor.to(torch.bfloat16 if quantize else tensor.dtype).contiguous()
    return tensors


def tiny_save(model: nn.Module, out_dir: str | Path) -> None:
    """Two safetensors shards with an index, config.json with the release's quantization_config."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _to_native(model.state_dict(), model.config)
    tensors.update(mtp_native_tensors(mtp_modules(model.config), model.config))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, out / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in shard_names})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config = model.config.to_dict()
    config.pop("dtype", None)
    config.update(quantization_config=QUANTIZATION, expert_dtype=_expert_dtype(model.config), torch_dtype="bfloat16")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
