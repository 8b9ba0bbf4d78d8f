"""Penalties read token counts kept on the device (runtime.sampler.TokenCounts), written when a request
joins and updated from each step's emitted tokens: async scheduling stays on with penalties and gives the
tokens of synchronous steps; verification rows count the drafts before them, so speculative greedy decoding
with penalties equals plain decoding."""
from __future__ import annotations

from dataclasses import replace

import torch

from runtime import LLM, SamplingParams
from runtime.sampler import TokenCounts
from tools.parity import random_prompts

# block_size 4, a 16-token budget and a small cache: chunked prefill, mixed steps and preemption (after
# which a request joins again and its counts are rebuilt from its history) all happen.
TIGHT_CACHE = dict(device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=16, num_gpu_blocks=48)

PENALIZED = [
    SamplingParams(temperature=0.8, seed=1, presence_penalty=0.6, frequency_penalty=0.4, repetition_penalty=1.3,
                   max_tokens=20, ignore_eos=True),
    SamplingParams(temperature=0.0, repetition_penalty=1.5, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=1.0, seed=2, frequency_penalty=1.0, top_k=20, max_tokens=16, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=18, ignore_eos=True),                     # no penalties
    SamplingParams(temperature=0.0, presence_penalty=2.0, max_tokens=22, ignore_eos=True),
    SamplingParams(temperature=0.6, seed=3, repetition_penalty=0.8, max_tokens=20, ignore_eos=True),
]


def run(path, async_scheduling: bool) -> tuple[list[list[int]], int, int]:
    """Token ids per request, how many steps were left in flight (overlapped), and the preemptions."""
    llm = LLM(str(path), async_scheduling=async_scheduling, **TIGHT_CACHE)
    engine = llm.engine
    prompts = random_prompts(engine.vocab_size, (5, 30, 12, 41, 8, 22), seed=4)
    for i, (prompt, params) in enumerate(zip(prompts, PENALIZED)):
        engine.add_request(str(i), prompt, params)
    finished, overlapped = {}, 0
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids
        overlapped += engine._in_flight is not None
    return [finished[str(i)] for i in range(len(PENALIZED))], overlapped, engine.scheduler.stats.num_preemptions


def test_async_scheduling_with_penalties_gives_the_tokens_of_synchronous_steps(tiny_qwen3):
    sync_tokens, sync_overlapped, _ = run(tiny_qwen3, async_scheduling=False)
    async_tokens, async_overlapped, preemptions = run(tiny_qwen3, async_scheduling=True)
    assert async_tokens == sync_tokens
    assert sync_overlapped == 0 and async_overlapped > 10, "penalties turned async scheduling off"
    assert preemptions > 0


def test_penalties_change_the_tokens(tiny_qwen3):
    # the counts really are read: without penalties the same seeds give other tokens
    plain = [replace(p, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0) for p in PENALIZED]
    llm = LLM(str(tiny_qwen3), **TIGHT_CACHE)
    prompts = random_prompts(llm.engine.vocab_size, (5, 30, 12, 41, 8, 22), seed=4)
    outputs = [o.token_ids for o in llm.generate(prompts, plain, use_tqdm=False)]
    penalized, _, _ = run(tiny_qwen3, async_scheduling=True)
    assert outputs[3] == penalized[3]
    assert sum(a != b for a, b in zip(outputs, penalized)) >= 4


def test_speculative_greedy_with_penalties_equals_plain_decoding(tiny_qwen3):
    params = SamplingParams(temperature=0.0, repetition_penalty=1.05, presence_penalty=0.05, max_tokens=30,
                            ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9] * 8, [11, 12, 13] * 10] + random_prompts(1000, (17, 9), seed=5)
    plain = LLM(str(tiny_qwen3), **TIGHT_CACHE).generate(prompts, params, use_tqdm=False)
    llm = LLM(str(tiny_qwen3), speculative_config={"method": "ngram", "num_speculative_tokens": 3}, **TIGHT_CACHE)
    drafted = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in drafted] == [o.token_ids for o in plain]
    stats = llm.engine.spec_stats
    assert stats.num_accepted_tokens > 0 and stats.num_draft_tokens > stats.num_accepted_tokens


def test_token_counts_count_emitted_tokens_only():
    counts = TokenCounts(max_rows=3, vocab_size=10, device=torch.device("cpu"))
    counts.reset(row=1, token_ids=[4, 4, 7, 2, 2, 9], num_prompt_tokens=3)        # prompt 4 4 7, output 2 2 9
    counts.add(torch.tensor([1, 1, 1]), torch.tensor([9, 3, 5]), emitted=torch.tensor([True, True, False]))
    row_counts, row_seen = counts.gather(torch.tensor([1, 1]), torch.tensor([1]), torch.tensor([6]))
    assert row_counts[0].tolist() == [0, 0, 2, 1, 0, 0, 0, 0, 0, 2]
    assert row_seen[0].nonzero()[:, 0].tolist() == [2, 3, 4, 7, 9]
    assert row_counts[1, 6] == 1 and row_seen[1, 6] and not row_seen[0, 6]        # the extra draft: row 1 only
