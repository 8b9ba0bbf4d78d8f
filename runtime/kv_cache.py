"""The paged KV cache: cache specs, cache groups, block pools, block tables and prefix caching.

A layer describes what it keeps per token with a CacheSpec. Layers with identical specs form a cache group;
each group has its own block pool, and each request one block table per group. A block always covers
`block_size` token positions; a group with `tokens_per_entry` r stores `block_size // r` entries per block.
Block 0 of every pool is the null block: it is never handed out and fills block-table slots that a window
group has recycled.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
import math
from math import prod

import numpy as np
import torch

NULL_BLOCK = 0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, slots=True)
class CacheSpec:
    entry_shape: tuple[int, ...]            # one cache entry, e.g. (2, kv_heads, head_dim) for K and V
    dtype: torch.dtype
    tokens_per_entry: int = 1               # compression ratio: one entry per r token positions
    window: int | None = None               # only the last `window` positions are ever read
    shared_with: int | None = None          # index of the layer whose entries this layer reads

    @property
    def entry_bytes(self) -> int:
        return prod(self.entry_shape) * torch.empty((), dtype=self.dtype).element_size()

    def group_key(self) -> tuple:
        return (tuple(self.entry_shape), self.dtype, self.tokens_per_entry, self.window)


@dataclass(slots=True)
class CacheGroup:
    spec: CacheSpec                         # shared_with is always None here
    layers: list[int]                       # indices (into cache_specs()) of the layers owning a slot

    def block_bytes(self, block_size: int) -> int:
        return len(self.layers) * (block_size // self.spec.tokens_per_entry) * self.spec.entry_bytes


@dataclass(slots=True)
class CacheLayout:
    groups: list[CacheGroup]
    layer_group: list[int]                  # per layer: its group (a sharing layer: its owner's)
    layer_slot: list[int]                   # per layer: its slot inside the group's tensor


def group_cache_specs(specs: list[CacheSpec], block_size: int) -> CacheLayout:
    """Group layers with identical specs; sharing layers point at their owner's slot and allocate nothing."""
    groups: list[CacheGroup] = []
    by_key: dict[tuple, int] = {}
    layer_group = [-1] * len(specs)
    layer_slot = [-1] * len(specs)
    for i, spec in enumerate(specs):
        if spec.shared_with is not None:
            continue
        if block_size % spec.tokens_per_entry:
            raise ValueError(f"block_size {block_size} is not a multiple of layer {i}'s tokens_per_entry "
                             f"{spec.tokens_per_entry}; choose --block-size as a multiple of it")
        g = by_key.setdefault(spec.group_key(), len(groups))
        if g == len(groups):
            groups.append(CacheGroup(spec=spec, layers=[]))
        layer_group[i], layer_slot[i] = g, len(groups[g].layers)
        groups[g].layers.append(i)
    for i, spec in enumerate(specs):
        owner = spec.shared_with
        if owner is None:
            continue
        if not 0 <= owner < len(specs) or specs[owner].shared_with is not None:
            raise ValueError(f"layer {i} shares the cache of layer {owner}, which does not own a cache")
        layer_group[i], layer_slot[i] = layer_group[owner], layer_slot[owner]
    return CacheLayout(groups, layer_group, layer_slot)


def default_block_size(specs: list[CacheSpec], base: int = 16) -> int:
    """The smallest multiple of `base` that every layer's tokens_per_entry divides (a block holds whole entries)."""
    return math.lcm(base, *(spec.tokens_per_entry for spec in specs))


def window_blocks_per_request(window: int, block_size: int, max_num_batched_tokens: int) -> int:
    """Blocks a window group can need at once: the window behind the first new token plus one chunk."""
    return cdiv(window - 1 + max_num_batched_tokens, block_size) + 1


def window_group_cap(window: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int) -> int:
    """Blocks (null block included) that all requests of a window group can hold at once: each keeps its
    window plus a partly filled block, and one step's new tokens (the whole token budget, shared by
    everyone) may open fresh blocks. Not max_num_seqs times a whole chunk: only one step's worth of new
    tokens exists at a time."""
    return max_num_seqs * (cdiv(window, block_size) + 1) + cdiv(max_num_batched_tokens, block_size) + 1


def plan_num_blocks(groups: list[CacheGroup], block_size: int, budget_bytes: int, max_num_seqs: int,
                    max_num_batched_tokens: int, forced: int | None = None) -> list[int]:
    """Blocks per group (null block included). Full groups share one count N; a window group gets
    min(N, what all requests can ever hold of it), so sliding layers cost memory only window-deep and
    the full groups get the rest of the budget."""
    caps = [None if g.spec.window is None else
            window_group_cap(g.spec.window, block_size, max_num_seqs, max_num_batched_tokens) for g in groups]

    def counts(n: int) -> list[int]:
        return [n if cap is None else min(n, cap) for cap in caps]

    if forced is not None:
        return counts(forced)
    per_block = [g.block_bytes(block_size) for g in groups]
    lo, hi = 0, max(1, budget_bytes // max(1, min(per_block)))
    while lo < hi:                                 # the largest N whose total fits the budget
        mid = (lo + hi + 1) // 2
        if sum(c * b for c, b in zip(counts(mid), per_block)) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    if lo < 2:
        raise ValueError(f"the KV cache budget of {budget_bytes / 2**20:.1f} MiB holds fewer than 2 blocks; "
                         f"raise --gpu-memory-utilization or lower --block-size")
    return counts(lo)


def hash_block(parent: int | None, token_ids: tuple[int, ...]) -> int:
    """Chained block hash: a block's identity is its tokens and everything before them."""
    return hash((parent, token_ids))


class BlockPool:
    """Reference-counted blocks of one group; free blocks keep their hash until reused (LRU eviction)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self.cached: dict[int, int] = {}         # hash -> block id

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - len(self.free)

    def allocate(self, n: int) -> list[int]:
        blocks = []
        for _ in range(n):
            block, _ = self.free.popitem(last=False)
            h = self.block_hash[block]
            if h is not None:                    # evict: its content is about to be overwritten
                del self.cached[h]
                self.block_hash[block] = None
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: list[int]) -> None:
        for block in reversed(blocks):           # tail blocks are evicted first
            if block == NULL_BLOCK:
                continue
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None

    def lookup(self, h: int) -> int | None:
        return self.cached.get(h)

    def acquire(self, block: int) -> None:
        """Take a reference to a cached block (a prefix hit)."""
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def register(self, block: int, h: int) -> None:
        if block != NULL_BLOCK and h not in self.cached and self.block_hash[block] is None:
            self.cached[h] = block
            self.block_hash[block] = h


@dataclass(slots=True)
class _RequestBlocks:
    row: int                                  # this request's row in the persistent block tables
    blocks: list[list[int]]                   # per group; NULL_BLOCK where a window group recycled
    first_live: list[int]                     # per group: first block index not yet recycled
    num_hashed_blocks: int = 0
    num_covered_tokens: int = 0               # token positions every group's table already covers


@dataclass(slots=True)
class PrefixCacheStats:
    queries: int = 0                          # prompt tokens looked up
    hits: int = 0                             # prompt tokens served from the cache


class KVCacheManager:
    """Block tables and block pools for all groups. The scheduler's only view of memory."""

    def __init__(self, layout: CacheLayout, block_size: int, num_blocks: list[int], max_num_seqs: int,
                 max_model_len: int, enable_prefix_caching: bool):
        self.layout = layout
        self.groups = layout.groups
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pools = [BlockPool(n) for n in num_blocks]
        self.max_blocks_per_seq = cdiv(max_model_len, block_size)
        self.max_num_seqs = max_num_seqs
        # each request holds one block-table row (its index in the runner's tables) while it holds blocks
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))
        # Block-table writes since the last step plan, per group: (row, first column, block ids). The
        # runner keeps its own copy of the tables and replays these; nothing else about memory crosses.
        self.staged_writes: list[list[tuple[int, int, list[int]]]] = [[] for _ in self.groups]
        self.requests: dict[str, _RequestBlocks] = {}
        self.has_window_groups = any(g.spec.window is not None for g in self.groups)
        # Tokens past a block that its hash covers too. A model drafter's entry at position p depends on the
        # token at p + 1: with 1 here, a hit on a block means the token after it matches as well.
        self.hash_lookahead = 0
        self.stats = PrefixCacheStats()

    # ---- capacity -------------------------------------------------------------------------------------

    def blocks_needed(self, group: int, num_tokens: int, chunk: int) -> int:
        window = self.groups[group].spec.window
        total = cdiv(num_tokens, self.block_size)
        if window is None:
            return total
        return min(total, window_blocks_per_request(window, self.block_size, chunk))

    def check_fits(self, num_tokens: int, chunk: int) -> str | None:
        """Why a request of `num_tokens` could never be scheduled, or None if it could."""
        for g, pool in enumerate(self.pools):
            need = self.blocks_needed(g, num_tokens, chunk)
            if need > pool.num_blocks - 1:
                return (f"the request needs {need} KV blocks of {self.block_size} tokens ({num_tokens} tokens) "
                        f"but cache group {g} has only {pool.num_blocks - 1}")
        return None

    def usage(self) -> list[float]:
        return [pool.num_used / max(1, pool.num_blocks - 1) for pool in self.pools]

    # ---- per request ----------------------------------------------------------------------------------

    def row(self, request_id: str) -> int:
        return self.requests[request_id].row

    def _state(self, request_id: str) -> _RequestBlocks:
        state = self.requests.get(request_id)
        if state is None:
            state = _RequestBlocks(row=self.free_rows.pop(), blocks=[[] for _ in self.groups],
                                   first_live=[0] * len(self.groups))
            self.requests[request_id] = state
        return state

    def _ensure_hashes(self, request, num_blocks: int) -> list[int]:
        hashes = request.block_hashes
        bs = self.block_size
        while len(hashes) < num_blocks:
            b = len(hashes)
            end = (b + 1) * bs + self.hash_lookahead
            hashes.append(hash_block(hashes[-1] if hashes else None, tuple(request.token_ids[b * bs:end])))
        return hashes

    def _first_needed_block(self, group: int, position: int) -> int:
        """First block a query at `position` (or later) can read in this group."""
        window = self.groups[group].spec.window
        return 0 if window is None else max(0, position - window + 1) // self.block_size

    def match_prefix(self, request) -> int:
        """Take references on the longest cached prefix of a fresh request; returns the tokens it covers.
        At least the last token is always left to compute, since its logits are needed. Stats are left to
        `record_prefix_lookup`: a request whose allocation fails is looked up again on every retry."""
        if not self.enable_prefix_caching:
            return 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._ensure_hashes(request, max_blocks)
        k = max_blocks
        for g, pool in enumerate(self.pools):
            if self.groups[g].spec.window is None:
                k = next((i for i, h in enumerate(hashes[:k]) if pool.lookup(h) is None), k)
        while k > 0 and not all(self._window_hit(g, hashes, k) for g in range(len(self.groups))):
            k -= 1
        if k == 0:
            return 0
        state = self._state(request.request_id)
        for g, pool in enumerate(self.pools):
            first = self._first_needed_block(g, k * self.block_size)
            blocks = [NULL_BLOCK] * first + [pool.lookup(h) for h in hashes[first:k]]
            for block in blocks[first:]:
                pool.acquire(block)
            state.blocks[g] = blocks
            state.first_live[g] = first
            self._write_table(g, state.row, 0, blocks)
        state.num_hashed_blocks = k
        state.num_covered_tokens = k * self.block_size
        return k * self.block_size

    def record_prefix_lookup(self, request, num_cached_tokens: int) -> None:
        """Count a lookup once, when its request is admitted."""
        if self.enable_prefix_caching:
            self.stats.queries += request.num_tokens
            self.stats.hits += num_cached_tokens

    def _window_hit(self, group: int, hashes: list[int], k: int) -> bool:
        if self.groups[group].spec.window is None:
            return True
        pool = self.pools[group]
        first = self._first_needed_block(group, k * self.block_size)
        return all(pool.lookup(h) is not None for h in hashes[first:k])

    def allocate(self, request, num_new_tokens: int) -> bool:
        """Make the block tables cover `num_computed + num_new_tokens` positions; False if memory is short
        (nothing is allocated then)."""
        state = self._state(request.request_id)
        computed = request.num_computed_tokens
        if computed + num_new_tokens <= state.num_covered_tokens and not self.has_window_groups:
            return True                                 # the common decode step: the last block has room
        # a drafter's lookahead may reach past max_model_len: those positions are never written (the runner
        # masks draft writes past the table), so the table never grows past its width
        target = min(cdiv(computed + num_new_tokens, self.block_size), self.max_blocks_per_seq)
        for g in range(len(self.groups)):
            self._recycle(g, state, computed)
        need = [max(0, target - len(blocks)) for blocks in state.blocks]
        if any(n > pool.num_free for n, pool in zip(need, self.pools)):
            return False
        for g, n in enumerate(need):
            if n:
                new = self.pools[g].allocate(n)
                start = len(state.blocks[g])
                state.blocks[g].extend(new)
                self._write_table(g, state.row, start, new)
        state.num_covered_tokens = min(len(blocks) for blocks in state.blocks) * self.block_size
        return True

    def _recycle(self, group: int, state: _RequestBlocks, computed: int) -> None:
        """Free the blocks of a window group that no query from `computed` on can reach."""
        first = min(self._first_needed_block(group, computed), len(state.blocks[group]))
        live = state.first_live[group]
        if first <= live:
            return
        blocks = state.blocks[group]
        self.pools[group].release(blocks[live:first])
        blocks[live:first] = [NULL_BLOCK] * (first - live)
        self._write_table(group, state.row, live, [NULL_BLOCK] * (first - live))
        state.first_live[group] = first

    def cache_blocks(self, request) -> None:
        """Register blocks that became full of computed tokens, so later requests can hit them."""
        if not self.enable_prefix_caching:
            return
        state = self.requests[request.request_id]
        num_full = min(request.num_computed_tokens, request.num_tokens - self.hash_lookahead) // self.block_size
        if num_full <= state.num_hashed_blocks:
            return
        hashes = self._ensure_hashes(request, num_full)
        for g, pool in enumerate(self.pools):
            blocks = state.blocks[g]
            for b in range(state.num_hashed_blocks, num_full):
                pool.register(blocks[b], hashes[b])
        state.num_hashed_blocks = num_full

    def free(self, request) -> None:
        state = self.requests.pop(request.request_id, None)
        if state is None:
            return
        for g, pool in enumerate(self.pools):
            pool.release(state.blocks[g])
        self.free_rows.append(state.row)

    def _write_table(self, group: int, row: int, start: int, blocks: list[int]) -> None:
        self.staged_writes[group].append((row, start, list(blocks)))

    def block_table_row(self, request_id: str, group: int) -> np.ndarray:
        """A request's block table in one group, NULL_BLOCK past its blocks (the runner's copy holds the same)."""
        row = np.full(self.max_blocks_per_seq, NULL_BLOCK, dtype=np.int32)
        blocks = self.requests[request_id].blocks[group]
        row[:len(blocks)] = blocks
        return row

    def take_staged_writes(self) -> list[list[tuple[int, int, list[int]]]]:
        """The block-table writes since the last call, per group (a step plan carries them)."""
        staged, self.staged_writes = self.staged_writes, [[] for _ in self.groups]
        return staged

    def num_blocks_held(self, request_id: str) -> list[int]:
        state = self.requests.get(request_id)
        if state is None:
            return [0] * len(self.groups)
        return [sum(b != NULL_BLOCK for b in blocks) for blocks in state.blocks]
