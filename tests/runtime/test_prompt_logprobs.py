"""SamplingParams.prompt_logprobs on the tiny Qwen3 through the real engine path (block size 4, a 16-token budget
so prompts span several prefill chunks, a cache small enough to preempt): every prompt token's logprob and rank,
and the top n, are transformers' log_softmax of the same prompt; a request that wants them takes no prefix-cache
hits, and one that does not still does."""
from __future__ import annotations

import pytest
import torch

from runtime import LLM, SamplingParams
from tools.parity import load_transformers, random_prompts

TOLERANCE = 1e-4
TOP_N = 3


@pytest.fixture(scope="module")
def hf(tiny_qwen3):
    return load_transformers(tiny_qwen3)


@torch.inference_mode()
def check_against_transformers(hf, prompt: list[int], prompt_logprobs: list, top_n: int) -> None:
    reference = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)    # [len, vocab]
    assert len(prompt_logprobs) == len(prompt) and prompt_logprobs[0] is None
    for position in range(1, len(prompt)):
        row, token, entry = reference[position - 1], prompt[position], prompt_logprobs[position]
        assert token in entry and len(entry) in (top_n, top_n + 1)
        ours = entry[token]
        assert abs(ours.logprob - row[token].item()) <= TOLERANCE
        # the rank counts strictly likelier tokens; a near-tie within the tolerance may fall either way
        assert (row > row[token] + TOLERANCE).sum() + 1 <= ours.rank <= (row > row[token] - TOLERANCE).sum() + 1
        nth_best = row.topk(top_n).values[-1].item() if top_n else float("inf")
        others = {t: lp for t, lp in entry.items() if lp.rank <= top_n}      # the top n (the token, if among them)
        assert len(others) == top_n
        for other, lp in others.items():
            assert abs(lp.logprob - row[other].item()) <= TOLERANCE and lp.logprob >= nth_best - TOLERANCE
        assert sorted(lp.rank for lp in others.values()) == list(range(1, top_n + 1))


def test_prompt_logprobs_match_transformers_across_chunks_and_preemption(tiny_qwen3, hf):
    llm = LLM(str(tiny_qwen3), device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=16,
              num_gpu_blocks=40)
    prompts = random_prompts(llm.engine.vocab_size, (45, 3, 70, 20), seed=5)
    params = [SamplingParams(temperature=0.0, max_tokens=24, prompt_logprobs=TOP_N, logprobs=2),
              SamplingParams(temperature=0.0, max_tokens=24, prompt_logprobs=0),
              SamplingParams(temperature=0.0, max_tokens=24, prompt_logprobs=TOP_N),
              SamplingParams(temperature=0.0, max_tokens=24)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    stats = llm.engine.scheduler.stats
    assert stats.num_prefill_chunks > 0 and stats.num_preemptions > 0
    for prompt, p, output in zip(prompts, params, outputs):
        if p.prompt_logprobs is None:
            assert output.prompt_logprobs is None
            continue
        check_against_transformers(hf, prompt, output.prompt_logprobs, p.prompt_logprobs)
    # the outputs are those of the same prompts without prompt logprobs
    plain = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    assert [o.token_ids for o in plain] == [o.token_ids for o in outputs]


def test_a_request_with_prompt_logprobs_skips_prefix_cache_hits(tiny_qwen3, hf):
    llm = LLM(str(tiny_qwen3), device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=16)
    prompt = random_prompts(llm.engine.vocab_size, (30,), seed=6)[0]
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)   # caches the prompt
    with_logprobs, without = llm.generate([prompt, prompt], [SamplingParams(max_tokens=2, prompt_logprobs=1),
                                                             SamplingParams(max_tokens=2)], use_tqdm=False)
    assert with_logprobs.num_cached_tokens == 0 and without.num_cached_tokens > 0
    check_against_transformers(hf, prompt, with_logprobs.prompt_logprobs, 1)


def test_prompt_logprobs_are_refused_past_the_vocabulary(tiny_qwen3):
    llm = LLM(str(tiny_qwen3), device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="prompt_logprobs"):
        llm.generate([[5, 6]], SamplingParams(prompt_logprobs=llm.engine.vocab_size + 1), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
