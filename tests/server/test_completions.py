"""/v1/completions through the official openai client: the server reproduces the offline engine."""
from __future__ import annotations

import math

import pytest

from runtime import SamplingParams
from tests.server.server_process import MODEL
from tools.parity import random_prompts

PROMPTS = ["Hello, my name is", "The quick brown fox", "Numbers: 1 2 3", "Once upon a time, in a land far away,"]


def greedy(max_tokens: int, **options) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **options)


def streamed(client, **request):
    """(text per choice index, finish reason per index, usage) of a streamed completion."""
    texts, reasons, usage = {}, {}, None
    for chunk in client.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True},
                                           **request):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                reasons[choice.index] = choice.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    return texts, reasons, usage


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_matches_offline_generate(client, offline, prompt):
    expected = offline.generate([prompt], greedy(12))[0]
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.total_tokens == len(expected.prompt_token_ids) + len(expected.token_ids)


def test_streamed_completion_matches_offline_generate(client, offline):
    expected = offline.generate(PROMPTS[:1], greedy(20, ignore_eos=True))[0]
    texts, reasons, usage = streamed(client, prompt=PROMPTS[0], max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert texts == {0: expected.text}
    assert reasons == {0: "length"}
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(expected.prompt_token_ids), 20)


def test_batch_of_token_id_prompts_gives_one_choice_each(client, offline):
    prompts = random_prompts(1024, (7, 30, 3), seed=11)
    expected = offline.generate(prompts, greedy(8, ignore_eos=True))
    reply = client.completions.create(model=MODEL, prompt=prompts, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.text for c in reply.choices] == [e.text for e in expected]
    assert reply.usage.prompt_tokens == sum(len(p) for p in prompts)
    assert reply.usage.completion_tokens == 3 * 8


def _stop_string_inside(text: str) -> str:
    """Two printable characters from the middle of `text` that do not occur earlier in it."""
    for start in range(len(text) // 3, len(text) - 2):
        stop = text[start:start + 2]
        if stop.strip() and "\ufffd" not in stop and text.find(stop) == start:
            return stop
    pytest.skip("no usable stop string in this greedy text")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_output(client, offline, stream):
    free = offline.generate([PROMPTS[3]], greedy(24, ignore_eos=True))[0]
    stop = _stop_string_inside(free.text)
    request = dict(prompt=PROMPTS[3], max_tokens=24, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    if stream:
        texts, reasons, _ = streamed(client, **request)
        text, reason = texts[0], reasons[0]
    else:
        choice = client.completions.create(model=MODEL, **request).choices[0]
        text, reason = choice.text, choice.finish_reason
    assert text == free.text[:free.text.find(stop)]
    assert reason == "stop"


def test_stop_token_id_finishes_with_stop(client, offline):
    free = offline.generate([PROMPTS[1]], greedy(16, ignore_eos=True))[0]
    stop_id = free.token_ids[4]
    reply = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True, "stop_token_ids": [stop_id]})
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == free.token_ids.index(stop_id) + 1


def test_seed_makes_sampling_reproducible(client, offline):
    request = dict(model=MODEL, prompt=PROMPTS[2], max_tokens=16, temperature=1.0, top_p=0.9,
                   extra_body={"ignore_eos": True})
    first = client.completions.create(seed=1234, **request).choices[0].text
    again = client.completions.create(seed=1234, **request).choices[0].text
    other = client.completions.create(seed=99, **request).choices[0].text
    expected = offline.generate([PROMPTS[2]], SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16,
                                                             ignore_eos=True))[0]
    assert first == again == expected.text
    assert other != first


def test_n_gives_independent_choices(client):
    reply = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=10, temperature=1.0, n=3, seed=5,
                                      extra_body={"ignore_eos": True})
    assert sorted(c.index for c in reply.choices) == [0, 1, 2]
    assert len({c.text for c in reply.choices}) > 1
    assert reply.usage.completion_tokens == 30


def test_logprobs_match_the_offline_engine(client, offline):
    expected = offline.generate([PROMPTS[0]], greedy(6, logprobs=3, ignore_eos=True))[0]
    reply = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3,
                                      extra_body={"ignore_eos": True})
    logprobs = reply.choices[0].logprobs
    tokenizer = offline.tokenizer
    assert logprobs.tokens == [tokenizer.decode([t], skip_special_tokens=False) for t in expected.token_ids]
    for token_id, entry, sent, top in zip(expected.token_ids, expected.logprobs, logprobs.token_logprobs,
                                          logprobs.top_logprobs):
        assert math.isclose(sent, entry[token_id], abs_tol=1e-4)
        assert len(top) == 3
        assert max(top.values()) == pytest.approx(sent, abs=1e-4)      # greedy picks the most likely token
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]


def test_max_tokens_finishes_with_length(client):
    reply = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5


def test_streamed_text_equals_the_whole_text_when_the_prompt_ends_mid_character(client, offline):
    """Prompts cut inside a character: the streamed deltas add up to the non-streamed text, byte for byte."""
    ids = offline.tokenizer.encode("東京 😀 café")
    cuts = [i for i in range(1, len(ids)) if offline.tokenizer.decode(ids[:i]).endswith("\ufffd")]
    for cut in cuts[:3]:
        request = dict(prompt=ids[:cut], max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
        whole = client.completions.create(model=MODEL, **request).choices[0].text
        texts, _, _ = streamed(client, **request)
        assert texts[0].encode() == whole.encode()
