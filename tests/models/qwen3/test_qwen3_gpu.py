"""Qwen3 on the GPU (run with `pytest -m gpu` on the GPU machine): bf16 teacher-forced parity with
transformers (criteria in tools/gpu_parity.py), and CUDA graphs vs eager."""
from __future__ import annotations

import pytest
import torch

from runtime import LLM, SamplingParams
from tools.gpu_parity import assert_parity, free_gpu, kv_cache_agreement, teacher_forced
from tools.parity import random_prompts

pytestmark = pytest.mark.gpu


def test_tiny_bf16_parity_on_gpu(tiny_qwen3):
    prompts = random_prompts(1024, (3, 17, 40, 64, 99, 128, 150, 200))
    result = teacher_forced(tiny_qwen3, prompts, 32, block_size=16, max_num_batched_tokens=64)
    print("tiny", result)
    assert result["rows"] == 701 + 8 * 31        # every prompt token and every fed-back output token
    assert_parity(result)


@pytest.fixture(scope="module")
def qwen3_06b_checkpoint(tmp_path_factory):
    """Random weights at Qwen3-0.6B shapes, saved by transformers (real names), with the tiny package's
    norm perturbation so QK-norm weights matter."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from runtime.registry import get_package
    config = AutoConfig.from_pretrained("tools/configs/qwen3-0.6b")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        get_package("qwen3").tiny_init(model)
    path = tmp_path_factory.mktemp("qwen3-0.6b")
    model.save_pretrained(path)
    del model
    free_gpu()
    return path


def test_qwen3_06b_shape_bf16_parity_on_gpu(qwen3_06b_checkpoint):
    prompts = random_prompts(151936, (7, 130, 300, 41), seed=3)
    result = teacher_forced(qwen3_06b_checkpoint, prompts, 24, max_num_batched_tokens=256)
    print("0.6B", result)
    assert result["rows"] == 478 + 4 * 23
    assert_parity(result)


@pytest.mark.xfail(strict=False, reason="issue 12's bar (cosine >= 0.999 on every row) is not met: on the H200 "
                   "(2026-11-29) min 0.9970, median 0.9983, top-1 88.0% over 1338 rows. e4m3 keeps 3 mantissa bits; "
                   "the CPU test shows the error is that of the format (tests/runtime/test_fp8_kv_cache.py)")
def test_fp8_kv_cache_teacher_forced_against_bf16_cache(qwen3_06b_checkpoint):
    """--kv-cache-dtype fp8 at Qwen3-0.6B shapes: every teacher-forced row within cosine 0.999 of the bf16
    cache's logits (top-1 agreement is reported: random weights have many near ties)."""
    prompts = random_prompts(151936, (7, 130, 300, 41, 700), seed=6)
    result = kv_cache_agreement(qwen3_06b_checkpoint, prompts, 32, "fp8", max_num_batched_tokens=256,
                                max_num_seqs=16)
    print("fp8 KV vs bf16 KV, 0.6B shape:", result)
    assert result["rows"] == sum(len(p) + 32 for p in prompts)
    assert result["min_cosine"] >= 0.999, result


def test_cuda_graphs_match_eager_greedy_tokens(qwen3_06b_checkpoint):
    """16 requests = a captured size, so eager and graphs run the same shapes and split choices and must give
    the same bits; a padded batch runs other GEMM shapes, whose rounding may flip a random model's near ties."""
    prompts = random_prompts(151936, (5, 77, 200, 13, 64, 9, 150, 33, 2, 100, 31, 8, 120, 66, 1, 45), seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    results = []
    for eager in (True, False):
        llm = LLM(str(qwen3_06b_checkpoint), device="cuda", dtype="bfloat16", enforce_eager=eager,
                  skip_tokenizer_init=True, max_num_seqs=16, gpu_memory_utilization=0.5)
        assert bool(llm.engine.runner.graphs) is not eager
        results.append([o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        del llm
        free_gpu()
    assert results[0] == results[1]


def test_moe_bf16_parity_on_gpu(tiny_qwen3_moe):
    prompts = random_prompts(1024, (3, 40, 99, 200), seed=5)
    result = teacher_forced(tiny_qwen3_moe, prompts, 16, block_size=16, max_num_batched_tokens=64)
    print("tiny moe", result)
    assert_parity(result, moe=True)


def test_cuda_graphs_match_eager_with_ngram_speculation(tiny_qwen3):
    """Uniform verification batches (every request 1 + k tokens) replay graphs of their own; tokens equal
    eager's, and both equal plain decoding. fp32, because in bf16 a verification step (k + 1 rows) rounds
    differently from a one-token decode, which flips a random model's near ties (as in any engine) and
    would hide what this test looks for. Batches of 1 and 2 (captured sizes) of periodic prompts."""
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    periodic = [[100 + i % 7 for i in range(60)], [200 + i % 5 for i in range(45)]]
    results, graph_keys = {}, []
    for batch in (periodic[:1], periodic):
        for eager, spec in ((True, None), (True, 3), (False, 3)):
            llm = LLM(str(tiny_qwen3), device="cuda", dtype="float32", enforce_eager=eager,
                      skip_tokenizer_init=True, max_num_seqs=16, gpu_memory_utilization=0.5,
                      speculative_config={"method": "ngram", "num_speculative_tokens": spec} if spec else None)
            runner = llm.engine.runner
            graph_key = runner._graph_key
            runner._graph_key = lambda plan: graph_keys.append(graph_key(plan)) or graph_keys[-1]
            results[(len(batch), eager, spec)] = [o.token_ids for o in llm.generate(batch, params, use_tqdm=False)]
            accepted = llm.engine.spec_stats.num_accepted_tokens
            assert spec is None or accepted > 0
            del runner._graph_key, graph_key, llm, runner          # nothing may keep the engine's memory
            free_gpu()
        assert results[(len(batch), False, 3)] == results[(len(batch), True, 3)] == results[(len(batch), True, None)]
    assert any(key is not None and key[1] == 4 for key in graph_keys)
