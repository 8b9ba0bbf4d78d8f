"""The tiny checkpoint is in DeepSeek's release layout; transformers' save_pretrained layout loads too; a
checkpoint with a missing, unexpected or mis-scaled tensor fails at load with a message naming it."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime import LLM
from runtime.registry import get_package
from runtime.tiny import make_tiny
from tools.parity import make_tiny_checkpoint, run_parity

LOGIT_TOLERANCE = 1e-4


def _all_tensors(path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_checkpoint_is_in_the_release_layout(tiny_deepseek_v4):
    tensors = _all_tensors(tiny_deepseek_v4)
    config = json.loads((tiny_deepseek_v4 / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [16, 32] and config["expert_dtype"] == "fp4"
    assert (tiny_deepseek_v4 / "model.safetensors.index.json").is_file()
    assert tensors["layers.2.attn.wq_b.weight"].dtype == torch.float8_e4m3fn
    assert tensors["layers.2.attn.wq_b.scale"].dtype == torch.float8_e8m0fnu
    assert tensors["layers.2.attn.wq_b.scale"].shape == (128 // 16, 32 // 32)          # [out / 16, in / 32]
    assert tensors["layers.2.ffn.experts.3.w1.weight"].dtype == torch.int8
    assert tensors["layers.2.ffn.experts.3.w1.weight"].shape == (32, 64 // 2)          # two E2M1 a byte
    assert tensors["layers.2.ffn.experts.3.w2.scale"].shape == (64, 32 // 32)          # one scale per 32
    assert tensors["layers.0.ffn.gate.tid2eid"].dtype == torch.int64
    assert tensors["embed.weight"].dtype == torch.bfloat16
    assert tensors["layers.1.hc_attn_fn"].dtype == torch.float32
    assert any(name.startswith("mtp.") for name in tensors)


def test_transformers_save_pretrained_layout_matches_too(tmp_path):
    """transformers' own names (float experts stacked as gate_up_proj / down_proj, no quantization)."""
    package = dataclasses.replace(get_package("deepseek_v4"), tiny_save=None)
    path = make_tiny(package, tmp_path / "hf-layout")
    assert "model.layers.0.mlp.experts.gate_up_proj" not in load_file(path / "model.safetensors")  # DeepSeek's names
    report = run_parity(path, prompt_lengths=(9, 60), max_tokens=8, block_size=8, max_num_batched_tokens=16)
    assert report.max_logit_diff <= LOGIT_TOLERANCE
    assert report.greedy_matches == report.greedy_total, report.first_mismatch


def _rewrite(src, dst, edit) -> None:
    shutil.copytree(src, dst)
    for file in sorted(dst.glob("*.safetensors")):
        tensors = load_file(file)
        edit(tensors)
        save_file(tensors, file, metadata={"format": "pt"})


def _load(path):
    return LLM(str(path), device="cpu", dtype="float32", block_size=8, num_gpu_blocks=16)


def test_missing_tensor_is_named(tiny_deepseek_v4, tmp_path):
    _rewrite(tiny_deepseek_v4, tmp_path / "ckpt", lambda t: t.pop("layers.3.attn.compressor.ape", None))
    with pytest.raises(ValueError, match=r"layers\.3\.attn\.compressor\.ape"):
        _load(tmp_path / "ckpt")


def test_unexpected_tensor_is_named(tiny_deepseek_v4, tmp_path):
    def add(tensors):
        if "embed.weight" in tensors:
            tensors["layers.0.attn.extra.weight"] = torch.zeros(2)
    _rewrite(tiny_deepseek_v4, tmp_path / "ckpt", add)
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.extra\.weight"):
        _load(tmp_path / "ckpt")


def test_scale_grid_that_does_not_fit_the_weight_is_named(tiny_deepseek_v4, tmp_path):
    def transpose(tensors):
        name = "layers.1.attn.wo_b.scale"
        if name in tensors:
            tensors[name] = tensors[name].view(torch.uint8).t().contiguous().view(torch.float8_e8m0fnu)
    _rewrite(tiny_deepseek_v4, tmp_path / "ckpt", transpose)
    with pytest.raises(ValueError, match=r"layers\.1\.attn\.wo_b"):
        _load(tmp_path / "ckpt")


def test_weight_without_its_scale_is_named(tiny_deepseek_v4, tmp_path):
    _rewrite(tiny_deepseek_v4, tmp_path / "ckpt", lambda t: t.pop("layers.4.ffn.experts.5.w2.scale", None))
    with pytest.raises(ValueError, match=r"layers\.4\.ffn\.experts\.5\.w2\.weight"):
        _load(tmp_path / "ckpt")


def test_engine_keeps_experts_packed_and_declares_every_cache(tiny_deepseek_v4):
    model = _load(tiny_deepseek_v4).engine.model
    assert model.layers[2].ffn.experts.w13_blocks.dtype == torch.uint8
    specs = model.cache_specs()
    # window-only layer: its window; HCA (ratio 8): window, state (window 8), entries; CSA (ratio 4):
    # window, state (overlap: window 8), entries, indexer state, indexer keys
    assert [(s.tokens_per_entry, s.window) for s in specs[:10]] == [
        (1, 8), (1, 8), (1, 8), (8, None), (1, 8), (1, 8), (4, None), (1, 8), (4, None), (1, 8)]
    assert [s.entry_shape for s in specs[4:9]] == [(32,), (2, 64), (32,), (2, 32), (16,)]


def test_base_checkpoint_with_fp8_experts_matches(tmp_path):
    """The Base releases ship routed experts as FP8 with block scales; the loader dequantizes them."""
    path = make_tiny_checkpoint("deepseek_v4", tmp_path / "base", variant="base")
    assert _all_tensors(path)["layers.2.ffn.experts.3.w1.weight"].dtype == torch.float8_e4m3fn
    report = run_parity(path, prompt_lengths=(9, 60), max_tokens=8, block_size=8, max_num_batched_tokens=16)
    assert report.max_logit_diff <= LOGIT_TOLERANCE
    assert report.greedy_matches == report.greedy_total, report.first_mismatch
