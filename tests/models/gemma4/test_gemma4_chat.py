"""Gemma 4's chat surface on the tiny tokenizer: the turn format, thinking, stop tokens, the thought parser."""
from __future__ import annotations

import subprocess
import sys

import pytest

from models.gemma4.chat import SPECIAL_TOKENS, parse_output, parse_reasoning
from runtime import LLM
from runtime.tokenizer import Tokenizer
from tests.runtime.forced_tools import check_forced_tool_calls
from tests.runtime.tool_stream import CharTokenizer, final_message, streamed_message


@pytest.fixture(scope="module")
def tokenizer(tiny_gemma4):
    return Tokenizer(str(tiny_gemma4))


def render(tokenizer, messages, **options) -> str:
    return tokenizer.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **options)


def test_turns_use_the_model_role_and_end_with_the_generation_prompt(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": [{"type": "text", "text": "Bye"}]}]
    assert render(tokenizer, messages) == ("<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n"
                                           "<|turn>model\nHello.<turn|>\n<|turn>user\nBye<turn|>\n<|turn>model\n")


def test_thinking_puts_the_think_token_in_the_system_turn(tokenizer):
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render(tokenizer, with_system, enable_thinking=True).startswith("<bos><|turn>system\n<|think|>Be brief.")
    assert render(tokenizer, with_system[1:], enable_thinking=True) == \
        "<bos><|turn>system\n<|think|><turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"


def test_earlier_model_turns_are_replayed_without_their_thoughts(tokenizer):
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "<|channel>thought\nsay hello<channel|>Hello."},
                {"role": "user", "content": "Again"}]
    assert "<|turn>model\nHello.<turn|>" in render(tokenizer, messages)


def test_an_image_part_is_refused_with_a_message(tokenizer):
    messages = [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}]
    with pytest.raises(Exception, match="text decoder only"):
        render(tokenizer, messages)


def test_generation_stops_on_eos_end_of_turn_and_tool_response(tiny_gemma4, tokenizer):
    engine = LLM(str(tiny_gemma4), device="cpu", dtype="float32", num_gpu_blocks=16).engine
    stops = {tokenizer.hf.convert_ids_to_tokens(i) for i in engine.eos_token_ids}
    assert stops == {"<eos>", "<turn|>", "<|tool_response>"}


def test_thought_parser_splits_reasoning_from_content_and_is_prefix_monotonic(tokenizer):
    ids = tokenizer.hf.encode("<|channel>thought\nsay hi<channel|>Hello there.", add_special_tokens=False)
    assert parse_reasoning(tokenizer, ids) == ("say hi", "Hello there.")
    previous_reasoning, previous_content = "", ""
    for n in range(1, len(ids) + 1):
        reasoning, content = parse_reasoning(tokenizer, ids[:n])
        assert reasoning.startswith(previous_reasoning) and content.startswith(previous_content)
        previous_reasoning, previous_content = reasoning, content
    plain = tokenizer.hf.encode("Hello there.", add_special_tokens=False)
    assert parse_reasoning(tokenizer, plain) == (None, "Hello there.")


def test_run_model_serves_the_tiny_checkpoint_from_the_command_line():
    result = subprocess.run([sys.executable, "-m", "runtime.cli", "gemma4", "--model", "tiny", "--prompt", "Hi",
                             "--chat", "--max-tokens", "5", "--ignore-eos"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "[length, 5 tokens]" in result.stdout
    assert "window 8" in result.stderr


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "description": "City"}, "days": {"type": "integer"}},
    "required": ["city"]}}}]
# shared/specs/chat_tools_structured.md section 3: the checkpoint's template rendered by transformers, up to the
# generation prompt (the tiny template opens the model turn without the empty thought block some sizes add)
WITH_TOOLS = ('<bos><|turn>system\nBe brief.<|tool>declaration:get_weather{description:<|"|>Get weather<|"|>,'
              'parameters:{properties:{city:{description:<|"|>City<|"|>,type:<|"|>STRING<|"|>},days:{type:<|"|>'
              'INTEGER<|"|>}},required:[<|"|>city<|"|>],type:<|"|>OBJECT<|"|>}}<tool|><turn|>\n<|turn>user\n'
              'Weather in Paris?<turn|>\n<|turn>model\n<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2}'
              '<tool_call|><|tool_response>response:get_weather{value:<|"|>sunny, 21C<|"|>}<tool_response|>\n'
              'Sunny, 21C.<turn|>\n<|turn>user\nThanks<turn|>\n<|turn>model\n')


def test_tools_calls_and_results_render_like_the_checkpoint_template(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
                    "name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21C"},
                {"role": "assistant", "content": "Sunny, 21C."}, {"role": "user", "content": "Thanks"}]
    assert render(tokenizer, messages, tools=TOOLS) == WITH_TOOLS
    # after the last result the model continues its own turn
    assert render(tokenizer, messages[:4], tools=TOOLS).endswith("21C<|\"|>}<tool_response|>")


CALLS = ('<|channel>thought\nx<channel|><|tool_call>call:a{s:<|"|>x, "y"<|"|>,n:3.5,b:true,o:{k:[1,<|"|>z<|"|>]}}'
         '<tool_call|><|tool_call>call:b{}<tool_call|><|tool_response>')
CHARS = CharTokenizer(SPECIAL_TOKENS)


def test_two_parallel_calls_in_gemma_notation_parse_to_json():
    message = final_message(parse_output, CHARS, CHARS.encode(CALLS))
    assert message == {"reasoning": "x", "content": "", "finish_reason": "tool_calls", "calls": [
        ("a", '{"s": "x, \\"y\\"", "n": 3.5, "b": true, "o": {"k": [1, "z"]}}'), ("b", "{}")]}


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_gemma_streams_cut_anywhere_add_up_to_the_whole(step):
    ids = CHARS.encode(CALLS)
    assert streamed_message(parse_output, CHARS, ids, step) == final_message(parse_output, CHARS, ids)


def test_a_call_in_an_unclosed_thought_ends_it_and_json_arguments_are_accepted():
    ids = CHARS.encode('<|channel>thought\nhm<|tool_call>call:f{"city": "Oslo", days:2}<tool_call|>')
    message = streamed_message(parse_output, CHARS, ids)
    assert message["reasoning"] == "hm" and message["calls"] == [("f", '{"city": "Oslo", "days": 2}')]


def test_forced_tool_choice_returns_valid_calls(tiny_gemma4):
    check_forced_tool_calls(tiny_gemma4, "gemma4")
