"""Gemma 4 matches transformers (fp32) through the real engine path, on the three tiny checkpoints."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from runtime import LLM, SamplingParams
from tools.parity import load_transformers, random_prompts, run_parity

LOGIT_TOLERANCE = 1e-4
LOGPROB_TOLERANCE = 1e-3
# 8 prompts of 3..200 tokens (the tiny window is 8) at once, block_size 4, a 16-token budget (chunked prefill),
# and 79 blocks (316 tokens) for about 1,000 tokens of work: preemption, and prefix hits on recomputation.
STRESS = dict(block_size=4, max_num_batched_tokens=16, num_gpu_blocks=80)


@pytest.fixture(scope="module", params=["e2b_like", "moe", "dense"])
def checkpoint(request, tiny_gemma4, tiny_gemma4_moe, tiny_gemma4_dense):
    return {"e2b_like": tiny_gemma4, "moe": tiny_gemma4_moe, "dense": tiny_gemma4_dense}[request.param]


@pytest.fixture(scope="module")
def stress_report(checkpoint):
    return run_parity(checkpoint, max_tokens=32, **STRESS)


def test_every_logit_row_matches_transformers(stress_report):
    assert stress_report.logit_rows_compared > 1000
    assert stress_report.max_logit_diff <= LOGIT_TOLERANCE


def test_greedy_outputs_match_transformers_generate(stress_report):
    assert stress_report.greedy_matches == stress_report.greedy_total == 8, stress_report.first_mismatch


def test_stress_run_exercised_chunking_mixing_preemption_and_prefix_hits(stress_report):
    conditions = stress_report.conditions
    assert conditions["preemptions"] > 0
    assert conditions["prefill_chunks"] > 0
    assert conditions["mixed_steps"] > 0
    assert conditions["prefix_hit_tokens"] > 0


def test_prefill_logits_match_in_one_shot(tiny_gemma4_moe):
    """No chunking, one big batch: the plain prefill path on its own."""
    report = run_parity(tiny_gemma4_moe, prompt_lengths=(5, 33, 130), max_tokens=4, block_size=16)
    assert report.conditions["prefill_chunks"] == 0 and report.conditions["preemptions"] == 0
    assert report.max_logit_diff <= LOGIT_TOLERANCE
    assert report.greedy_matches == report.greedy_total


@torch.inference_mode()
def test_logprobs_match_transformers(tiny_gemma4):
    prompt = random_prompts(512, (40,), seed=5)[0]
    llm = LLM(str(tiny_gemma4), device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=16)
    output = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, logprobs=5), use_tqdm=False)[0]
    sequence = torch.tensor([prompt + output.token_ids])
    expected = torch.log_softmax(load_transformers(tiny_gemma4)(sequence).logits[0].double(), dim=-1)
    compared = 0
    for step, top in enumerate(output.logprobs):
        for token, logprob in top.items():
            assert abs(logprob - expected[len(prompt) - 1 + step, token].item()) <= LOGPROB_TOLERANCE
            compared += 1
    assert compared >= 8 * 5


# ---- the tiny weights make every feature matter --------------------------------------------------------


def _text_config_with(path, **changes):
    config = AutoConfig.from_pretrained(path)
    for key, value in changes.items():
        setattr(config.get_text_config(), key, value)
    return {"config": config}


@torch.inference_mode()
def test_ple_softcap_layer_scalar_window_and_rope_each_move_logits_far_beyond_the_tolerance(tiny_gemma4):
    """A model missing any of them (or rotating all of a global head) would fail parity."""
    prompt = torch.tensor([random_prompts(512, (200,), seed=3)[0]])
    reference = load_transformers(tiny_gemma4)(prompt).logits[0]
    without_ple = load_transformers(tiny_gemma4)
    without_layer_scalar = load_transformers(tiny_gemma4)
    for layer in without_ple.model.language_model.layers:
        layer.per_layer_input_gate.weight.zero_()
    for layer in without_layer_scalar.model.language_model.layers:
        layer.layer_scalar.fill_(1.0)
    without_softcap = load_transformers(tiny_gemma4, _text_config_with(tiny_gemma4, final_logit_softcapping=None))
    wider_window = load_transformers(tiny_gemma4, _text_config_with(tiny_gemma4, sliding_window=16))
    rope = AutoConfig.from_pretrained(tiny_gemma4).get_text_config().rope_parameters
    full_rotation = {**rope, "full_attention": {**rope["full_attention"], "partial_rotary_factor": 1.0}}
    fully_rotated = load_transformers(tiny_gemma4, _text_config_with(tiny_gemma4, rope_parameters=full_rotation))
    for model in (without_ple, without_layer_scalar, without_softcap, wider_window, fully_rotated):
        assert (model(prompt).logits[0] - reference).abs().max().item() > 100 * LOGIT_TOLERANCE


def _shortcut_producers(layer_types: list[str], num_kv_shared_layers: int) -> list[int | None]:
    """Google's JAX shortcut: shared global layers read layer first-1, shared sliding layers first-2."""
    first = len(layer_types) - num_kv_shared_layers
    return [None if i < first else first - 1 if kind == "full_attention" else first - 2
            for i, kind in enumerate(layer_types)]


def _first_of_type_producers(layer_types: list[str], num_kv_shared_layers: int) -> list[int | None]:
    first = len(layer_types) - num_kv_shared_layers
    return [None if i < first else layer_types.index(kind) for i, kind in enumerate(layer_types)]


def test_shared_layers_read_the_last_earlier_layer_of_their_type(tiny_gemma4, monkeypatch):
    """transformers' rule, not the shortcut that only matches the released patterns (on the tiny pattern
    S S S S F S | S S S F it would pair layers of different head dims), and an engine whose shared layers
    read another layer of the right type fails parity."""
    from models.gemma4 import model as gemma4_model
    text = AutoConfig.from_pretrained(tiny_gemma4).get_text_config()
    ours = gemma4_model.kv_producers(text.layer_types, text.num_kv_shared_layers)
    stores = [i for i, mode in enumerate(text.kv_sharing_modes) if mode == "store"]
    assert ours == [None] * 6 + [5, 5, 5, 4] and sorted(stores) == [4, 5]
    assert _shortcut_producers(text.layer_types, text.num_kv_shared_layers) == [None] * 6 + [4, 4, 4, 5]

    monkeypatch.setattr(gemma4_model, "kv_producers", _first_of_type_producers)
    report = run_parity(tiny_gemma4, prompt_lengths=(40,), max_tokens=2, block_size=16)
    assert report.max_logit_diff > 100 * LOGIT_TOLERANCE


@torch.inference_mode()
def test_per_expert_scales_and_k_eq_v_move_logits_far_beyond_the_tolerance(tiny_gemma4_moe):
    prompt = torch.tensor([random_prompts(512, (200,), seed=3)[0]])
    reference = load_transformers(tiny_gemma4_moe)(prompt).logits[0]
    without_scales = load_transformers(tiny_gemma4_moe)
    for layer in without_scales.model.layers:
        layer.router.per_expert_scale.fill_(1.0)
    assert (without_scales(prompt).logits[0] - reference).abs().max().item() > 100 * LOGIT_TOLERANCE


@pytest.mark.parametrize("variant", ["e2b_like", "moe"])
@torch.inference_mode()
def test_transformers_own_fp32_error_is_far_below_the_tolerance(variant, tiny_gemma4, tiny_gemma4_moe):
    """The tolerance measures our error only if the oracle's own rounding (fp32 vs fp64) is much smaller."""
    path = tiny_gemma4 if variant == "e2b_like" else tiny_gemma4_moe
    prompt = torch.tensor([random_prompts(512, (200,), seed=3)[0]])
    fp64 = load_transformers(path, {"experts_implementation": "eager"}).double()     # grouped_mm: no fp64
    error = (load_transformers(path)(prompt).logits[0].double() - fp64(prompt).logits[0]).abs().max().item()
    assert error < LOGIT_TOLERANCE / 10
