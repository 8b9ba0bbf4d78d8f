"""DeepSeek V4 on the GPU (run with `pytest -m gpu` on the GPU machine): bf16 teacher-forced parity of the tiny
checkpoints with transformers (criteria in tools/gpu_parity.py) through the Triton kernels, and CUDA graphs
(decode, and MTP verification of 1 + k tokens) giving the eager path's greedy tokens for batches whose
contexts differ from the capture's."""
from __future__ import annotations

import pytest

from runtime import LLM, SamplingParams
from tools.gpu_parity import assert_parity, free_gpu, teacher_forced
from tools.parity import random_prompts

pytestmark = pytest.mark.gpu

VOCAB = 512
# a fixed cache: sized by free memory, the tiny model's few bytes per block would give tens of millions of
# blocks, and the host's block lists would take minutes to build
BLOCKS = 512


def test_tiny_bf16_parity_on_gpu(tiny_deepseek_v4):
    prompts = random_prompts(VOCAB, (3, 17, 40, 64, 99, 128, 150, 200))
    result = teacher_forced(tiny_deepseek_v4, prompts, 32, block_size=16, max_num_batched_tokens=64,
                            num_gpu_blocks=BLOCKS)
    print("tiny deepseek-v4", result)
    assert result["rows"] == 701 + 8 * 31        # every prompt token and every fed-back output token
    assert_parity(result, moe=True)


def test_released_ratios_bf16_parity_on_gpu(tiny_deepseek_v4_released):
    """Ratios 4 / 128, the 128-token window, prompts past it in unaligned chunks."""
    prompts = random_prompts(VOCAB, (5, 300, 77, 390), seed=1)
    result = teacher_forced(tiny_deepseek_v4_released, prompts, 16, block_size=128, max_num_batched_tokens=96,
                            num_gpu_blocks=BLOCKS)
    print("tiny deepseek-v4 released ratios", result)
    assert_parity(result, moe=True)


def _generate(path, prompts, eager: bool, **options) -> tuple[list[list[int]], list]:
    """Greedy tokens, and the graph key of every step (None = eager)."""
    llm = LLM(str(path), device="cuda", dtype="float32", enforce_eager=eager, skip_tokenizer_init=True,
              num_gpu_blocks=BLOCKS, block_size=16, max_num_batched_tokens=256, **options)
    runner = llm.engine.runner
    assert bool(runner.graphs) is not eager
    keys = []
    graph_key = runner._graph_key
    runner._graph_key = lambda plan: keys.append(graph_key(plan)) or keys[-1]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    del runner._graph_key, graph_key, llm, runner
    free_gpu()
    return [o.token_ids for o in outputs], keys


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_cuda_graphs_match_eager_greedy_tokens(tiny_deepseek_v4, kv_cache_dtype):
    """4 requests (a captured size) of 3..200 tokens: each replay's contexts (windows, HCA entries, CSA
    selections, compressor states closing at other positions) differ from the capture's; fp32, so that the
    comparison is exact rather than subject to bf16 near ties. Also with FP8 entries."""
    prompts = random_prompts(VOCAB, (3, 40, 200, 77), seed=2)
    eager, _ = _generate(tiny_deepseek_v4, prompts, True, max_num_seqs=4, kv_cache_dtype=kv_cache_dtype)
    graphs, keys = _generate(tiny_deepseek_v4, prompts, False, max_num_seqs=4, kv_cache_dtype=kv_cache_dtype)
    assert sum(k is not None for k in keys) >= 30
    assert graphs == eager


@pytest.mark.parametrize("k", [1, 2])
def test_cuda_graphs_match_eager_with_mtp_verification(tiny_deepseek_v4, k):
    """Verification batches (1 + k tokens per request) replay graphs of their own; their tokens equal eager's
    and plain decoding's."""
    prompts = random_prompts(VOCAB, (9, 120), seed=3)
    spec = {"method": "mtp", "num_speculative_tokens": k}
    plain, _ = _generate(tiny_deepseek_v4, prompts, True, max_num_seqs=2)
    eager, _ = _generate(tiny_deepseek_v4, prompts, True, max_num_seqs=2, speculative_config=spec)
    graphs, keys = _generate(tiny_deepseek_v4, prompts, False, max_num_seqs=2, speculative_config=spec)
    assert any(key is not None and key[1] == k + 1 for key in keys)
    assert graphs == eager == plain
