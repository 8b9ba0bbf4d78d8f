"""Engine behaviour seen from LLM.generate: seeds, stop strings, logprobs, n, ignore_eos, abort."""
from __future__ import annotations

import pytest
import torch

from runtime import LLM, SamplingParams
from tools.parity import load_transformers, random_prompts


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(str(tiny_qwen3), device="cpu", dtype="float32", block_size=8, max_num_batched_tokens=64)


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    prompt = random_prompts(1024, (12,), seed=4)[0]
    others = random_prompts(1024, (5, 40, 23), seed=5)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([prompt], params, use_tqdm=False)[0].token_ids
    crowded = llm.generate(others[:2] + [prompt] + others[2:],
                           [SamplingParams(temperature=0.7, max_tokens=20)] * 2 + [params] +
                           [SamplingParams(temperature=0.0, max_tokens=5)], use_tqdm=False)[2].token_ids
    other_seed = llm.generate([prompt], SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16,
                                                       ignore_eos=True), use_tqdm=False)[0].token_ids
    assert alone == crowded
    assert alone != other_seed


def test_n_returns_independent_completions(llm):
    prompt = random_prompts(1024, (9,), seed=6)[0]
    output = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True),
                          use_tqdm=False)[0]
    assert len(output.outputs) == 3
    assert all(len(c.token_ids) == 12 for c in output.outputs)
    assert len({tuple(c.token_ids) for c in output.outputs}) > 1


def test_ignore_eos_generates_exactly_max_tokens(llm):
    outputs = llm.generate(random_prompts(1024, (4, 8), seed=8), SamplingParams(temperature=0.0, max_tokens=40,
                                                                                  ignore_eos=True), use_tqdm=False)
    assert [len(o.token_ids) for o in outputs] == [40, 40]
    assert {o.finish_reason for o in outputs} == {"length"}


def test_stop_string_spanning_tokens_cuts_the_text(llm):
    tokenizer = llm.tokenizer
    prompt = random_prompts(1024, (10,), seed=9)[0]
    free = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                        use_tqdm=False)[0]
    # find a token boundary with at least two printable characters on each side, and a stop string
    # made of the last two characters before it and the first character after it
    for k in range(2, len(free.token_ids) - 1):
        before = tokenizer.decode(free.token_ids[:k])
        after = tokenizer.decode(free.token_ids[:k + 1])
        if after.startswith(before) and len(after) > len(before) and "\ufffd" not in after and len(before) >= 2:
            stop = before[-2:] + after[len(before)]
            if free.text.find(stop) == len(before) - 2:
                break
    else:
        pytest.skip("no suitable token boundary in this greedy text")
    cut = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0]
    assert cut.finish_reason == "stop"
    assert cut.outputs[0].stop_reason == stop
    assert cut.text == free.text[:free.text.find(stop)]
    kept = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop],
                                                 include_stop_str_in_output=True), use_tqdm=False)[0]
    assert kept.text == free.text[:free.text.find(stop) + len(stop)]


def test_stop_token_ids_end_generation(llm):
    prompt = random_prompts(1024, (6,), seed=10)[0]
    free = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)[0]
    stop_id = free.token_ids[5]
    first = free.token_ids.index(stop_id)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                                stop_token_ids=[stop_id]), use_tqdm=False)[0]
    assert out.token_ids == free.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop_id


def test_logprobs_are_log_softmax_of_transformers_logits(llm, tiny_qwen3):
    prompt = random_prompts(1024, (11,), seed=11)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0.8, seed=3, max_tokens=6, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0]
    hf = load_transformers(tiny_qwen3)
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt + out.token_ids])).logits[0].float()
    reference = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)          # [generated, vocab]
    assert len(out.logprobs) == len(out.token_ids) == 6
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        top3 = reference[step].topk(3).indices.tolist()
        assert token in entry and set(top3) <= set(entry) and len(entry) <= 4
        for token_id, logprob in entry.items():
            assert logprob == pytest.approx(reference[step, token_id].item(), abs=1e-4)


def test_abort_frees_blocks_and_others_finish(llm):
    engine = llm.engine
    prompts = random_prompts(1024, (30, 31), seed=12)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    engine.add_request("keep", prompts[0], params)
    engine.add_request("drop", prompts[1], params)
    engine.step()
    engine.abort("drop")
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert [o.request_id for o in outputs] == ["keep"] and len(outputs[0].token_ids) == 10
    assert all(pool.num_used == 0 for pool in engine.kv.pools)
