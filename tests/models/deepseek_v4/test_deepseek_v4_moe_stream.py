"""DeepSeek V4's side stream (models/deepseek_v4/streams.py): the MoE's shared expert on it gives the same outputs
as on one stream, eagerly and replayed from a CUDA graph (where the two chains become parallel branches), with
inputs changed between replays; the whole tiny model (the attention's compressed branch on it too) gives one
stream's greedy tokens through CUDA graphs."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from models.deepseek_v4 import moe, streams
from models.deepseek_v4.linear import Linears
from runtime import LLM, SamplingParams
from runtime.loader import init_dummy_weights
from tools.gpu_parity import free_gpu
from tools.parity import random_prompts

# MXFP4 experts and FP8 linears at widths their GPU kernels tile (128 x 128 FP8 blocks)
CONFIG = SimpleNamespace(hidden_size=256, n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=128,
                         routed_scaling_factor=1.5, scoring_func="sqrtsoftplus", swiglu_limit=10.0,
                         expert_dtype="fp4", vocab_size=64)


def _block(hashed: bool, seed: int) -> moe.MoE:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            block = moe.MoE(CONFIG, hashed=hashed, linears=Linears((128, 128)))
    finally:
        torch.set_default_dtype(previous)
    init_dummy_weights(block, seed=seed, low=-0.05, high=0.05)
    return block.eval()


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 3])
def test_shared_expert_stream_matches_one_stream(tokens, monkeypatch):
    blocks = [_block(hashed=i == 0, seed=i) for i in range(3)]
    x = torch.randn(tokens, CONFIG.hidden_size, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, CONFIG.vocab_size, (tokens,), device="cuda")

    def run():
        h, outs = x, []
        for block in blocks:                     # each block's input depends on the one before
            routed, shared = block.parts(h, ids)
            outs += [routed, shared]
            h = (routed + shared).to(torch.bfloat16)
        return outs

    with torch.inference_mode():
        monkeypatch.setattr(streams, "SIDE_STREAMS", False)
        expected = run()
        monkeypatch.setattr(streams, "SIDE_STREAMS", True)
        eager = run()
        for a, b in zip(expected, eager):
            assert torch.equal(a, b)
        assert any(t.abs().max() > 0 for t in expected[1::2])          # the shared expert did contribute
        run()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = run()
        for _ in range(2):                       # new inputs each replay
            x.copy_(torch.randn_like(x))
            ids.copy_(torch.randint_like(ids, CONFIG.vocab_size))
            graph.replay()
            monkeypatch.setattr(streams, "SIDE_STREAMS", False)
            expected = run()
            monkeypatch.setattr(streams, "SIDE_STREAMS", True)
            torch.cuda.synchronize()
            for a, b in zip(expected, captured):
                assert torch.equal(a, b)


@pytest.mark.gpu
def test_side_streams_give_one_streams_greedy_tokens(tiny_deepseek_v4, monkeypatch):
    """fp32 (exact comparison), CUDA graphs, prompts whose CSA / HCA entries close at other positions than the
    capture's."""
    prompts = random_prompts(512, (3, 40, 200, 77), seed=4)
    tokens = {}
    for side in (False, True):
        monkeypatch.setattr(streams, "SIDE_STREAMS", side)
        llm = LLM(str(tiny_deepseek_v4), device="cuda", dtype="float32", skip_tokenizer_init=True,
                  num_gpu_blocks=512, block_size=16, max_num_batched_tokens=256, max_num_seqs=4)
        outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                               use_tqdm=False)
        tokens[side] = [o.token_ids for o in outputs]
        del llm
        free_gpu()
    assert tokens[True] == tokens[False]
