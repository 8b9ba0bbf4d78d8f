"""DeepSeek V4 matches transformers (fp32) through the real engine path, on tiny checkpoints in the release
layout: every layer kind (window, CSA with its indexer, HCA), hash and score routing, small blocks, chunked
prefill at unaligned boundaries, several requests at once, preemption and prefix hits."""
from __future__ import annotations

import pytest
import torch

from runtime import LLM, SamplingParams
from tools.parity import load_transformers, random_prompts, run_parity, stress_options

LOGIT_TOLERANCE = 1e-4
VOCAB = 512


@pytest.fixture(scope="module")
def stress_report(tiny_deepseek_v4):
    # 8 prompts of 3..200 tokens, blocks of 8 positions, a 16-token budget and a 320-position cache
    return run_parity(tiny_deepseek_v4, max_tokens=24,
                      **stress_options(tiny_deepseek_v4, block_size=4, max_num_batched_tokens=16, cache_tokens=320))


def test_every_logit_row_matches_transformers(stress_report):
    assert stress_report.logit_rows_compared > 900
    assert stress_report.max_logit_diff <= LOGIT_TOLERANCE


def test_greedy_outputs_match_transformers_generate(stress_report):
    assert stress_report.greedy_matches == stress_report.greedy_total == 8, stress_report.first_mismatch


def test_stress_run_exercised_chunking_preemption_and_prefix_hits(stress_report):
    conditions = stress_report.conditions
    assert conditions["preemptions"] > 0
    assert conditions["prefill_chunks"] > 0
    assert conditions["mixed_steps"] > 0
    assert conditions["prefix_hit_tokens"] > 0


def test_released_ratios_with_prompts_past_the_window_and_several_hca_entries(tiny_deepseek_v4_released):
    """Ratios 4 and 128 and the 128-token window: 300+ token prompts give 2-3 HCA entries and ~100 CSA
    entries (index_topk 8 picks among them), prefilled in unaligned 48-token chunks next to short requests."""
    report = run_parity(tiny_deepseek_v4_released, prompt_lengths=(5, 300, 77, 390), max_tokens=8,
                        block_size=128, max_num_batched_tokens=48)
    assert report.conditions["prefill_chunks"] > 0
    assert report.max_logit_diff <= LOGIT_TOLERANCE
    assert report.greedy_matches == report.greedy_total, report.first_mismatch


def test_prefix_cache_on_and_off_give_identical_outputs(tiny_deepseek_v4):
    prompts = random_prompts(VOCAB, (70, 70), seed=5)
    prompts[1][:64] = prompts[0][:64]                              # a shared 64-token prefix: 8 full blocks
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = {}
    for caching in (True, False):
        llm = LLM(str(tiny_deepseek_v4), device="cpu", dtype="float32", block_size=8,
                  enable_prefix_caching=caching)
        first = llm.generate([prompts[0]], params, use_tqdm=False)
        second = llm.generate([prompts[1]], params, use_tqdm=False)
        outputs[caching] = [o.token_ids for o in first + second]
        if caching:
            assert llm.engine.kv.stats.hits >= 64
    assert outputs[True] == outputs[False]


@torch.inference_mode()
def _max_logit_change(model, reference: torch.Tensor, prompt: torch.Tensor) -> float:
    return (model(prompt).logits[0] - reference).abs().max().item()


@torch.inference_mode()
def test_sinks_hash_table_compressors_indexer_and_yarn_each_move_logits_far_beyond_the_tolerance(tiny_deepseek_v4):
    """A model missing any of them would fail parity: the tiny weights make each of them matter."""
    prompt = torch.tensor([random_prompts(VOCAB, (200,), seed=3)[0]])
    reference_model = load_transformers(tiny_deepseek_v4)
    reference = reference_model(prompt).logits[0]
    config = reference_model.config
    variants = {}
    variants["sinks"] = load_transformers(tiny_deepseek_v4)
    for layer in variants["sinks"].model.layers:
        layer.self_attn.sinks.fill_(float("-inf"))                  # a sink of -inf is no sink
    variants["hash table"] = load_transformers(tiny_deepseek_v4)
    for layer in variants["hash table"].model.layers:
        if hasattr(layer.mlp.gate, "tid2eid"):
            layer.mlp.gate.tid2eid.zero_()                           # what an unloaded table holds
    window_only = ["sliding_attention" if t == "heavily_compressed_attention" else t for t in config.layer_types]
    variants["HCA compressor"] = load_transformers(tiny_deepseek_v4, {"layer_types": window_only})
    variants["indexer selection"] = load_transformers(tiny_deepseek_v4, {"index_topk": 1000})   # every entry
    no_yarn = {**config.rope_parameters,
               "compress": {"rope_type": "default", "rope_theta": config.rope_parameters["compress"]["rope_theta"],
                            "partial_rotary_factor": config.rope_parameters["compress"]["partial_rotary_factor"]}}
    variants["YaRN"] = load_transformers(tiny_deepseek_v4, {"rope_parameters": no_yarn})
    changes = {name: _max_logit_change(model, reference, prompt) for name, model in variants.items()}
    assert all(change > 100 * LOGIT_TOLERANCE for change in changes.values()), changes


@torch.inference_mode()
def test_transformers_own_fp32_error_is_far_below_the_tolerance(tiny_deepseek_v4):
    """The tolerance measures our error only if the oracle's own rounding (fp32 vs fp64) is much smaller."""
    prompt = torch.tensor([random_prompts(VOCAB, (200,), seed=3)[0]])
    fp32 = load_transformers(tiny_deepseek_v4)
    fp64 = load_transformers(tiny_deepseek_v4, {"experts_implementation": "eager"}).double()
    error = (fp32(prompt).logits[0].double() - fp64(prompt).logits[0]).abs().max().item()
    assert error < LOGIT_TOLERANCE / 10
