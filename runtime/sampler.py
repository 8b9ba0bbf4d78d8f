"""Sampling for a batch of rows in one pass: penalties, min_tokens, temperature, top-k, top-p, min-p,
greedy, and top-n logprobs. Random rows draw from an exponential race whose noise is a hash of
(request seed, output index, token id): reproducible per request whatever the batch, and no host sync."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from runtime.ops.sampling import (GREEDY_BELOW, apply_top_k_top_p_min_p, greedy_tokens, sample_rows,  # noqa: F401
                                  uniform_noise, uniform_per_row)
from runtime.structured import apply_bitmask


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
                      step_offsets: list[int] | None = None,
                      token_counts: tuple[torch.Tensor, torch.Tensor] | None = None,
                      stage: Callable[[list, torch.dtype], torch.Tensor] | None = None,
                      counts_later: bool = False) -> "SamplingBatch":
        """One row per entry of `requests` (anything with params, seed, token ids and output counts). A
        request verifying k drafts appears k + 1 times, `step_offsets` 0..k: row i samples its output
        token number num_output_tokens + i. Penalties read `token_counts` (output counts, seen), per row,
        where the caller keeps them on the device (`counts_later`: the caller puts them in `penalties` itself,
        after `stage`d values reached the device); otherwise they are counted here from the token ids.
        `stage(values, dtype)` returns a device tensor of values that the caller copies over with its other
        inputs (one copy per step); without it each tensor is copied on its own."""
        params = [r.params for r in requests]
        offsets = step_offsets or [0] * len(requests)
        pin = device.type == "cuda"

        def as_tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            if stage is not None:
                return stage(values, dtype)
            host = torch.tensor(values, dtype=dtype)
            return host.pin_memory().to(device, non_blocking=True) if pin else host

        all_greedy = all(p.greedy for p in params)
        top_k = [min(p.top_k, vocab_size) for p in params]
        penalties = None
        if any(p.has_penalties for p in params) and (token_counts is not None or counts_later):
            penalties = (as_tensor([p.presence_penalty for p in params], torch.float32),
                         as_tensor([p.frequency_penalty for p in params], torch.float32),
                         as_tensor([p.repetition_penalty for p in params], torch.float32),
                         *(token_counts or (None, None)))
        elif any(p.has_penalties for p in params):
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


class TokenCounts:
    """What penalties read, per request row and on the device: how often each token was emitted
    ([rows, vocab] fp32) and whether it is in the prompt or the output ([rows, vocab] bool). A row is
    written from the request's history when it joins, then updated on the device from each step's emitted
    tokens: sampling with penalties never waits for the host to learn the last tokens, so async scheduling
    stays on. Allocated when the first request with penalties joins; one extra row takes the updates of
    tokens that were not emitted (rejected verification rows)."""

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device):
        self.max_rows, self.vocab_size, self.device = max_rows, vocab_size, device
        self.counts: torch.Tensor | None = None       # [max_rows + 1, vocab] fp32
        self.seen: torch.Tensor | None = None         # [max_rows + 1, vocab] bool

    def reset(self, row: int, token_ids: list[int], num_prompt_tokens: int) -> None:
        if self.counts is None:
            shape = (self.max_rows + 1, self.vocab_size)
            self.counts = torch.zeros(shape, dtype=torch.float32, device=self.device)
            self.seen = torch.zeros(shape, dtype=torch.bool, device=self.device)
        host = torch.tensor(token_ids, dtype=torch.int64)
        ids = host.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else host
        self.counts[row].zero_()
        self.counts[row].index_add_(0, ids[num_prompt_tokens:], torch.ones_like(ids[num_prompt_tokens:],
                                                                                 dtype=torch.float32))
        self.seen[row].zero_()
        self.seen[row, ids] = True

    def add(self, rows: torch.Tensor, tokens: torch.Tensor, emitted: torch.Tensor | None = None) -> None:
        """Count `tokens` [n] in `rows` [n]; where `emitted` is False, nowhere."""
        if self.counts is None:
            return
        if emitted is not None:
            rows = torch.where(emitted, rows, self.max_rows)
        self.counts.index_put_((rows, tokens), self.counts.new_ones(()).expand(rows.shape), accumulate=True)
        self.seen.index_put_((rows, tokens), self.seen.new_ones(()))

    def gather(self, rows: torch.Tensor, extra_rows: torch.Tensor | None = None,
               extra_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts, seen) [len(rows), vocab] of `rows`, plus one emission of each (extra row, extra token):
        a verification row also counts the drafts before it."""
        counts, seen = self.counts.index_select(0, rows), self.seen.index_select(0, rows)
        if extra_rows is not None and len(extra_rows):
            counts.index_put_((extra_rows, extra_tokens), counts.new_ones(()).expand(extra_rows.shape),
                              accumulate=True)
            seen.index_put_((extra_rows, extra_tokens), seen.new_ones(()))
        return counts, seen


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


def sample(logits: torch.Tensor, batch: SamplingBatch, draft_ids: torch.Tensor | None = None,
           out: torch.Tensor | None = None, greedy: torch.Tensor | None = None) -> SamplerOutput:
    """logits [rows, vocab] fp32 -> one token per row (written into `out` [rows] int64 when given).
    `greedy` [rows], where given, is the argmax of these logits already computed (a CUDA graph's): an
    all-greedy batch whose logits nothing modifies takes it as its tokens.

    With `draft_ids` [rows] (-1 = no draft) a row verifies a draft token by the rejection rule for a
    deterministic drafter (q = one-hot): greedy rows accept a draft equal to their argmax; random rows
    accept it with probability p(draft), else draw from p with the draft removed (the normalised
    max(0, p - q)). The returned token is then the one the row emits if every earlier draft was accepted;
    rows without a draft sample as usual. The output distribution is exactly the target's."""
    sampled_logprobs = top_logprobs = top_ids = accepted = None
    raw_logits = logits
    raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.max_logprobs is not None else None
    if batch.penalties is not None:
        logits = apply_penalties(logits, batch.penalties)
    if batch.banned is not None:
        # new_full fills on the device; torch.tensor(..., device=cuda) would copy from the host and sync
        logits = logits.index_put(batch.banned, logits.new_full((), float("-inf")))
    if batch.grammar is not None:
        logits = apply_bitmask(logits, batch.grammar)
    has_draft = draft_ids >= 0 if draft_ids is not None else None
    if batch.all_greedy and greedy is not None and logits is raw_logits:
        token_ids = greedy
        if out is not None and out.data_ptr() != greedy.data_ptr():
            token_ids = out.copy_(greedy)
        if has_draft is not None:
            accepted = has_draft & (token_ids == draft_ids)
    elif batch.all_greedy:
        token_ids = greedy_tokens(logits, out=out)
        if has_draft is not None:
            accepted = has_draft & (token_ids == draft_ids)
    else:
        greedy_rows = batch.temperature < GREEDY_BELOW
        rows = sample_rows(logits, batch.temperature, batch.top_k if batch.use_top_k else None,
                           batch.top_p if batch.use_top_p else None, batch.min_p if batch.use_min_p else None,
                           batch.seeds, batch.steps, exclude=draft_ids)
        random_tokens = rows.random                   # with a draft: the race without it (the residual)
        if has_draft is not None:
            accept_random = uniform_per_row(batch.seeds, batch.steps) < rows.excluded_prob
            random_tokens = torch.where(has_draft & accept_random, draft_ids, random_tokens)
            accepted = has_draft & torch.where(greedy_rows, rows.greedy == draft_ids, accept_random)
        token_ids = torch.where(greedy_rows, rows.greedy, random_tokens, out=out) if out is not None else \
            torch.where(greedy_rows, rows.greedy, random_tokens)
    if raw_logprobs is not None:
        sampled_logprobs = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)
        top_logprobs, top_ids = torch.topk(raw_logprobs, batch.max_logprobs, dim=-1)
    return SamplerOutput(token_ids, sampled_logprobs, top_logprobs, top_ids, accepted)
