"""DeepSeek V4's chat format (spec: chat_tools_structured.md section 1) and its reasoning parser."""
from __future__ import annotations

import pytest

from models.deepseek_v4.chat import parse_reasoning, render_prompt
from runtime import LLM, SamplingParams
from runtime.tokenizer import Tokenizer

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


def test_tool_definitions_are_refused_rather_than_approximated():
    with pytest.raises(ValueError, match="tool definitions"):
        render_prompt([{"role": "user", "content": "hi"}], {"tools": [{"type": "function"}]})


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
