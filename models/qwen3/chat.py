"""Qwen3's chat surface: the `<think>...</think>` reasoning parser and the `<tool_call>` parser.

Qwen3 opens a thinking turn with `<think>`, reasons, closes it with `</think>` and then answers. The parser
works on token ids, not text: `<think>`/`</think>` may be special tokens that a skip-special-tokens decode
would erase, so the text alone cannot say where reasoning ends."""
from __future__ import annotations

import json
import re
from typing import Any

from runtime.structured import json_schema_ebnf

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


_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)


def parse_tool_calls(content: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(content before the first call or None when empty, [(name, arguments as JSON text)]) of an answer
    (reasoning already split off). Qwen3 writes each call as `<tool_call>\n{"name": N, "arguments": {...}}
    \n</tool_call>`, parallel calls one after the other; the last may lack its closing tag (cut by a stop).
    When any call is not that JSON the answer is left as plain content, with no calls."""
    if "<tool_call>" not in content:
        return content, []
    calls = []
    for match in _TOOL_CALL.finditer(content):
        body = (match.group(1) if match.group(1) is not None else match.group(2)).strip()
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            return content, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return content, []
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):          # some fine-tunes write the arguments as a JSON string
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                return content, []
        calls.append((call["name"], json.dumps(arguments, ensure_ascii=False)))
    before = content[:content.index("<tool_call>")]
    return (before if before.strip() else None), calls


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
