"""Drive a package's tool-call parser the way the server does, over a character-level fake tokenizer (one
token per character, each special string one token), so a stream can be cut at every position."""
from __future__ import annotations

import json
from typing import Any

from runtime.request import CompletionOutput
from runtime.tool_calls import ToolCallProgress, ToolCallStreams


class CharTokenizer:
    """ids: code points for plain characters, 10**6 + i for special string i."""

    def __init__(self, specials: tuple[str, ...]):
        self.specials = tuple(sorted(specials, key=len, reverse=True))
        self.ids = {s: 10**6 + i for i, s in enumerate(specials)}
        self.names = {i: s for s, i in self.ids.items()}
        self.hf = self
        self.unk_token_id = -1

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.ids.get(token, -1)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            special = next((s for s in self.specials if text.startswith(s, i)), None)
            if special is not None:
                ids.append(self.ids[special])
                i += len(special)
            else:
                ids.append(ord(text[i]))
                i += 1
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True, **_: Any) -> str:
        return "".join(self.names[i] if i in self.names else chr(i) for i in ids
                       if not (skip_special_tokens and i in self.names))


def final_message(parser, tokenizer, ids: list[int], parallel: bool = True) -> dict[str, Any]:
    """What a non-streaming response carries: reasoning, content and calls (name, arguments)."""
    delta = ToolCallStreams(parser, tokenizer, parallel).delta(_output(ids, "stop"), ToolCallProgress())
    return {"reasoning": delta.reasoning, "content": delta.content, "finish_reason": delta.finish_reason,
            "calls": [(c["function"]["name"], c["function"]["arguments"]) for c in delta.tool_calls]}


def streamed_message(parser, tokenizer, ids: list[int], step: int = 1, parallel: bool = True) -> dict[str, Any]:
    """The same, assembled from stream deltas sent after every `step` tokens, checking the chunk rules:
    a call's first chunk has id, type and name, later ones only arguments, ids are unique."""
    streams, progress = ToolCallStreams(parser, tokenizer, parallel), ToolCallProgress()
    reasoning, content, calls, finish = "", "", {}, None
    cuts = list(range(step, len(ids), step)) + [len(ids)]
    for cut in cuts:
        delta = streams.delta(_output(ids[:cut], "stop" if cut == len(ids) else None), progress)
        if delta is None:
            continue
        reasoning += delta.reasoning
        content += delta.content
        finish = delta.finish_reason or finish
        for chunk in delta.tool_calls:
            if chunk["index"] not in calls:
                assert chunk["index"] == len(calls) and chunk["type"] == "function" and chunk["id"].startswith("call_")
                calls[chunk["index"]] = [chunk["id"], chunk["function"]["name"], ""]
            else:
                assert set(chunk) == {"index", "function"} and set(chunk["function"]) == {"arguments"}
            calls[chunk["index"]][2] += chunk["function"]["arguments"]
    assert len({c[0] for c in calls.values()}) == len(calls)
    for _, _, arguments in calls.values():
        json.loads(arguments)
    return {"reasoning": reasoning, "content": content, "finish_reason": finish,
            "calls": [(name, arguments) for _, name, arguments in calls.values()]}


def _output(ids: list[int], finish_reason: str | None) -> CompletionOutput:
    return CompletionOutput(index=0, text="", token_ids=list(ids), finish_reason=finish_reason, stop_reason=None,
                            logprobs=None)
