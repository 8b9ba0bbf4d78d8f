"""Speculative decoding on DeepSeek V4 is lossless: with the MTP drafter, and with n-gram drafts that get
accepted (so the window, compressed entries, indexer keys and compressor state rewind past rejected drafts),
under small blocks, chunked prefill and preemption."""
from __future__ import annotations

import pytest

from runtime import LLM, SamplingParams
from tools.parity import random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
STRESS = dict(device="cpu", dtype="float32", block_size=8, max_num_batched_tokens=16, num_gpu_blocks=24)


def _prompts() -> list[list[int]]:
    """Random prompts, and periodic ones whose continuations may repeat earlier n-grams."""
    return random_prompts(512, (5, 37, 90), seed=6) + [[20, 21, 22, 23, 24] * 8, [30, 31, 32] * 12]


@pytest.fixture(scope="module")
def plain_outputs(tiny_deepseek_v4):
    llm = LLM(str(tiny_deepseek_v4), **STRESS)
    return [o.outputs[0].token_ids for o in llm.generate(_prompts(), GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("method", ["mtp", "ngram"])
def test_speculative_greedy_outputs_equal_plain_ones(tiny_deepseek_v4, plain_outputs, method):
    llm = LLM(str(tiny_deepseek_v4), speculative_config={"method": method, "num_speculative_tokens": 3}, **STRESS)
    outputs = [o.outputs[0].token_ids for o in llm.generate(_prompts(), GREEDY, use_tqdm=False)]
    assert outputs == plain_outputs
    stats = llm.engine.spec_stats
    assert stats.num_draft_tokens > 0 and llm.engine.scheduler.stats.num_preemptions > 0
    if method == "ngram":
        assert stats.num_accepted_tokens > 0             # the caches really rewound past rejected drafts
    else:                                                # the random MTP layer rarely guesses right
        assert llm.engine.drafter.layers[0].attn.window_layer == len(llm.engine.model.cache_specs())


def test_mtp_lookahead_past_max_model_len(tiny_deepseek_v4):
    """A prompt one short of max_model_len with 2 drafts: the lookahead would need a block past the table's
    width; the table stops at its width (those positions are never written) instead of overflowing."""
    llm = LLM(str(tiny_deepseek_v4), device="cpu", dtype="float32", block_size=16, max_model_len=64,
              speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    prompt = random_prompts(512, (63,), seed=9)
    spec = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    plain = LLM(str(tiny_deepseek_v4), device="cpu", dtype="float32", block_size=16, max_model_len=64).generate(
        prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    assert spec[0].outputs[0].token_ids == plain[0].outputs[0].token_ids
