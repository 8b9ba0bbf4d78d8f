"""Qwen3 and Qwen3-MoE match transformers (fp32) through the real engine path."""
from __future__ import annotations

import pytest

from runtime import LLM, SamplingParams
from tools.parity import load_transformers, random_prompts, run_parity

LOGIT_TOLERANCE = 1e-4
# 8 prompts of 3..200 tokens at once, block_size 4, a 16-token budget (chunked prefill), and a cache of
# 79 blocks (316 tokens) for about 1,000 tokens of work: preemption must happen.
STRESS = dict(block_size=4, max_num_batched_tokens=16, num_gpu_blocks=80)


@pytest.fixture(scope="module", params=["dense", "moe"])
def checkpoint(request, tiny_qwen3, tiny_qwen3_moe):
    return tiny_qwen3 if request.param == "dense" else tiny_qwen3_moe


@pytest.fixture(scope="module")
def stress_report(checkpoint):
    return run_parity(checkpoint, max_tokens=32, **STRESS)


def test_every_logit_row_matches_transformers(stress_report):
    assert stress_report.logit_rows_compared > 1000
    assert stress_report.max_logit_diff <= LOGIT_TOLERANCE


def test_greedy_outputs_match_transformers_generate(stress_report):
    assert stress_report.greedy_matches == stress_report.greedy_total == 8, stress_report.first_mismatch


def test_stress_run_exercised_chunking_mixing_and_preemption(stress_report):
    conditions = stress_report.conditions
    assert conditions["preemptions"] > 0
    assert conditions["prefill_chunks"] > 0
    assert conditions["mixed_steps"] > 0


def test_prefill_logits_match_in_one_shot(checkpoint):
    """No chunking, one big batch: the plain prefill path on its own."""
    report = run_parity(checkpoint, prompt_lengths=(5, 33, 130), max_tokens=4, block_size=16)
    assert report.conditions["prefill_chunks"] == 0 and report.conditions["preemptions"] == 0
    assert report.max_logit_diff <= LOGIT_TOLERANCE
    assert report.greedy_matches == report.greedy_total


def test_prefix_caching_reproduces_the_uncached_outputs(tiny_qwen3):
    shared = random_prompts(1024, (48,), seed=1)[0]
    tails = random_prompts(1024, (5, 9, 13, 2), seed=2)
    prompts = [shared + tail for tail in tails]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    results = {}
    for caching in (True, False):
        llm = LLM(str(tiny_qwen3), device="cpu", dtype="float32", block_size=8, enable_prefix_caching=caching,
                  max_num_batched_tokens=64)
        first = llm.generate(prompts[:1], params, use_tqdm=False)     # fills the cache with the shared prefix
        rest = llm.generate(prompts[1:], params, use_tqdm=False)
        results[caching] = ([o.token_ids for o in first + rest], llm.engine.kv.stats.hits,
                            [o.num_cached_tokens for o in rest])
    (cached_tokens, hits, cached_per_request), (uncached_tokens, no_hits, _) = results[True], results[False]
    assert cached_tokens == uncached_tokens
    assert hits >= 3 * 48 and no_hits == 0
    assert all(n == 48 for n in cached_per_request)


def test_tied_checkpoint_with_lm_head_on_disk_loads(tiny_qwen3, tmp_path):
    """Released tied repos may carry lm_head.weight; the loader must accept it."""
    import shutil

    from safetensors.torch import load_file, save_file
    shutil.copytree(tiny_qwen3, tmp_path / "ckpt")
    weights = load_file(tmp_path / "ckpt" / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, tmp_path / "ckpt" / "model.safetensors", metadata={"format": "pt"})
    llm = LLM(str(tmp_path / "ckpt"), device="cpu", dtype="float32")
    prompt = random_prompts(1024, (10,))[0]
    ours = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)[0].token_ids
    import torch
    expected = load_transformers(tiny_qwen3).generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False)
    assert ours == expected[0, 10:].tolist()
