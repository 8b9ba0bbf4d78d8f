"""Qwen3 on the GPU (run with `pytest -m gpu` on the GPU machine): bf16 teacher-forced parity with
transformers, and CUDA graphs vs eager."""
from __future__ import annotations

import pytest
import torch

from runtime import LLM, SamplingParams
from tools.parity import random_prompts

pytestmark = pytest.mark.gpu


def teacher_forced_agreement(path, hf_model, prompts, max_tokens, **options):
    """Our bf16 logits at every position the engine computed vs transformers' bf16 forward over the same
    finished sequences: (top-1 agreement, minimum cosine similarity, rows compared)."""
    from tools.parity import _LogitRecorder
    llm = LLM(str(path), device="cuda", dtype="bfloat16", enforce_eager=True, skip_tokenizer_init=True, **options)
    recorder = _LogitRecorder(llm.engine.runner)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                           use_tqdm=False)
    with torch.inference_mode():
        reference = {str(i): hf_model(torch.tensor([o.prompt_token_ids + o.token_ids], device="cuda")).logits[0].float()
                     for i, o in enumerate(outputs)}
    agree, cosines = 0, []
    for request_id, position, logits in recorder.rows:
        expected = reference[request_id][position]
        agree += int(logits.argmax() == expected.argmax())
        cosines.append(torch.nn.functional.cosine_similarity(logits.float(), expected, dim=0).item())
    return agree / len(recorder.rows), min(cosines), len(recorder.rows)


def _hf(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()


def test_tiny_bf16_parity_on_gpu(tiny_qwen3):
    prompts = random_prompts(1024, (3, 17, 40, 64, 99, 128, 150, 200))
    top1, cosine, rows = teacher_forced_agreement(tiny_qwen3, _hf(tiny_qwen3), prompts, 32, block_size=16,
                                                  max_num_batched_tokens=64)
    assert rows == 701 + 8 * 31           # every prompt token and every fed-back output token
    assert top1 >= 0.99 and cosine >= 0.999, (top1, cosine)


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
    return path, model.eval()


def test_qwen3_06b_shape_bf16_parity_on_gpu(qwen3_06b_checkpoint):
    path, hf_model = qwen3_06b_checkpoint
    prompts = random_prompts(151936, (7, 130, 300, 41), seed=3)
    top1, cosine, rows = teacher_forced_agreement(path, hf_model, prompts, 24, max_num_batched_tokens=256)
    assert rows > 500
    assert top1 >= 0.99 and cosine >= 0.999, (top1, cosine)


def test_cuda_graphs_match_eager_greedy_tokens(qwen3_06b_checkpoint):
    path, _ = qwen3_06b_checkpoint
    prompts = random_prompts(151936, (5, 77, 200, 13, 64, 9, 150, 33, 2, 100), seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    results = []
    for eager in (True, False):
        llm = LLM(str(path), device="cuda", dtype="bfloat16", enforce_eager=eager, skip_tokenizer_init=True,
                  max_num_seqs=16)
        assert bool(llm.engine.runner.graphs) is not eager
        results.append([o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        del llm
        torch.cuda.empty_cache()
    assert results[0] == results[1]
