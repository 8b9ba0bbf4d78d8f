"""DeepSeek V4's FP8 linears kept in FP8 (runtime.ops.fp8.Fp8Linear, the default on a GPU) against the same
checkpoint dequantized at load (the default on the CPU): which modules keep FP8, the greedy tokens through the
engine (chunked prefill, MTP drafts), `--load-format dummy`, and a tensor-parallel rank's shards (whole
blocks; a shard that is not falls back to a dense linear). On the CPU the FP8 module runs its torch reference
(dequantize, fp32), so tokens must be identical; `-m gpu` compares the FP8 GEMV in bf16 with the dequantized
bf16 model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from models.deepseek_v4 import linear as linears_module
from models.deepseek_v4.linear import Fp8Projection, Fp8Rows, GroupedLinear, Linears
from models.deepseek_v4.model import DeepseekV4ForCausalLM
from runtime import LLM, SamplingParams
from runtime.loader import iterate_weights, load_hf_config
from runtime.ops.fp8 import Fp8Linear, fp8_block_dequantize
from runtime.parallel import ParallelContext, RowParallelLinear
from tools.gpu_parity import free_gpu
from tools.parity import random_prompts

VOCAB = 512
FP8_NAMES = ("attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_a", "attn.wo_b", "ffn.shared_experts.w1",
             "ffn.shared_experts.w2", "ffn.shared_experts.w3")
# linears of one input kept as one stacked FP8 weight (one GEMV launch): its parts under their own names
STACKED = {"attn.wq_a_kv": ("attn.wq_a", "attn.wkv"), "ffn.shared_experts.w13": ("ffn.shared_experts.w1",
                                                                                 "ffn.shared_experts.w3")}


def _linear(module: nn.Module, name: str):
    """The module, or a stacked projection's Fp8Rows, at a dotted name."""
    owner, _, attribute = name.rpartition(".")
    return getattr(module.get_submodule(owner), attribute)


def _block(linear) -> tuple[int, int]:
    return linear.projection.block if isinstance(linear, Fp8Rows) else linear.block


def _generate(path, keep_fp8_on: tuple[str, ...], monkeypatch, prompts, max_tokens=10, **options):
    with monkeypatch.context() as patch:
        patch.setattr(linears_module, "FP8_DEVICES", keep_fp8_on)
        llm = LLM(str(path), skip_tokenizer_init=True, **options)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                           use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outputs]


def test_kept_fp8_linears_give_the_dequantized_tokens(tiny_deepseek_v4, monkeypatch):
    prompts = random_prompts(VOCAB, (3, 21, 60, 117), seed=4)
    options = dict(device="cpu", dtype="float32", block_size=8, max_num_batched_tokens=32,
                   speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    dense, want = _generate(tiny_deepseek_v4, (), monkeypatch, prompts, **options)
    kept, got = _generate(tiny_deepseek_v4, ("cuda", "cpu"), monkeypatch, prompts, **options)
    assert got == want
    model, drafter = kept.engine.model, kept.engine.drafter
    for layer in model.layers:
        for name in FP8_NAMES:
            module = _linear(layer, name)
            assert isinstance(module, (Fp8Linear, Fp8Rows)) and module.weight.dtype == torch.float8_e4m3fn, name
            assert module.scale.dtype == torch.float32 and _block(module) == (16, 32)
        for stacked, parts in STACKED.items():
            projection = layer.get_submodule(stacked)
            assert isinstance(projection, Fp8Projection), stacked
            assert [_linear(layer, part).projection for part in parts] == [projection] * len(parts)
        assert layer.attn.wo_a.groups == model.config.o_groups
        if layer.attn.indexer is not None:
            assert isinstance(layer.attn.indexer.wq_b, Fp8Linear)
            assert not isinstance(layer.attn.indexer.weights_proj, Fp8Linear)      # BF16 in the checkpoint
        if layer.attn.compressor is not None:
            assert not isinstance(layer.attn.compressor.wkv, Fp8Linear)
    assert isinstance(drafter.e_proj, Fp8Linear) and isinstance(drafter.h_proj, Fp8Linear)
    assert isinstance(drafter.layers[0].attn.wq_b, Fp8Linear)
    assert isinstance(dense.engine.model.layers[0].attn.wq_a, nn.Linear)
    assert isinstance(dense.engine.model.layers[0].attn.wo_a, GroupedLinear)
    # the kept bytes are the checkpoint's: dequantized, the dense model's weights
    for name in ("layers.2.attn.wq_b", "layers.1.attn.wo_a", "layers.0.ffn.shared_experts.w2", "layers.1.attn.wq_a",
                 "layers.2.attn.wkv", "layers.0.ffn.shared_experts.w1", "layers.3.ffn.shared_experts.w3"):
        module = _linear(model, name)
        torch.testing.assert_close(fp8_block_dequantize(module.weight, module.scale),
                                   _linear(dense.engine.model, name).weight, rtol=0, atol=0)


def test_dummy_weights_make_fp8_weights_and_scales(tiny_deepseek_v4, monkeypatch):
    llm, tokens = _generate(tiny_deepseek_v4, ("cuda", "cpu"), monkeypatch, [[5, 6, 7]], max_tokens=3,
                            device="cpu", dtype="float32", load_format="dummy")
    module = llm.engine.model.layers[0].attn.wq_b
    assert isinstance(module, Fp8Linear)
    values = module.weight.float()
    assert values.abs().max() <= 1.0 and (values != 0).float().mean() > 0.9
    assert module.scale.abs().max() <= 1e-3 and (module.scale != 0).all()
    assert len(tokens[0]) == 3


def test_tensor_parallel_rank_keeps_whole_blocks(tiny_deepseek_v4):
    """Rank 1 of 2 loads its rows of wq_b, wo_a and the shared expert's w1/w3 as FP8 (whole 16-row blocks);
    wo_b's and w2's 16 input columns are half a 32-column block, so those stay dense (dequantized shards)."""
    config = load_hf_config(tiny_deepseek_v4)
    block = (16, 32)
    full = DeepseekV4ForCausalLM(config, torch.float32, linears=Linears(block))
    full.load_weights(iterate_weights(tiny_deepseek_v4))
    parallel = ParallelContext(rank=1, world_size=2, enable_expert_parallel=True)     # MXFP4 experts: whole ones
    rank = DeepseekV4ForCausalLM(config, torch.float32, parallel, linears=Linears(block))
    rank.load_weights(iterate_weights(tiny_deepseek_v4))
    dense = lambda m: fp8_block_dequantize(m.weight, m.scale) if isinstance(m, (Fp8Linear, Fp8Rows)) \
        else m.weight  # noqa: E731
    for i in range(len(full.layers)):
        ours, whole = rank.layers[i], full.layers[i]
        for name, dim in (("attn.wq_b", 0), ("attn.wo_a", 0), ("ffn.shared_experts.w1", 0),
                          ("ffn.shared_experts.w3", 0), ("attn.wo_b", 1), ("ffn.shared_experts.w2", 1),
                          ("attn.wq_a", None), ("attn.wkv", None)):
            module = _linear(ours, name)
            assert isinstance(module, (Fp8Linear, Fp8Rows)) == (dim != 1), name
            if dim == 1:
                assert isinstance(module, (RowParallelLinear, nn.Linear)) and module.weight.dtype == torch.float32
            want = dense(_linear(whole, name))
            if dim is not None:
                size = want.shape[dim] // 2
                want = want.narrow(dim, size, size)
            torch.testing.assert_close(dense(module), want, rtol=0, atol=0)


@pytest.mark.gpu
def test_fp8_gemv_model_gives_the_dequantized_tokens_on_the_gpu(tiny_deepseek_v4, monkeypatch):
    """bf16 on the GPU: the FP8 GEMV decode (fp32 sums, as cuBLAS) against the dequantized model, with CUDA
    graphs (whose replays must find the GEMV's split-K counters at zero) and eager."""
    prompts = random_prompts(VOCAB, (3, 21, 60, 117, 200), seed=5)
    for eager in (True, False):
        options = dict(device="cuda", dtype="bfloat16", block_size=16, max_num_batched_tokens=64,
                       enforce_eager=eager, num_gpu_blocks=256)
        dense, want = _generate(tiny_deepseek_v4, (), monkeypatch, prompts, max_tokens=16, **options)
        del dense
        free_gpu()
        kept, got = _generate(tiny_deepseek_v4, ("cuda",), monkeypatch, prompts, max_tokens=16, **options)
        assert isinstance(kept.engine.model.layers[0].attn.wq_a_kv, Fp8Projection)
        del kept
        free_gpu()
        assert got == want, f"enforce_eager={eager}"
