"""Qwen3's reasoning parser: `<think>...</think>` on token ids, prefix-monotonic so streams can send deltas."""
from __future__ import annotations

import pytest

from models.qwen3.chat import parse_reasoning
from runtime.tokenizer import Tokenizer

REASONING, CONTENT = "Let me count: one, two.\n", "Three."


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3):
    return Tokenizer(str(tiny_qwen3))


def ids(tokenizer, *pieces: str) -> list[int]:
    """Token ids of pieces of text, the think tags as their single special tokens."""
    out = []
    for piece in pieces:
        if piece in ("<think>", "</think>"):
            out.append(tokenizer.hf.convert_tokens_to_ids(piece))
        else:
            out += tokenizer.encode(piece)
    return out


def test_think_tags_are_special_tokens_that_a_text_decode_drops(tokenizer):
    """Why the parser reads ids: the decoded text alone no longer shows where reasoning ends."""
    output = ids(tokenizer, "<think>", "\n" + REASONING, "</think>", "\n\n" + CONTENT)
    assert "think>" not in tokenizer.decode(output)


def test_thinking_output_splits_into_reasoning_and_content(tokenizer):
    output = ids(tokenizer, "<think>", "\n" + REASONING, "</think>", "\n\n" + CONTENT)
    assert parse_reasoning(tokenizer, output) == (REASONING, CONTENT)


def test_unfinished_thought_is_all_reasoning(tokenizer):
    output = ids(tokenizer, "<think>", "\n" + REASONING)
    assert parse_reasoning(tokenizer, output) == (REASONING, "")


def test_output_without_think_is_all_content(tokenizer):
    """With enable_thinking=False the template closes an empty think block in the prompt."""
    output = ids(tokenizer, CONTENT)
    assert parse_reasoning(tokenizer, output) == (None, CONTENT)


def test_every_prefix_parses_to_prefixes_of_the_whole(tokenizer):
    output = ids(tokenizer, "<think>", "\n" + REASONING, "</think>", "\n\n" + CONTENT)
    reasoning, content = parse_reasoning(tokenizer, output)
    for end in range(len(output) + 1):
        partial_reasoning, partial_content = parse_reasoning(tokenizer, output[:end])
        assert reasoning.startswith(partial_reasoning or "")
        assert content.startswith(partial_content)
