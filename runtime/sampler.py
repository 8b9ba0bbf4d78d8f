"""Sampling for a batch of rows in one pass: penalties, min_tokens, temperature, top-k, top-p, min-p,
greedy, and top-n logprobs. Random rows draw from an exponential race whose noise is a hash of
(request seed, output index, token id): reproducible per request whatever the batch, and no host sync."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.structured import apply_bitmask

_M32 = 0xFFFFFFFF
_GREEDY_BELOW = 1e-5    # temperatures under this sample greedily: logits / 1e-40 overflow to inf, softmax to NaN


@dataclass(slots=True)
class SamplingBatch:
    temperature: torch.Tensor | None     # [rows] fp32, 0 = greedy; the per-row fields are None when all_greedy
    top_k: torch.Tensor | None           # [rows] int64, 0 = off
    top_p: torch.Tensor | None           # [rows] fp32
    min_p: torch.Tensor | None           # [rows] fp32
    seeds: torch.Tensor | None           # [rows] int64
    steps: torch.Tensor | None           # [rows] int64, index of the token being sampled
    all_greedy: bool
    use_top_k: bool
    use_top_p: bool
    use_min_p: bool
    max_logprobs: int | None             # largest top-n any row asked for
    penalties: tuple[torch.Tensor, ...] | None  # (presence [rows], frequency [rows], repetition [rows],
                                                #  output counts [rows, vocab], seen in prompt or output [rows, vocab])
    banned: tuple[torch.Tensor, torch.Tensor] | None   # (row, token) pairs masked out (min_tokens)
    # (token bitmasks, their rows): structured outputs; set by the runner once the forward is queued
    grammar: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_requests(cls, requests: list, vocab_size: int, device: torch.device,
                      step_offsets: list[int] | None = None) -> "SamplingBatch":
        """One row per entry of `requests` (anything with params, seed, token ids and output counts). A
        request verifying k drafts appears k + 1 times, `step_offsets` 0..k: row i samples its output
        token number num_output_tokens + i."""
        params = [r.params for r in requests]
        offsets = step_offsets or [0] * len(requests)
        pin = device.type == "cuda"

        def as_tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            host = torch.tensor(values, dtype=dtype)
            return host.pin_memory().to(device, non_blocking=True) if pin else host

        all_greedy = all(p.greedy for p in params)
        top_k = [min(p.top_k, vocab_size) for p in params]
        penalties = None
        if any(p.has_penalties for p in params):
            counts = torch.zeros(len(requests), vocab_size, dtype=torch.float32, device=device)
            seen = torch.zeros(len(requests), vocab_size, dtype=torch.bool, device=device)
            for row, r in enumerate(requests):
                if not r.params.has_penalties:     # neutral penalties ignore its row; its tokens may be pending
                    continue
                out = as_tensor(r.output_token_ids, torch.int64)
                counts[row].index_add_(0, out, torch.ones_like(out, dtype=torch.float32))
                seen[row, as_tensor(r.token_ids, torch.int64)] = True
            penalties = (as_tensor([p.presence_penalty for p in params], torch.float32),
                         as_tensor([p.frequency_penalty for p in params], torch.float32),
                         as_tensor([p.repetition_penalty for p in params], torch.float32), counts, seen)
        banned_rows, banned_tokens = [], []
        for row, (r, offset) in enumerate(zip(requests, offsets)):
            if r.num_output_tokens + offset < r.params.min_tokens:
                stops = set(r.params.stop_token_ids) | (set() if r.params.ignore_eos else set(r.eos_token_ids))
                banned_rows += [row] * len(stops)
                banned_tokens += sorted(stops)
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        # an all-greedy batch needs none of the per-row parameters: argmax only
        per_row = (lambda values, dtype: None) if all_greedy else as_tensor  # noqa: E731
        return cls(
            temperature=per_row([p.temperature for p in params], torch.float32),
            top_k=per_row(top_k, torch.int64),
            top_p=per_row([p.top_p for p in params], torch.float32),
            min_p=per_row([p.min_p for p in params], torch.float32),
            seeds=per_row([r.seed for r in requests], torch.int64),
            steps=per_row([r.num_output_tokens + i for r, i in zip(requests, offsets)], torch.int64),
            all_greedy=all_greedy,
            use_top_k=any(k > 0 for k in top_k),
            use_top_p=any(p.top_p < 1.0 for p in params),
            use_min_p=any(p.min_p > 0.0 for p in params),
            max_logprobs=max(wanted) if wanted else None,
            penalties=penalties,
            banned=(as_tensor(banned_rows, torch.int64), as_tensor(banned_tokens, torch.int64)) if banned_rows else None,
        )


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor                   # [rows]
    sampled_logprobs: torch.Tensor | None     # [rows]
    top_logprobs: torch.Tensor | None         # [rows, n]
    top_ids: torch.Tensor | None              # [rows, n]
    accepted: torch.Tensor | None = None      # [rows] bool: the row's draft token was accepted


def apply_penalties(logits: torch.Tensor, penalties: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """OpenAI presence/frequency penalties on output tokens; repetition penalty (divide positive logits,
    multiply negative ones) on every token seen in the prompt or output."""
    presence, frequency, repetition, counts, seen = penalties
    rep = repetition[:, None].expand_as(logits)
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).float()


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                            min_p: torch.Tensor | None) -> torch.Tensor:
    """Mask (to -inf) the tokens each row's filters remove. top_k 0 = off; ties at the k-th value are kept.
    top-p keeps the smallest prefix of tokens by descending probability whose mass reaches p."""
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, logits.shape[-1])
        kth = torch.sort(logits, dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
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


def sample(logits: torch.Tensor, batch: SamplingBatch, draft_ids: torch.Tensor | None = None) -> SamplerOutput:
    """logits [rows, vocab] fp32 -> one token per row.

    With `draft_ids` [rows] (-1 = no draft) a row verifies a draft token by the rejection rule for a
    deterministic drafter (q = one-hot): greedy rows accept a draft equal to their argmax; random rows
    accept it with probability p(draft), else draw from p with the draft removed (the normalised
    max(0, p - q)). The returned token is then the one the row emits if every earlier draft was accepted;
    rows without a draft sample as usual. The output distribution is exactly the target's."""
    sampled_logprobs = top_logprobs = top_ids = accepted = None
    raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.max_logprobs is not None else None
    if batch.penalties is not None:
        logits = apply_penalties(logits, batch.penalties)
    if batch.banned is not None:
        # new_full fills on the device; torch.tensor(..., device=cuda) would copy from the host and sync
        logits = logits.index_put(batch.banned, logits.new_full((), float("-inf")))
    if batch.grammar is not None:
        logits = apply_bitmask(logits, batch.grammar)
    greedy_tokens = logits.argmax(dim=-1)
    has_draft = draft_ids >= 0 if draft_ids is not None else None
    if batch.all_greedy:
        token_ids = greedy_tokens
        if has_draft is not None:
            accepted = has_draft & (greedy_tokens == draft_ids)
    else:
        greedy_rows = batch.temperature < _GREEDY_BELOW
        temperature = torch.where(greedy_rows, 1.0, batch.temperature)
        scaled = apply_top_k_top_p_min_p(logits / temperature[:, None],
                                         batch.top_k if batch.use_top_k else None,
                                         batch.top_p if batch.use_top_p else None,
                                         batch.min_p if batch.use_min_p else None)
        probs = torch.softmax(scaled, dim=-1)
        race = probs / -torch.log(uniform_noise(batch.seeds, batch.steps, logits.shape[-1]))
        random_tokens = race.argmax(dim=-1)
        if has_draft is not None:
            draft = draft_ids.clamp(min=0)[:, None]                                   # [rows, 1]
            accept_random = uniform_per_row(batch.seeds, batch.steps) < probs.gather(1, draft).squeeze(1)
            residual = race.scatter(1, draft, 0.0).argmax(dim=-1)                     # p without the draft
            random_tokens = torch.where(has_draft, torch.where(accept_random, draft_ids, residual), random_tokens)
            accepted = has_draft & torch.where(greedy_rows, greedy_tokens == draft_ids, accept_random)
        token_ids = torch.where(greedy_rows, greedy_tokens, random_tokens)
    if raw_logprobs is not None:
        sampled_logprobs = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)
        top_logprobs, top_ids = torch.topk(raw_logprobs, batch.max_logprobs, dim=-1)
    return SamplerOutput(token_ids, sampled_logprobs, top_logprobs, top_ids, accepted)
