"""Qwen3 tool calling through the server with the official openai client, streaming and not: tool_choice
required / named are enforced by the grammar, so even the tiny random model returns valid calls."""
from __future__ import annotations

import json

import pytest

from tests.runtime.test_structured_outputs import validate
from tests.server.server_process import MODEL, error_of

@pytest.fixture(scope="module")
def server(tools_server):
    return tools_server


@pytest.fixture(scope="module")
def client(tools_server):
    return tools_server.client()


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"]}
CLOCK = {"type": "object", "properties": {"zone": {"enum": ["utc", "local"]}}, "required": ["zone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}}]
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}


def ask(client, **options):
    return client.chat.completions.create(**{"model": MODEL, "messages": MESSAGES, "tools": TOOLS,
                                             "max_tokens": 200, "temperature": 1.0, **options})


def test_named_tool_choice_returns_a_valid_call(client):
    for seed in range(2):
        reply = ask(client, seed=seed, n=2, tool_choice={"type": "function", "function": {"name": "get_weather"}})
        ids = []
        for choice in reply.choices:
            assert choice.finish_reason == "tool_calls"
            assert choice.message.content is None
            (call,) = choice.message.tool_calls
            assert call.type == "function" and call.function.name == "get_weather"
            validate(json.loads(call.function.arguments), WEATHER)
            ids.append(call.id)
        assert len(set(ids)) == len(ids)


def test_required_returns_a_call_to_one_of_the_tools(client):
    names = set()
    for seed in range(3):
        reply = ask(client, seed=seed, tool_choice="required", parallel_tool_calls=False)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        names.add(call.function.name)
    assert names <= set(SCHEMAS)


def streamed_calls(stream) -> tuple[list[tuple[str, str, str]], str | None, str]:
    """(id, name, arguments) per call index, the finish reason and the content, from stream chunks; a
    call's first chunk must carry its id, type and name."""
    calls, finish, content = {}, None, ""
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for piece in choice.delta.tool_calls or []:
                if piece.index not in calls:
                    assert piece.id and piece.type == "function" and piece.function.name
                    calls[piece.index] = [piece.id, piece.function.name, ""]
                calls[piece.index][2] += piece.function.arguments or ""
    return [tuple(calls[i]) for i in sorted(calls)], finish, content


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_streamed_calls_match_the_whole_response(client, tool_choice):
    for seed in range(2):
        whole = ask(client, seed=seed, tool_choice=tool_choice).choices[0]
        calls, finish, content = streamed_calls(ask(client, seed=seed, tool_choice=tool_choice, stream=True))
        assert finish == whole.finish_reason == "tool_calls" and content == ""
        assert [(name, arguments) for _, name, arguments in calls] == \
            [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
        assert len({call_id for call_id, _, _ in calls}) == len(calls)
        for _, name, arguments in calls:
            validate(json.loads(arguments), SCHEMAS[name])


def test_none_returns_no_calls_and_a_tool_result_conversation_is_accepted(client):
    reply = ask(client, seed=1, tool_choice="none", max_tokens=8)
    assert not reply.choices[0].message.tool_calls and reply.choices[0].finish_reason in ("stop", "length")
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"}]
    reply = ask(client, seed=2, messages=history, max_tokens=8)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("fields, param", [
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function"}]}, "tools"),
])
def test_bad_tool_requests_get_a_400(server, fields, param):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "tools": TOOLS, **fields}
    reply = server.request("POST", "/v1/chat/completions", json.dumps(body))
    assert reply.status == 400, reply.body
    assert error_of(reply)["param"] == param
