"""Bad input gets a ValueError that names the problem, and the engine keeps serving everyone else."""
from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file, save_file

from runtime import LLM, SamplingParams
from tools.parity import random_prompts


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(str(tiny_qwen3), device="cpu", dtype="float32", max_model_len=256, block_size=8)


@pytest.mark.parametrize("prompt, params, message", [
    ("", SamplingParams(), "empty"),
    ([], SamplingParams(), "empty"),
    ([5] * 300, SamplingParams(max_tokens=4), "300 tokens"),
    ([5] * 250, SamplingParams(max_tokens=10), "max_model_len is 256"),
    ([5, 99999], SamplingParams(), "token ids"),
])
def test_bad_prompt_is_rejected_with_a_reason(llm, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([prompt], params, use_tqdm=False)


@pytest.mark.parametrize("options, message", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(n=0), "n must be"),
])
def test_bad_sampling_params_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**options)


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture 'nosuchmodel'"):
        LLM("tiny", arch="nosuchmodel")


def test_missing_model_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "nowhere"))


def _checkpoint_with(tiny_qwen3, tmp_path, edit):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_qwen3, path)
    weights = load_file(path / "model.safetensors")
    edit(weights)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_checkpoint_missing_a_tensor(tiny_qwen3, tmp_path):
    path = _checkpoint_with(tiny_qwen3, tmp_path, lambda w: w.pop("model.layers.2.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"missing 1 tensor.*layers\.2\.self_attn\.qkv_proj"):
        LLM(str(path), device="cpu")


def test_checkpoint_with_an_unexpected_tensor(tiny_qwen3, tmp_path):
    import torch
    path = _checkpoint_with(tiny_qwen3, tmp_path, lambda w: w.update({"model.layers.0.mystery.weight": torch.ones(3)}))
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.mystery.weight'"):
        LLM(str(path), device="cpu")


def test_checkpoint_with_a_wrong_shape(tiny_qwen3, tmp_path):
    import torch
    path = _checkpoint_with(tiny_qwen3, tmp_path, lambda w: w.update({"model.norm.weight": torch.ones(7)}))
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(7,\)"):
        LLM(str(path), device="cpu")


def test_engine_keeps_serving_after_rejections(llm):
    prompts = random_prompts(1024, (7, 30, 12), seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=8)
    expected = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"good-{i}", prompt, params)
    rejected = 0
    for bad_prompt, bad_params in [("", params), ([5] * 400, params), (prompts[0], SamplingParams(max_tokens=300))]:
        with pytest.raises(ValueError):
            engine.add_request(f"bad-{rejected}", bad_prompt, bad_params)
        rejected += 1
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("good-0", prompts[0], params)
    finished = {}
    while engine.has_unfinished():
        for output in engine.step():
            finished[output.request_id] = output.token_ids
    assert [finished[f"good-{i}"] for i in range(3)] == expected
    assert all(pool.num_used == 0 for pool in engine.kv.pools)


@pytest.mark.parametrize("options, message", [
    (dict(stop_token_ids=[5, 5000]), r"stop_token_ids \[5000\] are outside the vocabulary"),
    (dict(logprobs=5000), "logprobs is 5000 but the vocabulary has 1024"),
])
def test_params_naming_tokens_outside_the_vocabulary_are_rejected(llm, options, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, **options), use_tqdm=False)


def test_seed_outside_64_bits_is_rejected():
    with pytest.raises(ValueError, match="seed must fit in 64 bits"):
        SamplingParams(seed=2**64)


def test_checkpoint_without_a_tokenizer_says_so(tiny_qwen3, tmp_path):
    path = tmp_path / "no-tokenizer"
    path.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tiny_qwen3 / name, path / name)
    with pytest.raises(ValueError, match=r"no tokenizer in .*no-tokenizer.*--tokenizer"):
        LLM(str(path), device="cpu")


def test_wrong_architecture_for_the_checkpoint_names_the_right_one(tiny_qwen3):
    with pytest.raises(ValueError, match=r"Qwen3ForCausalLM, not gpt_oss.*building it failed.*run-model qwen3"):
        LLM(str(tiny_qwen3), arch="gpt_oss", device="cpu")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a torch without CUDA")
def test_cuda_device_without_cuda_says_so():
    with pytest.raises(ValueError, match="--device cuda.*no CUDA"):
        LLM("tiny", arch="qwen3", device="cuda")


@pytest.mark.parametrize("max_model_len, message", [
    (0, "max_model_len must be at least 1"),
    (-5, "max_model_len must be at least 1"),
    (10**6, r"max_model_len 1000000 is more than the 4096 positions the model"),
])
def test_max_model_len_is_checked(tiny_qwen3, max_model_len, message):
    with pytest.raises(ValueError, match=message):
        LLM(str(tiny_qwen3), device="cpu", max_model_len=max_model_len)
