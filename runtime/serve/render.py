"""From engine outputs to what the client sees: choice text and logprobs, whole or as stream deltas."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterator, Protocol

from runtime.request import CompletionOutput, RequestOutput, SamplingParams
from runtime.serve.engine_client import Mailbox
from runtime.tokenizer import Tokenizer


@dataclass(slots=True)
class Job:
    """One HTTP request: its prompts (each one engine request) and where their outputs arrive."""
    id: str
    created: int
    model: str
    request_ids: list[str]
    prompt_lengths: list[int]
    n: int
    mailbox: Mailbox

    def choice_index(self, request_id: str, completion: CompletionOutput) -> int:
        return self.request_ids.index(request_id) * self.n + completion.index


@dataclass(slots=True)
class StreamProgress:
    """What a stream has already sent of one choice."""
    reasoning: str = ""
    content: str = ""
    num_tokens: int = 0          # tokens whose logprobs went out
    text_offset: int = 0         # completions logprobs: characters of token text so far
    prompt_sent: bool = False    # completions: the echoed prompt and prompt logprobs went out
    finished: bool = False


@dataclass(slots=True)
class Delta:
    reasoning: str
    content: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None


def _settled(text: str, holdback: int) -> str:
    """The part of a growing text later tokens cannot change: without a trailing incomplete character, and
    without the last `holdback` characters, which may still turn out to begin a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    return text[:max(0, end - holdback)]


def _suffix_after(sent: str, now: str) -> str:
    return now[len(sent):] if now.startswith(sent) else ""


def _cut_at_stop(reasoning: str | None, content: str, stop: str, keep: bool) -> tuple[str | None, str]:
    """Apply the engine's stop-string cut to parsed parts: the first occurrence ends the output."""
    if reasoning is not None and (at := reasoning.find(stop)) >= 0:
        return reasoning[:at + len(stop) * keep], ""
    if (at := content.find(stop)) >= 0:
        return reasoning, content[:at + len(stop) * keep]
    return reasoning, content


class ChoiceRenderer:
    """Text and logprobs of completions as the client sees them: whole, or as the next stream delta."""

    def __init__(self, tokenizer: Tokenizer, reasoning_parser: Callable | None, params: SamplingParams):
        self.tokenizer, self.reasoning_parser, self.params = tokenizer, reasoning_parser, params
        self.holdback = max((len(s) for s in params.stop), default=1) - 1

    def parts(self, completion: CompletionOutput) -> tuple[str | None, str]:
        """(reasoning or None, content) so far; while unfinished, only what can no longer change."""
        finished = completion.finish_reason is not None
        if self.reasoning_parser is None:
            reasoning, content = None, completion.text
        else:
            reasoning, content = self.reasoning_parser(self.tokenizer, completion.token_ids)
            if finished and isinstance(completion.stop_reason, str):
                reasoning, content = _cut_at_stop(reasoning, content, completion.stop_reason,
                                                  self.params.include_stop_str_in_output)
        if finished:
            return reasoning, content
        return (None if reasoning is None else _settled(reasoning, self.holdback)), _settled(content, self.holdback)

    def delta(self, completion: CompletionOutput, sent: StreamProgress) -> Delta | None:
        """What is new since `sent` (and update it), or None when nothing is."""
        if sent.finished:
            return None
        reasoning, content = self.parts(completion)
        new_reasoning = _suffix_after(sent.reasoning, reasoning or "")
        new_content = _suffix_after(sent.content, content)
        token_ids = completion.token_ids[sent.num_tokens:]
        logprobs = completion.logprobs[sent.num_tokens:] if completion.logprobs is not None else None
        # a token that adds no settled text yet (half a character, a held-back stop prefix) is only worth a
        # chunk for its logprobs
        if not (new_reasoning or new_content or completion.finish_reason or (token_ids and logprobs is not None)):
            return None
        sent.reasoning += new_reasoning
        sent.content += new_content
        sent.num_tokens = len(completion.token_ids)
        sent.finished = completion.finish_reason is not None
        return Delta(new_reasoning, new_content, token_ids, logprobs, completion.finish_reason)


@lru_cache(maxsize=65536)
def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def clamp_logprob(value: float) -> float:
    return max(value, -9999.0)      # -inf is not JSON


def ranked(entry: dict[int, float], n: int) -> list[tuple[int, float]]:
    """The top n alternatives of a logprobs entry (which also holds the sampled token)."""
    return sorted(entry.items(), key=lambda item: -item[1])[:n]


def usage(job: Job, outputs: dict[str, RequestOutput]) -> dict[str, Any]:
    prompt_tokens = sum(job.prompt_lengths)
    completion_tokens = sum(len(c.token_ids) for output in outputs.values() for c in output.outputs)
    cached = sum(output.num_cached_tokens for output in outputs.values())
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}


class ResponseFormat(Protocol):
    """How one endpoint shapes a job's outputs (completions.py, chat.py)."""

    def opening(self) -> list[dict[str, Any]]: ...
    def chunks(self, newest: dict[str, RequestOutput]) -> Iterator[dict[str, Any]]: ...
    def response(self, final: dict[str, RequestOutput]) -> dict[str, Any]: ...
    def envelope(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]: ...
