"""Gemma 4's chat surface: special tokens, stop tokens, and the `<|channel>thought\n...<channel|>` parser.

With thinking on, the model opens its answer with `<|channel>thought\n`, reasons, closes with `<channel|>` and
then answers. The parser works on token ids: the delimiters are special tokens that a skip-special-tokens
decode would erase."""
from __future__ import annotations

import json
import re
from typing import Any, Iterator

from runtime.structured import ReasoningGate, tool_calls_ebnf
from runtime.tool_calls import (JsonToken, ParsedOutput, ToolCallPiece, canonical_value, is_json_object, json_tokens,
                                settled_content)

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


TOOL_CALL_START, TOOL_CALL_END, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'
_CALL_NAME = re.compile(r"call:([\w\-.]+)\{")
_GEMMA_TOKEN = re.compile(r'\s*(?:([{}\[\]:,])|<\|"\|>|"|([^\s{}\[\]:,<"]+))')


def parse_output(tokenizer: Any, output_token_ids: list[int], final: bool) -> ParsedOutput:
    """The tool-calling hook: the thought block, the answer before its calls, and the calls,
    `<|tool_call>call:NAME{key:value,...}<tool_call|>` one after the other, arguments in Gemma's notation
    (or JSON) turned into JSON. A call inside an unclosed thought block ends the thought."""
    hf = getattr(tokenizer, "hf", tokenizer)
    text = hf.decode(output_token_ids, skip_special_tokens=False)
    for stop in STOP_TOKENS:
        text = text.split(stop)[0]
    if not final:
        text = text.rstrip("\ufffd")
    reasoning = None
    if text.startswith(CHANNEL_START):
        thought = text[len(CHANNEL_START):]
        if CHANNEL_END in thought:
            reasoning, text = thought.split(CHANNEL_END, 1)
        elif TOOL_CALL_START in thought:
            reasoning, text = thought[:thought.index(TOOL_CALL_START)], thought[thought.index(TOOL_CALL_START):]
        else:
            return ParsedOutput(_strip_header(settled_content(thought, (CHANNEL_END, TOOL_CALL_START), final)), "")
        reasoning = _strip_header(reasoning)
    first = text.find(TOOL_CALL_START)
    if first < 0:
        return ParsedOutput(reasoning, settled_content(text, (TOOL_CALL_START,), final))
    calls = []
    for body in text[first + len(TOOL_CALL_START):].split(TOOL_CALL_START):
        closed = TOOL_CALL_END in body
        call = _gemma_call(body.split(TOOL_CALL_END)[0], closed or final)
        if call is None:
            if final:
                return ParsedOutput(reasoning, text)
            break
        calls.append(call)
        if not call.complete:
            break
    return ParsedOutput(reasoning, text[:first].rstrip(), calls)


def _gemma_call(body: str, closed: bool) -> ToolCallPiece | None:
    name = _CALL_NAME.match(body)
    if name is None:
        return None
    arguments, complete = canonical_value(gemma_tokens(body[name.end() - 1:], closed))
    if closed and not (complete and is_json_object(arguments)):
        return None
    return ToolCallPiece(name.group(1), arguments, closed)


def gemma_tokens(text: str, final: bool) -> Iterator[JsonToken]:
    """JSON tokens of a value in Gemma's notation: bare keys, `<|"|>`-quoted strings (JSON strings too),
    bare numbers and literals (a bare word that is neither is a string)."""
    at, in_object = 0, []                        # in_object: per open bracket, whether it is an object
    expect_key = False
    while at < len(text):
        match = _GEMMA_TOKEN.match(text, at)
        if match is None:
            return
        punct, word = match.group(1), match.group(2)
        if punct is not None:
            at = match.end()
            if punct in "{[":
                in_object.append(punct == "{")
            elif punct in "}]" and in_object:
                in_object.pop()
            expect_key = punct in "{," and bool(in_object) and in_object[-1]
            yield JsonToken("punct", punct)
        elif word is not None:
            at = match.end()
            complete = final or at < len(text)
            if expect_key:
                yield JsonToken("string", word, complete)
            elif not complete:
                yield JsonToken("scalar", word, complete=False)
            else:
                yield JsonToken("scalar" if _is_json_scalar(word) else "string", word)
            expect_key = False
            if not complete:
                return
        elif match.group().strip() == QUOTE:
            end = text.find(QUOTE, match.end())
            if end < 0:
                rest = text[match.end():]
                yield JsonToken("string", rest if final else settled_content(rest, (QUOTE,), False), complete=False)
                return
            yield JsonToken("string", text[match.end():end])
            at, expect_key = end + len(QUOTE), False
        else:                                    # a JSON string
            try:
                value, at = json.decoder.scanstring(text, match.end())
            except json.JSONDecodeError:
                yield from json_tokens(text[match.end() - 1:])
                return
            yield JsonToken("string", value)
            expect_key = False


def _is_json_scalar(word: str) -> bool:
    try:
        json.loads(word)
        return True
    except json.JSONDecodeError:
        return False


def tool_call_grammar(tools: list[dict[str, Any]], name: str | None, parallel: bool = True) -> str:
    """EBNF for an answer that is only tool calls, from its first token (no thought block): one call to `name`,
    or (name None) calls to any of the tools, several when `parallel`; arguments as JSON following the tool's
    schema, which the parser reads like Gemma's own notation."""
    calls = [[f"{TOOL_CALL_START}call:{t['function']['name']}", t["function"].get("parameters") or {"type": "object"},
              TOOL_CALL_END] for t in tools if name is None or t["function"]["name"] == name]
    return tool_calls_ebnf(calls, parallel and name is None)


def reasoning_gate(tokenizer: Any, prompt_token_ids: list[int]) -> ReasoningGate:
    """A thought block, when the model writes one, is the answer's first token `<|channel>` up to `<channel|>`."""
    start, end = _token_id(tokenizer, CHANNEL_START), _token_id(tokenizer, CHANNEL_END)
    if start is None or end is None:
        return ReasoningGate("answer")
    return ReasoningGate("open", (end,), start)
