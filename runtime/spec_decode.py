"""Speculative decoding: the configuration, the drafters the runtime owns (ngram prompt lookup), and the
hook a model package implements for its own drafter (multi-token-prediction heads, draft models).

A drafter proposes k tokens per request; the next step scores the request's last token and the k drafts in
one forward, and the sampler's rejection rule (runtime/sampler.py) keeps the longest acceptable prefix plus
one token of the target's own, so outputs are distributed exactly as without speculation."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable, Protocol

import numpy as np
import torch

from runtime.forward import ForwardContext
from runtime.kv_cache import CacheSpec

RUNTIME_METHODS = ("ngram",)


@dataclass(slots=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 4              # ngram: longest suffix looked up
    prompt_lookup_min: int = 2              # ngram: shortest suffix looked up
    model: str | None = None                # draft_model: the drafter's checkpoint

    @classmethod
    def parse(cls, value: "SpeculativeConfig | dict[str, Any] | str | None",
              package_methods: tuple[str, ...] = ()) -> "SpeculativeConfig | None":
        """From a dict or its JSON (vLLM's --speculative-config); one-line ValueErrors name the choices."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"speculative_config is not valid JSON: {error}") from None
        if not isinstance(value, dict):
            raise ValueError("speculative_config must be a JSON object, e.g. "
                             '{"method": "ngram", "num_speculative_tokens": 3}')
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown speculative_config key(s) {unknown}; known: {sorted(known)}")
        methods = RUNTIME_METHODS + tuple(package_methods)
        method = value.get("method")
        if method not in methods:
            raise ValueError(f"speculative method {method!r} is not available for this model; "
                             f"choices: {', '.join(methods)}")
        k = value.get("num_speculative_tokens")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"num_speculative_tokens must be an integer >= 1, got {k!r}")
        config = cls(**value)
        if not 1 <= config.prompt_lookup_min <= config.prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min ({config.prompt_lookup_min}) <= prompt_lookup_max "
                             f"({config.prompt_lookup_max})")
        return config


def ngram_propose(token_ids: list[int] | np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """Prompt lookup: find the most recent earlier occurrence of the sequence's last n tokens (the longest n
    in [n_min, n_max] that has one) and propose the up to k tokens that followed it."""
    tokens = np.asarray(token_ids, dtype=np.int64)
    length = len(tokens)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:length - 1], n)   # starts 0 .. length-1-n
        hits = np.flatnonzero((windows == tokens[length - n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start:start + k].tolist()
    return []


@dataclass(slots=True)
class DraftInputs:
    """What a model drafter reads after the target's step (see Drafter)."""
    target_hidden: torch.Tensor          # [num_tokens, hidden] what target.forward returned this step
    next_token_ids: torch.Tensor         # [num_tokens] the token after each row; at each request's last
                                         # accepted row the token the target just produced
    positions: torch.Tensor              # [num_tokens]
    ctx: ForwardContext                  # the target step's context, drafter cache layers included
    last_rows: torch.Tensor              # [num_reqs] int64: each sampling request's last accepted row
    num_drafts: int
    # positions [num_reqs] -> a one-token-per-request context over the same block tables (drafts 2..k)
    decode_context: Callable[[torch.Tensor], ForwardContext]


class Drafter(Protocol):
    """A package's own drafter (ModelPackage.build_drafter). Its cache layers are allocated after the
    target's: its layer i is layer len(target.cache_specs()) + i of the step's context.

    A drafter that sets `capturable = True` has its `propose` captured in a CUDA graph per target graph
    (batch size, query length) and replayed after the target's graph. Its propose must then read nothing but
    the tensors of DraftInputs (no host reads or syncs: no `.item()`, no boolean-mask indexing, no Python
    branch on a tensor's values), take its shapes from them alone, and return a new tensor. In a replayed
    step `last_rows` has an entry for every padded row too: a padding row's entry is a token of no request
    (position 0 .. query length - 1, context of its own query only) and its `decode_context` rows write no
    cache entry; the runner reads the drafts of the real rows only."""

    weight_prefixes: tuple[str, ...] | None      # checkpoint names it consumes; None = all of spec.model's
    # (optional, default False) propose may be captured in a CUDA graph, as described above
    capturable: bool

    def cache_specs(self) -> list[CacheSpec]:
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        ...

    def propose(self, inputs: DraftInputs) -> torch.Tensor:
        """[num_reqs, num_drafts] int64 greedy drafts."""
        ...
