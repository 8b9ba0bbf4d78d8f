"""gpt-oss matches transformers (fp32) through the real engine path, on the tiny MXFP4 checkpoint."""
from __future__ import annotations

import pytest
import torch

from runtime import LLM, SamplingParams
from runtime.kv_cache import cdiv, window_blocks_per_request
from tools.parity import load_transformers, random_prompts, run_parity

LOGIT_TOLERANCE = 1e-4
# 8 prompts of 3..200 tokens (the tiny window is 8) at once, block_size 4, a 16-token budget (chunked
# prefill), and 79 blocks (316 tokens) for about 1,000 tokens of work: preemption must happen.
STRESS = dict(block_size=4, max_num_batched_tokens=16, num_gpu_blocks=80)


@pytest.fixture(scope="module")
def stress_report(tiny_gpt_oss):
    return run_parity(tiny_gpt_oss, max_tokens=32, **STRESS)


@pytest.fixture(scope="module")
def hf_model(tiny_gpt_oss):
    return load_transformers(tiny_gpt_oss)


@pytest.fixture(scope="module")
def long_prompt():
    return torch.tensor([random_prompts(1024, (200,), seed=3)[0]])


def test_every_logit_row_matches_transformers(stress_report):
    assert stress_report.logit_rows_compared > 1000
    assert stress_report.max_logit_diff <= LOGIT_TOLERANCE


def test_greedy_outputs_match_transformers_generate(stress_report):
    assert stress_report.greedy_matches == stress_report.greedy_total == 8, stress_report.first_mismatch


def test_stress_run_exercised_chunking_mixing_and_preemption(stress_report):
    conditions = stress_report.conditions
    assert conditions["preemptions"] > 0
    assert conditions["prefill_chunks"] > 0
    assert conditions["mixed_steps"] > 0


def test_prefill_logits_match_in_one_shot(tiny_gpt_oss):
    """No chunking, one big batch: the plain prefill path on its own."""
    report = run_parity(tiny_gpt_oss, prompt_lengths=(5, 33, 130), max_tokens=4, block_size=16)
    assert report.conditions["prefill_chunks"] == 0 and report.conditions["preemptions"] == 0
    assert report.max_logit_diff <= LOGIT_TOLERANCE
    assert report.greedy_matches == report.greedy_total


@torch.inference_mode()
def _max_logit_change(model, reference: torch.Tensor, prompt: torch.Tensor) -> float:
    return (model(prompt).logits[0] - reference).abs().max().item()


@torch.inference_mode()
def test_sinks_window_and_yarn_each_move_logits_far_beyond_the_tolerance(tiny_gpt_oss, hf_model, long_prompt):
    """A model missing any of them would fail parity: the tiny weights make each of them matter."""
    reference = hf_model(long_prompt).logits[0]
    without_sinks = load_transformers(tiny_gpt_oss)
    for layer in without_sinks.model.layers:
        layer.self_attn.sinks.fill_(float("-inf"))                  # a sink of -inf is no sink
    without_window = load_transformers(tiny_gpt_oss, {"layer_types": ["full_attention"] * 4})
    without_yarn = load_transformers(tiny_gpt_oss, {"rope_parameters": {"rope_type": "default",
                                                                        "rope_theta": 150000.0}})
    for model in (without_sinks, without_window, without_yarn):
        assert _max_logit_change(model, reference, long_prompt) > 100 * LOGIT_TOLERANCE


@torch.inference_mode()
def test_transformers_own_fp32_error_is_far_below_the_tolerance(tiny_gpt_oss, hf_model, long_prompt):
    """The tolerance measures our error only if the oracle's own rounding (fp32 vs fp64) is much smaller."""
    fp64 = load_transformers(tiny_gpt_oss, {"experts_implementation": "eager"}).double()   # grouped_mm: no fp64
    error = (hf_model(long_prompt).logits[0].double() - fp64(long_prompt).logits[0]).abs().max().item()
    assert error < LOGIT_TOLERANCE / 10


def test_sliding_group_of_a_long_request_stays_window_sized(tiny_gpt_oss):
    """A 2,000-token request: the full-attention group grows with it, the sliding group holds only the
    blocks the window (plus one prefill chunk) can reach."""
    block_size, budget = 16, 64
    llm = LLM(str(tiny_gpt_oss), device="cpu", dtype="float32", block_size=block_size,
              max_num_batched_tokens=budget)
    engine = llm.engine
    window_group = next(g for g, group in enumerate(engine.kv.groups) if group.spec.window is not None)
    full_group = 1 - window_group
    window = engine.kv.groups[window_group].spec.window
    prompt = random_prompts(1024, (2000,), seed=4)[0]
    engine.add_request("long", prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    held = []
    while engine.has_unfinished():
        engine.step()
        held.append(engine.kv.num_blocks_held("long"))
    assert max(h[window_group] for h in held) <= window_blocks_per_request(window, block_size, budget)
    assert max(h[full_group] for h in held) == cdiv(2000 + 7, block_size)
