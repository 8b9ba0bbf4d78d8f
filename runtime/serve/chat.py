"""POST /v1/chat/completions: messages rendered by the model package (its renderer, else the tokenizer's
chat template, on a worker thread with a time limit) to `chat.completion` objects, with the package's
reasoning parser splitting `reasoning_content` from `content`."""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable, Iterator

from fastapi import Request
from fastapi.responses import Response

from runtime.request import RequestOutput
from runtime.serve.protocol import ApiError, ChatBody, reject_unsupported, sampling_params, wants_usage_chunk
from runtime.serve.render import ChoiceRenderer, Delta, Job, StreamProgress, clamp_logprob, ranked, token_text, usage
from runtime.serve.serving import ServingContext, respond
from runtime.structured import StructuredOutputsParams
from runtime.tool_calls import ParsedOutput, ToolCallDelta, ToolCallProgress, ToolCallStreams
from runtime.tokenizer import Tokenizer


async def create_chat_completion(ctx: ServingContext, body: ChatBody, request: Request) -> Response:
    arrival = time.monotonic()
    model = ctx.check_model(body.model)
    reject_unsupported(body, {"logit_bias": bool})
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    renames = {"max_tokens": "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens",
               "logprobs": "top_logprobs"}
    params = sampling_params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None, renames,
                             ctx.vocab_size, body.response_format)
    include_usage = wants_usage_chunk(body)
    options = body.chat_options()
    tool_parser = None
    if body.tools:
        params, tool_parser = _tool_calling(ctx, body, params)
        options["tools"] = body.tools
    prompt = await ctx.render_chat(body.template_messages(), options)
    reasoning_parser = ctx.package.reasoning_parser
    if _answers_at_once(ctx, prompt):
        reasoning_parser, tool_parser = None, _answer_only(tool_parser) if tool_parser else None
    job = await ctx.start_job("chatcmpl", model, [prompt], params, body.stream, arrival)
    tools = ToolCallStreams(tool_parser, ctx.tokenizer, body.parallel_tool_calls) if tool_parser else None
    fmt = ChatFormat(job, ChoiceRenderer(ctx.tokenizer, reasoning_parser, params), ctx.tokenizer, tools)
    return await respond(ctx.engine_client, job, fmt, body.stream, include_usage, request)


def _tool_calling(ctx: ServingContext, body: ChatBody, params):
    """(sampling params, the package's tool-call parser or None) of a request with tools: tool_choice
    "none" parses no calls; "required" and a named function constrain the answer with the family's
    tool-call grammar, so it is calls only and their arguments follow the tools' schemas."""
    forced, name = body.forced_tool()
    if body.tool_choice == "none":
        return params, None
    package = ctx.package
    if package.tool_parser is None or (forced and package.tool_call_grammar is None):
        raise ApiError(400, f"tool calling is not supported for {package.name} models yet", param="tools")
    if forced:
        if params.structured_outputs is not None:
            raise ApiError(400, "tool_choice required or a named function cannot be combined with "
                           "response_format or structured_outputs", param="tool_choice")
        grammar = package.tool_call_grammar(body.tools, name, body.parallel_tool_calls)
        params = replace(params, structured_outputs=StructuredOutputsParams(grammar=grammar, in_reasoning=True))
    return params, package.tool_parser


def _answers_at_once(ctx: ServingContext, prompt: list[int]) -> bool:
    """Whether the prompt closed the reasoning (a chat mode, thinking off): then the whole output is the answer,
    whatever a parser written for the reasoning mode would take for reasoning."""
    gate = ctx.package.reasoning_gate
    return gate is not None and gate(ctx.tokenizer, prompt).state == "answer"


def _answer_only(parser: Callable[[Any, list[int], bool], ParsedOutput]) -> Callable[[Any, list[int], bool],
                                                                                      ParsedOutput]:
    """The package's output parser with what it reads as reasoning put back into the content."""
    def parse(tokenizer: Any, token_ids: list[int], final: bool) -> ParsedOutput:
        parsed = parser(tokenizer, token_ids, final)
        return replace(parsed, reasoning=None, content=(parsed.reasoning or "") + parsed.content)
    return parse


class ChatFormat:
    """/v1/chat/completions objects: `chat.completion`, or `chat.completion.chunk`s whose deltas carry
    `reasoning_content` and `content` separately."""

    def __init__(self, job: Job, renderer: ChoiceRenderer, tokenizer: Tokenizer, tools: ToolCallStreams | None = None):
        self.job, self.renderer, self.tokenizer, self.tools = job, renderer, tokenizer, tools
        self.sent: dict[tuple[str, int], StreamProgress] = {}
        self.tool_progress: dict[tuple[str, int], ToolCallProgress] = {}

    def opening(self) -> list[dict[str, Any]]:
        return [self.envelope([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}], None) for i in range(self.job.n * len(self.job.request_ids))]

    def chunks(self, newest: dict[str, RequestOutput]) -> Iterator[dict[str, Any]]:
        for request_id, output in newest.items():
            for completion in output.outputs:
                if self.tools is not None:
                    progress = self.tool_progress.setdefault((request_id, completion.index), ToolCallProgress())
                    delta = self.tools.delta(completion, progress)
                else:
                    delta = self.renderer.delta(completion, self.sent.setdefault((request_id, completion.index),
                                                                                 StreamProgress()))
                if delta is None:
                    continue
                message: dict[str, Any] = {}
                if delta.reasoning:
                    message["reasoning_content"] = delta.reasoning
                tool_calls = getattr(delta, "tool_calls", None)
                if delta.content or not (delta.reasoning or tool_calls):
                    message["content"] = delta.content
                if tool_calls:
                    message["tool_calls"] = tool_calls
                yield self.envelope([{"index": self.job.choice_index(request_id, completion), "delta": message,
                                      "logprobs": self._logprobs(delta), "finish_reason": delta.finish_reason}], None)

    def response(self, final: dict[str, RequestOutput]) -> dict[str, Any]:
        choices = []
        for request_id in self.job.request_ids:
            for completion in final[request_id].outputs:
                if self.tools is not None:
                    delta = self.tools.delta(completion, ToolCallProgress())
                else:
                    delta = self.renderer.delta(completion, StreamProgress())
                message = {"role": "assistant", "content": delta.content, "reasoning_content": delta.reasoning or None}
                if getattr(delta, "tool_calls", None):
                    message["content"] = delta.content or None
                    message["tool_calls"] = [{"id": call["id"], "type": "function", "function": call["function"]}
                                             for call in delta.tool_calls]
                choices.append({"index": self.job.choice_index(request_id, completion), "message": message,
                                "logprobs": self._logprobs(delta), "finish_reason": delta.finish_reason})
        return {**self.envelope(choices, usage(self.job, final)), "object": "chat.completion"}

    def envelope(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        job = self.job
        return {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": job.model,
                "choices": choices, "usage": usage}

    def _logprobs(self, delta: Delta | ToolCallDelta) -> dict[str, Any] | None:
        if delta.logprobs is None:
            return None
        top_n = self.renderer.params.logprobs

        def token(token_id: int, logprob: float) -> dict[str, Any]:
            text = token_text(self.tokenizer, token_id)
            return {"token": text, "logprob": clamp_logprob(logprob), "bytes": list(text.encode())}
        return {"content": [{**token(t, entry[t]), "top_logprobs": [token(a, lp) for a, lp in ranked(entry, top_n)]}
                            for t, entry in zip(delta.token_ids, delta.logprobs)]}
