"""The engine on its own thread, and how HTTP requests talk to it.

The engine thread is the only code that calls Engine methods: between steps it applies the commands the
event loop queued (submit, abort, fail all, stop), runs a step, and hands the outputs to the event loop
with one `call_soon_threadsafe` per step. Each HTTP request reads its outputs from a Mailbox that keeps only
the newest output of each engine request: outputs are cumulative, so a client that reads slowly (or not at
all) skips to the newest one and loses nothing, and its memory stays one output per engine request."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from runtime.engine import Engine
from runtime.serve.metrics import EngineSnapshot, ServerMetrics
from runtime.request import RequestOutput, SamplingParams
from runtime.serve.protocol import ApiError

logger = logging.getLogger("run-model")


class Mailbox:
    """Where the outputs of one HTTP request's engine requests arrive. Event loop only."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.accepted: asyncio.Future = loop.create_future()   # the engine took (or refused) the prompts
        self._newest: dict[str, RequestOutput] = {}
        self._failure: ApiError | None = None
        self._ready = asyncio.Event()

    def deliver(self, output: RequestOutput) -> None:
        self._newest[output.request_id] = output          # replaces an unread, older output
        self._ready.set()

    def fail(self, error: ApiError) -> None:
        if not self.accepted.done():
            self.accepted.set_exception(error)
        self._failure = error
        self._ready.set()

    def num_unread(self) -> int:
        return len(self._newest)

    async def take(self) -> dict[str, RequestOutput]:
        """The newest output of each engine request that moved since the last call; waits for one. Raises the
        ApiError that ended the request, if one did."""
        await self._ready.wait()
        self._ready.clear()
        if self._failure is not None:
            raise self._failure
        newest, self._newest = self._newest, {}
        return newest


@dataclass(slots=True)
class _Submit:
    request_ids: list[str]
    prompts: list[list[int]]
    params: SamplingParams
    stream: bool
    arrival_time: float
    mailbox: Mailbox


@dataclass(slots=True)
class _Abort:
    request_ids: list[str]


@dataclass(slots=True)
class _FailAll:
    status: int
    message: str


_STOP = object()
_ACCEPTED = object()


class EngineClient:
    """Owns the engine on its own thread. Everything else talks to it through submit / abort / fail_all."""

    def __init__(self, engine: Engine, metrics: ServerMetrics, stats_interval: float = 10.0):
        self.engine = engine
        self.metrics = metrics
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._mailboxes: dict[str, Mailbox] = {}              # engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stats = _StatsLog(engine, stats_interval)
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
                     stream: bool, arrival_time: float) -> Mailbox:
        """Queue prompts; returns the mailbox their outputs will arrive in, once the engine accepted them."""
        if self.dead is not None:
            raise ApiError(503, f"the engine is not serving: {self.dead}")
        mailbox = Mailbox(asyncio.get_running_loop())
        self._commands.put(_Submit(request_ids, prompts, params, stream, arrival_time, mailbox))
        try:
            await mailbox.accepted
        except asyncio.CancelledError:      # nobody will read the outputs: do not generate them
            self.abort(request_ids)
            raise
        return mailbox

    def abort(self, request_ids: list[str]) -> None:
        self._commands.put(_Abort(request_ids))

    def fail_all(self, status: int, message: str) -> None:
        """End every request in flight with this error (streams get it as their last event)."""
        self._commands.put(_FailAll(status, message))

    # -- the engine thread --

    def _run(self) -> None:
        try:
            while self._apply_commands(block=not self.engine.has_unfinished()):
                if self.engine.has_unfinished():
                    self._step()
                self._publish_snapshot()
                self._stats.maybe_log()
        except Exception as exc:           # a bug in this loop: say so on every channel, keep answering
            logger.exception("the engine loop failed")
            self.dead = f"{type(exc).__name__}: {exc}"
            self._fail_all(503, f"the engine loop failed ({self.dead})")
            while (command := self._commands.get()) is not _STOP:
                if isinstance(command, _Submit):
                    self._post([(command.mailbox, ApiError(503, f"the engine is not serving: {self.dead}"))])

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
            elif isinstance(command, _FailAll):
                self._fail_all(command.status, command.message)
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
            self._post([(submit.mailbox, ApiError(400 if isinstance(exc, ValueError) else 500, str(exc)))])
            return
        for request_id in added:
            self._mailboxes[request_id] = submit.mailbox
        self._post([(submit.mailbox, _ACCEPTED)])

    def _abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            if self._mailboxes.pop(request_id, None) is not None:
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
        self._stats.record(self.engine.last_step_stats)
        deliveries = []
        for output in outputs:
            mailbox = self._mailboxes.get(output.request_id)
            if mailbox is None:
                continue
            if output.finished:
                del self._mailboxes[output.request_id]
                self.metrics.record_finished(output.finish_reason or "stop")
            deliveries.append((mailbox, output))
        self._post(deliveries)

    def _fail_all(self, status: int, message: str) -> None:
        failed = list(self._mailboxes.items())
        self._mailboxes.clear()
        for request_id, _ in failed:
            with contextlib.suppress(Exception):
                self.engine.abort(request_id)
            self.metrics.record_finished("abort")
        self._post([(mailbox, ApiError(status, message)) for _, mailbox in failed])

    def _post(self, deliveries: list[tuple[Mailbox, Any]]) -> None:
        """Hand items to their mailboxes: one wake-up of the event loop for the whole batch."""
        if deliveries and self._loop is not None:
            with contextlib.suppress(RuntimeError):        # the event loop has already closed
                self._loop.call_soon_threadsafe(_deliver_all, deliveries)

    def _publish_snapshot(self) -> None:
        kv, scheduler = self.engine.kv, self.engine.scheduler
        self.metrics.record_snapshot(EngineSnapshot(
            num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
            kv_blocks_used=[pool.num_used for pool in kv.pools],
            kv_blocks_total=[pool.num_blocks - 1 for pool in kv.pools],
            prefix_cache_queries=kv.stats.queries, prefix_cache_hits=kv.stats.hits,
            num_preemptions=scheduler.stats.num_preemptions))


def _deliver_all(deliveries: list[tuple[Mailbox, Any]]) -> None:
    for mailbox, item in deliveries:
        if item is _ACCEPTED:
            if not mailbox.accepted.done():
                mailbox.accepted.set_result(None)
        elif isinstance(item, ApiError):
            mailbox.fail(item)
        else:
            mailbox.deliver(item)


class _StatsLog:
    """A line every `interval` seconds while the engine works: throughput, queues, KV use (vLLM's style)."""

    def __init__(self, engine: Engine, interval: float):
        self.engine, self.interval = engine, interval
        self.last_time = time.monotonic()
        self.prompt_tokens = self.generation_tokens = 0
        self.queries = self.hits = 0

    def record(self, stats: Any) -> None:
        self.prompt_tokens += stats.num_prompt_tokens
        self.generation_tokens += stats.num_generation_tokens

    def maybe_log(self) -> None:
        now = time.monotonic()
        elapsed = now - self.last_time
        if self.interval <= 0 or elapsed < self.interval:
            return
        kv, scheduler = self.engine.kv, self.engine.scheduler
        busy = self.prompt_tokens or self.generation_tokens or scheduler.running or scheduler.waiting
        if busy:
            queries, hits = kv.stats.queries - self.queries, kv.stats.hits - self.hits
            hit_rate = f"{100 * hits / queries:.1f}%" if queries else "-"
            logger.info("prompt throughput %.1f tok/s, generation throughput %.1f tok/s, running %d, waiting %d, "
                        "KV cache usage %.1f%%, prefix cache hit rate %s",
                        self.prompt_tokens / elapsed, self.generation_tokens / elapsed, len(scheduler.running),
                        len(scheduler.waiting), 100 * max(kv.usage(), default=0.0), hit_rate)
        self.last_time, self.prompt_tokens, self.generation_tokens = now, 0, 0
        self.queries, self.hits = kv.stats.queries, kv.stats.hits
