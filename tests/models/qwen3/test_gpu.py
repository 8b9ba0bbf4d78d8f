"""Qwen3 on the GPU (run with `pytest -m gpu` on the GPU machine): bf16 teacher-forced parity with
transformers, and CUDA graphs vs eager.

On random weights the top-1 margins are often far below bf16 rounding, so two correct bf16 implementations
disagree on a few percent of positions: transformers' own sdpa and eager attention agree on only 96-98% of
positions on the tiny checkpoint (fp32 vs bf16 transformers: 97%). A flat 99% bar therefore cannot be met
by transformers itself. We require instead: logit cosine >= 0.999 everywhere; top-1 agreement at least 99%
or at least transformers' own sdpa-vs-eager agreement on the same rows; and every disagreement a near tie
(our token within transformers' top 3)."""
from __future__ import annotations

import gc

import pytest
import torch

from runtime import LLM, SamplingParams
from tools.parity import _LogitRecorder, random_prompts

pytestmark = pytest.mark.gpu


def _free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def teacher_forced(path, hf_sdpa, hf_eager, prompts, max_tokens, **options) -> dict:
    """Our bf16 logits at every position the engine computed vs transformers' bf16 forward over the same
    finished sequences."""
    llm = LLM(str(path), device="cuda", dtype="bfloat16", enforce_eager=True, skip_tokenizer_init=True,
              gpu_memory_utilization=0.5, **options)
    recorder = _LogitRecorder(llm.engine.runner)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                           use_tqdm=False)
    del llm
    _free_gpu()
    with torch.inference_mode():
        sequences = {str(i): torch.tensor([o.prompt_token_ids + o.token_ids], device="cuda")
                     for i, o in enumerate(outputs)}
        sdpa = {k: hf_sdpa(v).logits[0].float() for k, v in sequences.items()}
        eager = {k: hf_eager(v).logits[0].float() for k, v in sequences.items()}
    agree = floor = near_ties = 0
    cosines = []
    for request_id, position, logits in recorder.rows:
        expected = sdpa[request_id][position]
        ours_top = int(logits.argmax())
        agree += int(ours_top == int(expected.argmax()))
        floor += int(eager[request_id][position].argmax() == expected.argmax())
        near_ties += int(ours_top in expected.topk(3).indices.tolist())
        cosines.append(torch.nn.functional.cosine_similarity(logits.float(), expected, dim=0).item())
    rows = len(recorder.rows)
    return dict(rows=rows, top1=agree / rows, hf_floor=floor / rows, within_top3=near_ties / rows,
                min_cosine=min(cosines))


def _assert_parity(result: dict) -> None:
    assert result["min_cosine"] >= 0.999, result
    assert result["top1"] >= min(0.99, result["hf_floor"]), result
    assert result["within_top3"] == 1.0, result


def _hf_pair(path):
    from transformers import AutoModelForCausalLM
    load = lambda **kw: AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kw).cuda().eval()  # noqa
    return load(), load(attn_implementation="eager")


def test_tiny_bf16_parity_on_gpu(tiny_qwen3):
    prompts = random_prompts(1024, (3, 17, 40, 64, 99, 128, 150, 200))
    result = teacher_forced(tiny_qwen3, *_hf_pair(tiny_qwen3), prompts, 32, block_size=16, max_num_batched_tokens=64)
    print("tiny", result)
    assert result["rows"] == 701 + 8 * 31        # every prompt token and every fed-back output token
    _assert_parity(result)


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
    _free_gpu()
    return path


def test_qwen3_06b_shape_bf16_parity_on_gpu(qwen3_06b_checkpoint):
    prompts = random_prompts(151936, (7, 130, 300, 41), seed=3)
    result = teacher_forced(qwen3_06b_checkpoint, *_hf_pair(qwen3_06b_checkpoint), prompts, 24,
                            max_num_batched_tokens=256)
    print("0.6B", result)
    assert result["rows"] == 478 + 4 * 23
    _assert_parity(result)


def test_cuda_graphs_match_eager_greedy_tokens(qwen3_06b_checkpoint):
    prompts = random_prompts(151936, (5, 77, 200, 13, 64, 9, 150, 33, 2, 100), seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    results = []
    for eager in (True, False):
        llm = LLM(str(qwen3_06b_checkpoint), device="cuda", dtype="bfloat16", enforce_eager=eager,
                  skip_tokenizer_init=True, max_num_seqs=16, gpu_memory_utilization=0.5)
        assert bool(llm.engine.runner.graphs) is not eager
        results.append([o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        del llm
        _free_gpu()
    assert results[0] == results[1]


def test_moe_bf16_parity_on_gpu(tiny_qwen3_moe):
    prompts = random_prompts(1024, (3, 40, 99, 200), seed=5)
    result = teacher_forced(tiny_qwen3_moe, *_hf_pair(tiny_qwen3_moe), prompts, 16, block_size=16,
                            max_num_batched_tokens=64)
    print("tiny moe", result)
    _assert_parity(result)
