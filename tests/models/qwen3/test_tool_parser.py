"""Qwen3's tool calling: the tiny template's rendering of tools, calls and results, and the parser on whole
outputs and streams cut at every position, with reasoning."""
from __future__ import annotations

import pytest

from models.qwen3.chat import parse_output
from runtime.tokenizer import Tokenizer
from tests.runtime.forced_tools import check_forced_tool_calls
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


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                                  "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "Look it up.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "Sunny.", "reasoning_content": "Easy."},
        {"role": "user", "content": "Thanks"}]
# The checkpoint template's rules (shared/specs/chat_tools_structured.md section 2): tools in the system turn, the
# call as JSON in <tool_call> tags, the result as a user turn, reasoning dropped before the last real query.
RENDERED = (
    '<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'
    'You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{"type": "function", '
    '"function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": '
    '{"city": {"type": "string"}}}}}\n</tools>\n\nFor each function call, return a json object with function name and '
    'arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    '<args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n'
    '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    '<|im_end|>\n<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n'
    'Sunny.<|im_end|>\n<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n')


def test_a_conversation_with_tools_renders_like_the_checkpoint_template(tiny_qwen3):
    hf = Tokenizer(str(tiny_qwen3)).hf
    assert hf.apply_chat_template(CHAT, tools=[WEATHER_TOOL], tokenize=False, add_generation_prompt=True) == RENDERED
    # after the last real query, the turns keep their reasoning; two results share one user turn
    tail = CHAT[:3] + [CHAT[3], {**CHAT[3], "content": "windy"}]
    rendered = hf.apply_chat_template(tail, tools=[WEATHER_TOOL], tokenize=False, add_generation_prompt=True)
    assert rendered.endswith('<|im_start|>assistant\n<think>\nLook it up.\n</think>\n\n<tool_call>\n{"name": '
                             '"get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n<|im_start|>'
                             'user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nwindy\n'
                             '</tool_response><|im_end|>\n<|im_start|>assistant\n')


def test_forced_tool_choice_returns_valid_calls(tiny_qwen3):
    check_forced_tool_calls(tiny_qwen3, "qwen3")
