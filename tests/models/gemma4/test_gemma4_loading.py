"""The tiny checkpoints are in the released layouts, the loader reads the text decoder out of them, and the
cache is laid out as the architecture needs: window groups for sliding layers, nothing for KV-sharing layers."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime import LLM, SamplingParams
from runtime.kv_cache import cdiv, window_blocks_per_request
from tools.parity import random_prompts


def test_multimodal_archive_nests_the_decoder_beside_a_tower(tiny_gemma4):
    weights = load_file(tiny_gemma4 / "model.safetensors")
    config = json.loads((tiny_gemma4 / "config.json").read_text())
    assert config["architectures"] == ["Gemma4ForConditionalGeneration"] and "vocab_size" not in config
    assert "model.language_model.embed_tokens_per_layer.weight" in weights
    assert any(name.startswith("model.vision_tower.") for name in weights)
    assert "model.language_model.layers.9.self_attn.k_proj.weight" in weights       # unused, as released
    assert not any(name.startswith("model.layers.") for name in weights)


def test_text_only_archive_uses_model_layers(tiny_gemma4_moe):
    weights = load_file(tiny_gemma4_moe / "model.safetensors")
    assert json.loads((tiny_gemma4_moe / "config.json").read_text())["architectures"] == ["Gemma4ForCausalLM"]
    assert weights["model.layers.0.experts.gate_up_proj"].shape == (8, 64, 64)      # [E, 2 * inter, hidden]
    assert "model.layers.5.self_attn.v_proj.weight" not in weights                  # the K=V global layer


def test_loader_skips_towers_and_unused_kv_weights_in_one_log_line(tiny_gemma4, caplog):
    with caplog.at_level(logging.INFO, logger="models.gemma4.model"):
        LLM(str(tiny_gemma4), device="cpu", dtype="float32", num_gpu_blocks=16)
    lines = [r.getMessage() for r in caplog.records if r.name == "models.gemma4.model"]
    towers = sum(name.startswith(("model.vision_tower.", "model.embed_vision.")) for name in
                 load_file(tiny_gemma4 / "model.safetensors"))
    assert lines == [f"skipped {towers} vision/audio tower tensors (this package runs the text decoder) and "
                     f"12 K/V tensors of KV-sharing layers"]


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_loader_rejects_a_missing_or_unexpected_decoder_tensor(tiny_gemma4, tmp_path, change):
    shutil.copytree(tiny_gemma4, tmp_path / "ckpt")
    weights = load_file(tmp_path / "ckpt" / "model.safetensors")
    if change == "missing":
        del weights["model.language_model.layers.3.layer_scalar"]
    else:
        weights["model.language_model.layers.3.mlp.bias"] = torch.zeros(64)
    save_file(weights, tmp_path / "ckpt" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="layers.3.layer_scalar" if change == "missing" else "layers.3.mlp.bias"):
        LLM(str(tmp_path / "ckpt"), device="cpu", dtype="float32", num_gpu_blocks=16)


def test_shared_layers_allocate_nothing_and_read_their_producers_cache(tiny_gemma4):
    engine = LLM(str(tiny_gemma4), device="cpu", dtype="float32", num_gpu_blocks=16).engine
    specs = engine.model.cache_specs()
    assert [s.shared_with for s in specs] == [None] * 6 + [5, 5, 5, 4]
    groups = {(g.spec.entry_shape, g.spec.window): len(g.layers) for g in engine.kv.groups}
    assert groups == {((2, 1, 32), 8): 5, ((2, 1, 64), None): 1}                    # 6 owner layers in all
    caches = engine.runner.caches
    assert caches[7].data_ptr() == caches[5].data_ptr() and caches[9].data_ptr() == caches[4].data_ptr()


def test_k_eq_v_global_layers_have_one_kv_projection_and_store_k_and_v(tiny_gemma4_dense):
    model = LLM(str(tiny_gemma4_dense), device="cpu", dtype="float32", num_gpu_blocks=16).engine.model
    global_attention = model.model.layers[2].self_attn
    assert not global_attention.has_v_proj and global_attention.split == (4 * 64, 64)      # q_proj | k_proj
    assert [(s.entry_shape, s.window) for s in model.cache_specs()][:3] == \
        [((2, 2, 32), 8), ((2, 2, 32), 8), ((2, 1, 64), None)]


def test_sliding_groups_of_a_480_token_request_stay_window_sized(tiny_gemma4):
    """The full-attention group grows with the request, the sliding group holds only the blocks the window
    (plus one prefill chunk) can reach."""
    block_size, budget = 16, 64
    engine = LLM(str(tiny_gemma4), device="cpu", dtype="float32", block_size=block_size,
                 max_num_batched_tokens=budget).engine       # the tiny model's 512 positions
    window_group = next(g for g, group in enumerate(engine.kv.groups) if group.spec.window is not None)
    prompt = random_prompts(512, (480,), seed=4)[0]
    engine.add_request("long", prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    held = []
    while engine.has_unfinished():
        engine.step()
        held.append(engine.kv.num_blocks_held("long"))
    assert max(h[window_group] for h in held) <= window_blocks_per_request(8, block_size, budget)
    assert max(h[1 - window_group] for h in held) == cdiv(480 + 7, block_size)


def test_loader_rejects_a_v_projection_on_a_k_eq_v_layer(tiny_gemma4_dense, tmp_path):
    shutil.copytree(tiny_gemma4_dense, tmp_path / "ckpt")
    weights = load_file(tmp_path / "ckpt" / "model.safetensors")
    weights["model.language_model.layers.2.self_attn.v_proj.weight"] = torch.zeros(64, 64)
    save_file(weights, tmp_path / "ckpt" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="layers.2.self_attn.v_proj"):
        LLM(str(tmp_path / "ckpt"), device="cpu", dtype="float32", num_gpu_blocks=16)


def test_dummy_weights_leave_the_layer_scalars_at_one(tiny_gemma4_moe):
    """Random weights for benchmarks must not shrink the residual stream layer after layer (which would
    also tie every router's logits and send all tokens to the same experts)."""
    model = LLM(str(tiny_gemma4_moe), device="cpu", dtype="float32", num_gpu_blocks=16, load_format="dummy").engine.model
    assert all(layer.layer_scalar.item() == 1.0 for layer in model.model.layers)
