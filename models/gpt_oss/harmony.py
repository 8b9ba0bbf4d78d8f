"""Harmony, gpt-oss's chat format: render OpenAI-style messages into a prompt, parse the model's messages back.

A message is `<|start|>{header}<|message|>{content}<|end|>`; the header holds the role, a `<|channel|>`
(analysis = chain of thought, commentary = tool calls and preambles, final = the answer), an optional
recipient ` to=...` and an optional content type after `<|constrain|>`. The prompt ends with
`<|start|>assistant`; generation stops at `<|return|>` or `<|call|>` (`<|end|>` only separates messages).
Functions take either a `runtime.tokenizer.Tokenizer` or a transformers tokenizer."""
from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass, field
from typing import Any

from runtime.structured import ReasoningGate, tool_calls_ebnf
from runtime.tool_calls import ParsedOutput, ToolCallPiece, canonical_json

# The tiny tokenizer's specials, ids 0..8 in this order; the released tokenizer has them at 199998..200012.
SPECIAL_TOKENS = ("<|endoftext|>", "<|startoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>",
                  "<|end|>", "<|message|>", "<|call|>")
STOP_TOKENS = ("<|return|>", "<|endoftext|>", "<|call|>")      # generation_config's eos ids, in this order
_MESSAGE_ENDS = ("<|end|>", "<|return|>", "<|call|>", "<|endoftext|>")

DEFAULT_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
REASONING_EFFORTS = ("low", "medium", "high")


@dataclass(slots=True)
class ChatOptions:
    """What a request may set besides its messages (unknown keys are ignored: the server passes its own)."""
    reasoning_effort: str = "medium"
    model_identity: str = DEFAULT_IDENTITY
    knowledge_cutoff: str = "2024-06"
    current_date: str | None = None                  # None = today
    tools: list[dict[str, Any]] = field(default_factory=list)
    add_generation_prompt: bool = True

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> "ChatOptions":
        known = {k: v for k, v in (options or {}).items() if k in cls.__dataclass_fields__ and v is not None}
        chat = cls(**known)
        if chat.reasoning_effort not in REASONING_EFFORTS:
            raise ValueError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, "
                             f"got {chat.reasoning_effort!r}")
        return chat


@dataclass(slots=True)
class HarmonyMessage:
    role: str                                        # system, developer, user, assistant, or a tool's name
    content: str
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    end: str = "<|end|>"

    def render(self) -> str:
        # an assistant names its recipient after the channel, a tool (replying to=assistant) before it
        header = self.role
        if self.recipient and self.role != "assistant":
            header += f" to={self.recipient}"
        if self.channel:
            header += f"<|channel|>{self.channel}"
        if self.recipient and self.role == "assistant":
            header += f" to={self.recipient}"
        if self.content_type:
            header += f" <|constrain|>{self.content_type}"
        return f"<|start|>{header}<|message|>{self.content}{self.end}"


# ---- rendering --------------------------------------------------------------------------------------


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], options: dict[str, Any] | None = None) -> list[int]:
    """The ModelPackage hook: OpenAI-style messages -> prompt token ids."""
    return list(_hf(tokenizer).encode(render_prompt(messages, ChatOptions.from_dict(options)),
                                      add_special_tokens=False))


def render_prompt(messages: list[dict[str, Any]], options: ChatOptions) -> str:
    instructions = [_text(m) for m in messages if m.get("role") in ("system", "developer")]
    rendered = [_system_message(options)]
    developer = _developer_message("\n\n".join(instructions), options.tools)
    if developer is not None:
        rendered.append(developer)
    rendered += _drop_answered_analysis(_conversation(messages))
    text = "".join(m.render() for m in rendered)
    return text + "<|start|>assistant" if options.add_generation_prompt else text


def _system_message(options: ChatOptions) -> HarmonyMessage:
    date = options.current_date or datetime.date.today().isoformat()
    content = (f"{options.model_identity}\nKnowledge cutoff: {options.knowledge_cutoff}\nCurrent date: {date}\n\n"
               f"Reasoning: {options.reasoning_effort}\n\n"
               "# Valid channels: analysis, commentary, final. Channel must be included for every message.")
    if options.tools:
        content += "\nCalls to these tools must go to the commentary channel: 'functions'."
    return HarmonyMessage("system", content)


def _developer_message(instructions: str, tools: list[dict[str, Any]]) -> HarmonyMessage | None:
    sections = []
    if instructions:
        sections.append(f"# Instructions\n\n{instructions}")
    if tools:
        sections.append("# Tools\n\n" + _functions_namespace(tools))
    return HarmonyMessage("developer", "\n\n".join(sections)) if sections else None


def _conversation(messages: list[dict[str, Any]]) -> list[HarmonyMessage]:
    """User, assistant and tool turns as harmony messages (system/developer went into the headers)."""
    out: list[HarmonyMessage] = []
    call_names: dict[str, str] = {}                  # tool_call_id -> function name, for tool results
    for message in messages:
        role = message.get("role")
        if role in ("system", "developer"):
            continue
        if role == "user":
            out.append(HarmonyMessage("user", _text(message)))
        elif role == "assistant":
            out += _assistant_messages(message, call_names)
        elif role == "tool":
            name = message.get("name") or call_names.get(message.get("tool_call_id", ""))
            if name is None:
                raise ValueError("a tool message needs a 'name' or the 'tool_call_id' of an earlier tool call")
            out.append(HarmonyMessage(f"functions.{name}", _text(message), channel="commentary",
                                      recipient="assistant"))
        else:
            raise ValueError(f"unknown message role {role!r}; expected system, developer, user, assistant or tool")
    return out


def _assistant_messages(message: dict[str, Any], call_names: dict[str, str]) -> list[HarmonyMessage]:
    out = []
    reasoning = message.get("reasoning_content") or message.get("reasoning") or message.get("thinking")
    if reasoning:
        out.append(HarmonyMessage("assistant", reasoning, channel="analysis"))
    content = _text(message)
    tool_calls = message.get("tool_calls") or []
    if not tool_calls:
        return out + [HarmonyMessage("assistant", content, channel="final")]
    if content:                                      # shown to the user before the calls: a preamble
        out.append(HarmonyMessage("assistant", content, channel="commentary"))
    for call in tool_calls:
        function = call.get("function", call)
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        call_names[call.get("id", "")] = function["name"]
        out.append(HarmonyMessage("assistant", arguments, channel="commentary",
                                  recipient=f"functions.{function['name']}", content_type="json", end="<|call|>"))
    return out


def _drop_answered_analysis(messages: list[HarmonyMessage]) -> list[HarmonyMessage]:
    """Chain of thought is dropped once a final answer follows it; analysis still leading to a pending tool
    call is kept, since the model continues from it."""
    last_final = max((i for i, m in enumerate(messages) if m.channel == "final"), default=-1)
    return [m for i, m in enumerate(messages) if not (m.channel == "analysis" and i < last_final)]


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(p.get("text", "") for p in content)
    raise ValueError("message content must be a string or a list of text parts")


def _functions_namespace(tools: list[dict[str, Any]]) -> str:
    """Function tools as the TypeScript-like declarations the model was trained on."""
    body = "## functions\n\nnamespace functions {\n\n"
    for tool in tools:
        function = tool.get("function", tool)
        if function.get("description"):
            body += f"// {function['description']}\n"
        parameters = function.get("parameters") or {}
        properties = parameters.get("properties") or {}
        if not properties:
            body += f"type {function['name']} = () => any;\n\n"
            continue
        body += f"type {function['name']} = (_: {{\n"
        required = set(parameters.get("required") or [])
        for name, schema in properties.items():
            if schema.get("description"):
                body += f"// {schema['description']}\n"
            optional = "" if name in required else "?"
            default = f" // default: {_default_text(schema['default'])}" if "default" in schema else ""
            body += f"{name}{optional}: {_typescript_type(schema)},{default}\n"
        body += "}) => any;\n\n"
    return body + "} // namespace functions"


def _typescript_type(schema: dict[str, Any]) -> str:
    if "enum" in schema:
        return " | ".join(json.dumps(value) for value in schema["enum"])
    variants = schema.get("anyOf") or schema.get("oneOf")
    if variants:
        return " | ".join(_typescript_type(variant) for variant in variants)
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(_typescript_type({**schema, "type": k}) for k in kind)
    if kind == "array":
        item = _typescript_type(schema.get("items") or {})
        return f"{item}[]" if " " not in item else f"({item})[]"
    if kind == "object" and schema.get("properties"):
        required = set(schema.get("required") or [])
        fields = ", ".join(f"{name}{'' if name in required else '?'}: {_typescript_type(sub)}"
                           for name, sub in schema["properties"].items())
        return f"{{ {fields} }}"
    return {"string": "string", "number": "number", "integer": "number", "boolean": "boolean",
            "null": "null", "object": "object"}.get(kind, "any")


def _default_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


# ---- parsing ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class ParsedMessage:
    channel: str | None
    recipient: str | None
    content_type: str | None
    content: str
    complete: bool                                   # its end token has been generated


def reasoning_parser(tokenizer: Any, output_ids: list[int]) -> tuple[str | None, str]:
    """The ModelPackage hook: generated ids -> (analysis text or None, user-visible text).

    Prefix-monotonic (with None read as ""): each result extends the result for any prefix of output_ids,
    because a message contributes nothing until its header is complete and an unfinished message holds back
    an incomplete UTF-8 character. Tool calls (commentary to=...) are in neither part; see parse_completion."""
    messages = parse_completion(tokenizer, output_ids)
    reasoning = [m.content for m in messages if m.channel == "analysis"]
    visible = [m.content for m in messages
               if m.channel in ("final", None) or (m.channel == "commentary" and m.recipient is None)]
    return ("\n".join(reasoning) if reasoning else None), "\n".join(visible)


def parse_completion(tokenizer: Any, output_ids: list[int]) -> list[ParsedMessage]:
    """The messages of a completion that began after `<|start|>assistant`, the last one possibly unfinished.
    Tokens after a stop token are ignored; a message whose header is still open is not returned."""
    hf = _hf(tokenizer)
    special = {hf.convert_tokens_to_ids(token): token for token in SPECIAL_TOKENS}
    messages: list[ParsedMessage] = []
    header: list[int] = []
    content: list[int] | None = None                 # None while reading a header
    for token in output_ids:
        name = special.get(token)
        if content is None:
            if name == "<|message|>":
                content = []
            elif name == "<|start|>":
                header = []
            elif name in STOP_TOKENS:
                break
            else:
                header.append(token)
            continue
        if name in _MESSAGE_ENDS:
            messages.append(_parsed(hf, special, header, content, complete=True))
            header, content = [], None
            if name != "<|end|>":
                break
        else:
            content.append(token)
    else:
        if content is not None:
            messages.append(_parsed(hf, special, header, content, complete=False))
    return messages


def _parsed(hf: Any, special: dict[int, str], header: list[int], content: list[int], complete: bool) -> ParsedMessage:
    fields = {"role": [], "<|channel|>": [], "<|constrain|>": []}
    current = fields["role"]
    for token in header:
        if special.get(token) in fields:
            current = fields[special[token]]
        else:
            current.append(token)
    role, channel, constrain = (_decode(hf, ids) for ids in fields.values())
    recipient = re.search(r"to=(\S+)", f"{role} {channel}")
    text = _decode(hf, content)
    if not complete:
        text = text.rstrip("\ufffd")                 # an incomplete UTF-8 character at the end waits
    return ParsedMessage(channel=channel.split()[0] if channel.split() else None,
                         recipient=recipient.group(1) if recipient else None,
                         content_type=constrain.strip() or None, content=text, complete=complete)


def _decode(hf: Any, ids: list[int]) -> str:
    return hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) if ids else ""


def _hf(tokenizer: Any) -> Any:
    """The transformers tokenizer inside runtime.tokenizer.Tokenizer, or the tokenizer itself."""
    return getattr(tokenizer, "hf", tokenizer)


def parse_output(tokenizer: Any, output_ids: list[int], final: bool) -> ParsedOutput:
    """The tool-calling hook: analysis is reasoning, final and preamble (commentary to no one) messages are
    content, a commentary message to `functions.NAME` is a call whose message is the JSON arguments. Other
    recipients (built-in tools this server does not run) stay reasoning. The ids are read back from their
    text, so that markers a grammar let the model spell in pieces count as the special tokens they spell."""
    hf = _hf(tokenizer)
    text = _decode(hf, output_ids)
    output_ids = hf.encode(text if final else text.rstrip("\ufffd"), add_special_tokens=False)
    reasoning, content, calls = [], [], []
    for message in parse_completion(tokenizer, output_ids):
        recipient = message.recipient or ""
        if recipient.startswith("functions."):
            arguments, complete = canonical_json(message.content, final or message.complete)
            calls.append(ToolCallPiece(recipient[len("functions."):], arguments, message.complete or final))
        elif message.channel == "analysis" or recipient:
            reasoning.append(message.content)
        elif not calls:
            content.append(message.content)
    return ParsedOutput("\n".join(reasoning) if reasoning else None, "\n".join(content).rstrip() if calls
                        else "\n".join(content), calls)


def tool_call_grammar(tools: list[dict[str, Any]], name: str | None, parallel: bool = True) -> str:
    """EBNF for an answer that is one call, from its first token (no analysis first): a commentary message to
    `functions.NAME` whose JSON arguments follow the tool's schema (`<|call|>` ends it and the turn: one call
    per completion, whatever `parallel` says)."""
    calls = [[f"<|channel|>commentary to=functions.{t['function']['name']} <|constrain|>json<|message|>",
              t["function"].get("parameters") or {"type": "object"}]
             for t in tools if name is None or t["function"]["name"] == name]
    return tool_calls_ebnf(calls, False)


def reasoning_gate(tokenizer: Any, prompt_token_ids: list[int]) -> ReasoningGate:
    """The answer is the final channel's message: a grammar applies after `<|channel|>final<|message|>`."""
    hf = _hf(tokenizer)
    end = (hf.convert_tokens_to_ids("<|channel|>"), *hf.encode("final", add_special_tokens=False),
           hf.convert_tokens_to_ids("<|message|>"))
    return ReasoningGate("reasoning", end)
