"""The paged cache without a model: synthetic CacheSpec lists, requests built by hand, steps simulated here."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.kv_cache import (NULL_BLOCK, CacheSpec, KVCacheManager, group_cache_specs, hash_block,
                              plan_num_blocks)
from runtime.request import Request, SamplingParams
from runtime.runner import ModelRunner, allocate_caches
from runtime.scheduler import JoiningRequest, StepPlan

BLOCK_SIZE = 16
KV_SHAPE = (2, 2, 8)                        # K and V, 2 heads, head_dim 8
KV_BYTES = 2 * 2 * 8 * 4                    # float32
FULL = CacheSpec(KV_SHAPE, torch.float32)
WINDOW_128 = CacheSpec(KV_SHAPE, torch.float32, window=128)
COMPRESSED_4 = CacheSpec((16,), torch.float32, tokens_per_entry=4)
COMPRESSED_8 = CacheSpec((16,), torch.float32, tokens_per_entry=8)


def shared(owner: int) -> CacheSpec:
    return CacheSpec(KV_SHAPE, torch.float32, shared_with=owner)


def make_manager(specs: list[CacheSpec], num_blocks: int | list[int], block_size: int = BLOCK_SIZE,
                 max_num_seqs: int = 4, max_model_len: int = 4096, prefix_caching: bool = True) -> KVCacheManager:
    layout = group_cache_specs(specs, block_size)
    counts = num_blocks if isinstance(num_blocks, list) else [num_blocks] * len(layout.groups)
    return KVCacheManager(layout, block_size, counts, max_num_seqs, max_model_len, prefix_caching)


def make_request(request_id: str, token_ids: list[int]) -> Request:
    return Request(request_id, token_ids, SamplingParams(max_tokens=8))


def compute(kv: KVCacheManager, request: Request, num_new: int) -> None:
    """One simulated engine step for one request: blocks, forward, register full blocks."""
    assert kv.allocate(request, num_new), f"{request.request_id} did not fit"
    request.num_computed_tokens += num_new
    kv.cache_blocks(request)


def prefill(kv: KVCacheManager, request: Request, chunk: int = 64) -> int:
    """Prefix lookup, then the rest of the prompt in chunks, as the scheduler does; returns the hit."""
    request.num_computed_tokens = kv.match_prefix(request)
    hit = request.num_computed_tokens
    assert kv.allocate(request, min(chunk, request.num_tokens - hit))
    kv.record_prefix_lookup(request, hit)                            # admitted
    while request.num_computed_tokens < request.num_tokens:
        compute(kv, request, min(chunk, request.num_tokens - request.num_computed_tokens))
    return hit


def table_row(kv: KVCacheManager, group: int, request: Request) -> np.ndarray:
    return kv.block_table_row(request.request_id, group)


# ---- grouping ---------------------------------------------------------------------------------------------

def test_layers_with_identical_specs_share_one_group():
    layout = group_cache_specs([FULL, CacheSpec(KV_SHAPE, torch.float32), FULL], BLOCK_SIZE)

    assert len(layout.groups) == 1
    assert layout.groups[0].layers == [0, 1, 2]
    assert layout.layer_group == [0, 0, 0]
    assert layout.layer_slot == [0, 1, 2]


@pytest.mark.parametrize("one, other", [
    (FULL, CacheSpec(KV_SHAPE, torch.float32, window=128)),
    (CacheSpec(KV_SHAPE, torch.float32, window=128), CacheSpec(KV_SHAPE, torch.float32, window=256)),
    (FULL, CacheSpec(KV_SHAPE, torch.bfloat16)),
    (FULL, CacheSpec((2, 4, 8), torch.float32)),
    (FULL, CacheSpec(KV_SHAPE, torch.float32, tokens_per_entry=4)),
], ids=["window", "window-size", "dtype", "entry-shape", "tokens-per-entry"])
def test_a_different_window_dtype_entry_shape_or_ratio_splits_groups(one, other):
    layout = group_cache_specs([one, other, one, other], BLOCK_SIZE)

    assert [g.layers for g in layout.groups] == [[0, 2], [1, 3]]
    assert [g.spec for g in layout.groups] == [one, other]
    assert layout.layer_group == [0, 1, 0, 1]
    assert layout.layer_slot == [0, 0, 1, 1]


def test_mixed_model_gives_each_layer_its_group_and_slot():
    specs = [FULL, WINDOW_128, FULL, COMPRESSED_4, WINDOW_128, shared(0), COMPRESSED_4, shared(4)]
    layout = group_cache_specs(specs, BLOCK_SIZE)

    assert [g.spec for g in layout.groups] == [FULL, WINDOW_128, COMPRESSED_4]
    assert [g.layers for g in layout.groups] == [[0, 2], [1, 4], [3, 6]]
    assert layout.layer_group == [0, 1, 0, 2, 1, 0, 2, 1]
    assert layout.layer_slot == [0, 0, 1, 0, 1, 0, 1, 1]


# ---- shared specs -----------------------------------------------------------------------------------------

def test_sharing_layer_maps_to_its_owners_group_and_slot():
    layout = group_cache_specs([FULL, WINDOW_128, FULL, shared(2), shared(0)], BLOCK_SIZE)

    assert layout.layer_group[3] == layout.layer_group[2] == 0
    assert layout.layer_slot[3] == layout.layer_slot[2] == 1
    assert (layout.layer_group[4], layout.layer_slot[4]) == (0, 0)


def test_sharing_layer_is_not_counted_in_its_group():
    layout = group_cache_specs([FULL, FULL, shared(1), shared(0)], BLOCK_SIZE)

    assert layout.groups[0].layers == [0, 1]
    assert layout.groups[0].block_bytes(BLOCK_SIZE) == 2 * BLOCK_SIZE * KV_BYTES


def test_sharing_layer_adds_no_bytes_to_the_plan():
    layout = group_cache_specs([FULL, FULL, shared(1), shared(0)], BLOCK_SIZE)
    owner_bytes_per_block = 2 * BLOCK_SIZE * KV_BYTES          # two owning layers, nothing for the sharers
    budget = 100 * owner_bytes_per_block + 7

    [num_blocks] = plan_num_blocks(layout.groups, BLOCK_SIZE, budget, max_num_seqs=4, max_num_batched_tokens=64)

    assert num_blocks == 100


def test_sharing_layer_reads_its_owners_cache_tensor():
    layout = group_cache_specs([FULL, WINDOW_128, shared(0)], BLOCK_SIZE)
    caches = allocate_caches(layout, [5, 3], BLOCK_SIZE, torch.device("cpu"))

    assert caches[2].data_ptr() == caches[0].data_ptr()
    assert caches[2].untyped_storage().nbytes() == 5 * BLOCK_SIZE * KV_BYTES


@pytest.mark.parametrize("owner", [1, 3, -1], ids=["a-sharing-layer", "out-of-range", "negative"])
def test_sharing_a_layer_that_owns_no_cache_raises(owner):
    specs = [FULL, shared(0), shared(owner)]

    with pytest.raises(ValueError, match="layer 2"):               # names the offending layer
        group_cache_specs(specs, BLOCK_SIZE)


# ---- window recycling -------------------------------------------------------------------------------------

WINDOW, CHUNK = 128, 64
WINDOW_BOUND = -(-(WINDOW - 1 + CHUNK) // BLOCK_SIZE) + 1          # 13 blocks


def grow_in_window_model(num_tokens: int, observe) -> tuple[KVCacheManager, Request]:
    """A 300-token prompt prefilled in chunks of CHUNK, then decoded to `num_tokens`; `observe(kv, request,
    computed_before_step)` runs after each allocation. The window pool holds only WINDOW_BOUND blocks."""
    full_blocks = num_tokens // BLOCK_SIZE + 2
    kv = make_manager([FULL, WINDOW_128], [full_blocks + 1, WINDOW_BOUND + 1], prefix_caching=False)
    request = make_request("a", list(range(300)))
    while request.num_computed_tokens < num_tokens:
        computed = request.num_computed_tokens
        num_new = min(CHUNK, request.num_tokens - computed)
        assert kv.allocate(request, num_new)
        observe(kv, request, computed)
        request.num_computed_tokens += num_new
        if request.num_computed_tokens == request.num_tokens:
            request.token_ids.append(7)
    return kv, request


def test_window_group_memory_is_bounded_by_the_window():
    held = []
    grow_in_window_model(2000, lambda kv, request, _: held.append(kv.num_blocks_held("a")))

    full_held, window_held = zip(*held)
    assert max(window_held) <= WINDOW_BOUND
    assert full_held[-1] == -(-2000 // BLOCK_SIZE)                  # the full group keeps every block


def test_recycled_window_blocks_return_to_the_pool():
    def observe(kv, request, _):
        _, window_held = kv.num_blocks_held("a")
        assert kv.pools[1].num_free == WINDOW_BOUND - window_held

    kv, request = grow_in_window_model(2000, observe)
    kv.free(request)
    assert kv.pools[1].num_free == WINDOW_BOUND
    assert kv.pools[0].num_free == kv.pools[0].num_blocks - 1


def test_recycled_table_entries_are_null_while_the_full_group_keeps_every_block():
    def observe(kv, request, computed):
        num_blocks = -(-(computed + min(CHUNK, request.num_tokens - computed)) // BLOCK_SIZE)
        window_row, full_row = table_row(kv, 1, request), table_row(kv, 0, request)
        oldest_position_read = computed - (WINDOW - 1)
        for b in range(num_blocks):
            last_position_of_block = (b + 1) * BLOCK_SIZE - 1
            reachable = last_position_of_block >= oldest_position_read
            assert (window_row[b] != NULL_BLOCK) == reachable, (computed, b)
            assert full_row[b] != NULL_BLOCK
        assert len(set(full_row[:num_blocks].tolist())) == num_blocks

    grow_in_window_model(2000, observe)


# ---- compression ------------------------------------------------------------------------------------------

def test_compressed_group_holds_block_size_over_ratio_entries_per_block():
    layout = group_cache_specs([FULL, COMPRESSED_4, FULL, COMPRESSED_8, COMPRESSED_4], BLOCK_SIZE)
    caches = allocate_caches(layout, [6, 5, 4], BLOCK_SIZE, torch.device("cpu"))

    assert caches[0].shape == (6, BLOCK_SIZE, *KV_SHAPE)
    assert caches[1].shape == caches[4].shape == (5, BLOCK_SIZE // 4, 16)
    assert caches[3].shape == (4, BLOCK_SIZE // 8, 16)
    # each group is one tensor [layers, blocks, block_size // r, *entry_shape]
    assert caches[1].untyped_storage().nbytes() == 2 * 5 * (BLOCK_SIZE // 4) * 16 * 4
    assert caches[1].untyped_storage().data_ptr() == caches[4].untyped_storage().data_ptr()
    assert layout.groups[1].block_bytes(BLOCK_SIZE) == 2 * (BLOCK_SIZE // 4) * 16 * 4


def test_block_size_not_a_multiple_of_the_ratio_raises():
    with pytest.raises(ValueError, match="block_size"):
        group_cache_specs([FULL, CacheSpec((16,), torch.float32, tokens_per_entry=3)], BLOCK_SIZE)


def test_compressed_slot_mapping_writes_only_on_entry_closing_tokens():
    kv = make_manager([FULL, COMPRESSED_4, COMPRESSED_8], 20)
    a = make_request("a", list(range(45)))
    b = make_request("b", list(range(100, 120)))
    compute(kv, a, 13)
    assert kv.allocate(b, 20)
    assert kv.allocate(a, 30)                 # a's later blocks come after b's
    runner = ModelRunner(model=None, kv=kv, caches=[], vocab_size=32, device=torch.device("cpu"))

    joining = [JoiningRequest(r.request_id, r.token_ids, r.num_prompt_tokens, r.params, 0, (), kv.row(r.request_id))
               for r in (a, b)]
    plan = StepPlan(joining, ["a", "b"], [30, 20], [13, 0], [[], []], [False, True], kv.take_staged_writes())
    _, ctx, _ = runner.prepare_inputs(plan)

    token_positions = [(a, p) for p in range(13, 43)] + [(b, p) for p in range(20)]
    for group, ratio in enumerate([1, 4, 8]):
        expected = []
        for request, p in token_positions:
            block = int(table_row(kv, group, request)[p // BLOCK_SIZE])
            closes_entry = (p + 1) % ratio == 0
            expected.append(block * (BLOCK_SIZE // ratio) + (p % BLOCK_SIZE) // ratio if closes_entry else -1)
        assert ctx.slot_mappings[group].tolist() == expected, f"group {group} (ratio {ratio})"
    assert sum(s >= 0 for s in ctx.slot_mappings[2].tolist()) == 4 + 2     # a: 15 23 31 39; b: 7 15


# ---- prefix caching ---------------------------------------------------------------------------------------

def test_second_request_hits_the_shared_full_blocks():
    kv = make_manager([FULL], 32)
    first = make_request("first", list(range(50)))
    prefill(kv, first)
    second = make_request("second", list(range(48)) + [999, 998, 997])

    hit = prefill(kv, second)

    assert hit == 3 * BLOCK_SIZE
    assert table_row(kv, 0, second)[:3].tolist() == table_row(kv, 0, first)[:3].tolist()
    assert table_row(kv, 0, second)[3] != table_row(kv, 0, first)[3]


def test_prefix_hit_always_leaves_a_token_to_compute():
    kv = make_manager([FULL], 32)
    prefill(kv, make_request("first", list(range(48))))
    same = make_request("same", list(range(48)))                     # three full blocks, all cached

    assert kv.match_prefix(same) == 2 * BLOCK_SIZE


def test_prefix_stats_count_queried_and_hit_tokens():
    kv = make_manager([FULL], 32)
    prefill(kv, make_request("first", list(range(50))))
    assert (kv.stats.queries, kv.stats.hits) == (50, 0)

    prefill(kv, make_request("second", list(range(40))))

    assert (kv.stats.queries, kv.stats.hits) == (50 + 40, 2 * BLOCK_SIZE)


def test_freed_block_still_hits():
    kv = make_manager([FULL], 32)
    first = make_request("first", list(range(40)))
    prefill(kv, first)
    first_blocks = table_row(kv, 0, first)[:2].tolist()
    kv.free(first)
    free_before = kv.pools[0].num_free

    second = make_request("second", list(range(40)))
    hit = kv.match_prefix(second)

    assert hit == 2 * BLOCK_SIZE
    assert table_row(kv, 0, second)[:2].tolist() == first_blocks
    assert [kv.pools[0].ref_counts[block] for block in first_blocks] == [1, 1]
    assert kv.pools[0].num_free == free_before - 2


def test_evicted_block_no_longer_hits():
    kv = make_manager([FULL], 5)                                      # 4 usable blocks
    first = make_request("first", list(range(33)))
    prefill(kv, first)
    kv.free(first)
    filler = make_request("filler", list(range(500, 564)))
    assert kv.allocate(filler, 64)                                    # takes all 4 blocks: evicts both hashes

    again = make_request("again", list(range(33)))

    assert kv.match_prefix(again) == 0


def test_disabled_prefix_caching_never_hits():
    kv = make_manager([FULL], 32, prefix_caching=False)
    prefill(kv, make_request("first", list(range(50))))
    second = make_request("second", list(range(50)))

    assert kv.match_prefix(second) == 0
    assert kv.stats.hits == 0


def test_window_hit_needs_only_the_blocks_the_window_reaches():
    window_spec = CacheSpec(KV_SHAPE, torch.float32, window=32)
    kv = make_manager([FULL, window_spec], [32, 6])                   # 5 window blocks: early ones get evicted
    prompt = list(range(161))
    first = make_request("first", prompt)
    prefill(kv, first, chunk=BLOCK_SIZE)
    first_block_hash = hash_block(None, tuple(prompt[:BLOCK_SIZE]))
    assert kv.pools[1].lookup(first_block_hash) is None              # the window pool forgot the first block

    second = make_request("second", prompt)
    hit = kv.match_prefix(second)

    assert hit == 10 * BLOCK_SIZE
    # the first query (position 160) reads positions 129..160: blocks 8 and 9 of the hit
    window_row = table_row(kv, 1, second)
    assert window_row[:8].tolist() == [NULL_BLOCK] * 8
    assert window_row[8:10].tolist() == table_row(kv, 1, first)[8:10].tolist()


def test_window_group_misses_when_the_blocks_the_window_reaches_were_evicted():
    window_spec = CacheSpec(KV_SHAPE, torch.float32, window=32)
    kv = make_manager([FULL, window_spec], [32, 6])
    prompt = list(range(161))
    first = make_request("first", prompt)
    prefill(kv, first, chunk=BLOCK_SIZE)
    kv.free(first)
    filler = make_request("filler", list(range(1000, 1080)))
    assert kv.allocate(filler, 80)                                    # every window block is reused

    again = make_request("again", prompt)

    assert kv.match_prefix(again) == 0


# ---- plan_num_blocks --------------------------------------------------------------------------------------

PLAN_SEQS, PLAN_CHUNK = 4, 64
# each request's window plus a partial block, plus the blocks one step's tokens can open, plus the null block
WINDOW_CAP = PLAN_SEQS * (128 // BLOCK_SIZE + 1) + PLAN_CHUNK // BLOCK_SIZE + 1     # 41
FULL_BLOCK_BYTES = 2 * BLOCK_SIZE * KV_BYTES                            # two full layers
WINDOW_BLOCK_BYTES = BLOCK_SIZE * KV_BYTES                              # one window layer


def plan(budget: int, forced: int | None = None) -> list[int]:
    layout = group_cache_specs([FULL, WINDOW_128, FULL], BLOCK_SIZE)
    return plan_num_blocks(layout.groups, BLOCK_SIZE, budget, PLAN_SEQS, PLAN_CHUNK, forced=forced)


def test_window_group_is_capped_at_what_max_num_seqs_requests_can_hold():
    full, window = plan(budget=10_000 * FULL_BLOCK_BYTES)

    assert window == WINDOW_CAP
    assert full > WINDOW_CAP


def test_full_groups_get_the_rest_of_the_budget():
    budget = 1000 * FULL_BLOCK_BYTES + WINDOW_CAP * WINDOW_BLOCK_BYTES + 100

    assert plan(budget) == [1000, WINDOW_CAP]


@pytest.mark.parametrize("budget", [2 * (FULL_BLOCK_BYTES + WINDOW_BLOCK_BYTES),   # the least that works
                                    240_000,                                       # N below the window cap
                                    251_905,                                       # N just at the cap
                                    10**6, 3 * 10**7 + 12345])
def test_planned_blocks_are_the_most_that_fit_the_budget(budget):
    def total_bytes(n: int) -> int:
        return n * FULL_BLOCK_BYTES + min(n, WINDOW_CAP) * WINDOW_BLOCK_BYTES

    full, window = plan(budget)

    assert window == min(full, WINDOW_CAP)
    assert total_bytes(full) <= budget < total_bytes(full + 1)


@pytest.mark.parametrize("forced", [10, 500])
def test_forced_block_count_is_used_whatever_the_budget(forced):
    full, window = plan(budget=0, forced=forced)

    assert full == forced
    assert window == min(forced, WINDOW_CAP)


def test_budget_below_two_blocks_raises():
    with pytest.raises(ValueError):
        plan(budget=2 * (FULL_BLOCK_BYTES + WINDOW_BLOCK_BYTES) - 1)


# ---- check_fits -------------------------------------------------------------------------------------------

def numbers_in(text: str) -> set[int]:
    return {int(n) for n in re.findall(r"\d+", text)}


def test_check_fits_names_the_numbers_for_a_request_bigger_than_the_cache():
    kv = make_manager([FULL], 11)                                     # 10 usable blocks = 160 tokens

    message = kv.check_fits(200, chunk=64)

    assert message is not None
    assert {13, 200, 10} <= numbers_in(message)      # blocks needed, tokens, blocks the group has


def test_check_fits_accepts_exactly_what_the_cache_can_hold():
    kv = make_manager([FULL], 11)                                     # 10 usable blocks = 160 tokens

    assert kv.check_fits(160, chunk=64) is None
    assert kv.check_fits(161, chunk=64) is not None


def test_check_fits_charges_window_groups_only_window_deep():
    window_spec = CacheSpec(KV_SHAPE, torch.float32, window=32)
    kv = make_manager([window_spec], 6, max_model_len=100_000)       # 5 usable blocks

    assert kv.check_fits(50_000, chunk=16) is None                    # 32 - 1 + 16 positions: 4 blocks
    message = kv.check_fits(50_000, chunk=64)                         # 32 - 1 + 64 positions: 7 blocks
    assert message is not None and {7, 5} <= numbers_in(message)


# ---- invariants -------------------------------------------------------------------------------------------

def test_shared_prefix_blocks_are_reference_counted_per_holder():
    kv = make_manager([FULL], 32)
    requests = [make_request(str(i), list(range(40)) + [100 + i]) for i in range(3)]
    for request in requests:
        prefill(kv, request)

    holders = Counter(block for r in requests for block in table_row(kv, 0, r)[:3].tolist())
    for block, count in holders.items():
        assert kv.pools[0].ref_counts[block] == count
    assert holders.most_common(1)[0][1] == 3                          # the two shared blocks


def test_gpt_oss_20b_sliding_group_is_sized_by_the_global_bound():
    """gpt-oss-20b's cache (tools/configs/gpt-oss-20b: 12 sliding layers of window 128 and 12 full layers,
    8 KV heads of 64, bf16) at a 60 GiB budget and the default 256 sequences / 8192-token budget: the
    sliding group holds every request's window plus a block, plus one step's new tokens, and the full group
    gets all the rest."""
    config = json.loads(Path("tools/configs/gpt-oss-20b/config.json").read_text())
    entry = (2, config["num_key_value_heads"], config["head_dim"])
    specs = [CacheSpec(entry, torch.bfloat16, window=config["sliding_window"] if kind == "sliding_attention" else None)
             for kind in config["layer_types"]]
    layout = group_cache_specs(specs, 16)
    full, sliding = (0, 1) if layout.groups[0].spec.window is None else (1, 0)
    budget = 60 * 2**30

    counts = plan_num_blocks(layout.groups, 16, budget, 256, 8192)

    bound = 256 * (-(-128 // 16) + 1) + 8192 // 16 + 1                  # 2,817 blocks, null block included
    assert counts[sliding] == bound
    block_bytes = [g.block_bytes(16) for g in layout.groups]
    assert counts[full] == (budget - bound * block_bytes[sliding]) // block_bytes[full]
    assert counts[full] > 5 * counts[sliding]
