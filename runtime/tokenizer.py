"""Tokenizer wrapper (transformers), chat templates, and incremental detokenization."""
from __future__ import annotations

from typing import Any


class Tokenizer:
    def __init__(self, path: str):
        from transformers import AutoTokenizer
        try:
            self.hf = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load a tokenizer from {path}: {exc}; pass --tokenizer DIR_OR_HUB_ID") from None
        if len(self.hf) < 2:     # transformers builds an empty one from a directory without tokenizer files
            raise ValueError(f"no tokenizer in {path} (no tokenizer.json or vocabulary files); pass "
                             "--tokenizer DIR_OR_HUB_ID, or give token ids (LLM(..., skip_tokenizer_init=True))")

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **template_kwargs: Any) -> list[int]:
        if not getattr(self.hf, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; send plain prompts instead")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           **template_kwargs)
        return list(self.hf.encode(text, add_special_tokens=False))


class IncrementalDetokenizer:
    """Turns a growing token list into text pieces that add up to the decode of the output tokens. A piece is
    released only once its bytes form complete UTF-8 characters; the few tokens before it are re-decoded so
    that merges across tokens come out right.

    Not `tokenizers.decoders.DecodeStream`, which does the same windowing in Rust: it cannot flush a trailing
    incomplete character when the output ends (a non-streamed decode keeps it as U+FFFD), and it needs the
    Rust tokenizer, which a transformers tokenizer need not have."""

    _CONTEXT_TOKENS = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.read_offset = len(prompt_ids)
        self.prefix_offset = max(0, self.read_offset - self._CONTEXT_TOKENS)
        # A prompt that ends inside a character is no context: the output's first bytes would complete a
        # character the output does not hold, and the pieces would not add up to the output's decode.
        if self._decode(prompt_ids[self.prefix_offset:]).endswith("\ufffd"):
            self.prefix_offset = self.read_offset

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, self.skip_special_tokens)

    def step(self, token_ids: list[int], final: bool = False) -> str:
        """New text since the last call, given prompt + all output tokens so far."""
        prefix_text = self._decode(token_ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(token_ids[self.prefix_offset:])
        if len(full_text) <= len(prefix_text) or (full_text.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        return full_text[len(prefix_text):]
