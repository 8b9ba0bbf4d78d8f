"""Gemma 4's chat surface: special tokens, stop tokens, and the `<|channel>thought\n...<channel|>` parser.

With thinking on, the model opens its answer with `<|channel>thought\n`, reasons, closes with `<channel|>` and
then answers. The parser works on token ids: the delimiters are special tokens that a skip-special-tokens
decode would erase."""
from __future__ import annotations

from typing import Any

# The tiny tokenizer's specials (ids 0..n-1 in this order): pad, eos and bos keep the ids of the released
# vocabulary (0, 1, 2); the rest are the control tokens the chat format uses.
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>", "<|think|>", "<|channel>",
                  "<channel|>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                  "<tool_response|>", '<|"|>', "<|image>", "<image|>", "<|image|>", "<|audio>", "<audio|>",
                  "<|audio|>", "<|video|>")
# generation_config.json of the instruction-tuned checkpoints: <eos>, <turn|>, <|tool_response>
STOP_TOKENS = ("<eos>", "<turn|>", "<|tool_response>")
CHANNEL_START = "<|channel>"
CHANNEL_END = "<channel|>"
THOUGHT_HEADER = "thought\n"


def parse_reasoning(tokenizer: Any, output_token_ids: list[int]) -> tuple[str | None, str]:
    """(reasoning_content or None, content) of the tokens generated so far.

    Only an output that opens with `<|channel>` has reasoning: everything up to `<channel|>` (or, while it is
    still thinking, up to the end), less its `thought\\n` header. Deciding on the first token keeps the parse
    prefix-monotonic: a longer output never moves text from one part to the other."""
    start, end = _token_id(tokenizer, CHANNEL_START), _token_id(tokenizer, CHANNEL_END)
    if start is None or not output_token_ids or output_token_ids[0] != start:
        return None, tokenizer.decode(output_token_ids)
    thought = output_token_ids[1:]
    if end is not None and end in thought:
        cut = thought.index(end)
        reasoning_ids, content_ids = thought[:cut], thought[cut + 1:]
    else:
        reasoning_ids, content_ids = thought, []
    reasoning = tokenizer.decode(reasoning_ids)
    reasoning = _strip_header(reasoning)
    return reasoning, tokenizer.decode(content_ids)


def _strip_header(reasoning: str) -> str:
    """Drop `thought\\n`, or any prefix of it while it is still arriving (so the parse stays monotonic)."""
    if reasoning.startswith(THOUGHT_HEADER):
        return reasoning[len(THOUGHT_HEADER):]
    return "" if THOUGHT_HEADER.startswith(reasoning) else reasoning


def _token_id(tokenizer: Any, token: str) -> int | None:
    """The id of a single vocabulary token, or None when this tokenizer does not have it."""
    token_id = tokenizer.hf.convert_tokens_to_ids(token)
    return None if token_id is None or token_id == tokenizer.hf.unk_token_id else token_id
