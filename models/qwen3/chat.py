"""Qwen3's chat surface: the `<think>...</think>` reasoning parser and the `<tool_call>` parser.

Qwen3 opens a thinking turn with `<think>`, reasons, closes it with `</think>` and then answers. The parser
works on token ids, not text: `<think>`/`</think>` may be special tokens that a skip-special-tokens decode
would erase, so the text alone cannot say where reasoning ends."""
from __future__ import annotations

import json
import re
from typing import Any

from runtime.structured import ReasoningGate, json_schema_ebnf
from runtime.tool_calls import (ParsedOutput, ToolCallPiece, canonical_json, canonical_value, is_json_object,
                                json_tokens, settled_content)

THINK_START = "<think>"
THINK_END = "</think>"


def parse_reasoning(tokenizer: Any, output_token_ids: list[int]) -> tuple[str | None, str]:
    """(reasoning_content or None, content) of the tokens generated so far.

    Only an output that opens with `<think>` has reasoning: everything up to `</think>` (or, while it is
    still thinking, up to the end). An output without it, e.g. with `enable_thinking=False`, where the
    template already closed an empty think block in the prompt, is all content. Deciding on the first token
    keeps the parse prefix-monotonic: a longer output never moves text from one part to the other.
    Leading newlines of each part are dropped (Qwen3 writes `<think>\\n` and `</think>\\n\\n`); dropping a
    prefix keeps the parse monotonic too."""
    start, end = _token_id(tokenizer, THINK_START), _token_id(tokenizer, THINK_END)
    if start is None or not output_token_ids or output_token_ids[0] != start:
        return None, tokenizer.decode(output_token_ids)
    thought = output_token_ids[1:]
    if end is not None and end in thought:
        cut = thought.index(end)
        reasoning_ids, content_ids = thought[:cut], thought[cut + 1:]
    else:
        reasoning_ids, content_ids = thought, []
    return tokenizer.decode(reasoning_ids).lstrip("\n"), tokenizer.decode(content_ids).lstrip("\n")


def _token_id(tokenizer: Any, token: str) -> int | None:
    """The id of a single vocabulary token, or None when this tokenizer does not have it."""
    token_id = tokenizer.hf.convert_tokens_to_ids(token)
    return None if token_id is None or token_id == tokenizer.hf.unk_token_id else token_id


TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"


def parse_output(tokenizer: Any, output_token_ids: list[int], final: bool) -> ParsedOutput:
    """The tool-calling hook: reasoning, the answer before its calls, and the calls. Qwen3 writes each call
    as `<tool_call>\n{"name": N, "arguments": {...}}\n</tool_call>`, parallel calls one after the other; the
    last may lack its closing tag (cut by a stop). A finished answer whose calls are not that JSON is plain
    content, with no calls."""
    reasoning, content = parse_reasoning(tokenizer, output_token_ids)
    return ParsedOutput(reasoning, *parse_tool_calls(content if final else content.rstrip("\ufffd"), final))


def parse_tool_calls(content: str, final: bool = True) -> tuple[str, list[ToolCallPiece]]:
    """(the text before the first call, the calls) of an answer with the reasoning split off."""
    first = content.find(TOOL_CALL_START)
    if first < 0:
        return settled_content(content, (TOOL_CALL_START,), final), []
    calls = []
    for body in content[first + len(TOOL_CALL_START):].split(TOOL_CALL_START):
        closed = TOOL_CALL_END in body
        call = _call_json(body.split(TOOL_CALL_END)[0], final or closed)
        if call is None:
            if final:
                return content, []
            break
        calls.append(call)
        if not call.complete:
            break
    return content[:first].rstrip(), calls


def _call_json(body: str, closed: bool) -> ToolCallPiece | None:
    """The call in `{"name": N, "arguments": {...}}` so far; None when it is malformed (or, while it is still
    arriving, its name is not complete)."""
    tokens = list(json_tokens(body, closed))
    if not tokens or tokens[0].value != "{":
        return None
    name, arguments, arguments_done, i = None, "", False, 1
    while i + 2 < len(tokens) and tokens[i].kind == "string" and tokens[i].complete and tokens[i + 1].value == ":":
        key, value = tokens[i].value, tokens[i + 2]
        end = _value_end(tokens, i + 2)
        if key == "name" and value.kind == "string" and value.complete:
            name = value.value
        elif key == "arguments":
            if value.kind == "string":          # some fine-tunes write the arguments as a JSON string
                arguments, arguments_done = canonical_json(value.value, True) if value.complete else ("", False)
            else:
                arguments, arguments_done = canonical_value(tokens[i + 2:end])
        if end is None or end >= len(tokens) or tokens[end].value != ",":
            break
        i = end + 1
    if name is None:
        return None
    if closed and not arguments:
        arguments, arguments_done = "{}", True
    if closed and not (arguments_done and is_json_object(arguments)):
        return None
    return ToolCallPiece(name, arguments, closed)


def _value_end(tokens: list, start: int) -> int | None:
    """The index after the JSON value that starts at tokens[start]; None when it is not complete."""
    depth = 0
    for i in range(start, len(tokens)):
        token = tokens[i]
        if not token.complete:
            return None
        if token.kind == "punct" and token.value in "{[":
            depth += 1
        elif token.kind == "punct" and token.value in "}]":
            depth -= 1
        if depth == 0:
            return i + 1
    return None


def tool_call_grammar(tools: list[dict[str, Any]], name: str | None, parallel: bool = True) -> str:
    """EBNF for an answer that is only tool calls in Qwen3's format: one call to `name`, or (name None,
    tool_choice "required") a call to any of the tools, or several when `parallel`, whose arguments follow
    the tool's parameter schema."""
    def call_schema(function: dict[str, Any]) -> dict[str, Any]:
        return {"type": "object", "properties": {"name": {"const": function["name"]},
                                                 "arguments": function.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"]}
    functions = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    schema = call_schema(functions[0]) if len(functions) == 1 else {"anyOf": [call_schema(f) for f in functions]}
    body = re.sub(r"\broot\b", "tool_call_json", json_schema_ebnf(schema, separators=(", ", ": ")))
    repeat = "" if name is not None or not parallel else ' ("\\n" tool_call)*'
    return (f'root ::= tool_call{repeat}\n'
            f'tool_call ::= "<tool_call>\\n" tool_call_json "\\n</tool_call>"\n' + body)


def reasoning_gate(tokenizer: Any, prompt_token_ids: list[int]) -> ReasoningGate:
    """Qwen3 thinks when its answer opens with `<think>`: a prompt that closed an empty think block at its end
    (enable_thinking=False) answers at once, one that opened it (thinking-only checkpoints) reasons first, and
    a prompt that is no assistant turn's start (a plain completion) answers at once."""
    start, end = _token_id(tokenizer, THINK_START), _token_id(tokenizer, THINK_END)
    if start is None or end is None:
        return ReasoningGate("answer")
    last_start, last_end = _last_index(prompt_token_ids, start), _last_index(prompt_token_ids, end)
    if last_start > last_end:
        return ReasoningGate("reasoning", (end,))
    at_turn_start = tokenizer.decode(prompt_token_ids[-16:], skip_special_tokens=False).endswith(
        "<|im_start|>assistant\n")
    if last_end >= len(prompt_token_ids) - 4 or not at_turn_start:
        return ReasoningGate("answer")
    return ReasoningGate("open", (end,), start)


def _last_index(ids: list[int], token: int) -> int:
    return max((i for i in range(len(ids) - 1, -1, -1) if ids[i] == token), default=-1)
