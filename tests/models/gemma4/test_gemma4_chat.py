"""Gemma 4's chat surface on the tiny tokenizer: the turn format, thinking, stop tokens, the thought parser."""
from __future__ import annotations

import subprocess
import sys

import pytest

from models.gemma4.chat import parse_reasoning
from runtime import LLM
from runtime.tokenizer import Tokenizer


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
