"""What both generation endpoints share: the served model's context (names, tokenizer, the engine client, a
worker pool for tokenizing and rendering off the event loop), starting a job, and the response loop that
turns a job into one JSON object or server-sent events ending in `[DONE]`."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from runtime.package import ModelPackage
from runtime.request import RequestOutput, SamplingParams
from runtime.serve.engine_client import EngineClient
from runtime.serve.protocol import ApiError
from runtime.serve.render import Job, ResponseFormat, usage
from runtime.tokenizer import Tokenizer

T = TypeVar("T")


@dataclass(slots=True)
class ServingContext:
    served_names: tuple[str, ...]
    tokenizer: Tokenizer              # the event loop's own; the engine thread has another
    package: ModelPackage
    engine_client: EngineClient
    max_model_len: int
    vocab_size: int
    workers: ThreadPoolExecutor       # tokenization and chat rendering: a 5 MB prompt takes seconds
    render_timeout: float             # seconds a chat may take to render

    def check_model(self, model: str | None) -> str:
        if model is not None and model not in self.served_names:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                           f"{', '.join(map(repr, self.served_names))}", param="model", code="model_not_found")
        return model or self.served_names[0]

    async def off_loop(self, work: Callable[[], T], timeout: float | None = None) -> T:
        """Run `work` on a worker thread; the event loop keeps answering meanwhile."""
        future = asyncio.get_running_loop().run_in_executor(self.workers, work)
        return await asyncio.wait_for(future, timeout) if timeout is not None else await future

    async def tokenize(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        def encode() -> list[list[int]]:
            return [self.tokenizer.encode(text, add_special_tokens) for text in texts]
        try:
            return await self.off_loop(encode)
        except Exception as exc:     # the tokenizer refused the text (e.g. characters it cannot encode)
            raise ApiError(400, f"cannot tokenize the prompt: {type(exc).__name__}: {exc}", param="prompt") from None

    async def render_chat(self, messages: list[dict[str, Any]], options: dict[str, Any]) -> list[int]:
        """Prompt ids of a chat, rendered on a worker thread within `render_timeout` seconds."""
        try:
            return await self.off_loop(lambda: self.package.chat_prompt(self.tokenizer, messages, options),
                                       self.render_timeout)
        except asyncio.TimeoutError:
            raise ApiError(400, f"rendering the chat took longer than {self.render_timeout:g} s",
                           param="messages") from None
        except Exception as exc:     # the template rejected these messages or options: the client's to fix
            raise ApiError(400, f"cannot render the chat: {type(exc).__name__}: {exc}", param="messages") from None

    async def start_job(self, prefix: str, model: str, prompts: list[list[int]], params: SamplingParams,
                        stream: bool, arrival_time: float) -> Job:
        job_id = f"{prefix}-{uuid.uuid4().hex}"
        request_ids = [f"{job_id}-{i}" for i in range(len(prompts))]
        mailbox = await self.engine_client.submit(request_ids, prompts, params, stream, arrival_time)
        return Job(job_id, int(time.time()), model, request_ids, [len(p) for p in prompts], params.n, mailbox)


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event. The framing is a line, so no library is needed for it."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


class EventStream(StreamingResponse):
    """A server-sent-event response that always closes its generator, whether the stream ended, the client
    left (Starlette cancels the stream) or the server is stopping: the generator's cleanup aborts the
    request, which frees its blocks."""
    media_type = "text/event-stream"

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def respond(engine_client: EngineClient, job: Job, fmt: ResponseFormat, stream: bool, include_usage: bool,
                  request: Request) -> Response:
    if stream:
        return EventStream(_stream(engine_client, job, fmt, include_usage))
    final = await _final_outputs(engine_client, job, request)
    if final is None:
        return Response(status_code=499)           # nobody is listening; nginx's "client closed request"
    return JSONResponse(fmt.response(final))


async def _updates(job: Job) -> AsyncIterator[dict[str, RequestOutput]]:
    """Per wake-up, the newest output of each of the job's requests that moved, until all finished."""
    unfinished = set(job.request_ids)
    while unfinished:
        newest = await job.mailbox.take()
        unfinished.difference_update(r for r, output in newest.items() if output.finished)
        yield newest


async def _final_outputs(engine_client: EngineClient, job: Job, request: Request) -> dict[str, RequestOutput] | None:
    """The finished outputs of a non-streaming job; None if the client left first (the job is aborted)."""
    async def collect() -> dict[str, RequestOutput]:
        final: dict[str, RequestOutput] = {}
        async for newest in _updates(job):
            final.update(newest)
        return final
    collecting, leaving = asyncio.ensure_future(collect()), asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({collecting, leaving}, return_when=asyncio.FIRST_COMPLETED)
        return collecting.result() if collecting.done() else None
    finally:
        if not collecting.done():
            engine_client.abort(job.request_ids)
        collecting.cancel()
        leaving.cancel()


async def _stream(engine_client: EngineClient, job: Job, fmt: ResponseFormat,
                  include_usage: bool) -> AsyncIterator[str]:
    finished = False
    final: dict[str, RequestOutput] = {}
    try:
        for chunk in fmt.opening():
            yield sse(chunk)
        async for newest in _updates(job):
            final.update(newest)
            for chunk in fmt.chunks(newest):
                yield sse(chunk)
        finished = True
        if include_usage:
            yield sse(fmt.envelope([], usage(job, final)))
    except ApiError as exc:        # the engine failed or the server is stopping: the error ends the stream
        finished = True
        yield sse(exc.body())
    finally:
        if not finished:           # the client left (or the server gave up waiting): free its blocks
            engine_client.abort(job.request_ids)
    yield sse("[DONE]")


async def _client_gone(request: Request) -> None:
    """Returns when the client closes its connection (the body has been read, so only that can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
