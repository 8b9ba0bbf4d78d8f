"""The app: routes, authentication, error objects, start-up report, and a graceful stop.

Stopping (SIGINT/SIGTERM): the listening socket closes and new requests on open connections get 503; the
requests in flight get `shutdown_timeout` seconds to finish; whatever still runs then is ended by the
engine client with an OpenAI-style 503 (a stream gets it as an error event, then `[DONE]`), and the
process exits 0. A second Ctrl-C stops waiting."""
from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import secrets
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from runtime.engine import Engine
from runtime.kv_cache import cdiv
from runtime.serve.metrics import ServerMetrics
from runtime.serve.chat import create_chat_completion
from runtime.serve.completions import create_completion
from runtime.serve.engine_client import EngineClient
from runtime.serve.protocol import (ApiError, BodyT, ChatBody, CompletionBody, DetokenizeBody, TokenizeBody,
                                    parse_json, read_body, validate, validation_error)
from runtime.serve.serving import ServingContext
from runtime.tokenizer import Tokenizer

logger = logging.getLogger("run-model")

_BIG_BODY = 1 << 16            # bytes; bodies above this are parsed on a worker thread


@dataclass(slots=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()                # empty = no authentication
    served_model_names: tuple[str, ...] = ()      # the first is the one /v1/models reports
    shutdown_timeout: float = 10.0                # seconds in-flight requests get to finish on SIGTERM
    max_request_bytes: int | None = None          # None = 2 MiB + 128 bytes per token of context
    chat_render_timeout: float = 10.0             # seconds a chat may take to render
    stats_interval: float = 10.0                  # seconds between stats lines while busy; 0 = none

    def request_limit(self, max_model_len: int) -> int:
        """A body big enough for any prompt that fits the context (a token id is ~8 bytes of JSON; a batch
        of prompts needs more), small enough that nobody makes the server parse gigabytes."""
        return self.max_request_bytes or (2 << 20) + 128 * max_model_len


def _version() -> str:
    try:
        return importlib.metadata.version("run-model")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class OpenAIServer:
    def __init__(self, engine: Engine, options: ServerOptions):
        self.options = options
        self.created = int(time.time())
        self.model_root = str(engine.model_path)
        self.metrics = ServerMetrics((options.served_model_names or (engine.config.model,))[0])
        self.engine_client = EngineClient(engine, self.metrics, options.stats_interval)
        self.workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="preprocess")
        self.ctx = ServingContext(
            served_names=options.served_model_names or (engine.config.model,),
            # the engine's tokenizer belongs to the engine thread; requests are rendered with this one
            tokenizer=Tokenizer(engine.config.tokenizer or str(engine.model_path)),
            package=engine.package, engine_client=self.engine_client, max_model_len=engine.max_model_len,
            vocab_size=engine.vocab_size, workers=self.workers, render_timeout=options.chat_render_timeout)
        self.request_limit = options.request_limit(engine.max_model_len)
        self.draining = False                         # stopping: in-flight requests finish, new ones get 503

    async def _body(self, request: Request, model: type[BodyT]) -> BodyT:
        if self.draining:
            raise ApiError(503, "the server is shutting down")
        raw = await read_body(request.stream(), request.headers.get("content-type"), self.request_limit)
        data = await self.ctx.off_loop(lambda: parse_json(raw)) if len(raw) > _BIG_BODY else parse_json(raw)
        return validate(model, data)

    # -- /v1/completions, /v1/chat/completions --

    async def completions(self, request: Request) -> Response:
        return await create_completion(self.ctx, await self._body(request, CompletionBody), request)

    async def chat_completions(self, request: Request) -> Response:
        return await create_chat_completion(self.ctx, await self._body(request, ChatBody), request)

    # -- /tokenize, /detokenize --

    async def tokenize(self, request: Request) -> dict[str, Any]:
        body = await self._body(request, TokenizeBody)
        self.ctx.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "send either prompt or messages", param="prompt")
        if body.prompt is not None:
            tokens = (await self.ctx.tokenize([body.prompt], body.add_special_tokens))[0]
        else:
            chat = ChatBody(messages=body.messages, add_generation_prompt=body.add_generation_prompt)
            tokens = await self.ctx.render_chat(chat.template_messages(), chat.chat_options())
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.ctx.max_model_len}

    async def detokenize(self, request: Request) -> dict[str, Any]:
        body = await self._body(request, DetokenizeBody)
        self.ctx.check_model(body.model)
        if not all(0 <= t < self.ctx.vocab_size for t in body.tokens):
            raise ApiError(400, f"tokens must be in [0, {self.ctx.vocab_size})", param="tokens")
        text = await self.ctx.off_loop(lambda: self.ctx.tokenizer.decode(body.tokens, skip_special_tokens=False))
        return {"prompt": text}

    # -- /v1/models, /health, /ping, /version, /metrics --

    def _model_card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "run-model",
                "root": self.model_root, "max_model_len": self.ctx.max_model_len}

    async def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_card(name) for name in self.ctx.served_names]}

    async def get_model(self, model_id: str) -> dict[str, Any]:
        return self._model_card(self.ctx.check_model(model_id))

    async def health(self) -> Response:
        if self.engine_client.dead is not None:
            return ApiError(503, f"the engine is not serving: {self.engine_client.dead}").response()
        return Response(status_code=200)

    async def version(self) -> dict[str, str]:
        return {"version": _version()}

    async def prometheus(self) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc.errors()).response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return ApiError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in a request")
        return ApiError(500, f"internal server error: {type(exc).__name__}").response()


_OPEN_PATHS = ("/health", "/ping", "/version", "/metrics")


class _ApiKeyCheck:
    """ASGI middleware: everything but /health, /ping, /version and /metrics needs `Authorization: Bearer
    KEY`. It runs before the body is read, so an unauthenticated client learns nothing about its request."""

    def __init__(self, app: Any, api_keys: tuple[str, ...]):
        self.app, self.api_keys = app, tuple(k.encode() for k in api_keys)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"] not in _OPEN_PATHS and not self._authorized(scope):
            error = ApiError(401, "missing or wrong API key; send `Authorization: Bearer <key>`",
                             code="invalid_api_key")
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: dict) -> bool:
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and any(secrets.compare_digest(token.strip().encode(), key)
                                                  for key in self.api_keys)


def build_app(engine: Engine, options: ServerOptions) -> FastAPI:
    server = OpenAIServer(engine, options)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.engine_client.start(asyncio.get_running_loop())
        yield
        server.engine_client.stop()
        server.workers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="run-model", version=_version(), lifespan=lifespan)
    app.state.server = server
    _install_error_handlers(app)
    app.post("/v1/completions")(server.completions)
    app.post("/v1/chat/completions")(server.chat_completions)
    app.get("/v1/models")(server.list_models)
    app.get("/v1/models/{model_id:path}")(server.get_model)
    app.post("/tokenize")(server.tokenize)
    app.post("/detokenize")(server.detokenize)
    app.get("/health")(server.health)
    app.api_route("/ping", methods=["GET", "POST"])(server.health)
    app.get("/version")(server.version)
    app.get("/metrics")(server.prometheus)
    if options.api_keys:
        app.add_middleware(_ApiKeyCheck, api_keys=options.api_keys)
    return app


class _Server(uvicorn.Server):
    """uvicorn's server with the stop described above. A SIGINT/SIGTERM stop exits with status 0: uvicorn
    re-raises the signal after its graceful shutdown, which would end the process as killed by it."""

    def __init__(self, config: uvicorn.Config, server: OpenAIServer):
        super().__init__(config)
        self.app_server = server

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

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        server = self.app_server
        server.draining = True
        for listener in self.servers:
            listener.close()
        timeout = server.options.shutdown_timeout
        if not await self._wait_for_requests(timeout):
            logger.info("stopping: %d request(s) still running after %g s (--shutdown-timeout) end with an error",
                        len(self.server_state.tasks), timeout)
            server.engine_client.fail_all(503, "the server is shutting down")
            await self._wait_for_requests(5.0)       # time to send their error events
        await super().shutdown(sockets)

    async def _wait_for_requests(self, timeout: float) -> bool:
        """Whether every request finished within `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.server_state.tasks and not self.force_exit and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return not self.server_state.tasks


def bind_socket(host: str, port: int) -> socket.socket:
    """Listen on host:port now (before a model loads for minutes), or say why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; is another server using port "
                         f"{port}? Pick another --port (0 = any free one)") from None
    sock.set_inheritable(True)
    return sock


def capacity_report(engine: Engine) -> str:
    """The KV cache's size in GiB and how many requests of max_model_len tokens it holds at once."""
    kv, block_size = engine.kv, engine.config.block_size
    total_bytes = sum((pool.num_blocks - 1) * group.block_bytes(block_size) for group, pool in zip(kv.groups, kv.pools))
    per_request = [kv.blocks_needed(g, engine.max_model_len, engine.config.max_num_batched_tokens)
                   for g in range(len(kv.groups))]
    concurrency = min((pool.num_blocks - 1) / need for pool, need in zip(kv.pools, per_request))
    tokens = min((pool.num_blocks - 1) * block_size for pool, group in zip(kv.pools, kv.groups)
                 if group.spec.window is None) if any(g.spec.window is None for g in kv.groups) else None
    size = f"{total_bytes / 2**30:.2f} GiB" + (f" ({tokens} tokens)" if tokens is not None else "")
    return (f"KV cache {size}; maximum concurrency for {engine.max_model_len} tokens per request: "
            f"{concurrency:.2f}x (max_num_seqs {engine.config.max_num_seqs})")


def serve(engine: Engine, options: ServerOptions, sock: socket.socket | None = None) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit status."""
    sock = sock or bind_socket(options.host, options.port)
    app = build_app(engine, options)
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)
    host, port = sock.getsockname()[:2]
    server: OpenAIServer = app.state.server
    logger.info("%s", capacity_report(engine))
    logger.info("serving %s as %s at http://%s:%d/v1 (also /health, /metrics, /tokenize, /version)",
                server.model_root, ", ".join(server.ctx.served_names), host, port)
    _Server(config, server).run(sockets=[sock])
    return 0
