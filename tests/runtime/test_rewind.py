"""Rejected drafts rewind every cache group. A synthetic model writes (token, position) into a full group, a
sliding-window group and a 4x-compressed group (one entry per 4 positions, written by the token that closes
it); verification rejects drafts every step, so rejected tokens write entries that must be rewritten before
anything reads them. After every step, each entry a query could read holds the accepted token, and at the
end the caches hold exactly what a run without drafts holds."""
from __future__ import annotations

import torch
from torch import nn

from runtime.forward import ForwardContext
from runtime.kv_cache import CacheSpec, KVCacheManager, group_cache_specs
from runtime.request import Request, SamplingParams
from runtime.runner import ModelRunner, allocate_caches
from runtime.scheduler import Scheduler

VOCAB, BLOCK_SIZE, WINDOW, RATIO = 64, 4, 8, 4
SPECS = [CacheSpec((2,), torch.float32), CacheSpec((2,), torch.float32, window=WINDOW),
         CacheSpec((2,), torch.float32, tokens_per_entry=RATIO)]


def next_token(token: int) -> int:
    return (token * 7 + 3) % VOCAB


class WritesTokensModel(nn.Module):
    """Every layer stores (token id, position) at its slot; the greedy next token is next_token(token)."""

    def cache_specs(self) -> list[CacheSpec]:
        return SPECS

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        for layer in range(len(SPECS)):
            cache, _, slots = ctx.layer_cache(layer)
            keep = slots >= 0
            cache.view(-1, 2)[slots[keep]] = torch.stack([input_ids, positions], dim=1).float()[keep]
        return input_ids[:, None].float()                                     # [num_tokens, 1]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        targets = (hidden[:, 0].long() * 7 + 3) % VOCAB
        return torch.nn.functional.one_hot(targets, VOCAB).float() * 10.0


def readable_entries(kv: KVCacheManager, caches: list[torch.Tensor], request: Request) -> dict:
    """(group, position) -> entry, for every position a query at num_computed could read in each group."""
    computed = request.num_computed_tokens
    entries = {}
    for g, spec in enumerate(SPECS):
        table = kv.block_table_row(request.request_id, g)
        oldest = 0 if spec.window is None else max(0, computed - spec.window + 1)
        for p in range(oldest, computed):
            if (p + 1) % spec.tokens_per_entry:
                continue                                      # no entry closes at p
            block = int(table[p // BLOCK_SIZE])
            entries[(g, p)] = caches[g][block, (p % BLOCK_SIZE) // spec.tokens_per_entry].tolist()
    return entries


def generate(num_drafts: int, checks: list) -> tuple[list[int], dict, int]:
    """Greedy generation with `num_drafts` drafts per step, of which only the first is right."""
    model = WritesTokensModel()
    layout = group_cache_specs(SPECS, BLOCK_SIZE)
    kv = KVCacheManager(layout, BLOCK_SIZE, [40, 40, 40], max_num_seqs=2, max_model_len=128,
                        enable_prefix_caching=False)
    caches = allocate_caches(layout, [40, 40, 40], BLOCK_SIZE, torch.device("cpu"))
    runner = ModelRunner(model, kv, caches, VOCAB, torch.device("cpu"), max_num_batched_tokens=8)
    scheduler = Scheduler(kv, max_num_seqs=2, max_num_batched_tokens=8)
    request = Request("a", [1, 2, 3, 4, 5, 6, 7, 9, 11, 13, 17], SamplingParams(temperature=0.0, max_tokens=40))
    scheduler.add(request)
    rewound = 0
    while request.num_output_tokens < 40:
        plan = scheduler.schedule()
        out = runner.wait(runner.launch(plan))
        rejected = {rid: k + 1 - len(t) for rid, k, t in zip(out.request_ids, out.num_drafts, out.token_ids)}
        rewound += sum(rejected.values())
        scheduler.finish_step(plan, rejected)
        for tokens in out.token_ids:
            request.token_ids.extend(tokens)
        entries = readable_entries(kv, caches, request)
        checks.append(all(value == [float(request.token_ids[p]), float(p)] for (_, p), value in entries.items()))
        room = 40 - request.num_output_tokens - 1
        if num_drafts and room > 0 and request.num_computed_tokens == request.num_tokens - 1:
            right = next_token(request.token_ids[-1])
            request.draft_token_ids = [right] + [(right + 1 + i) % VOCAB for i in range(num_drafts - 1)][:room - 1]
    return request.output_token_ids[:40], readable_entries(kv, caches, request), rewound


def test_rejected_drafts_are_rewound_in_full_window_and_compressed_groups():
    checks_plain, checks_drafted = [], []
    plain_tokens, plain_entries, _ = generate(0, checks_plain)
    tokens, entries, rewound = generate(3, checks_drafted)

    assert rewound > 20                                   # two of three drafts rejected, step after step
    assert all(checks_drafted) and all(checks_plain)
    assert tokens == plain_tokens
    assert entries == plain_entries and {g for g, _ in entries} == {0, 1, 2}
