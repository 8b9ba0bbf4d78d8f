"""Qwen3 on the GPU (run with `pytest -m gpu` on the GPU machine): bf16 teacher-forced parity with
transformers, and CUDA graphs vs eager.

On random weights the top-1 margins are often below bf16 rounding, so two correct bf16 implementations
disagree on a few percent of positions: on the tiny checkpoint transformers' own bf16 agrees with its fp32
on about 97% of positions, and its sdpa and eager attention with each other on 96-98%. A flat 99% top-1 bar
between two bf16 implementations cannot be met there, by transformers itself. So we require: logit cosine
with transformers' bf16 >= 0.999 at every position; top-1 agreement with transformers' fp32 at least that of
transformers' own bf16 (minus one point); and every top-1 disagreement with transformers' bf16 a tie within
bf16 noise (the fp32 logits of the two tokens closer than transformers' own bf16 error on that row)."""
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


def _hf_logits(path, dtype, sequences: dict) -> dict:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()
    with torch.inference_mode():
        logits = {k: model(v).logits[0].float() for k, v in sequences.items()}
    del model
    _free_gpu()
    return logits


def teacher_forced(path, prompts, max_tokens, **options) -> dict:
    """Our bf16 logits at every position the engine computed vs transformers (bf16 and fp32) over the same
    finished sequences."""
    llm = LLM(str(path), device="cuda", dtype="bfloat16", enforce_eager=True, skip_tokenizer_init=True,
              gpu_memory_utilization=0.5, **options)
    recorder = _LogitRecorder(llm.engine.runner)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                           use_tqdm=False)
    rows = [(r, p, logits.float()) for r, p, logits in recorder.rows]
    del recorder, llm
    _free_gpu()
    sequences = {str(i): torch.tensor([o.prompt_token_ids + o.token_ids], device="cuda") for i, o in enumerate(outputs)}
    bf16, fp32 = _hf_logits(path, torch.bfloat16, sequences), _hf_logits(path, torch.float32, sequences)
    agree = ours_exact = hf_exact = ours_far = hf_far = 0
    cosines, unexplained = [], []
    for request_id, position, ours in rows:
        ref16, ref32 = bf16[request_id][position], fp32[request_id][position]
        a, b = int(ours.argmax()), int(ref16.argmax())
        agree += a == b
        ours_exact += a == int(ref32.argmax())
        hf_exact += b == int(ref32.argmax())
        cosine = torch.nn.functional.cosine_similarity
        cosines.append(cosine(ours, ref16, dim=0).item())
        ours_far += cosine(ours, ref32, dim=0).item() < 0.99          # a different expert choice, say
        hf_far += cosine(ref16, ref32, dim=0).item() < 0.99
        if a != b and abs(ref32[a] - ref32[b]) > (ref16 - ref32).abs().max():
            unexplained.append((request_id, position, a, b))
    n = len(rows)
    return dict(rows=n, top1=agree / n, ours_vs_fp32=ours_exact / n, hf_bf16_vs_fp32=hf_exact / n,
                min_cosine=min(cosines), median_cosine=sorted(cosines)[n // 2], unexplained_disagreements=unexplained,
                ours_far_from_fp32=ours_far, hf_bf16_far_from_fp32=hf_far)


def _assert_parity(result: dict, moe: bool = False) -> None:
    if moe:
        # bf16 router logits near a tie pick a different expert now and then, in transformers too: a few
        # rows then differ a lot. Allow no more such rows (vs fp32) than transformers' bf16 has, plus two.
        assert result["median_cosine"] >= 0.999, result
        assert result["ours_far_from_fp32"] <= result["hf_bf16_far_from_fp32"] + 2, result
    else:
        assert result["min_cosine"] >= 0.999, result
    assert result["ours_vs_fp32"] >= result["hf_bf16_vs_fp32"] - 0.01, result
    assert not result["unexplained_disagreements"], result


def test_tiny_bf16_parity_on_gpu(tiny_qwen3):
    prompts = random_prompts(1024, (3, 17, 40, 64, 99, 128, 150, 200))
    result = teacher_forced(tiny_qwen3, prompts, 32, block_size=16, max_num_batched_tokens=64)
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
    result = teacher_forced(qwen3_06b_checkpoint, prompts, 24, max_num_batched_tokens=256)
    print("0.6B", result)
    assert result["rows"] == 478 + 4 * 23
    _assert_parity(result)


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
        _free_gpu()
    assert results[0] == results[1]


def test_moe_bf16_parity_on_gpu(tiny_qwen3_moe):
    prompts = random_prompts(1024, (3, 40, 99, 200), seed=5)
    result = teacher_forced(tiny_qwen3_moe, prompts, 16, block_size=16, max_num_batched_tokens=64)
    print("tiny moe", result)
    _assert_parity(result, moe=True)
