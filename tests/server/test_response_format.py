"""Structured outputs through the server with the official openai client: response_format json_schema and
json_object on chat, vLLM's structured_outputs extra on both endpoints, streaming and not; bad constraints
get a 400 that says what is wrong."""
from __future__ import annotations

import json
import re

import pytest

from tests.runtime.test_structured_outputs import SCHEMA, validate
from tests.server.server_process import MODEL, error_of

MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
# Qwen3 thinks first by default, and the constraint holds only after `</think>`, which a random model never
# writes: these requests turn thinking off, so the answer (and the grammar) starts at once
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def streamed_text(stream) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in stream:
        for choice in chunk.choices:
            text += (getattr(choice, "delta", None) and choice.delta.content) or getattr(choice, "text", "") or ""
            finish = choice.finish_reason or finish
    return text, finish


@pytest.mark.parametrize("stream", [False, True])
def test_chat_json_schema_outputs_validate(client, stream):
    for seed in range(4):
        reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=120, temperature=1.0,
                                               seed=seed, response_format=JSON_SCHEMA, stream=stream,
                                               extra_body=NO_THINKING)
        if stream:
            text, finish = streamed_text(reply)
        else:
            text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
        assert finish == "stop", text
        validate(json.loads(text), SCHEMA)


def test_with_thinking_on_the_reasoning_is_free_and_the_grammar_waits_for_its_end(client):
    """The first token may open a think block, besides what the grammar allows; a random model never closes it."""
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=1.0, seed=0,
                                           response_format=JSON_SCHEMA, n=8)
    thought = [c for c in reply.choices if c.message.reasoning_content]
    assert thought and all(not c.message.content for c in thought)
    assert all(c.message.content.startswith('{"name": "') for c in reply.choices if c not in thought)


def test_chat_json_object(client):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=60, temperature=1.0, seed=1,
                                           response_format={"type": "json_object"}, extra_body=NO_THINKING)
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_structured_outputs_extra_on_both_endpoints(client):
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=1.0, seed=2,
                                          extra_body={"structured_outputs": {"choice": ["red", "green"]}, **NO_THINKING})
    assert chat.choices[0].message.content in ("red", "green")
    completion = client.completions.create(model=MODEL, prompt="Code:", max_tokens=20, temperature=1.0, seed=3,
                                           extra_body={"structured_outputs": {"regex": r"[A-Z]{2}-\d{3}"}})
    assert re.fullmatch(r"[A-Z]{2}-\d{3}", completion.choices[0].text)
    stream = client.completions.create(model=MODEL, prompt="Data:", max_tokens=120, temperature=1.0, seed=4,
                                       stream=True, extra_body={"structured_outputs": {"json": SCHEMA}})
    text, finish = streamed_text(stream)
    assert finish == "stop"
    validate(json.loads(text), SCHEMA)


BAD = [
    ("schema with an unknown type", "/v1/chat/completions",
     {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nosuchtype"}}}},
     "invalid JSON schema"),
    ("json_schema without a schema", "/v1/chat/completions",
     {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema.schema"),
    ("unknown response_format type", "/v1/chat/completions", {"response_format": {"type": "yaml"}}, "not supported"),
    ("invalid regex", "/v1/completions", {"structured_outputs": {"regex": "(unclosed"}}, "invalid regex"),
    ("two constraints", "/v1/completions", {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one"),
    ("unsupported kind", "/v1/completions", {"structured_outputs": {"structural_tag": "{}"}}, "not supported"),
    ("both fields", "/v1/chat/completions",
     {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "either"),
]


@pytest.mark.parametrize("case, path, fields, message", BAD, ids=[c[0] for c in BAD])
def test_bad_constraints_get_a_400(server, case, path, fields, message):
    body = {"model": MODEL, "max_tokens": 4, **fields,
            **({"messages": MESSAGES} if "chat" in path else {"prompt": "Hi"})}
    reply = server.request("POST", path, json.dumps(body))
    assert reply.status == 400, reply.body
    assert message in error_of(reply)["message"]
