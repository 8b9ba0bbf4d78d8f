"""The tiny checkpoint is in the released on-disk layout, and the loader keeps MXFP4 experts packed."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime import LLM
from runtime.ops.mxfp4 import mxfp4_dequantize
from tools.parity import load_transformers

EXPERTS = "model.layers.1.mlp.experts"


def test_checkpoint_stores_experts_as_mxfp4_with_a_quantization_config(tiny_gpt_oss):
    weights = load_file(tiny_gpt_oss / "model.safetensors")
    config = json.loads((tiny_gpt_oss / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    assert weights[f"{EXPERTS}.gate_up_proj_blocks"].dtype == torch.uint8
    assert weights[f"{EXPERTS}.gate_up_proj_blocks"].shape == (8, 256, 4, 16)     # [E, 2I, H/32, 16]
    assert weights[f"{EXPERTS}.down_proj_scales"].shape == (8, 128, 4)            # [E, H, I/32]
    assert not any(name.endswith(("experts.gate_up_proj", "experts.down_proj")) for name in weights)


def test_transformers_dequantizes_the_checkpoint_to_exactly_our_weights(tiny_gpt_oss):
    weights = load_file(tiny_gpt_oss / "model.safetensors")
    experts = load_transformers(tiny_gpt_oss).model.layers[1].mlp.experts
    for projection in ("gate_up_proj", "down_proj"):
        ours = mxfp4_dequantize(weights[f"{EXPERTS}.{projection}_blocks"], weights[f"{EXPERTS}.{projection}_scales"])
        assert torch.equal(ours.transpose(1, 2), getattr(experts, projection))    # transformers: [E, in, out]


def test_engine_keeps_experts_packed_and_declares_window_caches(tiny_gpt_oss):
    model = LLM(str(tiny_gpt_oss), device="cpu", dtype="float32", num_gpu_blocks=16).engine.model
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj_blocks.dtype == experts.down_proj_scales.dtype == torch.uint8
    assert [spec.window for spec in model.cache_specs()] == [8, None, 8, None]


def _rewrite_checkpoint(src, dst, edit) -> None:
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    edit(weights)
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})


def test_dequantized_resave_is_refused_with_a_reason(tiny_gpt_oss, tmp_path):
    """transformers' save_pretrained after dequantize=True writes float '_blocks' and no scales."""
    def as_resaved(weights):
        for name in [n for n in weights if n.endswith("_blocks")]:
            weights[name] = torch.zeros(weights[name].shape, dtype=torch.float32)
    _rewrite_checkpoint(tiny_gpt_oss, tmp_path / "resaved", as_resaved)
    with pytest.raises(ValueError, match="dequantize=True"):
        LLM(str(tmp_path / "resaved"), device="cpu", dtype="float32", num_gpu_blocks=16)


def test_unquantized_experts_are_refused_with_a_reason(tiny_gpt_oss, tmp_path):
    def as_unquantized(weights):
        for projection, shape in (("gate_up_proj", (8, 128, 256)), ("down_proj", (8, 128, 128))):
            for layer in range(4):
                prefix = f"model.layers.{layer}.mlp.experts.{projection}"
                del weights[f"{prefix}_blocks"], weights[f"{prefix}_scales"]
                weights[prefix] = torch.zeros(shape)
    _rewrite_checkpoint(tiny_gpt_oss, tmp_path / "bf16", as_unquantized)
    with pytest.raises(ValueError, match="unquantized experts"):
        LLM(str(tmp_path / "bf16"), device="cpu", dtype="float32", num_gpu_blocks=16)


def test_missing_sinks_are_reported(tiny_gpt_oss, tmp_path):
    _rewrite_checkpoint(tiny_gpt_oss, tmp_path / "nosinks", lambda w: w.pop("model.layers.2.self_attn.sinks"))
    with pytest.raises(ValueError, match="layers.2.self_attn.sinks"):
        LLM(str(tmp_path / "nosinks"), device="cpu", dtype="float32", num_gpu_blocks=16)
