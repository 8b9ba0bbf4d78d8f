"""The token-budget scheduler without a model: requests built by hand, engine steps simulated here."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from runtime.kv_cache import NULL_BLOCK, CacheSpec, KVCacheManager, group_cache_specs
from runtime.request import Request, RequestStatus, SamplingParams
from runtime.scheduler import Scheduler, StepPlan

BLOCK_SIZE = 16
FULL = CacheSpec((2, 2, 8), torch.float32)
WINDOW_32 = CacheSpec((2, 2, 8), torch.float32, window=32)
COMPRESSED_4 = CacheSpec((16,), torch.float32, tokens_per_entry=4)


def make_scheduler(num_blocks: int | list[int] = 64, max_num_seqs: int = 8, budget: int = 64,
                   specs: list[CacheSpec] | None = None, prefix_caching: bool = False) -> Scheduler:
    layout = group_cache_specs(specs or [FULL], BLOCK_SIZE)
    counts = num_blocks if isinstance(num_blocks, list) else [num_blocks] * len(layout.groups)
    kv = KVCacheManager(layout, BLOCK_SIZE, counts, max_num_seqs, max_model_len=1024,
                        enable_prefix_caching=prefix_caching)
    return Scheduler(kv, max_num_seqs, budget)


def make_request(request_id: str, prompt_len: int, max_tokens: int, first_token: int = 0) -> Request:
    return Request(request_id, list(range(first_token, first_token + prompt_len)),
                   SamplingParams(max_tokens=max_tokens))


def scheduled(scheduler: Scheduler, plan: StepPlan) -> list[Request]:
    """The requests behind a plan's rows (a plan carries ids only)."""
    return [scheduler.requests[request_id] for request_id in plan.request_ids]


def complete(scheduler: Scheduler, batch: StepPlan) -> None:
    """What the engine does after the model ran: advance the cache, sample a fake token where the whole
    sequence is computed, finish requests that reached max_tokens."""
    requests = scheduled(scheduler, batch)
    scheduler.finish_step(batch)
    for request in requests:
        if request.num_computed_tokens == request.num_tokens:
            request.token_ids.append(10_000 + request.num_tokens)
            if request.num_output_tokens >= request.params.max_tokens:
                scheduler.finish(request)


def step(scheduler: Scheduler) -> StepPlan:
    batch = scheduler.schedule()
    complete(scheduler, batch)
    return batch


def run_to_completion(scheduler: Scheduler, forward=None, check=None, max_steps: int = 5000) -> list[StepPlan]:
    """Step until every request finished; `forward(batch)` stands in for the model, `check(scheduler, batch)`
    runs after each step."""
    batches = []
    while scheduler.has_unfinished():
        assert len(batches) < max_steps, "the scheduler stopped making progress"
        batches.append(scheduler.schedule())
        if forward is not None:
            forward(batches[-1])
        complete(scheduler, batches[-1])
        if check is not None:
            check(scheduler, batches[-1])
    return batches


def all_blocks_returned(scheduler: Scheduler) -> bool:
    return all(pool.num_free == pool.num_blocks - 1 for pool in scheduler.kv.pools)


def check_block_accounting(scheduler: Scheduler, batch: StepPlan) -> None:
    """Every held block is counted once per holder, and a block is free exactly when nobody holds it."""
    kv = scheduler.kv
    for g, pool in enumerate(kv.pools):
        holders = Counter(block for state in kv.requests.values() for block in state.blocks[g]
                          if block != NULL_BLOCK)
        for block in range(1, pool.num_blocks):
            assert pool.ref_counts[block] == holders[block], (g, block)
            assert (block in pool.free) == (holders[block] == 0), (g, block)


# ---- the token budget -------------------------------------------------------------------------------------

def test_every_step_stays_within_the_token_budget():
    scheduler = make_scheduler(budget=20)
    requests = [make_request(str(i), prompt_len=3 + 17 * i, max_tokens=4 + i, first_token=100 * i)
                for i in range(6)]
    for request in requests:
        scheduler.add(request)

    batches = run_to_completion(scheduler)

    assert all(0 < batch.num_tokens <= 20 for batch in batches)
    assert max(batch.num_tokens for batch in batches) == 20          # the budget was actually the limit
    assert [r.num_output_tokens for r in requests] == [4 + i for i in range(6)]


def test_decodes_are_scheduled_before_prefill_chunks():
    scheduler = make_scheduler(budget=16)
    owes_many, decoding = make_request("owes-many", 8, 50), make_request("decoding", 8, 50, first_token=100)
    scheduler.add(owes_many)
    scheduler.add(decoding)
    step(scheduler)                                                  # both prompts, 16 tokens
    owes_many.token_ids.extend(range(200, 230))                      # now owed 31 tokens, ahead in `running`

    batch = scheduler.schedule()

    assert scheduled(scheduler, batch) == [decoding, owes_many]
    assert batch.num_new_tokens == [1, 15]


def test_long_prompt_is_chunked_across_steps():
    scheduler = make_scheduler(budget=32)
    request = make_request("long", prompt_len=100, max_tokens=2)
    scheduler.add(request)

    batches = run_to_completion(scheduler)

    assert [b.num_new_tokens for b in batches] == [[32], [32], [32], [4], [1]]
    assert scheduler.stats.num_prefill_chunks == 3
    assert request.finished


def test_max_num_seqs_caps_running_requests():
    scheduler = make_scheduler(max_num_seqs=2, budget=64)
    requests = [make_request(str(i), 4, 3, first_token=10 * i) for i in range(5)]
    for request in requests:
        scheduler.add(request)
    running_counts = []

    batches = run_to_completion(scheduler, forward=lambda _: running_counts.append(len(scheduler.running)))

    assert len(batches[0]) == 2                                      # the budget alone would admit all five
    assert max(running_counts) == 2
    assert max(len(batch) for batch in batches) == 2
    assert all(r.finished for r in requests)


# ---- preemption -------------------------------------------------------------------------------------------

def test_cache_pressure_preempts_the_newest_running_request():
    scheduler = make_scheduler(num_blocks=7, max_num_seqs=3, budget=128)   # 6 usable blocks
    a, b, c, d = (make_request(name, 30, 20, first_token=100 * i) for i, name in enumerate("abcd"))
    for request in (a, b, c, d):
        scheduler.add(request)
    for _ in range(3):                       # prompts, then decodes at positions 30 and 31: 2 blocks each
        step(scheduler)
    assert scheduler.stats.num_preemptions == 0

    batch = scheduler.schedule()             # position 32 needs a third block each: none is free

    assert scheduled(scheduler, batch) == [a, b]
    assert c.num_computed_tokens == 0 and c.status is RequestStatus.WAITING
    assert list(scheduler.waiting) == [c, d]
    assert scheduler.running == [a, b]
    assert scheduler.stats.num_preemptions == 1
    assert c.num_preemptions == 1
    assert scheduler.kv.num_blocks_held("c") == [0]


def test_newest_request_that_cannot_grow_preempts_itself():
    scheduler = make_scheduler(num_blocks=4, max_num_seqs=2, budget=64)    # 3 usable blocks
    old, new = make_request("old", 10, 20), make_request("new", 30, 20, first_token=100)
    scheduler.add(old)
    scheduler.add(new)
    for _ in range(3):                       # old: 1 block, new: 2 blocks (positions up to 31)
        step(scheduler)

    batch = scheduler.schedule()             # new's position 32 needs a third block; old is already in

    assert scheduled(scheduler, batch) == [old]
    assert scheduler.running == [old]
    assert list(scheduler.waiting) == [new]
    assert new.num_computed_tokens == 0
    assert scheduler.stats.num_preemptions == 1


def test_no_request_is_admitted_in_a_step_that_preempted():
    scheduler = make_scheduler(num_blocks=7, max_num_seqs=2, budget=20)    # 6 usable blocks
    a, b = make_request("a", 16, 50), make_request("b", 70, 5, first_token=100)
    scheduler.add(a)
    scheduler.add(b)
    for _ in range(4):                       # a decodes in 2 blocks; b's prompt reaches 61 tokens in 4
        step(scheduler)
    assert b.num_computed_tokens == 61 and scheduler.kv.pools[0].num_free == 0

    batch = scheduler.schedule()             # b needs a fifth block and preempts itself

    # b's first chunk (19 tokens) would fit the 4 blocks it just gave back, but it must wait a step
    assert scheduled(scheduler, batch) == [a]
    assert list(scheduler.waiting) == [b] and scheduler.stats.num_preemptions == 1


def crowded_scheduler(prefix_caching: bool) -> tuple[Scheduler, list[Request]]:
    """10 requests of up to 14 blocks each sharing 19 full blocks, a tight window group and a compressed
    group; part of a common system prompt opens each prompt, so prefix hits happen too."""
    scheduler = make_scheduler(num_blocks=[20, 12, 20], max_num_seqs=6, budget=48,
                               specs=[FULL, WINDOW_32, FULL, COMPRESSED_4], prefix_caching=prefix_caching)
    system_prompt = list(range(40))
    requests = []
    for i in range(10):
        prompt = system_prompt[:8 * i] + list(range(1000 * i, 1000 * i + 5 + 9 * i))
        requests.append(Request(str(i), prompt, SamplingParams(max_tokens=20 + 4 * i)))
    for request in requests:
        assert scheduler.kv.check_fits(request.num_prompt_tokens + request.params.max_tokens, 48) is None
        scheduler.add(request)
    return scheduler, requests


class ShadowCache:
    """Stands in for the model: every entry written holds the identity of the tokens up to its position, and
    every entry a query reads must hold the reading request's own tokens."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.kv = kv = scheduler.kv
        self.entries: list[dict[tuple[int, int], int]] = [{} for _ in kv.groups]

    def forward(self, batch: StepPlan) -> None:
        for request, num_new in zip(scheduled(self.scheduler, batch), batch.num_new_tokens):
            start, end = request.num_computed_tokens, request.num_computed_tokens + num_new
            for g, group in enumerate(self.kv.groups):
                table = self.kv.block_table_row(request.request_id, g)
                ratio, window = group.spec.tokens_per_entry, group.spec.window
                oldest_read = 0 if window is None else max(0, start - window + 1)
                # positions whose entry the chunk's queries read: those where an entry closes
                where = {p: (int(table[p // BLOCK_SIZE]), (p % BLOCK_SIZE) // ratio)
                         for p in range(oldest_read, end) if (p + 1) % ratio == 0}
                for p in range(start, end):
                    if p in where:
                        assert where[p][0] != NULL_BLOCK, f"request {request.request_id} writes the null block"
                        self.entries[g][where[p]] = self.identity(request, p)
                for p, entry in where.items():
                    assert self.entries[g].get(entry) == self.identity(request, p), \
                        f"request {request.request_id} reads a wrong entry for position {p} in group {g}"

    @staticmethod
    def identity(request: Request, position: int) -> int:
        return hash(tuple(request.token_ids[:position + 1]))


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-prefix-caching", "prefix-caching"])
def test_heavy_preemption_finishes_every_request_and_returns_every_block(prefix_caching):
    scheduler, requests = crowded_scheduler(prefix_caching)

    run_to_completion(scheduler, check=check_block_accounting)

    assert scheduler.stats.num_preemptions > 0
    assert [r.num_output_tokens for r in requests] == [20 + 4 * i for i in range(10)]
    assert all(r.status is RequestStatus.FINISHED for r in requests)
    assert all_blocks_returned(scheduler)
    assert scheduler.kv.requests == {}


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-prefix-caching", "prefix-caching"])
def test_under_preemption_every_cache_read_sees_the_readers_own_tokens(prefix_caching):
    scheduler, requests = crowded_scheduler(prefix_caching)
    shadow = ShadowCache(scheduler)

    run_to_completion(scheduler, forward=shadow.forward)

    assert scheduler.stats.num_preemptions > 0
    assert (scheduler.kv.stats.hits > 0) == prefix_caching
    assert all(r.finished for r in requests)


def test_preempted_request_is_recomputed_with_the_tokens_it_had_sampled():
    scheduler = make_scheduler(num_blocks=4, max_num_seqs=2, budget=64)    # 3 usable blocks
    old, new = make_request("old", 16, 20), make_request("new", 30, 20, first_token=100)
    scheduler.add(old)
    scheduler.add(new)
    step(scheduler)                          # old: 1 block, new: 2 blocks; each samples a token
    step(scheduler)                          # old's position 16 needs a block: new goes
    assert new.status is RequestStatus.WAITING and new.num_output_tokens == 1

    for _ in range(100):
        batch = scheduler.schedule()
        if new.request_id in batch.request_ids:
            break
        complete(scheduler, batch)

    assert old.finished                      # new had to wait for old's blocks
    assert batch.num_new_tokens[batch.request_ids.index(new.request_id)] == 30 + 1


# ---- prefix caching ---------------------------------------------------------------------------------------

def test_a_request_retried_until_it_fits_counts_once_in_the_prefix_stats():
    scheduler = make_scheduler(num_blocks=7, max_num_seqs=2, budget=64, prefix_caching=True)  # 6 usable
    earlier = make_request("earlier", 33, 1)
    scheduler.add(earlier)
    run_to_completion(scheduler)             # leaves two cached blocks: tokens 0..31
    holder = make_request("holder", 40, 10, first_token=500)
    retried = Request("retried", list(range(32)) + list(range(900, 930)), SamplingParams(max_tokens=2))
    scheduler.add(holder)
    scheduler.add(retried)                   # 62 tokens: hits 2 blocks, needs 2 more while holder has 3-4

    run_to_completion(scheduler)

    assert retried.num_cached_tokens == 32
    assert scheduler.kv.stats.queries == 33 + 40 + 62
    assert scheduler.kv.stats.hits == 32


# ---- finish -----------------------------------------------------------------------------------------------

def test_finishing_a_running_request_frees_its_blocks():
    scheduler = make_scheduler(budget=32)
    request = make_request("a", 100, 5)
    scheduler.add(request)
    step(scheduler)                          # mid-prefill: 2 blocks held
    assert scheduler.kv.num_blocks_held("a") == [2]

    scheduler.finish(request)

    assert request.status is RequestStatus.FINISHED
    assert scheduler.running == [] and not scheduler.has_unfinished()
    assert all_blocks_returned(scheduler)
    assert len(scheduler.kv.free_rows) == scheduler.max_num_seqs


def test_finishing_a_waiting_request_removes_it_from_the_queue():
    scheduler = make_scheduler(max_num_seqs=1, budget=32)
    first, waiting = make_request("first", 40, 5), make_request("waiting", 40, 5, first_token=100)
    scheduler.add(first)
    scheduler.add(waiting)
    step(scheduler)
    step(scheduler)                          # `first` runs; `waiting` waits for a seat
    assert list(scheduler.waiting) == [waiting]

    scheduler.finish(waiting)
    run_to_completion(scheduler)

    assert waiting.status is RequestStatus.FINISHED and waiting.num_output_tokens == 0
    assert first.num_output_tokens == 5
    assert all_blocks_returned(scheduler)


def test_finishing_a_preempted_request_does_not_free_its_blocks_twice():
    scheduler = make_scheduler(num_blocks=4, max_num_seqs=2, budget=64)
    old, new = make_request("old", 16, 20), make_request("new", 30, 20, first_token=100)
    scheduler.add(old)
    scheduler.add(new)
    step(scheduler)
    step(scheduler)                          # new is preempted: back in `waiting`, its blocks freed
    assert new.status is RequestStatus.WAITING

    scheduler.finish(new)
    run_to_completion(scheduler)

    assert old.num_output_tokens == 20
    assert all(count == 0 for count in scheduler.kv.pools[0].ref_counts)
    assert all_blocks_returned(scheduler)
