"""The package drafter hook (ModelPackage.build_drafter), with a test drafter that keeps a cache of its own:
it records (next token, position) for every row the target computed, drafts by repeating the target's
newest token, and writes its later drafts through the one-token contexts the runner builds. The engine
must stay lossless, load only the drafter's checkpoint names, and hand it the right next tokens."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from runtime import LLM, SamplingParams
from runtime.kv_cache import CacheSpec
from runtime.registry import get_package
from runtime.spec_decode import DraftInputs
from tests.runtime.test_spec_decode import GREEDY, STRESS, PreemptDrafted, workload


class RepeatDrafter(nn.Module):
    weight_prefixes = ("model.norm.",)

    def __init__(self, first_layer: int, num_drafts: int):
        super().__init__()
        self.layer = first_layer                 # its cache layer comes after the target's
        self.num_drafts = num_drafts
        self.norm = nn.Parameter(torch.zeros(1))
        self.loaded: list[str] = []

    def cache_specs(self) -> list[CacheSpec]:
        return [CacheSpec((2,), torch.float32)]

    def load_weights(self, weights) -> None:
        for name, tensor in weights:
            self.loaded.append(name)
            self.norm.data.fill_(float(tensor.float().mean()))

    def _write(self, ctx, token_ids: torch.Tensor, positions: torch.Tensor) -> None:
        cache, _, slots = ctx.layer_cache(self.layer)
        keep = slots >= 0
        cache.view(-1, 2)[slots[keep]] = torch.stack([token_ids, positions], dim=1).float()[keep]

    def propose(self, inputs: DraftInputs) -> torch.Tensor:
        assert inputs.num_drafts == self.num_drafts and inputs.target_hidden.shape[0] == inputs.positions.shape[0]
        self._write(inputs.ctx, inputs.next_token_ids, inputs.positions)
        newest = inputs.next_token_ids.index_select(0, inputs.last_rows)            # [num_reqs]
        positions = inputs.positions.index_select(0, inputs.last_rows)
        for j in range(1, self.num_drafts):
            self._write(inputs.decode_context(positions + j), newest, positions + j)
        return newest[:, None].expand(-1, self.num_drafts).contiguous()


def checked_drafter_cache(engine, checks: list) -> None:
    """After every step: every position the target computed holds (the token after it, the position)."""
    step, scheduler, kv = engine.step, engine.scheduler, engine.kv
    layer = engine.drafter.layer
    group = kv.layout.layer_group[layer]

    def stepped():
        outputs = step()
        cache = engine.runner.caches[layer]
        for request in scheduler.running:
            table = kv.block_table_row(request.request_id, group)
            for p in range(request.num_computed_tokens):
                entry = cache[int(table[p // kv.block_size]), p % kv.block_size].tolist()
                checks.append(entry == [float(request.token_ids[p + 1]), float(p)])
        return outputs
    engine.step = stepped


@pytest.fixture
def repeat_drafter_package(monkeypatch):
    package = get_package("qwen3")
    built = []

    def build(target, hf_config, engine_config, spec):
        built.append(RepeatDrafter(len(target.cache_specs()), spec.num_speculative_tokens))
        return built[-1]
    monkeypatch.setattr(package, "drafter_methods", ("repeat",))
    monkeypatch.setattr(package, "build_drafter", build)
    return built


def test_package_drafter_is_lossless_and_sees_the_right_next_tokens(tiny_qwen3, repeat_drafter_package):
    plain = LLM(str(tiny_qwen3), **STRESS)
    prompts = workload(plain.engine.vocab_size)
    expected = [o.token_ids for o in plain.generate(prompts, GREEDY, use_tqdm=False)]

    llm = LLM(str(tiny_qwen3), speculative_config={"method": "repeat", "num_speculative_tokens": 3}, **STRESS)
    engine = llm.engine
    forced = PreemptDrafted(engine)
    checks: list[bool] = []
    checked_drafter_cache(engine, checks)

    assert [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == expected
    assert len(checks) > 500 and all(checks)
    assert engine.spec_stats.num_accepted_tokens > 0 and forced.count > 0
    drafter = repeat_drafter_package[-1]
    assert drafter.loaded == ["model.norm.weight"]
    assert engine.runner.num_lookahead_tokens == 3


def test_a_package_method_is_named_among_the_choices(tiny_qwen3, repeat_drafter_package):
    with pytest.raises(ValueError, match="choices: ngram, repeat"):
        LLM(str(tiny_qwen3), device="cpu", dtype="float32", speculative_config={"method": "mtp",
                                                                                   "num_speculative_tokens": 1})


def test_sampling_with_a_package_drafter_is_reproducible(tiny_qwen3, repeat_drafter_package):
    params = [SamplingParams(temperature=0.9, seed=s, max_tokens=20, ignore_eos=True) for s in range(4)]
    runs = []
    for _ in range(2):
        llm = LLM(str(tiny_qwen3), speculative_config={"method": "repeat", "num_speculative_tokens": 2}, **STRESS)
        runs.append([o.token_ids for o in llm.generate(workload(llm.engine.vocab_size)[-4:], params,
                                                       use_tqdm=False)])
    assert runs[0] == runs[1]


class TargetDrafter(nn.Module):
    """Drafts the target's own greedy continuation: target forwards at the positions after the newest
    token, through the runner's one-token contexts (KV written there is rewritten by the next step)."""
    weight_prefixes = ("model.norm.",)

    def __init__(self, target: nn.Module):
        super().__init__()
        self.target = [target]                  # not a submodule: the engine owns its weights

    def cache_specs(self) -> list[CacheSpec]:
        return []

    def load_weights(self, weights) -> None:
        list(weights)

    def propose(self, inputs: DraftInputs) -> torch.Tensor:
        target = self.target[0]
        token = inputs.next_token_ids.index_select(0, inputs.last_rows)
        positions = inputs.positions.index_select(0, inputs.last_rows)
        drafts = []
        for _ in range(inputs.num_drafts):
            positions = positions + 1
            hidden = target(token, positions, inputs.decode_context(positions))
            token = target.compute_logits(hidden).argmax(dim=-1)
            drafts.append(token)
        return torch.stack(drafts, dim=1)                                       # [num_reqs, k]


def test_sampled_outputs_with_drafts_are_distributed_as_without(tiny_qwen3, monkeypatch):
    """Many seeds of one prompt at top-k 3, drafts being the target's own argmax (often right, often not):
    the joint distribution of the 2nd and 3rd output tokens is the same with drafts verified by the
    rejection rule as without (two-sample chi-square at p = 0.001). A wrong step index for a draft row (the
    same noise on consecutive positions) would correlate them and fail."""
    package = get_package("qwen3")
    monkeypatch.setattr(package, "drafter_methods", ("target",))
    monkeypatch.setattr(package, "build_drafter", lambda target, *_: TargetDrafter(target))
    prompt = [5, 6, 7, 8, 9] * 4
    params = [SamplingParams(temperature=1.0, top_k=3, seed=s, max_tokens=4, ignore_eos=True) for s in range(600)]
    pairs = []
    for spec in (None, {"method": "target", "num_speculative_tokens": 2}):
        llm = LLM(str(tiny_qwen3), device="cpu", dtype="float32", max_num_seqs=128, speculative_config=spec)
        outputs = llm.generate([prompt] * len(params), params, use_tqdm=False)
        pairs.append(Counter(tuple(o.token_ids[1:3]) for o in outputs))
        if spec:
            stats = llm.engine.spec_stats
            assert stats.num_draft_tokens > stats.num_accepted_tokens > 100
    categories = sorted(set(pairs[0]) | set(pairs[1]))
    plain = torch.tensor([pairs[0][c] for c in categories], dtype=torch.float64)
    drafted = torch.tensor([pairs[1][c] for c in categories], dtype=torch.float64)
    expected = (plain + drafted) / 2
    statistic = float((((plain - expected) ** 2 + (drafted - expected) ** 2) / expected).sum())
    assert statistic < chi2_quantile_999(len(categories) - 1)


def chi2_quantile_999(dof: int) -> float:
    """The 0.999 quantile of chi-square (Wilson-Hilferty), without scipy."""
    z = 3.090                                                         # standard normal 0.999 quantile
    return dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3
