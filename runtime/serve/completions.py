"""POST /v1/completions: prompts (text, token ids, or lists of either) to `text_completion` objects. `echo`
puts the prompt before the completion (with `logprobs`, the prompt tokens' logprobs before the completion's:
None for the first); vLLM's `prompt_logprobs` extra adds them per choice as {token id: logprob, rank}."""
from __future__ import annotations

import time
from typing import Any, Iterator

from fastapi import Request
from fastapi.responses import Response

from runtime.request import CompletionOutput, PromptLogprobs, RequestOutput
from runtime.serve.protocol import ApiError, CompletionBody, reject_unsupported, sampling_params, wants_usage_chunk
from runtime.serve.render import ChoiceRenderer, Job, StreamProgress, clamp_logprob, ranked, token_text, usage
from runtime.serve.serving import ServingContext, respond
from runtime.tokenizer import Tokenizer

Prompt = str | list[str] | list[int] | list[list[int]]


async def create_completion(ctx: ServingContext, body: CompletionBody, request: Request) -> Response:
    arrival = time.monotonic()
    model = ctx.check_model(body.model)
    reject_unsupported(body, {"suffix": bool, "logit_bias": bool,
                              "best_of": lambda v: v is not None and v != body.n})
    # the prompt's logprobs come from its own forward: echo with logprobs asks for as many as the output's
    wanted = [n for n in (body.prompt_logprobs, body.logprobs if body.echo else None) if n is not None]
    params = sampling_params(body, body.max_tokens, body.logprobs, {}, ctx.vocab_size,
                             prompt_logprobs=max(wanted) if wanted else None)
    include_usage = wants_usage_chunk(body)
    prompts = await _prompt_ids(ctx, body.prompt)
    echo = _prompt_texts(ctx.tokenizer, body.prompt, prompts) if body.echo else None
    job = await ctx.start_job("cmpl", model, prompts, params, body.stream, arrival)
    fmt = CompletionFormat(job, ChoiceRenderer(ctx.tokenizer, None, params), ctx.tokenizer, echo,
                           body.prompt_logprobs)
    return await respond(ctx.engine_client, job, fmt, body.stream, include_usage, request)


def _listed(prompt: Prompt) -> list[str] | list[list[int]]:
    return [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt


async def _prompt_ids(ctx: ServingContext, prompt: Prompt) -> list[list[int]]:
    prompt = _listed(prompt)
    if not prompt:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    texts = [p for p in prompt if isinstance(p, str)]
    encoded = iter(await ctx.tokenize(texts) if texts else [])
    return [next(encoded) if isinstance(p, str) else list(p) for p in prompt]


def _prompt_texts(tokenizer: Tokenizer, prompt: Prompt, ids: list[list[int]]) -> list[str]:
    """What echo puts before each completion: the prompt as sent, or its token ids decoded."""
    return [p if isinstance(p, str) else tokenizer.decode(i, skip_special_tokens=False)
            for p, i in zip(_listed(prompt), ids)]


class CompletionFormat:
    """/v1/completions objects: `text_completion`, whole or as stream chunks."""

    def __init__(self, job: Job, renderer: ChoiceRenderer, tokenizer: Tokenizer, echo: list[str] | None = None,
                 prompt_logprobs: int | None = None):
        self.job, self.renderer, self.tokenizer = job, renderer, tokenizer
        self.echo, self.prompt_logprobs = echo, prompt_logprobs
        self.sent: dict[tuple[str, int], StreamProgress] = {}

    def opening(self) -> list[dict[str, Any]]:
        return []

    def chunks(self, newest: dict[str, RequestOutput]) -> Iterator[dict[str, Any]]:
        for request_id, output in newest.items():
            for completion in output.outputs:
                progress = self.sent.setdefault((request_id, completion.index), StreamProgress())
                choice = self._choice(request_id, output, completion, progress)
                if choice is not None:
                    yield self.envelope([choice], None)

    def response(self, final: dict[str, RequestOutput]) -> dict[str, Any]:
        choices = [self._choice(request_id, final[request_id], completion, StreamProgress())
                   for request_id in self.job.request_ids for completion in final[request_id].outputs]
        return self.envelope(choices, usage(self.job, final))

    def envelope(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        job = self.job
        return {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
                "choices": choices, "usage": usage}

    def _choice(self, request_id: str, output: RequestOutput, completion: CompletionOutput,
                sent: StreamProgress) -> dict[str, Any] | None:
        delta = self.renderer.delta(completion, sent)
        if delta is None:
            return None
        first = not sent.prompt_sent            # the prompt's parts go with a choice's first chunk
        sent.prompt_sent = True
        text, top_n = delta.content, self.renderer.params.logprobs
        logprobs = None
        if first and self.echo is not None:
            text = self.echo[self.job.request_ids.index(request_id)] + text
            if top_n is not None:
                logprobs = _echoed_logprobs(self.tokenizer, output.prompt_token_ids, output.prompt_logprobs,
                                            top_n, sent)
        if delta.logprobs is not None:
            generated = _logprobs(self.tokenizer, delta.token_ids, delta.logprobs, top_n, sent)
            logprobs = generated if logprobs is None else {k: logprobs[k] + generated[k] for k in logprobs}
        choice = {"index": self.job.choice_index(request_id, completion), "text": text,
                  "logprobs": logprobs, "finish_reason": delta.finish_reason}
        if first and self.prompt_logprobs is not None:
            choice["prompt_logprobs"] = _wire_prompt_logprobs(self.tokenizer, output.prompt_logprobs,
                                                              self.prompt_logprobs)
        return choice


def _logprobs(tokenizer: Tokenizer, token_ids: list[int], entries: list[dict[int, float]], top_n: int,
              sent: StreamProgress) -> dict[str, Any]:
    texts = [token_text(tokenizer, t) for t in token_ids]
    return {"tokens": texts, "token_logprobs": [clamp_logprob(e[t]) for t, e in zip(token_ids, entries)],
            "top_logprobs": [{token_text(tokenizer, a): clamp_logprob(lp) for a, lp in ranked(e, top_n)}
                             for e in entries],
            "text_offset": _offsets(texts, sent)}


def _echoed_logprobs(tokenizer: Tokenizer, prompt_ids: list[int], entries: PromptLogprobs, top_n: int,
                     sent: StreamProgress) -> dict[str, Any]:
    """The prompt tokens' part of an echoed choice's logprobs: None for the first token, which nothing
    predicts."""
    texts = [token_text(tokenizer, t) for t in prompt_ids]
    values = [None if e is None else {t: lp.logprob for t, lp in e.items()} for e in entries]
    return {"tokens": texts,
            "token_logprobs": [None if v is None else clamp_logprob(v[t]) for t, v in zip(prompt_ids, values)],
            "top_logprobs": [None if v is None else {token_text(tokenizer, a): clamp_logprob(lp)
                                                     for a, lp in ranked(v, top_n)} for v in values],
            "text_offset": _offsets(texts, sent)}


def _offsets(texts: list[str], sent: StreamProgress) -> list[int]:
    offsets = []
    for text in texts:
        offsets.append(sent.text_offset)
        sent.text_offset += len(text)
    return offsets


def _wire_prompt_logprobs(tokenizer: Tokenizer, entries: PromptLogprobs, top_n: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {logprob, rank, decoded_token}},
    the prompt's own token and the top n."""
    wire: list[dict | None] = []
    for entry in entries:
        if entry is None:
            wire.append(None)
            continue
        wanted = {t for t, _ in ranked({t: lp.logprob for t, lp in entry.items()}, top_n)} | {next(iter(entry))}
        wire.append({str(t): {"logprob": clamp_logprob(lp.logprob), "rank": lp.rank,
                              "decoded_token": token_text(tokenizer, t)} for t, lp in entry.items() if t in wanted})
    return wire
