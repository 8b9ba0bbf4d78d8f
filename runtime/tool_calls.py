"""What every family's tool-call parser shares: the parse record, and pieces that make a growing output's parse
safe to stream.

A family parser turns the ids generated so far into `ParsedOutput`: reasoning, content and calls, each only
as far as later tokens cannot change it (a suffix that may begin a marker waits, an unfinished string or
number waits). Each later parse extends the earlier one, so a stream can send the differences, and the
argument pieces of a call concatenate to the JSON text of the finished parse. Arguments are written in one
canonical form (`json.dumps(value, ensure_ascii=False)`: `", "` and `": "` separators, keys in the model's
order) whatever spacing the model used."""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from runtime.request import CompletionOutput
from runtime.tokenizer import Tokenizer


@dataclass(slots=True)
class ToolCallPiece:
    name: str
    arguments: str               # JSON text of the arguments object so far (all of it when complete)
    complete: bool


@dataclass(slots=True)
class ParsedOutput:
    reasoning: str | None
    content: str                 # the answer's text, without the calls
    calls: list[ToolCallPiece] = field(default_factory=list)


def settled_content(text: str, markers: tuple[str, ...], final: bool) -> str:
    """`text` (the content before any call marker) less what may still turn out to lead into a call: while
    unfinished, a suffix that is a prefix of a marker and the whitespace before it; when calls follow, the
    trailing whitespace too (the caller strips it at the end)."""
    text = text.rstrip("\ufffd") if not final else text
    if final:
        return text
    for cut in range(min(len(text), max(map(len, markers))), 0, -1):
        if any(m.startswith(text[-cut:]) for m in markers):
            text = text[:-cut]
            break
    return text.rstrip()


# ---- JSON, token by token -----------------------------------------------------------------------------

@dataclass(slots=True)
class JsonToken:
    kind: str                    # "punct" ({ } [ ] : ,), "string" (value = decoded text) or "scalar"
    value: str
    complete: bool = True


_NUMBER_OR_WORD = re.compile(r"[^\s{}\[\]:,\"]+")
_OPEN_ESCAPE = re.compile(r"(\\+)(u[0-9a-fA-F]{0,3})?$")


def json_tokens(text: str, final: bool = False) -> Iterator[JsonToken]:
    """The tokens of (the beginning of) a JSON text. A string still open comes as an incomplete token of
    its decoded characters so far; a number or word touching the end comes incomplete unless `final`.
    Stops (without raising) at the first character that cannot begin a token."""
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in "{}[]:,":
            yield JsonToken("punct", ch)
            i += 1
        elif ch == '"':
            end = _string_end(text, i + 1)
            if end < 0:
                decoded = _decode_string(_without_open_escape(text[i + 1:]))
                if decoded is None:
                    return
                if decoded and "\ud800" <= decoded[-1] <= "\udbff":      # half a surrogate pair waits
                    decoded = decoded[:-1]
                yield JsonToken("string", decoded, complete=False)
                return
            decoded = _decode_string(text[i + 1:end])
            if decoded is None:
                return
            yield JsonToken("string", decoded)
            i = end + 1
        else:
            match = _NUMBER_OR_WORD.match(text, i)
            if match is None:
                return
            i = match.end()
            yield JsonToken("scalar", match.group(), complete=final or i < n)


def _string_end(text: str, start: int) -> int:
    i = start
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == '"':
            return i
        else:
            i += 1
    return -1


def _without_open_escape(raw: str) -> str:
    """A string's raw text less an escape sequence cut off by the end (`\\` or `\\u12`)."""
    match = _OPEN_ESCAPE.search(raw)
    if match is None or len(match.group(1)) % 2 == 0:     # none, or escaped backslashes (then plain text)
        return raw
    return raw[:match.start() + len(match.group(1)) - 1]


def _decode_string(raw: str) -> str | None:
    try:
        return json.loads(f'"{raw}"', strict=False)
    except json.JSONDecodeError:
        return None


def canonical_value(tokens: Iterator[JsonToken] | list[JsonToken]) -> tuple[str, bool]:
    """(canonical JSON text of the value the tokens begin, as far as it is settled; whether the value is
    complete). A scalar that is not a JSON literal or number ends the settled text (the value is bad)."""
    out: list[str] = []
    depth = 0
    for token in tokens:
        if token.kind == "punct":
            if token.value in "{[":
                depth += 1
                out.append(token.value)
            elif token.value in "}]":
                depth -= 1
                out.append(token.value)
            else:
                out.append(token.value + " ")
        elif token.kind == "string":
            text = json.dumps(token.value, ensure_ascii=False)
            out.append(text if token.complete else text[:-1])
            if not token.complete:
                break
        else:
            if not token.complete:
                break
            try:
                out.append(json.dumps(json.loads(token.value)))
            except json.JSONDecodeError:
                break
        if depth == 0:
            return "".join(out), True
    return "".join(out), False


def canonical_json(text: str, final: bool = False) -> tuple[str, bool]:
    """canonical_value of a JSON text."""
    return canonical_value(json_tokens(text, final))


def is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


@dataclass(slots=True)
class ToolCallProgress:
    """What a stream has already sent of one choice, when the answer may hold tool calls."""
    reasoning: str = ""
    content: str = ""
    call_ids: list[str] = field(default_factory=list)
    arguments: list[str] = field(default_factory=list)    # per call, the argument text sent
    num_tokens: int = 0
    finished: bool = False


@dataclass(slots=True)
class ToolCallDelta:
    reasoning: str
    content: str
    tool_calls: list[dict[str, Any]]
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None


class ToolCallStreams:
    """Choices of a request with tools, through the package's output parser (ModelPackage.tool_parser): each
    update re-parses the whole output, whose parse only grows, and sends what is new. A call's first chunk
    carries its index, id, type and name; later ones add to its arguments; the pieces add up to the
    arguments of the finished parse."""

    def __init__(self, parser: Callable[[Any, list[int], bool], ParsedOutput], tokenizer: Tokenizer,
                 parallel: bool):
        self.parser, self.tokenizer, self.parallel = parser, tokenizer, parallel

    def delta(self, completion: CompletionOutput, sent: ToolCallProgress) -> ToolCallDelta | None:
        if sent.finished:
            return None
        finished = completion.finish_reason is not None
        parsed = self.parser(self.tokenizer, completion.token_ids, finished)
        calls = parsed.calls if self.parallel else parsed.calls[:1]
        reasoning = parsed.reasoning or ""
        if not finished:
            reasoning = reasoning.rstrip("\ufffd")
        new_reasoning = _suffix_after(sent.reasoning, reasoning)
        new_content = _suffix_after(sent.content, parsed.content)
        tool_calls = []
        for index, call in enumerate(calls):
            if index == len(sent.call_ids):
                sent.call_ids.append(f"call_{uuid.uuid4().hex[:24]}")
                sent.arguments.append("")
                tool_calls.append({"index": index, "id": sent.call_ids[index], "type": "function",
                                   "function": {"name": call.name, "arguments": ""}})
            piece = _suffix_after(sent.arguments[index], call.arguments)
            if piece:
                sent.arguments[index] += piece
                if tool_calls and tool_calls[-1]["index"] == index:
                    tool_calls[-1]["function"]["arguments"] += piece
                else:
                    tool_calls.append({"index": index, "function": {"arguments": piece}})
        token_ids = completion.token_ids[sent.num_tokens:]
        logprobs = completion.logprobs[sent.num_tokens:] if completion.logprobs is not None else None
        if not (new_reasoning or new_content or tool_calls or finished or (token_ids and logprobs is not None)):
            return None
        sent.reasoning += new_reasoning
        sent.content += new_content
        sent.num_tokens = len(completion.token_ids)
        sent.finished = finished
        finish_reason = completion.finish_reason
        if calls and finish_reason == "stop":
            finish_reason = "tool_calls"
        return ToolCallDelta(new_reasoning, new_content, tool_calls, token_ids, logprobs, finish_reason)


def _suffix_after(sent: str, now: str) -> str:
    return now[len(sent):] if now.startswith(sent) else ""
