"""Structured outputs with xgrammar: a request's JSON schema, JSON object, regex, choice or EBNF grammar is
compiled once (cached by its key), each request gets a matcher that advances with its accepted tokens, and
the sampler masks each constrained row's logits with the matcher's token bitmask (int32 words, bit set =
allowed), on the device. Rows without a grammar are untouched."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(slots=True, frozen=True)
class ReasoningGate:
    """Where a request's output stands with respect to reasoning, from its prompt (ModelPackage.reasoning_gate):
    "reasoning" (the prompt opened it: free until the `end` ids), "open" (the first token may be `start`,
    which opens it; any other starts the answer) or "answer"."""
    state: str
    end: tuple[int, ...] = ()
    start: int | None = None


@dataclass(slots=True, frozen=True)
class StructuredOutputsParams:
    """Exactly one constraint: `json` (a schema, as a dict or its JSON text), `json_object` (any JSON object),
    `regex`, `choice` (one of these strings) or `grammar` (EBNF). On a model that reasons first (its package
    has a reasoning_gate), the constraint applies once the reasoning has ended, unless `in_reasoning`: then
    from the first generated token (how forced tool calls skip the reasoning)."""
    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    in_reasoning: bool = False

    def __post_init__(self) -> None:
        given = [name for name, value in (("json", self.json), ("json_object", self.json_object or None),
                                          ("regex", self.regex), ("choice", self.choice),
                                          ("grammar", self.grammar)) if value is not None]
        if len(given) != 1:
            raise ValueError(f"structured outputs take exactly one of json, json_object, regex, choice, grammar; "
                             f"got {', '.join(given) or 'none'}")
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("structured outputs choice must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", tuple(self.choice))

    @property
    def key(self) -> tuple[str, str]:
        """What the compiled grammar is cached by."""
        if self.json is not None:
            return "json", self.json if isinstance(self.json, str) else json.dumps(self.json)
        if self.json_object:
            return "json", '{"type": "object"}'
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json.dumps(list(self.choice))
        return "grammar", self.grammar


def _choice_grammar(choices: list[str]) -> str:
    """EBNF whose root is one of the literal strings."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


# xgrammar 0.2.9 writes the characters of a string with maxLength/minLength as `[^"\\\r\n]`, which lets raw
# control characters through (invalid JSON: json.loads refuses them); its unbounded strings exclude \0-\x1f.
_LOOSE_STRING_CHAR = '[^\\"\\\\\\r\\n]'
_JSON_STRING_CHAR = '[^\\0-\\x1f\\"\\\\]'


def json_schema_ebnf(schema: str | dict, separators: tuple[str, str] | None = None) -> str:
    """The schema as EBNF (its start rule `root`), compact (no free whitespace: a small model could pad
    forever), with bounded strings held to JSON's characters."""
    import xgrammar as xgr
    return str(xgr.Grammar.from_json_schema(schema, any_whitespace=False, separators=separators)).replace(
        _LOOSE_STRING_CHAR, _JSON_STRING_CHAR)


def tool_calls_ebnf(calls: list[list[str | dict | tuple[str, str]]], repeat: bool, separator: str = "",
                    before: str = '""', after: str = "") -> str:
    """EBNF of one tool call, or (repeat) one or more separated by `separator`, between the EBNF expression
    `before` and the text `after`. Each entry of `calls` is one allowed call, spelled as pieces in order: a
    str is literal text, a dict a JSON value following that schema (compact, canonical separators),
    ("regex", pattern) text matching the pattern."""
    import xgrammar as xgr

    def piece(part: str | dict | tuple[str, str]):
        if isinstance(part, str):
            return xgr.Grammar.from_ebnf(f"root ::= {_ebnf_literal(part)}")
        if isinstance(part, dict):
            return xgr.Grammar.from_json_schema(json.dumps(part), any_whitespace=False, separators=(", ", ": "))
        return xgr.Grammar.from_regex(part[1])
    alternatives = [xgr.Grammar.concat(*(piece(p) for p in call if p != "")) for call in calls]
    one_call = str(xgr.Grammar.union(*alternatives) if len(alternatives) > 1 else alternatives[0])
    body = one_call.replace("root ::= ", "tool_call ::= ", 1).replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR)
    more = f" ({_ebnf_literal(separator) + ' ' if separator else ''}tool_call)*" if repeat else ""
    return f"root ::= {before} tool_call{more}{' ' + _ebnf_literal(after) if after else ''}\n{body}"


def regex_literal(text: str) -> str:
    """A regex matching exactly `text`."""
    return "".join("\\" + c if c in "\\.^$|?*+()[]{}/-" else c for c in text)


def _ebnf_literal(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{escaped}"'


class GrammarCache:
    """Compiles grammars against one tokenizer (lazily: engines that never see a constraint pay nothing)
    and keeps them by key."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: list[int],
                 reasoning_gate: Callable[[list[int]], ReasoningGate] | None = None):
        self._hf_tokenizer, self.vocab_size, self.stop_token_ids = hf_tokenizer, vocab_size, stop_token_ids
        self.reasoning_gate = reasoning_gate
        self._compiler = None
        self._compiled: dict[tuple[str, str], Any] = {}

    def compile(self, params: StructuredOutputsParams):
        """The compiled grammar; raises ValueError naming what is wrong when the constraint is invalid."""
        key = params.key
        if key in self._compiled:
            return self._compiled[key]
        import xgrammar as xgr
        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self._hf_tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self.stop_token_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        kind, text = key
        try:
            if kind == "json":
                json.loads(text)                                   # a clear message for text that is not JSON
                compiled = self._compiler.compile_grammar(json_schema_ebnf(text))
            elif kind == "regex":
                compiled = self._compiler.compile_regex(text)
            elif kind == "choice":
                compiled = self._compiler.compile_grammar(_choice_grammar(json.loads(text)))
            else:
                compiled = self._compiler.compile_grammar(text)
        except (RuntimeError, ValueError, TypeError) as error:   # xgrammar raises RuntimeError on bad input
            what = {"json": "JSON schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}[kind]
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"invalid {what} for structured outputs: {first_line}") from None
        self._compiled[key] = compiled
        return compiled

    def matcher(self, params: StructuredOutputsParams, output_token_ids: list[int],
                prompt_token_ids: list[int] = ()) -> "Matcher":
        """A fresh matcher, advanced over the tokens already generated (a request rejoining after preemption)."""
        import xgrammar as xgr
        gate = ReasoningGate("answer")
        if self.reasoning_gate is not None and not params.in_reasoning:
            gate = self.reasoning_gate(list(prompt_token_ids))
        matcher = Matcher(xgr.GrammarMatcher(self.compile(params)), gate)
        for token in output_token_ids:
            matcher.accept(token)
        return matcher


class Matcher:
    """One request's grammar state, behind its reasoning: while the model reasons its rows are free (all
    ones); the grammar sees the tokens after the reasoning's end marker."""

    def __init__(self, matcher: Any, gate: ReasoningGate = ReasoningGate("answer")):
        self._matcher, self._gate, self._state = matcher, gate, gate.state
        self._history: list[tuple[str, bool]] = []     # per accepted token: the state before it, grammar fed
        self._reasoning: list[int] = []                 # the tokens accepted while reasoning, to spot the end

    def accept(self, token_id: int) -> bool:
        """Advance over a generated token; False when the grammar refuses it."""
        state, fed, ok = self._state, False, True
        if state == "open" and token_id == self._gate.start:
            self._state = "reasoning"
        elif state == "reasoning":
            self._reasoning.append(token_id)
            if tuple(self._reasoning[-len(self._gate.end):]) == self._gate.end:
                self._state = "answer"
        elif not self._matcher.is_terminated():
            # a token the mask forbade can only come from outside the sampler (it never samples one); after
            # a finished grammar the request stops on the stop token, so later tokens are not fed
            ok = fed = self._matcher.accept_token(token_id)
            self._state = "answer"
        self._history.append((state, fed))
        return ok

    def rollback(self, num_tokens: int) -> None:
        grammar_tokens = 0
        for _ in range(num_tokens):
            self._state, fed = self._history.pop()
            grammar_tokens += fed
            if self._state == "reasoning":
                self._reasoning.pop()
        if grammar_tokens:
            self._matcher.rollback(grammar_tokens)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        if self._state == "reasoning":
            bitmask[row] = -1
            return
        self._matcher.fill_next_token_bitmask(bitmask, row)
        if self._state == "open" and self._gate.start is not None:
            bitmask[row, self._gate.start // 32] |= _bit(self._gate.start % 32)

    def fill_along(self, bitmask: torch.Tensor, row: int, drafts: list[int]) -> int:
        """Fill rows row.. for the grammar now and after each draft in turn, until a draft it refuses (or
        its end); returns how many drafts it went over, which the caller rolls back."""
        accepted = 0
        for i, draft in enumerate([*drafts, None]):
            if i and self._matcher.is_terminated():               # a draft stop token ends the output there
                break
            self.fill(bitmask, row + i)
            if draft is None:
                break
            accepted += 1
            if not self.accept(draft):
                break
        return accepted


def _bit(position: int) -> int:
    """The int32 word with only bit `position` set."""
    return (1 << position) - (1 << 32) * (position == 31)


def build_bitmask(requests: list[tuple["Matcher | None", list[int]]], vocab_size: int, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """([constrained rows, ceil(vocab / 32)] int32 masks, [constrained rows] their logits rows), filled on
    the host and on their way to the device; None when no row is constrained. Each request is (its matcher
    or None, the drafts it verifies): it has one logits row per draft plus one, row j masked as the grammar
    stands after drafts 0..j-1 (the matcher walks the drafts and rolls back). Rows after a draft the grammar
    refuses allow everything: verification stops at that draft."""
    rows, row = [], 0
    for matcher, drafts in requests:
        if matcher is not None:
            rows.extend(range(row, row + len(drafts) + 1))
        row += len(drafts) + 1
    if not rows:
        return None
    import xgrammar as xgr
    bitmask = xgr.allocate_token_bitmask(len(rows), vocab_size)          # all allowed
    at = 0
    for matcher, drafts in requests:
        if matcher is None:
            continue
        walked = matcher.fill_along(bitmask, at, drafts)
        at += len(drafts) + 1
        matcher.rollback(walked)
    index = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        bitmask = bitmask.pin_memory().to(device, non_blocking=True)
        index = index.pin_memory().to(device, non_blocking=True)
    return bitmask, index


def apply_bitmask(logits: torch.Tensor, grammar: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Forbidden tokens of the constrained rows to -inf, on a copy of those rows; the others unchanged."""
    import xgrammar as xgr
    bitmask, index = grammar
    picked = logits.index_select(0, index)
    xgr.apply_token_bitmask_inplace(picked, bitmask, vocab_size=logits.shape[-1])
    return logits.index_copy(0, index, picked)
