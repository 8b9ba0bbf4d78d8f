"""OpenAI-compatible HTTP server over the engine: `run-model ARCH --serve`.

Two threads. The engine loop thread is the only code that calls Engine methods: between steps it applies
the commands the HTTP side queued (add, abort, stop), runs a step, and pushes each output into the asyncio
queue of its request with one `loop.call_soon_threadsafe` per step. The asyncio event loop (uvicorn) does
everything else: validation, chat rendering and tokenization with its own tokenizer, and turning the
engine's cumulative outputs into responses or server-sent-event deltas. Engine outputs are cumulative, so a
stream that falls behind skips to the newest output and loses nothing.

The chat surface is the model package's: `render_chat` when it has one (else the tokenizer's chat
template) and `reasoning_parser`, which splits the output into `reasoning_content` and `content`."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import secrets
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, AsyncIterator, Callable, Iterator, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from runtime.engine import Engine
from runtime.metrics import EngineSnapshot, ServerMetrics
from runtime.request import CompletionOutput, RequestOutput, SamplingParams
from runtime.tokenizer import Tokenizer

logger = logging.getLogger("run-model")

MAX_N = 128                    # completions per prompt, as OpenAI allows
MAX_LOGPROBS = 20              # top alternatives per token
_MAX_SEED = 2**63 - 1 - MAX_N  # the engine gives completion i the seed `seed + i`, an int64


@dataclass(slots=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()                # empty = no authentication
    served_model_names: tuple[str, ...] = ()      # the first is the one /v1/models reports
    shutdown_timeout: float = 10.0                # seconds in-flight requests get to finish on SIGTERM


# ---- request bodies ---------------------------------------------------------------------------------------

class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do, so newer clients keep working.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class _GenerationBody(_Body):
    """Fields /v1/completions and /v1/chat/completions share, with the usual extras (top_k ... ignore_eos)."""
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, le=_MAX_SEED)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[str, float] | None = None


class CompletionBody(_GenerationBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Extra fields (tool_calls, name, reasoning_content, ...) go through to the chat template.
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None


class ChatBody(_GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None                 # None = up to the context length
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None


_FIELD_NAMES = {name for body in (CompletionBody, ChatBody, ChatMessage, TextPart, StreamOptions)
                for name in body.model_fields}


# ---- errors -----------------------------------------------------------------------------------------------

class ApiError(Exception):
    """An error the client caused (4xx) or the server could not avoid (5xx), in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _validation_error(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    if errors[0].get("type") == "json_invalid":
        detail = errors[0].get("ctx", {}).get("error", "")
        return ApiError(400, f"the body is not valid JSON: {detail} (at character {errors[0]['loc'][-1]})")
    param = _field_path(errors[0].get("loc", ()))
    # a value that fits no member of a union (prompt: str | list[int] | ...) fails once per member
    reasons = dict.fromkeys(e.get("msg", "invalid value") for e in errors if _field_path(e.get("loc", ())) == param)
    return ApiError(400, f"{param or 'body'}: {'; or '.join(reasons)}", param=param)


def _field_path(location: tuple) -> str | None:
    """`messages.0.role` from pydantic's location, which also names union members (`prompt.list[int].0`)."""
    path = []
    for part in location[1:] if location[:1] == ("body",) else location:
        if isinstance(part, str) and part not in _FIELD_NAMES:
            break
        path.append(str(part))
    return ".".join(path) or None


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return ApiError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in a request")
        return ApiError(500, f"internal server error: {type(exc).__name__}", kind="server_error").response()


class _ApiKeyCheck:
    """ASGI middleware: /v1/* needs `Authorization: Bearer KEY`. It runs before the body is parsed, so an
    unauthenticated client learns nothing about its request."""

    def __init__(self, app: Any, api_keys: tuple[str, ...]):
        self.app, self.api_keys = app, tuple(k.encode() for k in api_keys)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and not self._authorized(scope):
            error = ApiError(401, "missing or wrong API key; send `Authorization: Bearer <key>`",
                             code="invalid_api_key")
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: dict) -> bool:
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and any(secrets.compare_digest(token.strip().encode(), key)
                                                  for key in self.api_keys)


# ---- the engine loop --------------------------------------------------------------------------------------

@dataclass(slots=True)
class _Submit:
    request_ids: list[str]
    prompts: list[list[int]]
    params: SamplingParams
    stream: bool
    arrival_time: float
    outbox: asyncio.Queue


@dataclass(slots=True)
class _Abort:
    request_ids: list[str]


_STOP = object()


@dataclass(slots=True)
class _Accepted:
    pass


@dataclass(slots=True)
class _Failed:
    """The engine could not take or finish a request."""
    status: int
    message: str


class EngineLoop:
    """Owns the engine on its own thread. Everything else talks to it through submit / abort / stop."""

    def __init__(self, engine: Engine, metrics: ServerMetrics):
        self.engine = engine
        self.metrics = metrics
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._outboxes: dict[str, asyncio.Queue] = {}          # engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.dead: str | None = None                           # why the loop stopped serving, if it did

    # -- called from the event loop --

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._publish_snapshot()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._commands.put(_STOP)
            self._thread.join(timeout)

    async def submit(self, request_ids: list[str], prompts: list[list[int]], params: SamplingParams,
                     stream: bool, arrival_time: float) -> asyncio.Queue:
        """Queue prompts; returns the queue their outputs will arrive in, once the engine accepted them."""
        if self.dead is not None:
            raise ApiError(503, f"the engine is not serving: {self.dead}", kind="server_error")
        outbox: asyncio.Queue = asyncio.Queue()
        self._commands.put(_Submit(request_ids, prompts, params, stream, arrival_time, outbox))
        try:
            answer = await outbox.get()
        except asyncio.CancelledError:      # nobody will read the outputs: do not generate them
            self.abort(request_ids)
            raise
        if isinstance(answer, _Failed):
            raise ApiError(answer.status, answer.message, kind="invalid_request_error" if answer.status < 500
                           else "server_error")
        return outbox

    def abort(self, request_ids: list[str]) -> None:
        self._commands.put(_Abort(request_ids))

    # -- the engine thread --

    def _run(self) -> None:
        try:
            while self._apply_commands(block=not self.engine.has_unfinished()):
                if self.engine.has_unfinished():
                    self._step()
                self._publish_snapshot()
        except Exception as exc:           # a bug in this loop: say so on every channel, keep answering
            logger.exception("the engine loop failed")
            self.dead = f"{type(exc).__name__}: {exc}"
            self._fail_all(503, f"the engine loop failed ({self.dead})")
            while (command := self._commands.get()) is not _STOP:
                if isinstance(command, _Submit):
                    self._post([(command.outbox, _Failed(503, f"the engine is not serving: {self.dead}"))])

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one if `block`); False once asked to stop."""
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return True
        while True:
            if command is _STOP:
                self._fail_all(503, "the server is shutting down")
                self._publish_snapshot()
                return False
            if isinstance(command, _Submit):
                self._add(command)
            else:
                self._abort(command.request_ids)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _add(self, submit: _Submit) -> None:
        added: list[str] = []
        try:
            for request_id, prompt in zip(submit.request_ids, submit.prompts):
                self.engine.add_request(request_id, prompt, submit.params, stream=submit.stream,
                                        arrival_time=submit.arrival_time)
                added.append(request_id)
        except Exception as exc:           # ValueError = a request that can never be served; else a bug
            for request_id in added:
                self.engine.abort(request_id)
            if not isinstance(exc, ValueError):
                logger.exception("adding a request failed")
            status = 400 if isinstance(exc, ValueError) else 500
            self._post([(submit.outbox, _Failed(status, str(exc)))])
            return
        for request_id in added:
            self._outboxes[request_id] = submit.outbox
        self._post([(submit.outbox, _Accepted())])

    def _abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            if self._outboxes.pop(request_id, None) is not None:
                self.engine.abort(request_id)
                self.metrics.record_finished("abort")

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            # The step's requests cannot be trusted any more; fail them all, and keep serving new ones.
            logger.exception("an engine step failed")
            self._fail_all(500, f"the engine failed while generating: {type(exc).__name__}: {exc}")
            return
        self.metrics.record_step(self.engine.last_step_stats)
        deliveries = []
        for output in outputs:
            outbox = self._outboxes.get(output.request_id)
            if outbox is None:
                continue
            if output.finished:
                del self._outboxes[output.request_id]
                self.metrics.record_finished(output.finish_reason or "stop")
            deliveries.append((outbox, output))
        self._post(deliveries)

    def _fail_all(self, status: int, message: str) -> None:
        failed = list(self._outboxes.items())
        self._outboxes.clear()
        for request_id, _ in failed:
            with contextlib.suppress(Exception):
                self.engine.abort(request_id)
            self.metrics.record_finished("abort")
        self._post([(outbox, _Failed(status, message)) for _, outbox in failed])

    def _post(self, deliveries: list[tuple[asyncio.Queue, Any]]) -> None:
        """Hand items to their asyncio queues: one wake-up of the event loop for the whole batch."""
        if deliveries and self._loop is not None:
            with contextlib.suppress(RuntimeError):        # the event loop has already closed
                self._loop.call_soon_threadsafe(_put_all, deliveries)

    def _publish_snapshot(self) -> None:
        kv, scheduler = self.engine.kv, self.engine.scheduler
        self.metrics.record_snapshot(EngineSnapshot(
            num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
            kv_blocks_used=[pool.num_used for pool in kv.pools],
            kv_blocks_total=[pool.num_blocks - 1 for pool in kv.pools],
            prefix_cache_queries=kv.stats.queries, prefix_cache_hits=kv.stats.hits,
            num_preemptions=scheduler.stats.num_preemptions))


def _put_all(deliveries: list[tuple[asyncio.Queue, Any]]) -> None:
    for outbox, item in deliveries:
        outbox.put_nowait(item)


# ---- from engine outputs to what the client sees ----------------------------------------------------------

@dataclass(slots=True)
class _Job:
    """One HTTP request: its prompts (each one engine request) and where their outputs arrive."""
    id: str
    created: int
    model: str
    request_ids: list[str]
    prompt_lengths: list[int]
    n: int
    outbox: asyncio.Queue

    def choice_index(self, request_id: str, completion: CompletionOutput) -> int:
        return self.request_ids.index(request_id) * self.n + completion.index


@dataclass(slots=True)
class StreamProgress:
    """What a stream has already sent of one choice."""
    reasoning: str = ""
    content: str = ""
    num_tokens: int = 0          # tokens whose logprobs went out
    text_offset: int = 0         # completions logprobs: characters of token text so far
    finished: bool = False


@dataclass(slots=True)
class _Delta:
    reasoning: str
    content: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None


def _settled(text: str, holdback: int) -> str:
    """The part of a growing text later tokens cannot change: without a trailing incomplete character, and
    without the last `holdback` characters, which may still turn out to begin a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    return text[:max(0, end - holdback)]


def _suffix_after(sent: str, now: str) -> str:
    return now[len(sent):] if now.startswith(sent) else ""


def _cut_at_stop(reasoning: str | None, content: str, stop: str, keep: bool) -> tuple[str | None, str]:
    """Apply the engine's stop-string cut to parsed parts: the first occurrence ends the output."""
    if reasoning is not None and (at := reasoning.find(stop)) >= 0:
        return reasoning[:at + len(stop) * keep], ""
    if (at := content.find(stop)) >= 0:
        return reasoning, content[:at + len(stop) * keep]
    return reasoning, content


class ChoiceRenderer:
    """Text and logprobs of completions as the client sees them: whole, or as the next stream delta."""

    def __init__(self, tokenizer: Tokenizer, reasoning_parser: Callable | None, params: SamplingParams):
        self.tokenizer, self.reasoning_parser, self.params = tokenizer, reasoning_parser, params
        self.holdback = max((len(s) for s in params.stop), default=1) - 1

    def parts(self, completion: CompletionOutput) -> tuple[str | None, str]:
        """(reasoning or None, content) so far; while unfinished, only what can no longer change."""
        finished = completion.finish_reason is not None
        if self.reasoning_parser is None:
            reasoning, content = None, completion.text
        else:
            reasoning, content = self.reasoning_parser(self.tokenizer, completion.token_ids)
            if finished and isinstance(completion.stop_reason, str):
                reasoning, content = _cut_at_stop(reasoning, content, completion.stop_reason,
                                                  self.params.include_stop_str_in_output)
        if finished:
            return reasoning, content
        return (None if reasoning is None else _settled(reasoning, self.holdback)), _settled(content, self.holdback)

    def delta(self, completion: CompletionOutput, sent: StreamProgress) -> _Delta | None:
        """What is new since `sent` (and update it), or None when nothing is."""
        if sent.finished:
            return None
        reasoning, content = self.parts(completion)
        new_reasoning = _suffix_after(sent.reasoning, reasoning or "")
        new_content = _suffix_after(sent.content, content)
        token_ids = completion.token_ids[sent.num_tokens:]
        logprobs = completion.logprobs[sent.num_tokens:] if completion.logprobs is not None else None
        # a token that adds no settled text yet (half a character, a held-back stop prefix) is only worth a
        # chunk for its logprobs
        if not (new_reasoning or new_content or completion.finish_reason or (token_ids and logprobs is not None)):
            return None
        sent.reasoning += new_reasoning
        sent.content += new_content
        sent.num_tokens = len(completion.token_ids)
        sent.finished = completion.finish_reason is not None
        return _Delta(new_reasoning, new_content, token_ids, logprobs, completion.finish_reason)


@lru_cache(maxsize=None)
def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _clamp_logprob(value: float) -> float:
    return max(value, -9999.0)      # -inf is not JSON


def _ranked(entry: dict[int, float], n: int) -> list[tuple[int, float]]:
    """The top n alternatives of a logprobs entry (which also holds the sampled token)."""
    return sorted(entry.items(), key=lambda item: -item[1])[:n]


def _chat_logprobs(tokenizer: Tokenizer, token_ids: list[int], entries: list[dict[int, float]],
                   top_n: int) -> dict[str, Any]:
    def token(token_id: int, logprob: float) -> dict[str, Any]:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": _clamp_logprob(logprob), "bytes": list(text.encode())}
    content = [{**token(t, entry[t]), "top_logprobs": [token(a, lp) for a, lp in _ranked(entry, top_n)]}
               for t, entry in zip(token_ids, entries)]
    return {"content": content}


def _completion_logprobs(tokenizer: Tokenizer, token_ids: list[int], entries: list[dict[int, float]],
                         top_n: int, sent: StreamProgress) -> dict[str, Any]:
    texts = [_token_text(tokenizer, t) for t in token_ids]
    offsets = []
    for text in texts:
        offsets.append(sent.text_offset)
        sent.text_offset += len(text)
    return {"tokens": texts, "token_logprobs": [_clamp_logprob(e[t]) for t, e in zip(token_ids, entries)],
            "top_logprobs": [{_token_text(tokenizer, a): _clamp_logprob(lp) for a, lp in _ranked(e, top_n)}
                             for e in entries],
            "text_offset": offsets}


def _usage(job: _Job, outputs: dict[str, RequestOutput]) -> dict[str, Any]:
    prompt_tokens = sum(job.prompt_lengths)
    completion_tokens = sum(len(c.token_ids) for output in outputs.values() for c in output.outputs)
    cached = sum(output.num_cached_tokens for output in outputs.values())
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


class _EventStream(StreamingResponse):
    """A server-sent-event response that always closes its generator, whether the stream ended, the client
    left (Starlette cancels the stream) or the server is stopping: the generator's cleanup aborts the
    request, which frees its blocks."""
    media_type = "text/event-stream"

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _client_gone(request: Request) -> None:
    """Returns when the client closes its connection (the body has been read, so only that can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---- response formats -------------------------------------------------------------------------------------

class _CompletionFormat:
    """/v1/completions objects: `text_completion`, whole or as stream chunks."""

    def __init__(self, job: _Job, renderer: ChoiceRenderer, tokenizer: Tokenizer):
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
        return self.envelope(choices, _usage(self.job, final))

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
            logprobs = _completion_logprobs(self.tokenizer, delta.token_ids, delta.logprobs,
                                            self.renderer.params.logprobs, sent)
        return {"index": self.job.choice_index(request_id, completion), "text": delta.content,
                "logprobs": logprobs, "finish_reason": delta.finish_reason}


class _ChatFormat:
    """/v1/chat/completions objects: `chat.completion`, or `chat.completion.chunk`s whose deltas carry
    `reasoning_content` and `content` separately."""

    def __init__(self, job: _Job, renderer: ChoiceRenderer, tokenizer: Tokenizer):
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
        return {**self.envelope(choices, _usage(self.job, final)), "object": "chat.completion"}

    def envelope(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        job = self.job
        return {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": job.model,
                "choices": choices, "usage": usage}

    def _logprobs(self, delta: _Delta) -> dict[str, Any] | None:
        if delta.logprobs is None:
            return None
        return _chat_logprobs(self.tokenizer, delta.token_ids, delta.logprobs, self.renderer.params.logprobs)


# ---- the API ----------------------------------------------------------------------------------------------

def _sampling_params(body: _GenerationBody, max_tokens: int | None, logprobs: int | None,
                     renames: dict[str, str], vocab_size: int) -> SamplingParams:
    """The request's sampling parameters. SamplingParams checks the ranges; its messages start with the
    field's name, which becomes the error's `param` (under the request's name for it)."""
    for token_id in body.stop_token_ids or []:
        if not 0 <= token_id < vocab_size:
            raise ApiError(400, f"stop_token_ids must be in [0, {vocab_size}), got {token_id}",
                           param="stop_token_ids")
    try:
        return SamplingParams(
            n=body.n, temperature=_or(body.temperature, 1.0), top_p=_or(body.top_p, 1.0),
            top_k=_or(body.top_k, 0), min_p=_or(body.min_p, 0.0), seed=body.seed, max_tokens=max_tokens,
            min_tokens=body.min_tokens, stop=body.stop, stop_token_ids=body.stop_token_ids,
            ignore_eos=body.ignore_eos, logprobs=logprobs, presence_penalty=_or(body.presence_penalty, 0.0),
            frequency_penalty=_or(body.frequency_penalty, 0.0),
            repetition_penalty=_or(body.repetition_penalty, 1.0),
            include_stop_str_in_output=body.include_stop_str_in_output,
            skip_special_tokens=body.skip_special_tokens)
    except ValueError as exc:
        name = str(exc).split(" ", 1)[0]
        param = renames.get(name, name) if name in SamplingParams.__dataclass_fields__ else None
        raise ApiError(400, str(exc), param=param) from None


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _reject_unsupported(body: BaseModel, fields: dict[str, Callable[[Any], bool]]) -> None:
    for name, used in fields.items():
        if used(getattr(body, name)):
            raise ApiError(400, f"{name} is not supported by this server", param=name)


def _check_stream_options(body: _GenerationBody) -> bool:
    """Whether the stream ends with a usage chunk."""
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
    return body.stream_options is not None and body.stream_options.include_usage


class OpenAIServer:
    def __init__(self, engine: Engine, options: ServerOptions):
        self.options = options
        self.served_names = options.served_model_names or (engine.config.model,)
        self.model_root = str(engine.model_path)
        self.max_model_len, self.vocab_size = engine.max_model_len, engine.vocab_size
        self.package = engine.package
        # The engine's tokenizer belongs to the engine thread; requests are rendered with this one.
        self.tokenizer = Tokenizer(engine.config.tokenizer or str(engine.model_path))
        self.metrics = ServerMetrics(self.served_names[0])
        self.engine_loop = EngineLoop(engine, self.metrics)
        self.created = int(time.time())

    # -- /v1/completions, /v1/chat/completions --

    async def create_completion(self, body: CompletionBody, request: Request) -> Response:
        arrival = time.monotonic()
        model = self._check_model(body.model)
        _reject_unsupported(body, {"echo": bool, "suffix": bool, "logit_bias": bool,
                                   "best_of": lambda v: v is not None and v != body.n})
        params = _sampling_params(body, body.max_tokens, body.logprobs, {}, self.vocab_size)
        include_usage = _check_stream_options(body)
        job = await self._start_job("cmpl", model, self._completion_prompts(body.prompt), params, body.stream,
                                    arrival)
        fmt = _CompletionFormat(job, ChoiceRenderer(self.tokenizer, None, params), self.tokenizer)
        return await self._respond(job, fmt, body.stream, include_usage, request)

    async def create_chat_completion(self, body: ChatBody, request: Request) -> Response:
        arrival = time.monotonic()
        model = self._check_model(body.model)
        _reject_unsupported(body, {"logit_bias": bool, "tools": bool,
                                   "response_format": lambda v: v is not None and v.get("type") != "text"})
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        renames = {"max_tokens": "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens",
                   "logprobs": "top_logprobs"}
        params = _sampling_params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None, renames,
                                  self.vocab_size)
        include_usage = _check_stream_options(body)
        job = await self._start_job("chatcmpl", model, [self._chat_prompt(body)], params, body.stream, arrival)
        fmt = _ChatFormat(job, ChoiceRenderer(self.tokenizer, self.package.reasoning_parser, params), self.tokenizer)
        return await self._respond(job, fmt, body.stream, include_usage, request)

    def _check_model(self, model: str | None) -> str:
        if model is not None and model not in self.served_names:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                           f"{', '.join(map(repr, self.served_names))}", param="model", code="model_not_found")
        return model or self.served_names[0]

    def _completion_prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        return [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]

    def _chat_prompt(self, body: ChatBody) -> list[int]:
        messages = [_template_message(m) for m in body.messages]
        options = {**(body.chat_template_kwargs or {}), "add_generation_prompt": body.add_generation_prompt}
        if body.reasoning_effort is not None:
            options["reasoning_effort"] = body.reasoning_effort
        try:
            return self.package.chat_prompt(self.tokenizer, messages, options)
        except Exception as exc:     # the template rejected these messages or options: the client's to fix
            raise ApiError(400, f"cannot render the chat: {type(exc).__name__}: {exc}", param="messages") from None

    async def _start_job(self, prefix: str, model: str, prompts: list[list[int]], params: SamplingParams,
                         stream: bool, arrival_time: float) -> _Job:
        job_id = f"{prefix}-{uuid.uuid4().hex}"
        request_ids = [f"{job_id}-{i}" for i in range(len(prompts))]
        outbox = await self.engine_loop.submit(request_ids, prompts, params, stream, arrival_time)
        return _Job(job_id, int(time.time()), model, request_ids, [len(p) for p in prompts], params.n, outbox)

    async def _respond(self, job: _Job, fmt: _CompletionFormat | _ChatFormat, stream: bool, include_usage: bool,
                       request: Request) -> Response:
        if stream:
            return _EventStream(self._stream(job, fmt, include_usage))
        final = await self._final_outputs(job, request)
        if final is None:
            return Response(status_code=499)           # nobody is listening; nginx's "client closed request"
        return JSONResponse(fmt.response(final))

    async def _updates(self, job: _Job) -> AsyncIterator[dict[str, RequestOutput]]:
        """Per wake-up, the newest output of each of the job's requests that moved, until all finished."""
        unfinished = set(job.request_ids)
        while unfinished:
            newest: dict[str, RequestOutput] = {}
            item = await job.outbox.get()
            while True:
                if isinstance(item, _Failed):
                    raise ApiError(item.status, item.message, kind="server_error")
                newest[item.request_id] = item
                if item.finished:
                    unfinished.discard(item.request_id)
                if job.outbox.empty():
                    break
                item = job.outbox.get_nowait()
            yield newest

    async def _final_outputs(self, job: _Job, request: Request) -> dict[str, RequestOutput] | None:
        """The finished outputs of a non-streaming job; None if the client left first (the job is aborted)."""
        async def collect() -> dict[str, RequestOutput]:
            final: dict[str, RequestOutput] = {}
            async for newest in self._updates(job):
                final.update(newest)
            return final
        collecting, leaving = asyncio.ensure_future(collect()), asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({collecting, leaving}, return_when=asyncio.FIRST_COMPLETED)
            return collecting.result() if collecting.done() else None
        finally:
            if not collecting.done():
                self.engine_loop.abort(job.request_ids)
            collecting.cancel()
            leaving.cancel()

    async def _stream(self, job: _Job, fmt: _CompletionFormat | _ChatFormat,
                      include_usage: bool) -> AsyncIterator[str]:
        finished = False
        final: dict[str, RequestOutput] = {}
        try:
            for chunk in fmt.opening():
                yield _sse(chunk)
            async for newest in self._updates(job):
                final.update(newest)
                for chunk in fmt.chunks(newest):
                    yield _sse(chunk)
            finished = True
            if include_usage:
                yield _sse(fmt.envelope([], _usage(job, final)))
        except ApiError as exc:        # the engine failed or is stopping: the error ends the stream
            finished = True
            yield _sse(exc.body())
        finally:
            if not finished:           # the client left (or the server gave up waiting): free its blocks
                self.engine_loop.abort(job.request_ids)
        yield _sse("[DONE]")

    # -- /v1/models, /health, /metrics --

    async def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "run-model",
             "root": self.model_root, "max_model_len": self.max_model_len} for name in self.served_names]}

    async def health(self) -> Response:
        if self.engine_loop.dead is not None:
            return ApiError(503, f"the engine is not serving: {self.engine_loop.dead}",
                            kind="server_error").response()
        return Response(status_code=200)

    async def prometheus(self) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def _template_message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates expect it: content as one string."""
    data = message.model_dump(exclude_none=True)
    content = message.content
    data["content"] = "".join(part.text for part in content) if isinstance(content, list) else (content or "")
    return data


def build_app(engine: Engine, options: ServerOptions) -> FastAPI:
    server = OpenAIServer(engine, options)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.engine_loop.start(asyncio.get_running_loop())
        yield
        server.engine_loop.stop()

    app = FastAPI(title="run-model", lifespan=lifespan)
    app.state.server = server
    _install_error_handlers(app)
    app.post("/v1/completions")(server.create_completion)
    app.post("/v1/chat/completions")(server.create_chat_completion)
    app.get("/v1/models")(server.list_models)
    app.get("/health")(server.health)
    app.get("/metrics")(server.prometheus)
    if options.api_keys:
        app.add_middleware(_ApiKeyCheck, api_keys=options.api_keys)
    return app


class _Server(uvicorn.Server):
    """uvicorn's server, but a SIGINT/SIGTERM stop exits with status 0: uvicorn re-raises the signal after
    its graceful shutdown, which would end the process as killed by it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop(self, sig: int, _frame: Any) -> None:
        # a second Ctrl-C stops waiting for in-flight requests
        self.force_exit = self.should_exit and sig == signal.SIGINT
        self.should_exit = True


def serve(engine: Engine, options: ServerOptions) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit status."""
    app = build_app(engine, options)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="info",
                            timeout_graceful_shutdown=options.shutdown_timeout)
    sock = config.bind_socket()       # bound before serving, so port 0 works and the URL below is real
    host, port = sock.getsockname()[:2]
    server: OpenAIServer = app.state.server
    logger.info("serving %s as %s at http://%s:%d/v1 (also /health, /metrics)", server.model_root,
                ", ".join(server.served_names), host, port)
    _Server(config).run(sockets=[sock])
    return 0
