"""Prometheus metrics of a serving engine. Names follow vLLM's (`vllm:*`) where the meaning is the same, so
existing dashboards work; what vLLM does not export (block counts per cache group) is `run_model:*`.

Only the engine thread writes metrics (after each loop turn); /metrics reads them from the event loop. The
prometheus client locks each value, so the two threads need no other coordination."""
from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from runtime.engine import StepStats

# Bucket bounds (seconds) from vLLM, so dashboards' histogram_quantile panels line up.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)


@dataclass(slots=True)
class EngineSnapshot:
    """The engine's state after a loop turn, read on the engine thread."""
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: list[int] = field(default_factory=list)     # per cache group
    kv_blocks_total: list[int] = field(default_factory=list)
    prefix_cache_queries: int = 0                                # cumulative, in tokens
    prefix_cache_hits: int = 0
    num_preemptions: int = 0


class ServerMetrics:
    """The server's metrics, each bound to its labels once (the engine thread records them every step)."""

    def __init__(self, model_name: str):
        disable_created_metrics()      # the *_created samples only double the exposition (vLLM drops them too)
        self.registry = r = CollectorRegistry()
        self._previous = EngineSnapshot()
        model, group = ["model_name"], ["model_name", "cache_group"]
        one = lambda metric: metric.labels(model_name)  # noqa: E731
        self.running = one(Gauge("vllm:num_requests_running", "Sequences in the running batch.", model, registry=r))
        self.waiting = one(Gauge("vllm:num_requests_waiting", "Sequences waiting to be scheduled.", model,
                                 registry=r))
        self._kv_usage = Gauge("vllm:kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full).", group,
                               registry=r)
        self._kv_used = Gauge("run_model:kv_cache_used_blocks", "KV blocks held by requests.", group, registry=r)
        self._kv_total = Gauge("run_model:kv_cache_total_blocks", "KV blocks of the cache group.", group,
                               registry=r)
        self._model_name = model_name
        self.prefix_queries = one(Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix "
                                          "cache.", model, registry=r))
        self.prefix_hits = one(Counter("vllm:prefix_cache_hits", "Prompt tokens served from the prefix cache.",
                                       model, registry=r))
        self.preemptions = one(Counter("vllm:num_preemptions", "Requests preempted to free KV blocks.", model,
                                       registry=r))
        self.prompt_tokens = one(Counter("vllm:prompt_tokens", "Prompt tokens of requests that started "
                                         "generating.", model, registry=r))
        self.generation_tokens = one(Counter("vllm:generation_tokens", "Generated tokens.", model, registry=r))
        self._finished = Counter("vllm:request_success", "Finished requests, by finish reason (abort = the "
                                 "client left or the server stopped).", ["model_name", "finished_reason"], registry=r)
        self.finished = {reason: self._finished.labels(model_name, reason) for reason in ("stop", "length", "abort")}
        self.ttft = one(Histogram("vllm:time_to_first_token_seconds", "Time from arrival to the first token.",
                                  model, buckets=_TTFT_BUCKETS, registry=r))
        self.itl = one(Histogram("vllm:inter_token_latency_seconds", "Time between two tokens of a sequence.",
                                 model, buckets=_ITL_BUCKETS, registry=r))
        self.e2e = one(Histogram("vllm:e2e_request_latency_seconds", "Time from arrival to the last token.",
                                 model, buckets=_E2E_BUCKETS, registry=r))
        self._groups: list[tuple[Gauge, Gauge, Gauge]] = []          # (used, total, usage) per cache group
        self.spec_drafts = one(Counter("vllm:spec_decode_num_drafts", "Request steps that verified drafts.",
                                       model, registry=r))
        self.spec_draft_tokens = one(Counter("vllm:spec_decode_num_draft_tokens", "Draft tokens verified.",
                                             model, registry=r))
        self.spec_accepted_tokens = one(Counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                                                model, registry=r))
        self._spec_accepted_per_pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos",
                                              "Draft tokens accepted, by position in the draft.",
                                              ["model_name", "position"], registry=r)

    def record_step(self, stats: StepStats) -> None:
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        self.generation_tokens.inc(stats.num_generation_tokens)
        for seconds in stats.time_to_first_token:
            self.ttft.observe(seconds)
        for seconds in stats.inter_token_latency:
            self.itl.observe(seconds)
        for seconds in stats.e2e_latency:
            self.e2e.observe(seconds)
        if stats.num_drafts:
            self.spec_drafts.inc(stats.num_drafts)
            self.spec_draft_tokens.inc(stats.num_draft_tokens)
            self.spec_accepted_tokens.inc(stats.num_accepted_tokens)
            for position, accepted in enumerate(stats.accepted_per_position):
                self._spec_accepted_per_pos.labels(self._model_name, str(position)).inc(accepted)

    def record_finished(self, finish_reason: str) -> None:
        if finish_reason not in self.finished:
            self.finished[finish_reason] = self._finished.labels(self._model_name, finish_reason)
        self.finished[finish_reason].inc()

    def record_snapshot(self, now: EngineSnapshot) -> None:
        self.running.set(now.num_running)
        self.waiting.set(now.num_waiting)
        while len(self._groups) < len(now.kv_blocks_used):
            labels = (self._model_name, str(len(self._groups)))
            self._groups.append((self._kv_used.labels(*labels), self._kv_total.labels(*labels),
                                 self._kv_usage.labels(*labels)))
        for (used, total, usage), num_used, num_total in zip(self._groups, now.kv_blocks_used, now.kv_blocks_total):
            used.set(num_used)
            total.set(num_total)
            usage.set(num_used / max(1, num_total))
        # the engine keeps running totals; prometheus counters only move forward by increments
        before = self._previous
        self.prefix_queries.inc(now.prefix_cache_queries - before.prefix_cache_queries)
        self.prefix_hits.inc(now.prefix_cache_hits - before.prefix_cache_hits)
        self.preemptions.inc(now.num_preemptions - before.num_preemptions)
        self._previous = now

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
