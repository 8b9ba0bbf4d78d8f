"""Token-budget scheduler. One rule, no phases: each step every running request is owed
`num_tokens - num_computed_tokens` tokens; decodes are served first, then prefill chunks, then new requests,
within `max_num_batched_tokens` and `max_num_seqs`. Running out of blocks preempts the newest running request
(its blocks are freed and it is recomputed later)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from runtime.kv_cache import KVCacheManager
from runtime.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)   # per request, this step

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.requests)


@dataclass(slots=True)
class SchedulerStats:
    num_preemptions: int = 0
    num_prefill_chunks: int = 0          # scheduled prefill pieces that did not reach the end of the prompt
    num_mixed_steps: int = 0             # steps holding both decodes and prefill tokens


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = SchedulerStats()

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        scheduled: set[str] = set()
        preempted = False
        # Decodes (owed one token) first, then partially prefilled requests, each in arrival order.
        decodes, prefills = [], []
        for request in self.running:
            if len(request.token_ids) - request.num_computed_tokens != 1:
                prefills.append(request)
            elif request.num_output_tokens < request.params.max_tokens:
                decodes.append(request)
            # else its last token is a placeholder that reaches max_tokens: it ends there, owing no compute
        for request in decodes + prefills if prefills else decodes:
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:      # preempted earlier in this step
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate(request, num_new):
                victim = next(r for r in reversed(self.running) if r.request_id not in scheduled)
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            else:
                scheduled.add(request.request_id)
                self._add_to_batch(batch, request, num_new)
                budget -= num_new
        # New requests only when nobody was preempted: their blocks would be taken right back.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            request = self.waiting[0]
            looked_up = request.num_computed_tokens == 0
            if looked_up:
                request.num_computed_tokens = self.kv.match_prefix(request)
                if request.num_preemptions == 0:
                    request.num_cached_tokens = request.num_computed_tokens
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self.kv.allocate(request, num_new):
                self.kv.free(request)
                request.num_computed_tokens = 0
                break
            if looked_up:
                self.kv.record_prefix_lookup(request, request.num_computed_tokens)
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._add_to_batch(batch, request, num_new)
            budget -= num_new
        if batch.requests and 1 in batch.num_new_tokens and batch.num_tokens > len(batch):
            self.stats.num_mixed_steps += 1
        return batch

    def _add_to_batch(self, batch: ScheduledBatch, request: Request, num_new: int) -> None:
        batch.requests.append(request)
        batch.num_new_tokens.append(num_new)
        if request.num_computed_tokens + num_new < request.num_tokens:
            self.stats.num_prefill_chunks += 1

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        self.running.remove(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)
        self.stats.num_preemptions += 1

    def finish_step(self, batch: ScheduledBatch) -> None:
        """Advance what the cache holds after the model ran the batch. A request that finished while the
        batch ran (its previous token stopped it) has freed its blocks: nothing of it is kept."""
        for request, num_new in zip(batch.requests, batch.num_new_tokens):
            if request.status is RequestStatus.FINISHED:
                continue
            request.num_computed_tokens += num_new
            self.kv.cache_blocks(request)

    def finish(self, request: Request) -> None:
        """Release a finished or aborted request, wherever it is."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.FINISHED
