"""How the server turns the engine's cumulative outputs into stream deltas: the deltas always add up to the
whole answer, even when text must be held back (half a character, a possible stop string) or split into
reasoning and content by the package's parser."""
from __future__ import annotations

import pytest

from models.qwen3.chat import parse_reasoning
from runtime.request import CompletionOutput, SamplingParams
from runtime.serve.render import ChoiceRenderer, StreamProgress
from runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3):
    return Tokenizer(str(tiny_qwen3))


def stream(renderer: ChoiceRenderer, outputs: list[CompletionOutput]) -> tuple[str, str]:
    """Feed cumulative outputs as the engine would; (reasoning, content) the client assembles."""
    sent = StreamProgress()
    reasoning = content = ""
    for output in outputs:
        delta = renderer.delta(output, sent)
        if delta is not None:
            reasoning += delta.reasoning
            content += delta.content
    return reasoning, content


def texts(cumulative: list[str], final_text: str, stop_reason: str | None = None) -> list[CompletionOutput]:
    """Engine outputs whose text grows through `cumulative` and finishes as `final_text`."""
    growing = [CompletionOutput(0, text, list(range(i + 1)), None) for i, text in enumerate(cumulative)]
    done = CompletionOutput(0, final_text, list(range(len(cumulative) + 1)), "stop", stop_reason)
    return growing + [done]


def test_a_possible_stop_string_is_held_back_until_it_is_decided(tokenizer):
    """The engine cuts a stop string out of text it may already have shown: "ab" + "X" could begin "XY"."""
    renderer = ChoiceRenderer(tokenizer, None, SamplingParams(stop=["XY"]))
    assert stream(renderer, texts(["ab", "abX"], "ab", stop_reason="XY")) == ("", "ab")


def test_half_a_character_is_held_back(tokenizer):
    renderer = ChoiceRenderer(tokenizer, None, SamplingParams())
    assert stream(renderer, texts(["caf", "caf\ufffd"], "café")) == ("", "café")


def test_reasoning_deltas_add_up_to_the_parsed_answer(tokenizer):
    think, end = (tokenizer.hf.convert_tokens_to_ids(t) for t in ("<think>", "</think>"))
    token_ids = [think] + tokenizer.encode("\nFirst, two and two.\n") + [end] + tokenizer.encode("\n\nFour.")
    outputs = [CompletionOutput(0, "", token_ids[:i], None) for i in range(1, len(token_ids))]
    outputs.append(CompletionOutput(0, "", token_ids, "length"))
    renderer = ChoiceRenderer(tokenizer, parse_reasoning, SamplingParams())
    assert stream(renderer, outputs) == parse_reasoning(tokenizer, token_ids) == ("First, two and two.\n", "Four.")


def test_stop_string_cuts_the_parsed_content(tokenizer):
    think, end = (tokenizer.hf.convert_tokens_to_ids(t) for t in ("<think>", "</think>"))
    token_ids = [think] + tokenizer.encode("Hmm.") + [end] + tokenizer.encode("Four. Done")
    renderer = ChoiceRenderer(tokenizer, parse_reasoning, SamplingParams(stop=[". D"]))
    final = CompletionOutput(0, "", token_ids, "stop", ". D")
    assert renderer.parts(final) == ("Hmm.", "Four")
