"""/v1/chat/completions through the official openai client: the chat template, streaming deltas, logprobs."""
from __future__ import annotations

import pytest

from runtime import SamplingParams
from tests.server.server_process import MODEL

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
THINK_START = "<think>"


def greedy(max_tokens: int, **options) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **options)


@pytest.fixture(scope="module")
def expected(offline):
    """The offline engine's greedy chat answer. This tiny random model does not open with <think>, so the
    whole answer is content (the reasoning split itself is tested in test_stream_deltas.py)."""
    output = offline.chat(MESSAGES, greedy(16))[0]
    assert output.token_ids[0] != offline.tokenizer.hf.convert_tokens_to_ids(THINK_START)
    return output


def test_greedy_chat_matches_offline_chat(client, expected):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0,
                                           extra_body={"ignore_eos": True})
    message = reply.choices[0].message
    assert message.role == "assistant"
    assert message.content == expected.text
    assert message.reasoning_content is None
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert reply.usage.completion_tokens == 16


def test_streamed_chat_deltas_add_up_to_the_answer(client, expected):
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=16,
                                                 temperature=0, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    choices = [c.choices[0] for c in chunks if c.choices]
    assert "".join(c.delta.content or "" for c in choices) == expected.text
    assert [c.finish_reason for c in choices if c.finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_template_kwargs_reach_the_template(client, offline):
    """enable_thinking=False makes Qwen3's template close an empty think block inside the prompt."""
    with_thinking = offline.tokenizer.apply_chat_template(MESSAGES)
    without = offline.tokenizer.apply_chat_template(MESSAGES, enable_thinking=False)
    assert len(without) > len(with_thinking)
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert reply.usage.prompt_tokens == len(without)


def test_chat_logprobs_list_each_token_with_its_alternatives(client, offline):
    expected = offline.chat(MESSAGES, greedy(5, logprobs=2))[0]
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    assert [entry.token for entry in content] == [offline.tokenizer.decode([t], skip_special_tokens=False)
                                                  for t in expected.token_ids]
    for token_id, offline_entry, entry in zip(expected.token_ids, expected.logprobs, content):
        assert entry.logprob == pytest.approx(offline_entry[token_id], abs=1e-4)
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert bytes(entry.bytes).decode(errors="replace") == entry.token


def test_multi_part_text_content_is_joined(client, expected):
    parts = [{"role": "system", "content": [{"type": "text", "text": "You are "}, {"type": "text", "text": "terse."}]},
             MESSAGES[1]]
    reply = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=16, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert reply.choices[0].message.content == expected.text
