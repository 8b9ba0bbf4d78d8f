"""Qwen3's tool-call parser: whole outputs and streams cut at every position, with reasoning."""
from __future__ import annotations

import pytest

from models.qwen3.chat import parse_output
from tests.runtime.tool_stream import CharTokenizer, final_message, streamed_message

TOKENIZER = CharTokenizer(("<think>", "</think>", "<|im_end|>"))
TWO_CALLS = ('<think>\nweather twice\n</think>\n\nLet me check.\n<tool_call>\n{"name": "get_weather", '
             '"arguments": {"city": "Paris \\"FR\\" \\u00e9", "days": 2}}\n</tool_call>\n<tool_call>\n'
             '{"name":"get_time","arguments":{"zone":"utc","ok":true,"n":[1.5,null]}}\n</tool_call>')


def test_two_parallel_calls_after_reasoning():
    message = final_message(parse_output, TOKENIZER, TOKENIZER.encode(TWO_CALLS))
    assert message == {"reasoning": "weather twice\n", "content": "Let me check.", "finish_reason": "tool_calls",
                       "calls": [("get_weather", '{"city": "Paris \\"FR\\" é", "days": 2}'),
                                 ("get_time", '{"zone": "utc", "ok": true, "n": [1.5, null]}')]}


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_streams_cut_anywhere_add_up_to_the_whole(step):
    ids = TOKENIZER.encode(TWO_CALLS)
    assert streamed_message(parse_output, TOKENIZER, ids, step) == final_message(parse_output, TOKENIZER, ids)


def test_parallel_tool_calls_false_keeps_the_first_call():
    ids = TOKENIZER.encode(TWO_CALLS)
    message = streamed_message(parse_output, TOKENIZER, ids, 1, parallel=False)
    assert [name for name, _ in message["calls"]] == ["get_weather"]
    assert message == final_message(parse_output, TOKENIZER, ids, parallel=False)


def test_text_without_calls_is_content_and_a_lone_marker_prefix_is_released_at_the_end():
    for text in ("Hello <tool", "<think>\nhm", "No </think> here"):
        ids = TOKENIZER.encode(text)
        message = final_message(parse_output, TOKENIZER, ids)
        assert message["calls"] == [] and message["finish_reason"] == "stop"
        assert streamed_message(parse_output, TOKENIZER, ids) == message
    assert final_message(parse_output, TOKENIZER, TOKENIZER.encode("Hello <tool"))["content"] == "Hello <tool"


def test_a_malformed_call_leaves_the_answer_as_content():
    text = 'Hi <tool_call>\n{"name": "f", "arguments": {"a": }}\n</tool_call>'
    message = final_message(parse_output, TOKENIZER, TOKENIZER.encode(text))
    assert message["calls"] == [] and message["content"] == text
