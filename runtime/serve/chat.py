"""POST /v1/chat/completions: messages rendered by the model package (its renderer, else the tokenizer's
chat template, on a worker thread with a time limit) to `chat.completion` objects, with the package's
reasoning parser splitting `reasoning_content` from `content`."""
from __future__ import annotations

import time
from typing import Any, Iterator

from fastapi import Request
from fastapi.responses import Response

from runtime.request import RequestOutput
from runtime.serve.protocol import ApiError, ChatBody, reject_unsupported, sampling_params, wants_usage_chunk
from runtime.serve.render import ChoiceRenderer, Delta, Job, StreamProgress, clamp_logprob, ranked, token_text, usage
from runtime.serve.serving import ServingContext, respond
from runtime.tokenizer import Tokenizer


async def create_chat_completion(ctx: ServingContext, body: ChatBody, request: Request) -> Response:
    arrival = time.monotonic()
    model = ctx.check_model(body.model)
    reject_unsupported(body, {"logit_bias": bool, "tools": bool})
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    renames = {"max_tokens": "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens",
               "logprobs": "top_logprobs"}
    params = sampling_params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None, renames,
                             ctx.vocab_size, body.response_format)
    include_usage = wants_usage_chunk(body)
    prompt = await ctx.render_chat(body.template_messages(), body.chat_options())
    job = await ctx.start_job("chatcmpl", model, [prompt], params, body.stream, arrival)
    fmt = ChatFormat(job, ChoiceRenderer(ctx.tokenizer, ctx.package.reasoning_parser, params), ctx.tokenizer)
    return await respond(ctx.engine_client, job, fmt, body.stream, include_usage, request)


class ChatFormat:
    """/v1/chat/completions objects: `chat.completion`, or `chat.completion.chunk`s whose deltas carry
    `reasoning_content` and `content` separately."""

    def __init__(self, job: Job, renderer: ChoiceRenderer, tokenizer: Tokenizer):
        self.job, self.renderer, self.tokenizer = job, renderer, tokenizer
        self.sent: dict[tuple[str, int], StreamProgress] = {}

    def opening(self) -> list[dict[str, Any]]:
        return [self.envelope([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}], None) for i in range(self.job.n * len(self.job.request_ids))]

    def chunks(self, newest: dict[str, RequestOutput]) -> Iterator[dict[str, Any]]:
        for request_id, output in newest.items():
            for completion in output.outputs:
                progress = self.sent.setdefault((request_id, completion.index), StreamProgress())
                delta = self.renderer.delta(completion, progress)
                if delta is None:
                    continue
                message: dict[str, str] = {}
                if delta.reasoning:
                    message["reasoning_content"] = delta.reasoning
                if delta.content or not delta.reasoning:
                    message["content"] = delta.content
                yield self.envelope([{"index": self.job.choice_index(request_id, completion), "delta": message,
                                      "logprobs": self._logprobs(delta), "finish_reason": delta.finish_reason}], None)

    def response(self, final: dict[str, RequestOutput]) -> dict[str, Any]:
        choices = []
        for request_id in self.job.request_ids:
            for completion in final[request_id].outputs:
                delta = self.renderer.delta(completion, StreamProgress())
                message = {"role": "assistant", "content": delta.content, "reasoning_content": delta.reasoning or None}
                choices.append({"index": self.job.choice_index(request_id, completion), "message": message,
                                "logprobs": self._logprobs(delta), "finish_reason": delta.finish_reason})
        return {**self.envelope(choices, usage(self.job, final)), "object": "chat.completion"}

    def envelope(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        job = self.job
        return {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": job.model,
                "choices": choices, "usage": usage}

    def _logprobs(self, delta: Delta) -> dict[str, Any] | None:
        if delta.logprobs is None:
            return None
        top_n = self.renderer.params.logprobs

        def token(token_id: int, logprob: float) -> dict[str, Any]:
            text = token_text(self.tokenizer, token_id)
            return {"token": text, "logprob": clamp_logprob(logprob), "bytes": list(text.encode())}
        return {"content": [{**token(t, entry[t]), "top_logprobs": [token(a, lp) for a, lp in ranked(entry, top_n)]}
                            for t, entry in zip(delta.token_ids, delta.logprobs)]}
