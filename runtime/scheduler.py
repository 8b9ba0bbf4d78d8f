"""Token-budget scheduler. One rule, no phases: each step every running request is owed
`num_tokens - num_computed_tokens` tokens plus its draft tokens; decodes are served first, then prefill
chunks, then new requests, within `max_num_batched_tokens` and `max_num_seqs`. Running out of blocks preempts
the newest running request (its blocks are freed and it is recomputed later).

The scheduler's output is a StepPlan: plain, picklable data, the only thing that crosses to the runner (and
the message a tensor-parallel worker receives)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from runtime.kv_cache import KVCacheManager
from runtime.request import Request, RequestStatus, SamplingParams


@dataclass(slots=True)
class JoiningRequest:
    """A request the runner has no state for: new, or back after a preemption (with its outputs so far)."""
    request_id: str
    token_ids: list[int]                  # prompt + outputs so far; all known values
    num_prompt_tokens: int
    params: SamplingParams
    seed: int
    eos_token_ids: tuple[int, ...]
    row: int                              # its row in the block tables, for as long as it holds blocks


@dataclass(slots=True)
class StepPlan:
    """One step: who joins and leaves, what each scheduled row computes, and the block-table writes."""
    joining: list[JoiningRequest] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)       # scheduled rows, in order
    num_new_tokens: list[int] = field(default_factory=list)    # per row: tokens computed, drafts included
    num_computed: list[int] = field(default_factory=list)      # per row: tokens in the cache before the step
    draft_token_ids: list[list[int]] = field(default_factory=list)   # per row; [] = none
    samples: list[bool] = field(default_factory=list)          # per row: reaches its last token (samples)
    # per cache group: (row, first column, block ids) written to the block tables since the last plan
    block_writes: list[list[tuple[int, int, list[int]]]] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)      # runner state to drop (finished, aborted)
    preempted_ids: list[str] = field(default_factory=list)     # likewise; they rejoin later

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def num_draft_tokens(self) -> int:
        return sum(len(d) for d in self.draft_token_ids)

    def __len__(self) -> int:
        return len(self.request_ids)


@dataclass(slots=True)
class SchedulerStats:
    num_preemptions: int = 0
    num_prefill_chunks: int = 0          # scheduled prefill pieces that did not reach the end of the prompt
    num_mixed_steps: int = 0             # steps holding both decodes and prefill tokens


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 num_lookahead_tokens: int = 0):
        self.kv = kv
        # positions past a sampling row's last token that are allocated too (a model drafter writes its own
        # cache there while it drafts)
        self.num_lookahead_tokens = num_lookahead_tokens
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}      # every request not yet finished, by id
        self.stats = SchedulerStats()
        self._known_to_runner: set[str] = set()
        self._finished_ids: list[str] = []
        self._preempted_ids: list[str] = []

    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        batch = StepPlan()
        budget = self.max_num_batched_tokens
        scheduled: set[str] = set()
        preempted = False
        # Decodes (owed one token) first, then partially prefilled requests, each in arrival order.
        decodes, prefills = [], []
        for request in self.running:
            if request.num_tokens - request.num_computed_tokens != 1:
                prefills.append(request)
            elif request.num_output_tokens < request.params.max_tokens:
                decodes.append(request)
            # else its last token is a placeholder that reaches max_tokens: it ends there, owing no compute
        decode_ids = {r.request_id for r in decodes} if prefills or self.waiting else ()
        for request in decodes + prefills if prefills else decodes:
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:      # preempted earlier in this step
                continue
            owed = request.num_tokens - request.num_computed_tokens
            num_new = min(owed + len(request.draft_token_ids), budget)
            while not self.kv.allocate(request, num_new + (self.num_lookahead_tokens if num_new >= owed else 0)):
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
            # prompt logprobs come from the prompt's own forward: a request that wants them takes no cache hits
            looked_up = request.num_computed_tokens == 0 and request.params.prompt_logprobs is None
            if looked_up:
                request.num_computed_tokens = self.kv.match_prefix(request)
                if request.num_preemptions == 0:
                    request.num_cached_tokens = request.num_computed_tokens
            owed = request.num_tokens - request.num_computed_tokens
            num_new = min(owed, budget)
            if not self.kv.allocate(request, num_new + (self.num_lookahead_tokens if num_new >= owed else 0)):
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
        num_decodes = sum(1 for rid in batch.request_ids[:len(decodes)] if rid in decode_ids)
        if 0 < num_decodes < len(batch):                         # decodes and prefill chunks in one step
            self.stats.num_mixed_steps += 1
        batch.block_writes = self.kv.take_staged_writes()
        batch.finished_ids, self._finished_ids = self._finished_ids, []
        batch.preempted_ids, self._preempted_ids = self._preempted_ids, []
        return batch

    def _add_to_batch(self, batch: StepPlan, request: Request, num_new: int) -> None:
        rid = request.request_id
        if rid not in self._known_to_runner:
            self._known_to_runner.add(rid)
            batch.joining.append(JoiningRequest(rid, list(request.token_ids), request.num_prompt_tokens,
                                                request.params, request.seed, request.eos_token_ids,
                                                self.kv.row(rid)))
        owed = request.num_tokens - request.num_computed_tokens
        drafts = request.draft_token_ids[:max(0, num_new - owed)]
        batch.request_ids.append(rid)
        batch.num_new_tokens.append(num_new)
        batch.num_computed.append(request.num_computed_tokens)
        batch.draft_token_ids.append(drafts)
        batch.samples.append(num_new >= owed)
        if num_new < owed:
            self.stats.num_prefill_chunks += 1

    def _forget_in_runner(self, request: Request, into: list[str]) -> None:
        if request.request_id in self._known_to_runner:
            self._known_to_runner.discard(request.request_id)
            into.append(request.request_id)

    def _preempt(self, request: Request) -> None:
        self._forget_in_runner(request, self._preempted_ids)
        request.draft_token_ids = []
        self.kv.free(request)
        self.running.remove(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)
        self.stats.num_preemptions += 1

    def finish_step(self, plan: StepPlan, num_rejected: dict[str, int] | None = None) -> None:
        """Advance what the cache holds after the model ran the plan: every scheduled token, less the
        drafts verification rejected (their cache entries are rewound: the next step writes over them).
        A request that finished while the step ran has freed its blocks: nothing of it is kept."""
        for rid, num_new in zip(plan.request_ids, plan.num_new_tokens):
            request = self.requests.get(rid)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue
            request.num_computed_tokens += num_new - (num_rejected or {}).get(rid, 0)
            request.draft_token_ids = []
            self.kv.cache_blocks(request)

    def finish(self, request: Request) -> None:
        """Release a finished or aborted request, wherever it is."""
        self.requests.pop(request.request_id, None)
        self._forget_in_runner(request, self._finished_ids)
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.FINISHED
