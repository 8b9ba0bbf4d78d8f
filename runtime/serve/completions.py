"""POST /v1/completions: prompts (text, token ids, or lists of either) to `text_completion` objects."""
from __future__ import annotations

import time
from typing import Any, Iterator

from fastapi import Request
from fastapi.responses import Response

from runtime.request import CompletionOutput, RequestOutput
from runtime.serve.protocol import ApiError, CompletionBody, reject_unsupported, sampling_params, wants_usage_chunk
from runtime.serve.render import ChoiceRenderer, Job, StreamProgress, clamp_logprob, ranked, token_text, usage
from runtime.serve.serving import ServingContext, respond
from runtime.tokenizer import Tokenizer


async def create_completion(ctx: ServingContext, body: CompletionBody, request: Request) -> Response:
    arrival = time.monotonic()
    model = ctx.check_model(body.model)
    reject_unsupported(body, {"echo": bool, "suffix": bool, "logit_bias": bool,
                              "best_of": lambda v: v is not None and v != body.n})
    params = sampling_params(body, body.max_tokens, body.logprobs, {}, ctx.vocab_size)
    include_usage = wants_usage_chunk(body)
    prompts = await _prompt_ids(ctx, body.prompt)
    job = await ctx.start_job("cmpl", model, prompts, params, body.stream, arrival)
    fmt = CompletionFormat(job, ChoiceRenderer(ctx.tokenizer, None, params), ctx.tokenizer)
    return await respond(ctx.engine_client, job, fmt, body.stream, include_usage, request)


async def _prompt_ids(ctx: ServingContext, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    texts = [p for p in prompt if isinstance(p, str)]
    encoded = iter(await ctx.tokenize(texts) if texts else [])
    return [next(encoded) if isinstance(p, str) else list(p) for p in prompt]


class CompletionFormat:
    """/v1/completions objects: `text_completion`, whole or as stream chunks."""

    def __init__(self, job: Job, renderer: ChoiceRenderer, tokenizer: Tokenizer):
        self.job, self.renderer, self.tokenizer = job, renderer, tokenizer
        self.sent: dict[tuple[str, int], StreamProgress] = {}

    def opening(self) -> list[dict[str, Any]]:
        return []

    def chunks(self, newest: dict[str, RequestOutput]) -> Iterator[dict[str, Any]]:
        for request_id, output in newest.items():
            for completion in output.outputs:
                progress = self.sent.setdefault((request_id, completion.index), StreamProgress())
                choice = self._choice(request_id, completion, progress)
                if choice is not None:
                    yield self.envelope([choice], None)

    def response(self, final: dict[str, RequestOutput]) -> dict[str, Any]:
        choices = [self._choice(request_id, completion, StreamProgress())
                   for request_id in self.job.request_ids for completion in final[request_id].outputs]
        return self.envelope(choices, usage(self.job, final))

    def envelope(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        job = self.job
        return {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
                "choices": choices, "usage": usage}

    def _choice(self, request_id: str, completion: CompletionOutput, sent: StreamProgress) -> dict[str, Any] | None:
        delta = self.renderer.delta(completion, sent)
        if delta is None:
            return None
        logprobs = None
        if delta.logprobs is not None:
            logprobs = _logprobs(self.tokenizer, delta.token_ids, delta.logprobs, self.renderer.params.logprobs, sent)
        return {"index": self.job.choice_index(request_id, completion), "text": delta.content,
                "logprobs": logprobs, "finish_reason": delta.finish_reason}


def _logprobs(tokenizer: Tokenizer, token_ids: list[int], entries: list[dict[int, float]], top_n: int,
              sent: StreamProgress) -> dict[str, Any]:
    texts = [token_text(tokenizer, t) for t in token_ids]
    offsets = []
    for text in texts:
        offsets.append(sent.text_offset)
        sent.text_offset += len(text)
    return {"tokens": texts, "token_logprobs": [clamp_logprob(e[t]) for t, e in zip(token_ids, entries)],
            "top_logprobs": [{token_text(tokenizer, a): clamp_logprob(lp) for a, lp in ranked(e, top_n)}
                             for e in entries],
            "text_offset": offsets}
