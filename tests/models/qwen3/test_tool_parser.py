"""Qwen3's `<tool_call>` parser on answers as the model writes them (the format of its chat template)."""
from __future__ import annotations

import json

from models.qwen3.chat import parse_tool_calls


def call(name: str, arguments) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def test_two_parallel_calls_and_content_before_them():
    text = "Let me check.\n" + call("get_weather", {"city": "Paris", "days": 2}) + "\n" + call("get_time", {})
    content, calls = parse_tool_calls(text)
    assert content == "Let me check.\n"
    assert [(n, json.loads(a)) for n, a in calls] == [("get_weather", {"city": "Paris", "days": 2}),
                                                      ("get_time", {})]


def test_no_call_is_plain_content_and_only_calls_have_no_content():
    assert parse_tool_calls("Sunny.") == ("Sunny.", [])
    content, calls = parse_tool_calls(call("f", {"x": [1, "é"]}))
    assert content is None and calls == [("f", '{"x": [1, "é"]}')]


def test_unclosed_last_call_and_string_arguments():
    content, calls = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}')
    assert content is None and calls == [("f", '{"a": 1}')]


def test_malformed_call_leaves_the_answer_as_content():
    text = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": }\n</tool_call>"
    assert parse_tool_calls(text) == (text, [])
    assert parse_tool_calls("<tool_call>[1, 2]</tool_call>") == ("<tool_call>[1, 2]</tool_call>", [])
