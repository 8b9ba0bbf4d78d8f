"""DeepSeek V4's chat format (a port of the rules of DeepSeek's `encoding_dsv4.py`, as specified in
shared/specs/chat_tools_structured.md section 1) and its reasoning parser.

    <BOS>{system}<｜User｜>{user}<｜Assistant｜><think>{reasoning}</think>{answer}<EOS><｜User｜>...

Thinking mode (the default; `thinking` / `enable_thinking` false selects chat mode) opens the assistant turn
with `<think>`, chat mode with `</think>`. Earlier turns' reasoning is dropped (DeepSeek keeps it only when
tools are defined).
Tool calls in the history render as DSML blocks; tool definitions (whose template text must come verbatim from
the checkpoint) are refused rather than approximated."""
from __future__ import annotations

import json
from typing import Any

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT, REMINDER = "<｜User｜>", "<｜Assistant｜>", "<｜latest_reminder｜>"
THINK_START, THINK_END = "<think>", "</think>"
DSML = "｜DSML｜"
SPECIAL_TOKENS = (BOS, EOS, "<｜▁pad▁｜>", USER, ASSISTANT, THINK_START, THINK_END, REMINDER, DSML)


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
    """Tool results join the user turn before them (or open one); a user message right after joins it too."""
    merged: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "tool":
            block = f"<tool_result>{_text(message.get('content'))}</tool_result>"
            if merged and merged[-1]["role"] == "user" and merged[-1].get("_tool_results"):
                merged[-1]["content"] += "\n\n" + block
            else:
                merged.append({"role": "user", "content": block, "_tool_results": True})
        elif role == "user" and merged and merged[-1].get("_tool_results"):
            merged[-1]["content"] += "\n\n" + _text(message.get("content"))
        else:
            merged.append(dict(message))
    return merged


def render_prompt(messages: list[dict[str, Any]], options: dict[str, Any]) -> str:
    if options.get("tools"):
        raise ValueError("tool definitions are not supported yet by the DeepSeek V4 renderer")
    thinking = options.get("thinking", options.get("enable_thinking", True))
    messages = _merge_tool_results(messages)
    last_user = max((i for i, m in enumerate(messages) if m["role"] in ("user", "developer")), default=-1)
    drop_thinking = True             # DeepSeek keeps earlier reasoning only when tools are defined
    prompt = BOS
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system":
            prompt += _text(message.get("content"))
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
