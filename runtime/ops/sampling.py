"""Random sampling of many rows at once: temperature, top-k, top-p, min-p and an exponential race whose noise
is a hash of (request seed, output index, token id). The torch reference (the CPU path and the oracle) sorts
the vocabulary; its Triton twin does not, in the common case.

Semantics (both): rows with temperature below GREEDY_BELOW are greedy (their temperature is taken as 1 for
the random draw, which the caller ignores). On logits / temperature: top-k keeps every token >= the k-th
largest value (ties kept; 0 = off); top-p keeps, in descending order with ties in ascending id order, each
token whose preceding mass (renormalised over the top-k survivors) is below p (1 = off); min-p keeps tokens
whose probability over the survivors is >= min_p times the largest. The token is argmax(prob / -log(u)),
an exponential race: a draw from the filtered distribution that is a pure function of its noise."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:                                  # the torch reference still works without Triton
    triton = None

GREEDY_BELOW = 1e-5    # temperatures under this sample greedily: logits / 1e-40 overflow to inf, softmax to NaN
_M32 = 0xFFFFFFFF


@dataclass(slots=True)
class SampledRows:
    random: torch.Tensor          # [rows] int64: the race's winner (the excluded token left out)
    greedy: torch.Tensor          # [rows] int64: argmax of the logits
    excluded_prob: torch.Tensor | None   # [rows] fp32: probability of the excluded token under the filters


# ---- the noise ------------------------------------------------------------------------------------------


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 tensors; multipliers stay below 2**31 so nothing overflows."""
    x = x & _M32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _M32
    x = ((x ^ (x >> 15)) * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


def uniform_per_row(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """[rows] uniforms in (0, 1) for the acceptance test of speculative decoding, a pure function of
    (seed, step) and independent of the token race's noise (a different salt)."""
    key = _mix32(_mix32(seeds ^ (seeds >> 32)) ^ _mix32(steps + 0x7F4A7C15)) ^ 0x2545F491
    return ((_mix32(key) >> 9).float() + 0.5) / float(1 << 23)          # 23 bits: never rounds to 1


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, vocab] uniforms in (0, 1), a pure function of (seed, step, token id)."""
    row_key = _mix32(_mix32(seeds ^ (seeds >> 32)) ^ _mix32(steps + 0x9E3779B9))[:, None]   # [rows, 1]
    token_key = _mix32(torch.arange(vocab_size, device=seeds.device) + 0x632BE5AB)[None, :]  # [1, vocab]
    # 23 bits, so that bits + 0.5 is exact in fp32: with 24, the top code word rounds up to u = 1, whose
    # -log(u) = -0 turns a masked token's 0 probability into NaN, and argmax picks the NaN.
    bits = _mix32(row_key ^ token_key) >> 9                                                # 23 random bits
    return (bits.float() + 0.5) / float(1 << 23)


# ---- the torch reference --------------------------------------------------------------------------------


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                            min_p: torch.Tensor | None) -> torch.Tensor:
    """Mask (to -inf) the tokens each row's filters remove. top_k 0 = off; ties at the k-th value are kept.
    top-p keeps the smallest prefix of tokens by descending probability (ties by ascending id) whose mass
    reaches p."""
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, logits.shape[-1])
        kth = torch.sort(logits, dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        # top_p 1 is off: the fp32 running sum can reach 1.0 before the tail ends, which would cut the tail.
        remove_sorted = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
        remove_sorted[:, 0] = False
        logits = logits.masked_fill(torch.zeros_like(remove_sorted).scatter(1, order, remove_sorted), float("-inf"))
    if min_p is not None:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits


def sample_rows_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None,
                    top_p: torch.Tensor | None, min_p: torch.Tensor | None, seeds: torch.Tensor,
                    steps: torch.Tensor, exclude: torch.Tensor | None = None) -> SampledRows:
    """Torch reference of `sample_rows`: filters on a sorted copy of the vocabulary, then the race over it.
    `exclude` [rows] (-1 = none) leaves one token per row out of the race and reports its probability."""
    temperature = torch.where(temperature < GREEDY_BELOW, 1.0, temperature)
    probs = torch.softmax(apply_top_k_top_p_min_p(logits / temperature[:, None], top_k, top_p, min_p), dim=-1)
    race = probs / -torch.log(uniform_noise(seeds, steps, logits.shape[-1]))
    excluded_prob = None
    if exclude is not None:
        token = exclude.clamp(min=0)[:, None]                                         # [rows, 1]
        excluded_prob = probs.gather(1, token).squeeze(1)
        race = torch.where((exclude >= 0)[:, None], race.scatter(1, token, 0.0), race)
    return SampledRows(race.argmax(dim=-1), logits.argmax(dim=-1), excluded_prob)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None,
                top_p: torch.Tensor | None, min_p: torch.Tensor | None, seeds: torch.Tensor,
                steps: torch.Tensor, exclude: torch.Tensor | None = None) -> SampledRows:
    """One random and one greedy token per row of logits [rows, vocab] fp32. The Triton kernel on a GPU, the
    torch reference elsewhere (or everywhere with RUN_MODEL_TORCH_OPS=1)."""
    if logits.is_cuda and triton is not None and os.environ.get("RUN_MODEL_TORCH_OPS") != "1":
        return sample_rows_triton(logits, temperature, top_k, top_p, min_p, seeds, steps, exclude)
    return sample_rows_ref(logits, temperature, top_k, top_p, min_p, seeds, steps, exclude)


# ---- Triton kernels -------------------------------------------------------------------------------------
# Each row is split into chunks of CHUNK tokens, one program per (row, chunk) for the passes over the
# vocabulary, so that a few hundred rows still fill the GPU; a last program per row decides and draws.
#   1 (row, chunk): max and argmax of the raw logits (the argmax is the greedy token; max / T the scaled max M).
#   2 (row, chunk): the softmax sum Z over s = x / T, and per level j (gap d_j = 2^((j - LEVEL_SHIFT) / 2)
#     below M) the count and the mass of tokens with s >= M - d_j.
#     From those the lowest gap that certainly holds every survivor (>= k tokens above it; or mass >= p;
#     or exp(-d) below min_p) bounds the candidates: every program of the row works it out alike.
#   3 (row, chunk): if the candidates fit in CAP, copy the chunk's (value, id) to the row's scratch at the
#     chunk's offset (the counts of the chunks before it at that level); with no filter at all, race over
#     the chunk instead (argmax of prob / -log(u)).
#   4 (row): filter and race the candidates in registers (a sort of CAP values gives the k-th value and the
#     top-p cut; ties at the cut kept by ascending id), or reduce the chunks' races. Otherwise (too many
#     candidates, or top-p on a flat row) exact bisections over the order-preserving integer keys of the
#     values find the k-th value and the top-p cut, then one pass races over the whole row (slow, rare).

if triton is not None:

    @triton.jit
    def _mix32_u32(x):
        x = (x ^ (x >> 16)) * 0x7FEB352D
        x = (x ^ (x >> 15)) * 0x5BD1E995
        return x ^ (x >> 16)

    @triton.jit
    def _order_key(s):
        """fp32 -> int32 with the same order (-0.0 first made +0.0, so that equal values have equal keys)."""
        bits = (s + 0.0).to(tl.int32, bitcast=True)
        return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)

    @triton.jit
    def _exponential(row_key, ids):
        """-log(u) for the tokens `ids` of the row whose key is `row_key` (uniform_noise, bit for bit)."""
        token_key = _mix32_u32(ids.to(tl.uint32) + 0x632BE5AB)
        bits = _mix32_u32(row_key ^ token_key) >> 9
        return -tl.log((bits.to(tl.float32) + 0.5) / 8388608.0)

    @triton.jit
    def _race_winner(race, ids, eligible, V):
        """argmax with the smallest id on ties, over `eligible`; (race, id) of the winner (id V if none)."""
        best = tl.max(tl.where(eligible, race, -1.0), axis=0)
        winner = tl.min(tl.where(eligible & (race == best), ids, V), axis=0)
        return best, winner

    @triton.jit
    def _scaled(base, offs, V, temperature):
        return tl.load(base + offs, mask=offs < V, other=float("-inf")) / temperature

    @triton.jit
    def _kept_block(base, ids, V, temperature, scaled_max, cut_key, num_tied, seen_at_cut):
        """The bisection path's survivors among `ids`: values above the cut, and the first `num_tied` tokens
        at it in id order (`seen_at_cut` of them came before this block). (s, e, keep, seen_at_cut after)."""
        s = _scaled(base, ids, V, temperature)
        key = _order_key(s)
        tied = (key == cut_key) & (ids < V)
        tie_rank = seen_at_cut + tl.cumsum(tied.to(tl.int32), axis=0) - 1
        keep = ((key > cut_key) | (tied & (tie_rank < num_tied))) & (ids < V)
        return s, tl.exp(s - scaled_max), keep, seen_at_cut + tl.sum(tied.to(tl.int32), axis=0)

    @triton.jit
    def _chunk_max_kernel(logits_ptr, stride, V, part_max_ptr, part_arg_ptr, NUM_CHUNKS,
                          CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        row, chunk = tl.program_id(0), tl.program_id(1)
        base = logits_ptr + row.to(tl.int64) * stride
        offs = tl.arange(0, BLOCK)
        end = tl.minimum(V, chunk * CHUNK + CHUNK)
        best = float("-inf")
        best_id = chunk * CHUNK
        for start in range(chunk * CHUNK, end, BLOCK):                   # first index on ties
            x = tl.load(base + start + offs, mask=start + offs < end, other=float("-inf"))
            block_max = tl.max(x, axis=0)
            block_id = tl.min(tl.where(x == block_max, start + offs, V), axis=0)
            best_id = tl.where(block_max > best, block_id, best_id)
            best = tl.maximum(best, block_max)
        tl.store(part_max_ptr + row * NUM_CHUNKS + chunk, best)
        tl.store(part_arg_ptr + row * NUM_CHUNKS + chunk, best_id)

    @triton.jit
    def _row_max(part_max_ptr, part_arg_ptr, row, NUM_CHUNKS, V, CHUNKS_P2: tl.constexpr):
        """The row's max and its first index, from the chunks' (a lower chunk wins a tie)."""
        chunks = tl.arange(0, CHUNKS_P2)
        inside = chunks < NUM_CHUNKS
        maxima = tl.load(part_max_ptr + row * NUM_CHUNKS + chunks, mask=inside, other=float("-inf"))
        best = tl.max(maxima, axis=0)
        args = tl.load(part_arg_ptr + row * NUM_CHUNKS + chunks, mask=inside, other=V)
        return best, tl.min(tl.where(inside & (maxima == best), args, V), axis=0)

    @triton.jit
    def _row_temperature(temperature_ptr, row, greedy_below):
        temperature = tl.load(temperature_ptr + row)
        return tl.where(temperature < greedy_below, 1.0, temperature)

    @triton.jit
    def _level_gaps(NUM_LEVELS: tl.constexpr, LEVEL_SHIFT: tl.constexpr):
        levels = tl.arange(0, NUM_LEVELS)
        return levels, tl.exp2((levels.to(tl.float32) - LEVEL_SHIFT) * 0.5)

    @triton.jit
    def _chunk_levels_kernel(logits_ptr, stride, V, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr,
                             greedy_below, part_max_ptr, part_arg_ptr, part_z_ptr, part_count_ptr, part_mass_ptr,
                             NUM_CHUNKS, CHUNKS_P2: tl.constexpr, CHUNK: tl.constexpr, LEVEL_BLOCK: tl.constexpr,
                             NUM_LEVELS: tl.constexpr, LEVEL_SHIFT: tl.constexpr, LEVEL_STEPS: tl.constexpr):
        row, chunk = tl.program_id(0), tl.program_id(1)
        base = logits_ptr + row.to(tl.int64) * stride
        temperature = _row_temperature(temperature_ptr, row, greedy_below)
        best = _row_max(part_max_ptr, part_arg_ptr, row, NUM_CHUNKS, V, CHUNKS_P2)[0]
        scaled_max = best / temperature
        levels = tl.arange(0, NUM_LEVELS)
        offs = tl.arange(0, LEVEL_BLOCK)
        end = tl.minimum(V, chunk * CHUNK + CHUNK)
        k = tl.load(top_k_ptr + row)
        p = tl.load(top_p_ptr + row)
        need_mass = (k <= 0) & (p < 1.0)                 # the mass per level only decides for top-p alone
        # a row with no filter (temperature alone, the API's default) only needs Z: its draw races over the whole
        # row and _row_plan never reads its levels, so it skips the bisection and the histogram
        filtered = (k > 0) | (p < 1.0) | (tl.load(min_p_ptr + row) > 0.0)
        z = 0.0
        histogram = tl.zeros([2 * NUM_LEVELS], dtype=tl.int32)
        masses = tl.zeros([NUM_LEVELS], dtype=tl.float32)
        for start in range(chunk * CHUNK, end, LEVEL_BLOCK):
            s = _scaled(base, start + offs, end, temperature)
            e = tl.exp(s - scaled_max)
            z += tl.sum(e, axis=0)
            if filtered:
                # each token's level: the smallest j with s >= M - d_j (NUM_LEVELS if none), by bisection over
                # j with the very thresholds _row_plan and the gather compare against
                lo = tl.zeros([LEVEL_BLOCK], dtype=tl.int32)
                hi = tl.full([LEVEL_BLOCK], NUM_LEVELS, dtype=tl.int32)
                for bisection_step in tl.static_range(LEVEL_STEPS):
                    mid = (lo + hi) // 2
                    above = s >= scaled_max - tl.exp2((mid.to(tl.float32) - LEVEL_SHIFT) * 0.5)
                    hi = tl.where(above, mid, hi)
                    lo = tl.where(above, lo, mid + 1)
                level = tl.where(start + offs < end, lo, NUM_LEVELS)
                histogram += tl.histogram(level, 2 * NUM_LEVELS)
                if need_mass:
                    masses += tl.sum(tl.where(level[:, None] <= levels[None, :], e[:, None], 0.0), axis=0)
        counts = tl.cumsum(histogram, axis=0)                   # tokens at or above each level
        bins = tl.arange(0, 2 * NUM_LEVELS)
        at = row * NUM_CHUNKS + chunk
        tl.store(part_z_ptr + at, z)
        tl.store(part_count_ptr + at * NUM_LEVELS + bins, counts, mask=bins < NUM_LEVELS)
        tl.store(part_mass_ptr + at * NUM_LEVELS + levels, masses)

    @triton.jit
    def _row_plan(part_max_ptr, part_arg_ptr, part_z_ptr, part_count_ptr, part_mass_ptr, temperature_ptr,
                  top_k_ptr, top_p_ptr, min_p_ptr, row, NUM_CHUNKS, V, greedy_below, CHUNKS_P2: tl.constexpr,
                  NUM_LEVELS: tl.constexpr, LEVEL_SHIFT: tl.constexpr, CAP: tl.constexpr):
        """What every program of a row agrees on: the scaled max, Z, the level bounding the candidates and
        whether they fit in CAP (`fast`), or whether no filter is on (`plain`)."""
        temperature = _row_temperature(temperature_ptr, row, greedy_below)
        k = tl.maximum(tl.load(top_k_ptr + row).to(tl.int32), 0)       # -1 is off too
        p = tl.load(top_p_ptr + row)
        min_p = tl.load(min_p_ptr + row)
        best, best_id = _row_max(part_max_ptr, part_arg_ptr, row, NUM_CHUNKS, V, CHUNKS_P2)
        scaled_max = best / temperature
        chunks = tl.arange(0, CHUNKS_P2)
        inside = chunks < NUM_CHUNKS
        z_full = tl.sum(tl.load(part_z_ptr + row * NUM_CHUNKS + chunks, mask=inside, other=0.0), axis=0)
        levels, gaps = _level_gaps(NUM_LEVELS, LEVEL_SHIFT)
        at = (row * NUM_CHUNKS + chunks)[:, None] * NUM_LEVELS + levels[None, :]    # [CHUNKS_P2, LEVELS]
        counts = tl.sum(tl.load(part_count_ptr + at, mask=inside[:, None], other=0), axis=0)
        masses = tl.sum(tl.load(part_mass_ptr + at, mask=inside[:, None], other=0.0), axis=0)
        valid = (k > 0) & (counts >= k)
        valid |= (k == 0) & (p < 1.0) & (masses >= p * z_full * 1.0001)
        valid |= (k == 0) & (min_p > 0.0) & (gaps >= -tl.log(min_p) * 1.0001 + 1e-6)
        level = tl.min(tl.where(valid, levels, NUM_LEVELS), axis=0)
        bound = tl.sum(tl.where(levels == level, scaled_max - gaps, 0.0), axis=0)
        num_candidates = tl.sum(tl.where(levels == level, counts, 0), axis=0)
        small_vocab = V <= CAP
        bound = tl.where(small_vocab, float("-inf"), bound)
        num_candidates = tl.where(small_vocab, V, num_candidates)
        fast = small_vocab | ((level < NUM_LEVELS) & (num_candidates <= CAP))
        plain = ~fast & (k == 0) & (p >= 1.0) & (min_p <= 0.0)
        return (temperature, k, p, min_p, best_id, scaled_max, z_full, level, bound, num_candidates, fast,
                plain)

    @triton.jit
    def _row_key(seeds_ptr, steps_ptr, row):
        seed = tl.load(seeds_ptr + row)
        step = tl.load(steps_ptr + row)
        return _mix32_u32(_mix32_u32((seed ^ (seed >> 32)).to(tl.uint32))
                          ^ _mix32_u32((step + 0x9E3779B9).to(tl.uint32)))

    @triton.jit
    def _chunk_gather_kernel(logits_ptr, stride, V, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seeds_ptr,
                             steps_ptr, exclude_ptr, greedy_below, part_max_ptr, part_arg_ptr, part_z_ptr,
                             part_count_ptr, part_mass_ptr, part_race_ptr, part_winner_ptr, part_excluded_ptr,
                             cand_val_ptr, cand_id_ptr, NUM_CHUNKS, CHUNKS_P2: tl.constexpr, CHUNK: tl.constexpr,
                             BLOCK: tl.constexpr, NUM_LEVELS: tl.constexpr, LEVEL_SHIFT: tl.constexpr,
                             CAP: tl.constexpr):
        row, chunk = tl.program_id(0), tl.program_id(1)
        base = logits_ptr + row.to(tl.int64) * stride
        offs = tl.arange(0, BLOCK)
        end = tl.minimum(V, chunk * CHUNK + CHUNK)
        (temperature, k, p, min_p, best_id, scaled_max, z_full, level, bound, num_candidates, fast,
         plain) = _row_plan(part_max_ptr, part_arg_ptr, part_z_ptr, part_count_ptr, part_mass_ptr,
                            temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, row, NUM_CHUNKS, V, greedy_below,
                            CHUNKS_P2, NUM_LEVELS, LEVEL_SHIFT, CAP)
        if fast:
            # the chunk's candidates, in id order, after those of the chunks before it
            chunks = tl.arange(0, CHUNKS_P2)
            levels = tl.arange(0, NUM_LEVELS)
            at = (row * NUM_CHUNKS + chunks)[:, None] * NUM_LEVELS + levels[None, :]
            before = (chunks < chunk)[:, None] & (levels == level)[None, :]
            count = tl.sum(tl.sum(tl.load(part_count_ptr + at, mask=before, other=0), axis=1), axis=0)
            count = tl.where(V <= CAP, chunk * CHUNK, count)
            cand_val = cand_val_ptr + row.to(tl.int64) * CAP
            cand_id = cand_id_ptr + row.to(tl.int64) * CAP
            for start in range(chunk * CHUNK, end, BLOCK):
                s = _scaled(base, start + offs, end, temperature)
                take = (s >= bound) & (start + offs < end)
                taken = tl.sum(take.to(tl.int32), axis=0)
                if taken > 0:                       # most blocks hold no candidate: no scan, no store for them
                    slot = count + tl.cumsum(take.to(tl.int32), axis=0) - 1
                    tl.store(cand_val + slot, s, mask=take & (slot < CAP))
                    tl.store(cand_id + slot, start + offs, mask=take & (slot < CAP))
                count += taken
        elif plain:
            row_key = _row_key(seeds_ptr, steps_ptr, row)
            exclude = tl.load(exclude_ptr + row).to(tl.int32)
            best_race = -1.0
            winner = V
            excluded_prob = 0.0
            for start in range(chunk * CHUNK, end, BLOCK):
                ids = start + offs
                probs = tl.where(ids < end, tl.exp(_scaled(base, ids, end, temperature) - scaled_max) / z_full, 0.0)
                race = probs / _exponential(row_key, ids)
                block_best, block_winner = _race_winner(race, ids, (ids < end) & (ids != exclude), V)
                winner = tl.where(block_best > best_race, block_winner, winner)
                best_race = tl.maximum(best_race, block_best)
                excluded_prob += tl.sum(tl.where(ids == exclude, probs, 0.0), axis=0)
            at = row * NUM_CHUNKS + chunk
            tl.store(part_race_ptr + at, best_race)
            tl.store(part_winner_ptr + at, winner)
            tl.store(part_excluded_ptr + at, excluded_prob)

    @triton.jit
    def _sample_rows_kernel(logits_ptr, stride, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seeds_ptr,
                            steps_ptr, exclude_ptr, random_out, greedy_out, excluded_prob_out, part_max_ptr,
                            part_arg_ptr, part_z_ptr, part_count_ptr, part_mass_ptr, part_race_ptr,
                            part_winner_ptr, part_excluded_ptr, cand_val_ptr, cand_id_ptr, V, greedy_below,
                            NUM_CHUNKS, CHUNKS_P2: tl.constexpr, BLOCK: tl.constexpr, NUM_LEVELS: tl.constexpr,
                            LEVEL_SHIFT: tl.constexpr, CAP: tl.constexpr):
        row = tl.program_id(0)
        base = logits_ptr + row.to(tl.int64) * stride
        offs = tl.arange(0, BLOCK)
        exclude = tl.load(exclude_ptr + row).to(tl.int32)
        row_key = _row_key(seeds_ptr, steps_ptr, row)
        (temperature, k, p, min_p, best_id, scaled_max, z_full, level, bound, num_candidates, fast,
         plain) = _row_plan(part_max_ptr, part_arg_ptr, part_z_ptr, part_count_ptr, part_mass_ptr,
                            temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, row, NUM_CHUNKS, V, greedy_below,
                            CHUNKS_P2, NUM_LEVELS, LEVEL_SHIFT, CAP)
        tl.store(greedy_out + row, best_id.to(tl.int64))
        if fast:
            count = num_candidates
            cand_val = cand_val_ptr + row.to(tl.int64) * CAP
            cand_id = cand_id_ptr + row.to(tl.int64) * CAP
            slots = tl.arange(0, CAP)
            vals = tl.load(cand_val + slots, mask=slots < count, other=float("-inf"))
            ids = tl.load(cand_id + slots, mask=slots < count, other=V)
            ordered = tl.sort(vals, descending=True)
            kth = tl.sum(tl.where(slots == k - 1, ordered, 0.0), axis=0)
            kth = tl.where(k > 0, kth, float("-inf"))
            survivor = ordered >= kth
            e_ordered = tl.where(survivor, tl.exp(ordered - scaled_max), 0.0)
            z_k = tl.where(k > 0, tl.sum(e_ordered, axis=0), z_full)
            probs = e_ordered / z_k
            mass_before = tl.cumsum(probs, axis=0) - probs
            prefix = survivor & ((mass_before < tl.where(p < 1.0, p, float("inf"))) | (slots == 0))
            cut = tl.min(tl.where(prefix, ordered, float("inf")), axis=0)
            num_tied = tl.sum(prefix.to(tl.int32), axis=0) - tl.sum((prefix & (ordered > cut)).to(tl.int32), axis=0)
            tied = vals == cut
            tie_rank = tl.cumsum(tied.to(tl.int32), axis=0) - 1
            keep = ((vals > cut) | (tied & (tie_rank < num_tied))) & (ids < V)
            e = tl.where(keep, tl.exp(vals - scaled_max), 0.0)
            z = tl.sum(e, axis=0)
            keep &= ~(e / z < min_p * (1.0 / z))                  # min_p 0: never below
            e = tl.where(keep, e, 0.0)
            z = tl.sum(e, axis=0)
            race = (e / z) / _exponential(row_key, ids)
            _, winner = _race_winner(race, ids, keep & (ids != exclude), V)
            excluded_prob = tl.sum(tl.where(ids == exclude, e / z, 0.0), axis=0)
        elif plain:
            chunks = tl.arange(0, CHUNKS_P2)
            inside = chunks < NUM_CHUNKS
            races = tl.load(part_race_ptr + row * NUM_CHUNKS + chunks, mask=inside, other=-1.0)
            winners = tl.load(part_winner_ptr + row * NUM_CHUNKS + chunks, mask=inside, other=V)
            best_race = tl.max(races, axis=0)
            winner = tl.min(tl.where(races == best_race, winners, V), axis=0)
            excluded_prob = tl.sum(tl.load(part_excluded_ptr + row * NUM_CHUNKS + chunks, mask=inside, other=0.0),
                                   axis=0)
        else:
            no_key = tl.full([], -2139095041, tl.int64)    # the key of -inf: below every value's
            kth_key = no_key
            if k > 0:                                # largest key with >= k values at or above it
                lo = no_key
                hi = _order_key(scaled_max).to(tl.int64) + 1
                while hi - lo > 1:
                    mid = lo + (hi - lo) // 2
                    num_above = 0
                    for start in range(0, V, BLOCK):
                        s = _scaled(base, start + offs, V, temperature)
                        num_above += tl.sum(((_order_key(s) >= mid) & (start + offs < V)).to(tl.int32), axis=0)
                    lo = tl.where(num_above >= k, mid, lo)
                    hi = tl.where(num_above >= k, hi, mid)
                kth_key = lo
            z_k = z_full
            if k > 0:
                z_k = 0.0
                for start in range(0, V, BLOCK):
                    s = _scaled(base, start + offs, V, temperature)
                    z_k += tl.sum(tl.where(_order_key(s) >= kth_key, tl.exp(s - scaled_max), 0.0), axis=0)
            cut_key = kth_key
            num_tied = V                             # ties at the cut kept: all of them unless top-p says
            if p < 1.0:                              # smallest key whose mass strictly above is below p
                lo = kth_key - 1
                hi = _order_key(scaled_max).to(tl.int64)
                while hi - lo > 1:
                    mid = lo + (hi - lo) // 2
                    mass_above = 0.0
                    for start in range(0, V, BLOCK):
                        s = _scaled(base, start + offs, V, temperature)
                        mass_above += tl.sum(tl.where(_order_key(s) > mid, tl.exp(s - scaled_max), 0.0), axis=0)
                    below = mass_above / z_k < p
                    hi = tl.where(below, mid, hi)
                    lo = tl.where(below, lo, mid)
                cut_key = hi
                mass_above = 0.0
                num_at_cut = 0
                e_cut = 0.0
                for start in range(0, V, BLOCK):
                    s = _scaled(base, start + offs, V, temperature)
                    key = _order_key(s)
                    e = tl.exp(s - scaled_max)
                    mass_above += tl.sum(tl.where(key > cut_key, e, 0.0), axis=0)
                    at_cut = (key == cut_key) & (start + offs < V)
                    num_at_cut += tl.sum(at_cut.to(tl.int32), axis=0)
                    e_cut = tl.maximum(e_cut, tl.max(tl.where(at_cut, e, 0.0), axis=0))
                # tied tokens in id order: the r-th is kept while (mass_above + r * e_cut) / z_k < p
                room = (p - mass_above / z_k) / (e_cut / z_k)
                num_tied = tl.minimum(tl.maximum(tl.ceil(room), 1.0), num_at_cut.to(tl.float32)).to(tl.int32)
            # the kept set's sum (min-p is relative to it), then min-p's, then the race
            z = 0.0
            seen_at_cut = 0
            for start in range(0, V, BLOCK):
                s, e, keep, seen_at_cut = _kept_block(base, start + offs, V, temperature, scaled_max, cut_key,
                                                      num_tied, seen_at_cut)
                z += tl.sum(tl.where(keep, e, 0.0), axis=0)
            z_min_p = z
            if min_p > 0.0:
                z = 0.0
                seen_at_cut = 0
                for start in range(0, V, BLOCK):
                    s, e, keep, seen_at_cut = _kept_block(base, start + offs, V, temperature, scaled_max, cut_key,
                                                          num_tied, seen_at_cut)
                    keep &= ~(e / z_min_p < min_p * (1.0 / z_min_p))
                    z += tl.sum(tl.where(keep, e, 0.0), axis=0)
            best_race = -1.0
            winner = V
            excluded_prob = 0.0
            seen_at_cut = 0
            for start in range(0, V, BLOCK):
                ids = start + offs
                s, e, keep, seen_at_cut = _kept_block(base, ids, V, temperature, scaled_max, cut_key, num_tied,
                                                      seen_at_cut)
                keep &= ~(e / z_min_p < min_p * (1.0 / z_min_p))
                probs = tl.where(keep, e / z, 0.0)
                race = probs / _exponential(row_key, ids)
                block_best, block_winner = _race_winner(race, ids, keep & (ids != exclude), V)
                winner = tl.where(block_best > best_race, block_winner, winner)
                best_race = tl.maximum(best_race, block_best)
                excluded_prob += tl.sum(tl.where(ids == exclude, probs, 0.0), axis=0)
        tl.store(random_out + row, tl.where(winner < V, winner, 0).to(tl.int64))
        tl.store(excluded_prob_out + row, excluded_prob)


    @triton.jit
    def _greedy_kernel(part_max_ptr, part_arg_ptr, out_ptr, NUM_CHUNKS, V, CHUNKS_P2: tl.constexpr):
        row = tl.program_id(0)
        _, best_id = _row_max(part_max_ptr, part_arg_ptr, row, NUM_CHUNKS, V, CHUNKS_P2)
        tl.store(out_ptr + row, best_id.to(tl.int64))


def greedy_tokens(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[rows] int64 argmax of logits [rows, vocab] (the first index on ties), as `torch.argmax`; into `out`
    [rows] int64 when given. On a GPU two launches over (row, chunk) programs: torch reduces a row in one
    block, 27 us for one 129k row on an H200."""
    if not (logits.is_cuda and triton is not None and os.environ.get("RUN_MODEL_TORCH_OPS") != "1"):
        return logits.argmax(dim=-1) if out is None else torch.argmax(logits, dim=-1, out=out)
    return greedy_tokens_triton(logits, out=out)


def greedy_tokens_triton(logits: torch.Tensor, block: int = 1024, chunk: int | None = None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    rows, vocab = logits.shape
    # a few rows still fill the GPU: about 256 programs at least
    chunk = chunk or max(block, min(8 * block, triton.next_power_of_2(-(-rows * vocab // 256))))
    num_chunks = -(-vocab // chunk)
    part_max = torch.empty(rows, num_chunks, dtype=torch.float32, device=logits.device)
    part_arg = torch.empty(rows, num_chunks, dtype=torch.int32, device=logits.device)
    if out is None:
        out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        _chunk_max_kernel[(rows, num_chunks)](logits, logits.stride(0), vocab, part_max, part_arg, num_chunks,
                                              CHUNK=chunk, BLOCK=block, num_warps=4)
        _greedy_kernel[(rows,)](part_max, part_arg, out, num_chunks, vocab,
                                CHUNKS_P2=triton.next_power_of_2(num_chunks), num_warps=1)
    return out


def sample_rows_triton(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None,
                       top_p: torch.Tensor | None, min_p: torch.Tensor | None, seeds: torch.Tensor,
                       steps: torch.Tensor, exclude: torch.Tensor | None = None, block: int = 1024,
                       level_block: int = 128, chunk: int = 4096, num_levels: int = 32, cap: int = 1024,
                       num_warps: int = 4) -> SampledRows:
    """Triton twin of `sample_rows_ref` (arguments as there; the rest are the kernels' tile sizes: `chunk`,
    the tokens of a row one program reads, is a multiple of `block` and `level_block`)."""
    rows, vocab = logits.shape
    device = logits.device
    chunk = max(chunk, block, level_block)
    assert chunk % block == 0 and chunk % level_block == 0, (chunk, block, level_block)
    top_k = top_k if top_k is not None else torch.zeros(rows, dtype=torch.int64, device=device)
    top_p = top_p if top_p is not None else torch.ones(rows, dtype=torch.float32, device=device)
    min_p = min_p if min_p is not None else torch.zeros(rows, dtype=torch.float32, device=device)
    no_exclude = exclude is None
    exclude = torch.full((rows,), -1, dtype=torch.int64, device=device) if no_exclude else exclude
    random = torch.empty(rows, dtype=torch.int64, device=device)
    greedy = torch.empty(rows, dtype=torch.int64, device=device)
    excluded_prob = torch.empty(rows, dtype=torch.float32, device=device)
    num_chunks = -(-vocab // chunk)
    part_max = torch.empty(rows, num_chunks, dtype=torch.float32, device=device)       # per (row, chunk)
    part_arg, part_winner = (torch.empty(rows, num_chunks, dtype=torch.int32, device=device) for _ in range(2))
    part_z, part_race, part_excluded = (torch.empty(rows, num_chunks, dtype=torch.float32, device=device)
                                        for _ in range(3))
    part_count = torch.empty(rows, num_chunks, num_levels, dtype=torch.int32, device=device)
    part_mass = torch.empty(rows, num_chunks, num_levels, dtype=torch.float32, device=device)
    cand_val = torch.empty(rows, cap, dtype=torch.float32, device=device)               # [rows, cap] scratch
    cand_id = torch.empty(rows, cap, dtype=torch.int32, device=device)
    if rows:
        chunks_p2 = triton.next_power_of_2(num_chunks)
        grid = (rows, num_chunks)
        _chunk_max_kernel[grid](logits, logits.stride(0), vocab, part_max, part_arg, num_chunks, CHUNK=chunk,
                                BLOCK=block, num_warps=num_warps)
        _chunk_levels_kernel[grid](
            logits, logits.stride(0), vocab, temperature, top_k, top_p, min_p, GREEDY_BELOW, part_max, part_arg,
            part_z, part_count, part_mass, num_chunks, CHUNKS_P2=chunks_p2, CHUNK=chunk, LEVEL_BLOCK=level_block,
            NUM_LEVELS=num_levels, LEVEL_SHIFT=num_levels // 2, LEVEL_STEPS=num_levels.bit_length(),
            num_warps=num_warps)
        parts = (part_max, part_arg, part_z, part_count, part_mass, part_race, part_winner, part_excluded,
                 cand_val, cand_id)
        _chunk_gather_kernel[grid](
            logits, logits.stride(0), vocab, temperature, top_k, top_p, min_p, seeds, steps, exclude, GREEDY_BELOW,
            *parts, num_chunks, CHUNKS_P2=chunks_p2, CHUNK=chunk, BLOCK=block, NUM_LEVELS=num_levels,
            LEVEL_SHIFT=num_levels // 2, CAP=cap, num_warps=num_warps)
        _sample_rows_kernel[(rows,)](
            logits, logits.stride(0), temperature, top_k, top_p, min_p, seeds, steps, exclude, random, greedy,
            excluded_prob, *parts, vocab, GREEDY_BELOW, num_chunks, CHUNKS_P2=chunks_p2, BLOCK=block,
            NUM_LEVELS=num_levels, LEVEL_SHIFT=num_levels // 2, CAP=cap, num_warps=8)
    return SampledRows(random, greedy, None if no_exclude else excluded_prob)
