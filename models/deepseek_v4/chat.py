"""DeepSeek V4's chat format (a port of the rules of DeepSeek's `encoding_dsv4.py`, as specified in
shared/specs/chat_tools_structured.md section 1) and its reasoning parser.

    <BOS>{system}<｜User｜>{user}<｜Assistant｜><think>{reasoning}</think>{answer}<EOS><｜User｜>...

Thinking mode (the default; `thinking` / `enable_thinking` false selects chat mode) opens the assistant turn
with `<think>`, chat mode with `</think>`. Earlier turns' reasoning is dropped (DeepSeek keeps it only when
tools are defined).
Tools go on the system message (one is prepended when the chat has none) as DeepSeek's tool section; tool calls,
in the history and in the output, are DSML blocks; tool results join the user turn after them, in call order."""
from __future__ import annotations

import json
import re
from typing import Any

from runtime.structured import ReasoningGate, regex_literal, tool_calls_ebnf
from runtime.tool_calls import ParsedOutput, ToolCallPiece, canonical_json, settled_content

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT, REMINDER = "<｜User｜>", "<｜Assistant｜>", "<｜latest_reminder｜>"
THINK_START, THINK_END = "<think>", "</think>"
DSML = "｜DSML｜"
SPECIAL_TOKENS = (BOS, EOS, "<｜▁pad▁｜>", USER, ASSISTANT, THINK_START, THINK_END, REMINDER, DSML)
TOOL_CALLS_START, TOOL_CALLS_END = f"<{DSML}tool_calls>", f"</{DSML}tool_calls>"
INVOKE_END, PARAMETER_END = f"</{DSML}invoke>", f"</{DSML}parameter>"

# The tool section of the system prompt, as DeepSeek's encoder writes it (text from the checkpoint's encoding/).
TOOLS_TEMPLATE = (
    "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke tools by "
    f'writing a "<{DSML}tool_calls>" block like the following:\n\n<{DSML}tool_calls>\n<{DSML}invoke name='
    f'"$TOOL_NAME">\n<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>'
    f'\n...\n</{DSML}invoke>\n<{DSML}invoke name="$TOOL_NAME2">\n...\n</{DSML}invoke>\n</{DSML}tool_calls>\n\n'
    'String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, '
    'arrays, objects), pass the value in JSON format and set `string="false"`.\n\nIf thinking_mode is enabled '
    f"(triggered by {THINK_START}), you MUST output your complete reasoning inside {THINK_START}...{THINK_END} "
    f"BEFORE any tool calls or final response.\n\nOtherwise, output directly after {THINK_END} with tool calls or "
    "final response.\n\n### Available Tool Schemas\n\n{tool_schemas}\n\nYou MUST strictly follow the above "
    "defined tool name and parameter schemas to invoke tool calls.\n")


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = [p.get("text", "") if p.get("type") == "text" else f"[Unsupported {p.get('type')}]" for p in content]
    return "\n\n".join(parts)


def _tool_calls(calls: list[dict[str, Any]]) -> str:
    invokes = []
    for call in calls:
        function = call.get("function", call)
        arguments = function.get("arguments") or {}
        if isinstance(arguments, str):
            arguments = json.loads(arguments) if arguments.strip() else {}
        params = [f'<{DSML}parameter name="{key}" string="true">{value}</{DSML}parameter>' if isinstance(value, str)
                  else f'<{DSML}parameter name="{key}" string="false">{json.dumps(value, ensure_ascii=False)}'
                       f'</{DSML}parameter>' for key, value in arguments.items()]
        invokes.append(f'<{DSML}invoke name="{function["name"]}">\n' + "\n".join(params) + f"\n</{DSML}invoke>")
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n</{DSML}tool_calls>"


def _merge_tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool results join the user turn before them (or open one), ordered as the calls of the assistant turn
    before them; a user message right after joins it too."""
    merged: list[dict[str, Any]] = []
    call_order: dict[str, int] = {}
    for message in messages:
        role = message.get("role")
        if role == "tool":
            block = (call_order.get(message.get("tool_call_id", ""), 0),
                     f"<tool_result>{_text(message.get('content'))}</tool_result>")
            if merged and merged[-1]["role"] == "user" and "_blocks" in merged[-1]:
                merged[-1]["_blocks"].append(block)
            else:
                merged.append({"role": "user", "_blocks": [block]})
        elif role == "user" and merged and "_blocks" in merged[-1]:
            merged[-1]["_blocks"].append((None, _text(message.get("content"))))
        else:
            if role == "assistant" and message.get("tool_calls"):
                call_order = {call.get("id", ""): i for i, call in enumerate(message["tool_calls"])}
            merged.append(dict(message))
    for message in merged:
        if "_blocks" in message:
            blocks = message.pop("_blocks")
            results = iter(sorted((b for b in blocks if b[0] is not None), key=lambda b: b[0]))
            message["content"] = "\n\n".join(next(results)[1] if b[0] is not None else b[1] for b in blocks)
    return merged


def _tools_section(tools: list[dict[str, Any]]) -> str:
    schemas = "\n".join(json.dumps(tool.get("function", tool), ensure_ascii=False) for tool in tools)
    return TOOLS_TEMPLATE.replace("{tool_schemas}", schemas)


def render_prompt(messages: list[dict[str, Any]], options: dict[str, Any]) -> str:
    thinking = options.get("thinking", options.get("enable_thinking", True))
    tools = options.get("tools")
    if tools and not any(m.get("role") == "system" for m in messages):
        messages = [{"role": "system", "content": ""}] + list(messages)
    messages = _merge_tool_results(messages)
    last_user = max((i for i, m in enumerate(messages) if m["role"] in ("user", "developer")), default=-1)
    drop_thinking = not tools        # DeepSeek keeps earlier reasoning only when tools are defined
    first_system = next((i for i, m in enumerate(messages) if m["role"] == "system"), None)
    prompt = BOS
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system":
            prompt += _text(message.get("content"))
            if tools and i == first_system:
                prompt += "\n\n" + _tools_section(tools)
        elif role in ("user", "developer"):
            if role == "developer" and thinking and drop_thinking and i < last_user:
                continue
            prompt += USER + _text(message.get("content"))
        elif role == "latest_reminder":
            prompt += REMINDER + _text(message.get("content"))
        elif role == "assistant":
            reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
            keep = thinking and (not drop_thinking or i > last_user)
            prompt += (reasoning + THINK_END if keep else "") + _text(message.get("content"))
            prompt += _tool_calls(message["tool_calls"]) if message.get("tool_calls") else ""
            prompt += EOS
        else:
            raise ValueError(f"unknown chat role {role!r}")
        following = messages[i + 1]["role"] if i + 1 < len(messages) else None
        at_end = following is None and options.get("add_generation_prompt", True)
        if role in ("user", "developer") and (at_end or following in ("assistant", "latest_reminder")):
            opens_thinking = thinking and (not drop_thinking or i >= last_user)
            prompt += ASSISTANT + (THINK_START if opens_thinking else THINK_END)
    return prompt


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], options: dict[str, Any] | None = None) -> list[int]:
    """The ModelPackage hook: OpenAI-style messages -> prompt token ids."""
    hf = getattr(tokenizer, "hf", tokenizer)
    return list(hf.encode(render_prompt(messages, options or {}), add_special_tokens=False))


def parse_reasoning(tokenizer: Any, output_token_ids: list[int]) -> tuple[str | None, str]:
    """(reasoning, content) of a thinking-mode output: the prompt opened `<think>`, so everything up to
    `</think>` is reasoning (all of it while no `</think>` has come), the rest content. Prefix-monotonic."""
    hf = getattr(tokenizer, "hf", tokenizer)
    end = hf.convert_tokens_to_ids(THINK_END)
    if end is None or end == hf.unk_token_id or end not in output_token_ids:
        return tokenizer.decode(output_token_ids), ""
    cut = output_token_ids.index(end)
    return tokenizer.decode(output_token_ids[:cut]), tokenizer.decode(output_token_ids[cut + 1:])


_INVOKE = re.compile(rf'\s*<{DSML}invoke\s+name="([^"]*)"\s*>')
_PARAMETER = re.compile(rf'\s*<{DSML}parameter\s+name="([^"]*)"\s+string="(true|false)"\s*>')


def parse_output(tokenizer: Any, output_token_ids: list[int], final: bool) -> ParsedOutput:
    """The tool-calling hook (thinking mode: the prompt opened `<think>`): reasoning up to `</think>`, then the
    answer and its DSML tool-call block. A block that starts before any `</think>` ends the reasoning too
    (the model sometimes skips `</think>` in long contexts)."""
    hf = getattr(tokenizer, "hf", tokenizer)
    text = hf.decode(output_token_ids, skip_special_tokens=False)
    text = text.split(EOS)[0] if final or EOS in text else text.rstrip("\ufffd")
    if THINK_END in text:
        reasoning, content = text.split(THINK_END, 1)
    elif TOOL_CALLS_START in text:
        cut = text.index(TOOL_CALLS_START)
        reasoning, content = text[:cut].rstrip(), text[cut:]
    else:
        return ParsedOutput(settled_content(text, (THINK_END, TOOL_CALLS_START), final), "")
    first = content.find(TOOL_CALLS_START)
    if first < 0:
        return ParsedOutput(reasoning, settled_content(content, (TOOL_CALLS_START,), final))
    calls = _dsml_calls(content[first + len(TOOL_CALLS_START):], final)
    if calls is None:
        return ParsedOutput(reasoning, content)
    return ParsedOutput(reasoning, content[:first].rstrip(), calls)


def _dsml_calls(block: str, final: bool) -> list[ToolCallPiece] | None:
    """The invokes of a tool-call block so far, arguments as canonical JSON (string="true" values are JSON
    strings of the raw text, the others JSON values); None when a finished block is malformed."""
    calls, at = [], 0
    while (invoke := _INVOKE.match(block, at)) is not None:
        at, parameters = invoke.end(), []
        while (parameter := _PARAMETER.match(block, at)) is not None:
            end = block.find(PARAMETER_END, parameter.end())
            raw = block[parameter.end():] if end < 0 else block[parameter.end():end]
            key = json.dumps(parameter.group(1), ensure_ascii=False)
            if end < 0:
                if parameter.group(2) == "true" and not final:
                    value = settled_content(raw, (PARAMETER_END,), False)
                    parameters.append(f"{key}: " + json.dumps(value, ensure_ascii=False)[:-1])
                break
            parameters.append(f"{key}: {_parameter_value(raw, parameter.group(2) == 'true')}")
            at = end + len(PARAMETER_END)
        closed = _at(block, at, INVOKE_END)
        calls.append(ToolCallPiece(invoke.group(1), "{" + ", ".join(parameters) + ("}" if closed else ""), closed))
        if not closed:
            break
        at = _at(block, at, INVOKE_END)
    if final and (not calls or not calls[-1].complete):
        return None
    return calls


def _at(text: str, at: int, marker: str) -> int:
    """The position after `marker` when it follows `at` (after whitespace), else 0."""
    stripped = len(text) - len(text[at:].lstrip())
    return stripped + len(marker) if text.startswith(marker, stripped) else 0


def _parameter_value(raw: str, is_string: bool) -> str:
    if not is_string:
        value, complete = canonical_json(raw, final=True)
        if complete and value:
            return value
    return json.dumps(raw, ensure_ascii=False)


def tool_call_grammar(tools: list[dict[str, Any]], name: str | None, parallel: bool = True) -> str:
    """EBNF for an answer that is only a DSML tool-call block (after closing the thought, when the prompt
    opened one): one call to `name`, or (name None, tool_choice "required") calls to any of the tools, several
    when `parallel`. Each invoke writes the required parameters in schema order, string ones raw (an enum's
    values, or text without `<` within the length bounds), the others as JSON following their schema."""
    calls = []
    for function in (t["function"] for t in tools if name is None or t["function"]["name"] == name):
        parameters = function.get("parameters") or {}
        properties = parameters.get("properties") or {}
        pieces: list[Any] = [f'<{DSML}invoke name="{function["name"]}">\n']
        for key in parameters.get("required") or []:
            schema = properties.get(key) or {}
            if schema.get("type") == "string" or (schema.get("enum") and all(isinstance(v, str) for v in schema["enum"])):
                pieces += [f'<{DSML}parameter name="{key}" string="true">', ("regex", _string_pattern(schema))]
            else:
                pieces += [f'<{DSML}parameter name="{key}" string="false">', schema]
            pieces.append(f"{PARAMETER_END}\n")
        calls.append(pieces + [INVOKE_END])
    return tool_calls_ebnf(calls, parallel and name is None, "\n", before=f'("{THINK_END}")? "\\n\\n{TOOL_CALLS_START}\\n"',
                           after=f"\n{TOOL_CALLS_END}")


def _string_pattern(schema: dict[str, Any]) -> str:
    if schema.get("enum"):
        return "(" + "|".join(regex_literal(v) for v in schema["enum"]) + ")"
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    return f"[^<]{{{low},{'' if high is None else high}}}"


def reasoning_gate(tokenizer: Any, prompt_token_ids: list[int]) -> ReasoningGate:
    """Thinking mode opened `<think>` at the prompt's end: the answer follows `</think>`; chat mode closed it."""
    hf = getattr(tokenizer, "hf", tokenizer)
    start, end = hf.convert_tokens_to_ids(THINK_START), hf.convert_tokens_to_ids(THINK_END)
    if prompt_token_ids and prompt_token_ids[-1] == start:
        return ReasoningGate("reasoning", (end,))
    return ReasoningGate("answer")
