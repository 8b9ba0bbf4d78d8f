"""What a flaky or hostile client cannot do: get a 5xx from a malformed body, freeze the event loop with a
huge prompt or a template, or grow the server's memory with a stream it never reads. Also the small
endpoints around the API (/version, /ping, /tokenize, /detokenize, /v1/models/{id})."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from runtime import SamplingParams
from runtime.engine import Engine
from runtime.config import EngineConfig
from runtime.serve.metrics import ServerMetrics
from runtime.serve.engine_client import EngineClient
from tests.server.server_process import MAX_MODEL_LEN, MODEL, error_of

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
LIMIT = (2 << 20) + 128 * MAX_MODEL_LEN          # the default body limit at this context length


def completion(**fields) -> str:
    return json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 4, **fields})


def chat(**fields) -> str:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **fields})


LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"

# (case, path, raw body, headers, expected status, expected `param` or None when it need not name one)
BAD = [
    ("lone surrogate prompt", COMPLETIONS, completion(prompt="\ud800"), {}, 400, None),
    ("lone surrogate in a prompt list", COMPLETIONS, completion(prompt=["fine", "a\udfffb"]), {}, 400, None),
    ("lone surrogate in a message", CHAT, chat(messages=[{"role": "user", "content": "\ud83d"}]), {}, 400, None),
    ("UTF-8-encoded surrogate", COMPLETIONS, completion().replace("Hello", "\ud800").encode("utf-8", "surrogatepass"),
     {}, 400, None),
    ("Infinity", COMPLETIONS, completion()[:-1] + ', "top_p": Infinity}', {}, 400, "top_p"),
    ("deeply nested JSON", COMPLETIONS, '{"prompt": ' + "[" * 100000 + "]" * 100000 + "}", {}, 400, None),
    ("deeply nested extra field", CHAT, chat()[:-1] + ', "chat_template_kwargs": {"x": ' + "[" * 5000 + "]" * 5000
     + "}}", {}, 400, None),
    ("form content type", COMPLETIONS, completion(), {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     None),
    ("text content type", CHAT, chat(), {"Content-Type": "text/plain"}, 415, None),
    ("oversized body", COMPLETIONS, completion(prompt="a" * LIMIT), {}, 413, None),
    ("own chat template in kwargs", CHAT, chat(chat_template_kwargs={"chat_template": LOOPS}), {}, 400,
     "chat_template_kwargs"),
    ("own chat template", CHAT, chat(chat_template=LOOPS), {}, 400, "chat_template"),
    ("detokenize out of vocabulary", "/detokenize", json.dumps({"tokens": [1, 10**9]}), {}, 400, "tokens"),
    ("detokenize negative id", "/detokenize", json.dumps({"tokens": [-1]}), {}, 400, "tokens"),
    ("tokenize nothing", "/tokenize", json.dumps({}), {}, 400, None),
]


@pytest.mark.parametrize("case, path, body, headers, status, param", BAD, ids=[c[0] for c in BAD])
def test_malformed_body_gets_a_4xx(server, case, path, body, headers, status, param):
    reply = server.request("POST", path, body, headers)
    assert reply.status == status, reply.body[:300]
    error = error_of(reply)
    if param is not None:
        assert error["param"] == param, error


def test_health_answers_within_a_second_while_huge_prompts_arrive(server):
    prompt = "hello world, this is text 123. " * ((LIMIT - 200) // 31)     # just under the body limit
    replies = []
    senders = [threading.Thread(target=lambda: replies.append(server.request("POST", COMPLETIONS,
                                                                            completion(prompt=prompt))))
               for _ in range(2)]
    for sender in senders:
        sender.start()
    time.sleep(0.5)                                  # the bodies are in, their tokenization has begun
    slowest = 0.0
    while any(sender.is_alive() for sender in senders):
        start = time.monotonic()
        assert server.request("GET", "/health").status == 200
        slowest = max(slowest, time.monotonic() - start)
        time.sleep(0.1)
    assert [r.status for r in replies] == [400, 400]          # far more tokens than the context holds
    assert "max_model_len" in error_of(replies[0])["message"]
    assert slowest < 1.0


def test_tiny_temperatures_answer_like_greedy(client):
    request = dict(model=MODEL, prompt="Numbers: 1 2 3", max_tokens=8, extra_body={"ignore_eos": True})
    greedy = client.completions.create(temperature=0, **request).choices[0].text
    for temperature in (1e-40, 1e-9):
        assert client.completions.create(temperature=temperature, seed=3, **request).choices[0].text == greedy


def test_version_ping_and_model_card(server):
    assert server.request("GET", "/version").json()["version"]
    assert server.request("GET", "/ping").status == 200
    card = server.request("GET", f"/v1/models/{MODEL}")
    assert card.status == 200 and card.json()["id"] == MODEL
    missing = server.request("GET", "/v1/models/gpt-4")
    assert missing.status == 404 and error_of(missing)["code"] == "model_not_found"


def test_tokenize_and_detokenize_round_trip(server, offline):
    text = "Hello, café"
    tokens = server.request("POST", "/tokenize", {"model": MODEL, "prompt": text}).json()
    assert tokens["tokens"] == offline.tokenizer.encode(text)
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == MAX_MODEL_LEN
    assert server.request("POST", "/detokenize", {"tokens": tokens["tokens"]}).json()["prompt"] == text
    messages = [{"role": "user", "content": "Hi"}]
    rendered = server.request("POST", "/tokenize", {"messages": messages}).json()["tokens"]
    assert rendered == offline.tokenizer.apply_chat_template(messages)


def test_an_unread_stream_holds_one_output_however_long_it_runs(tiny_qwen3):
    """The engine publishes a cumulative output every step; a stream nobody reads keeps only the newest."""
    engine = Engine(EngineConfig(model=str(tiny_qwen3), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN))
    client = EngineClient(engine, ServerMetrics("unread"), stats_interval=0)
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True, logprobs=5)

    async def unread_stream():
        client.start(asyncio.get_running_loop())
        mailbox = await client.submit(["r"], [[5, 6, 7]], params, stream=True, arrival_time=time.monotonic())
        while client.engine.has_unfinished():
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)                     # the last delivery lands on this loop
        unread = mailbox.num_unread()
        newest = await mailbox.take()
        client.stop()
        return unread, newest

    unread, newest = asyncio.run(unread_stream())
    assert unread == 1
    assert newest["r"].finished and len(newest["r"].token_ids) == 200
