"""The tokenizer wrapper on a tiny byte-level BPE: streamed text equals the full decode, characters split across
tokens are held back until complete, and chat prompts end with the generation prompt."""
from __future__ import annotations

import pytest

from runtime.registry import get_package
from runtime.tiny import make_tiny
from runtime.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "東京 😀 café",
    "Hello, world! How are you today? I am fine , thank you .",
    "Привет 👋🏽 naïve Straße مرحبا 🤖🤖",
    "def f(x):\n    return x  # 3.14159\n",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    path = make_tiny(get_package("qwen3"), tmp_path_factory.mktemp("tokenizer") / "qwen3")
    return Tokenizer(str(path))


def stream(tokenizer: Tokenizer, prompt_ids: list[int], output_ids: list[int]) -> list[str]:
    """Feed the output one token at a time, as the engine does, and collect what each step releases."""
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    pieces = []
    for count in range(1, len(output_ids) + 1):
        pieces.append(detokenizer.step(prompt_ids + output_ids[:count], final=count == len(output_ids)))
    return pieces


def test_the_tiny_tokenizer_splits_multibyte_characters_across_tokens(tokenizer):
    # The streaming tests below are only meaningful if some single token is a fragment of a character.
    ids = tokenizer.encode(TEXTS[0])
    assert any("\ufffd" in tokenizer.decode([token]) for token in ids)


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_concatenate_to_the_full_decode(tokenizer, text):
    prompt_ids = tokenizer.encode("Unicode: ")
    output_ids = tokenizer.encode(text)
    pieces = stream(tokenizer, prompt_ids, output_ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_stream_with_an_empty_prompt(tokenizer):
    output_ids = tokenizer.encode(TEXTS[0])
    assert "".join(stream(tokenizer, [], output_ids)) == TEXTS[0]


def test_pieces_are_held_back_until_a_character_is_complete(tokenizer):
    output_ids = tokenizer.encode("😀")
    assert len(output_ids) > 1, "the emoji should take several byte tokens"
    pieces = stream(tokenizer, tokenizer.encode("a"), output_ids)
    assert pieces == [""] * (len(output_ids) - 1) + ["😀"]


def test_final_step_releases_an_incomplete_character(tokenizer):
    output_ids = tokenizer.encode("ok 😀")
    truncated = output_ids[:-1]                       # the emoji's last byte never arrives
    pieces = stream(tokenizer, [], truncated)
    assert "".join(pieces) == tokenizer.decode(truncated)
    assert "".join(pieces).startswith("ok ") and pieces[-1].endswith("\ufffd")


def test_special_tokens_are_skipped_in_the_stream(tokenizer):
    im_end = tokenizer.hf.convert_tokens_to_ids("<|im_end|>")
    output_ids = tokenizer.encode("café") + [im_end]
    assert "".join(stream(tokenizer, [], output_ids)) == "café"


def test_chat_template_ends_with_the_generation_prompt(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "東京はどこ?"}]
    ids = tokenizer.apply_chat_template(messages)
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n東京はどこ?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert text.endswith("<|im_start|>assistant\n")
    # The marker is one special token, not its characters spelled out by the BPE.
    tail = tokenizer.encode("assistant\n")
    assert ids[-len(tail) - 1:] == [tokenizer.hf.convert_tokens_to_ids("<|im_start|>")] + tail


def test_chat_template_without_generation_prompt(tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>\n"


@pytest.mark.parametrize("text", TEXTS[:1] + TEXTS[2:3])
@pytest.mark.parametrize("split", [1, 2, 3])
def test_a_prompt_that_ends_mid_character_streams_the_full_decode_of_the_output(tokenizer, text, split):
    """The prompt holds the first bytes of a character and the output the rest: the streamed pieces must add
    up to decode(output) byte for byte, as a non-streamed answer does (with U+FFFD for the orphaned bytes)."""
    ids = tokenizer.encode(text)
    cuts = [i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd")]
    assert len(cuts) >= split
    prompt_ids, output_ids = ids[:cuts[split - 1]], ids[cuts[split - 1]:]
    assert "".join(stream(tokenizer, prompt_ids, output_ids)) == tokenizer.decode(output_ids)
