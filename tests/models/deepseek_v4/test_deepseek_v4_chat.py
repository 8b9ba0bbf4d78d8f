"""DeepSeek V4's chat format (spec: chat_tools_structured.md section 1) and its reasoning parser."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.deepseek_v4.chat import SPECIAL_TOKENS, parse_output, parse_reasoning, render_prompt
from runtime import LLM, SamplingParams
from runtime.tokenizer import Tokenizer
from tests.runtime.forced_tools import check_forced_tool_calls
from tests.runtime.tool_stream import CharTokenizer, final_message, streamed_message

FIXTURES = Path(__file__).parent / "fixtures"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def test_chat_mode_closes_the_think_block_in_the_prompt():
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert render_prompt(messages, {"thinking": False, "add_generation_prompt": False}) == \
        f"{BOS}<｜User｜>Q<｜Assistant｜></think>A{EOS}"


def test_thinking_mode_opens_it_and_drops_earlier_reasoning():
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1", "reasoning_content": "hmm"},
                {"role": "user", "content": "Q2"}]
    assert render_prompt(messages, {}) == \
        f"{BOS}Be brief.<｜User｜>Q1<｜Assistant｜></think>A1{EOS}<｜User｜>Q2<｜Assistant｜><think>"


def test_tool_calls_and_results_render_as_dsml():
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "reasoning_content": "look it up",
                 "tool_calls": [{"function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'}}]},
                {"role": "tool", "content": '{"t": 3}'}]
    assert render_prompt(messages, {}) == (
        f"{BOS}<｜User｜>Weather?<｜Assistant｜></think>\n\n<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="get_weather">\n<｜DSML｜parameter name="city" string="true">Oslo</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
        f'{EOS}<｜User｜><tool_result>{{"t": 3}}</tool_result><｜Assistant｜><think>')


def test_a_conversation_with_tools_renders_like_deepseeks_encoder():
    """Fixture 1 of DeepSeek's encoding tests (thinking, effort low): tools, a call, its result, an answer."""
    chat = json.loads((FIXTURES / "tools_input.json").read_text())
    assert render_prompt(chat["messages"], {"tools": chat["tools"], "add_generation_prompt": False}) == \
        (FIXTURES / "tools_output.txt").read_text()


def test_tool_results_follow_the_order_of_the_calls():
    calls = [{"id": i, "function": {"name": n, "arguments": "{}"}} for i, n in (("a", "f"), ("b", "g"))]
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "", "tool_calls": calls},
                {"role": "tool", "tool_call_id": "b", "content": "B"}, {"role": "tool", "tool_call_id": "a", "content": "A"}]
    assert render_prompt(messages, {}).endswith(
        f"{EOS}<｜User｜><tool_result>A</tool_result>\n\n<tool_result>B</tool_result><｜Assistant｜><think>")


TOOL_TEXT = ('Check both.</think>Sure.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
             '<｜DSML｜parameter name="city" string="true">Oslo "N"</｜DSML｜parameter>\n'
             '<｜DSML｜parameter name="opts" string="false">{"a": [1, 2]}</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
             '<｜DSML｜invoke name="get_time">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>' + EOS)
CHARS = CharTokenizer(SPECIAL_TOKENS)


def test_two_parallel_dsml_calls_parse():
    message = final_message(parse_output, CHARS, CHARS.encode(TOOL_TEXT))
    assert message == {"reasoning": "Check both.", "content": "Sure.", "finish_reason": "tool_calls",
                       "calls": [("get_weather", '{"city": "Oslo \\"N\\"", "opts": {"a": [1, 2]}}'),
                                 ("get_time", "{}")]}


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_dsml_streams_cut_anywhere_add_up_to_the_whole(step):
    ids = CHARS.encode(TOOL_TEXT)
    assert streamed_message(parse_output, CHARS, ids, step) == final_message(parse_output, CHARS, ids)


def test_a_block_without_think_end_still_ends_the_reasoning():
    ids = CHARS.encode(TOOL_TEXT.replace("</think>Sure.", ""))
    message = streamed_message(parse_output, CHARS, ids)
    assert message["reasoning"] == "Check both." and message["content"] == ""
    assert [name for name, _ in message["calls"]] == ["get_weather", "get_time"]


def test_reasoning_parser_splits_at_think_end_and_is_prefix_monotonic(tiny_deepseek_v4):
    tokenizer = Tokenizer(str(tiny_deepseek_v4))
    ids = tokenizer.hf.encode("let me see</think>The answer", add_special_tokens=False)
    reasoning, content = parse_reasoning(tokenizer, ids)
    assert (reasoning, content) == ("let me see", "The answer")
    previous = ("", "")
    for n in range(1, len(ids) + 1):
        current = parse_reasoning(tokenizer, ids[:n])
        assert current[0].startswith(previous[0]) and current[1].startswith(previous[1])
        previous = current


def test_llm_chat_answers_on_the_tiny_model(tiny_deepseek_v4):
    llm = LLM(str(tiny_deepseek_v4), device="cpu", dtype="float32", block_size=8)
    outputs = llm.chat([[{"role": "user", "content": "Hello there"}]],
                       SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert len(outputs[0].outputs[0].token_ids) == 6


def test_forced_tool_choice_returns_valid_calls(tiny_deepseek_v4):
    check_forced_tool_calls(tiny_deepseek_v4, "deepseek_v4")
