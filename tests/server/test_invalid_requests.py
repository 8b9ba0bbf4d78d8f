"""Bad input gets a 4xx with an OpenAI error object, never a 500, and never disturbs the other clients."""
from __future__ import annotations

import itertools
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from runtime import SamplingParams
from tests.server.server_process import MAX_MODEL_LEN, MODEL, error_of

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "Hi"}]


def completion(**fields) -> str:
    return json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 4, **fields})


def chat(**fields) -> str:
    return json.dumps({"model": MODEL, "messages": USER, "max_tokens": 4, **fields})


# (case, path, raw body, expected status, expected `param` or None when it need not name one)
BAD_REQUESTS = [
    ("malformed JSON", COMPLETIONS, '{"model": "tiny-qwen3", "prompt": ', 400, None),
    ("not UTF-8", COMPLETIONS, b"\xff\xfe{}", 400, None),
    ("body is a list", COMPLETIONS, "[1, 2, 3]", 400, None),
    ("empty body", CHAT, "", 400, None),
    ("missing prompt", COMPLETIONS, json.dumps({"model": MODEL}), 400, "prompt"),
    ("max_tokens is a word", COMPLETIONS, completion(max_tokens="many"), 400, "max_tokens"),
    ("prompt is a number", COMPLETIONS, completion(prompt=5), 400, "prompt"),
    ("temperature is a word", COMPLETIONS, completion(temperature="hot"), 400, "temperature"),
    ("temperature is NaN", COMPLETIONS, completion()[:-1] + ', "temperature": NaN}', 400, "temperature"),
    ("stop is a number", COMPLETIONS, completion(stop=5), 400, "stop"),
    ("messages is a string", CHAT, chat(messages="hello"), 400, "messages"),
    ("unknown model", COMPLETIONS, completion(model="gpt-4"), 404, "model"),
    ("negative max_tokens", COMPLETIONS, completion(max_tokens=-5), 400, "max_tokens"),
    ("zero max_completion_tokens", CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    ("prompt longer than the context", COMPLETIONS, completion(prompt=[5] * (MAX_MODEL_LEN + 10)), 400, None),
    ("max_tokens past the context", COMPLETIONS, completion(max_tokens=MAX_MODEL_LEN), 400, None),
    ("empty messages", CHAT, chat(messages=[]), 400, "messages"),
    ("unknown role", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages.0.role"),
    ("image content", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     400, None),
    ("n is 0", COMPLETIONS, completion(n=0), 400, "n"),
    ("n is huge", CHAT, chat(n=100000), 400, "n"),
    ("top_p above 1", COMPLETIONS, completion(top_p=2.0), 400, "top_p"),
    ("min_tokens above max_tokens", COMPLETIONS, completion(min_tokens=10), 400, "min_tokens"),
    ("empty stop string", COMPLETIONS, completion(stop=[""]), 400, "stop"),
    ("too many logprobs", COMPLETIONS, completion(logprobs=1000), 400, "logprobs"),
    ("top_logprobs without logprobs", CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    ("token id outside the vocabulary", COMPLETIONS, completion(prompt=[1, 2, 10**9]), 400, None),
    ("negative token id", COMPLETIONS, completion(prompt=[[1, 2], [-1]]), 400, None),
    ("stop token id outside the vocabulary", COMPLETIONS, completion(stop_token_ids=[10**6], min_tokens=2), 400,
     "stop_token_ids"),
    ("seed beyond int64", COMPLETIONS, completion(seed=2**70), 400, "seed"),
    ("empty prompt", COMPLETIONS, completion(prompt=""), 400, None),
    ("empty prompt list", COMPLETIONS, completion(prompt=[]), 400, "prompt"),
    ("stream_options without stream", COMPLETIONS, completion(stream_options={"include_usage": True}), 400,
     "stream_options"),
    ("negative prompt_logprobs", COMPLETIONS, completion(prompt_logprobs=-1), 400, "prompt_logprobs"),
    ("unknown named tool", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}],
                                      tool_choice={"type": "function", "function": {"name": "g"}}), 400, "tool_choice"),
    ("bad template kwargs", CHAT, chat(chat_template_kwargs={"tokenize": True}), 400, "messages"),
]


@pytest.mark.parametrize("case, path, body, status, param", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_an_openai_error(server, case, path, body, status, param):
    reply = server.request("POST", path, body)
    assert reply.status == status, reply.body
    error = error_of(reply)
    if param is not None:
        assert error["param"] == param, error


def test_unknown_path_and_wrong_method_get_error_objects(server):
    assert server.request("GET", "/v1/nothing-here").status == 404
    assert error_of(server.request("GET", "/v1/nothing-here"))["code"] == "not_found"
    reply = server.request("GET", COMPLETIONS)
    assert reply.status == 405
    error_of(reply)


def test_200_bad_requests_among_good_ones_leave_the_server_healthy(server, offline):
    prompt = "Numbers: 1 2 3"
    expected = offline.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0].text
    good = ("good", COMPLETIONS, completion(prompt=prompt, max_tokens=8, temperature=0, ignore_eos=True), 200, None)
    bad = itertools.islice(itertools.cycle(BAD_REQUESTS), 200)
    mixed = [request for i, b in enumerate(bad) for request in ([b, good] if i % 10 == 9 else [b])]

    def send(request):
        _, path, body, _, _ = request
        return request, server.request("POST", path, body)

    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(send, mixed))

    assert len(replies) == 220
    for (case, _, _, status, _), reply in replies:
        assert reply.status == status, (case, reply.body)
        if case == "good":
            assert reply.json()["choices"][0]["text"] == expected
        else:
            error_of(reply)
    assert server.request("GET", "/health").status == 200
    after = server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                               extra_body={"ignore_eos": True})
    assert after.choices[0].text == expected
