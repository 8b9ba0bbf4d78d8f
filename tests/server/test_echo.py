"""/v1/completions `echo` and prompt logprobs through the official openai client: the prompt comes back before
the completion, whole and streamed, and its tokens' logprobs are transformers' log_softmax of the prompt."""
from __future__ import annotations

import math

import pytest
import torch

from runtime import SamplingParams
from tests.server.server_process import MODEL
from tools.parity import load_transformers

PROMPT = "The quick brown fox jumps over the lazy dog, and then"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference(tiny_qwen3, offline):
    """The prompt's token ids and transformers' log_softmax rows over them [len, vocab]."""
    ids = offline.tokenizer.encode(PROMPT)
    with torch.inference_mode():
        logits = load_transformers(tiny_qwen3)(torch.tensor([ids])).logits[0].float()
    return ids, torch.log_softmax(logits, dim=-1)


def test_echo_with_logprobs_scores_the_prompt_like_transformers(client, offline, reference):
    ids, log_softmax = reference
    expected = offline.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=4, logprobs=2,
                                                         ignore_eos=True))[0]
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2,
                                      echo=True, extra_body={"ignore_eos": True})
    choice = reply.choices[0]
    assert choice.text == PROMPT + expected.text
    logprobs = choice.logprobs
    tokenizer = offline.tokenizer
    all_ids = ids + expected.token_ids
    assert logprobs.tokens == [tokenizer.decode([t], skip_special_tokens=False) for t in all_ids]
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(all_ids))]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for position in range(1, len(ids)):
        row = log_softmax[position - 1]
        assert math.isclose(logprobs.token_logprobs[position], row[ids[position]].item(), abs_tol=TOLERANCE)
        top = logprobs.top_logprobs[position]
        assert len(top) == 2
        assert sorted(top.values(), reverse=True) == pytest.approx(row.topk(2).values.tolist(), abs=TOLERANCE)
    for at, (token, entry) in enumerate(zip(expected.token_ids, expected.logprobs), start=len(ids)):
        assert math.isclose(logprobs.token_logprobs[at], entry[token], abs_tol=TOLERANCE)


def test_streamed_echo_adds_up_to_the_whole_reply(client):
    request = dict(model=MODEL, prompt=[PROMPT, "Hello"], max_tokens=5, temperature=1.0, seed=3, logprobs=1,
                   echo=True, extra_body={"ignore_eos": True})
    whole = {c.index: c for c in client.completions.create(**request).choices}
    texts, tokens, token_logprobs = {}, {}, {}
    for chunk in client.completions.create(stream=True, **request):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            tokens.setdefault(choice.index, []).extend(choice.logprobs.tokens)
            token_logprobs.setdefault(choice.index, []).extend(choice.logprobs.token_logprobs)
    assert sorted(texts) == [0, 1] and texts[1].startswith("Hello")
    for index, choice in whole.items():
        assert texts[index] == choice.text
        assert tokens[index] == choice.logprobs.tokens
        assert token_logprobs[index] == choice.logprobs.token_logprobs


def test_prompt_logprobs_extra_and_echo_of_token_ids(client, offline, reference):
    ids, log_softmax = reference
    reply = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0, echo=True,
                                      extra_body={"prompt_logprobs": 1})
    choice = reply.choices[0]
    assert choice.text.startswith(offline.tokenizer.decode(ids, skip_special_tokens=False))
    assert choice.logprobs is None
    prompt_logprobs = choice.model_extra["prompt_logprobs"]
    assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    for position in range(1, len(ids)):
        row, entry = log_softmax[position - 1], prompt_logprobs[position]
        own = entry[str(ids[position])]
        assert math.isclose(own["logprob"], row[ids[position]].item(), abs_tol=TOLERANCE)
        token_lp = row[ids[position]]
        assert (row > token_lp + TOLERANCE).sum() + 1 <= own["rank"] <= (row > token_lp - TOLERANCE).sum() + 1
        best = int(row.argmax())
        assert entry[str(best)]["rank"] == 1 and len(entry) == (1 if best == ids[position] else 2)
