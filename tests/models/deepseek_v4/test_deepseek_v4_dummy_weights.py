"""`--load-format dummy` gives every parameter a valid value, the packed ones included: MXFP4 experts get random
codes and finite power-of-two scales, the hash layers' token -> experts table k distinct experts per token.
(Uninitialised memory there made benchmarks route every token of a hash layer to one expert, or read NaN
scales.)"""
from __future__ import annotations

import torch

from runtime import LLM


def test_dummy_weights_fill_packed_experts_and_the_hash_table(tiny_deepseek_v4):
    model = LLM(str(tiny_deepseek_v4), device="cpu", dtype="float32", num_gpu_blocks=32, load_format="dummy",
                skip_tokenizer_init=True).engine.model
    experts = model.layers[0].ffn.experts
    assert experts.packed
    for blocks, scales in ((experts.w13_blocks, experts.w13_scales), (experts.w2_blocks, experts.w2_scales)):
        assert blocks.unique().numel() > 200                                  # random codes, not one pattern
        assert scales.min() >= 127 - 9 and scales.max() <= 127 - 4            # 2^-9 .. 2^-4, never 0xFF (NaN)
    gate = model.layers[0].ffn.gate
    assert gate.hashed
    table, experts_count = gate.tid2eid, gate.weight.shape[0]
    assert table.min() >= 0 and table.max() < experts_count
    assert (table.sort(dim=-1).values.diff(dim=-1) > 0).all()                  # distinct experts per token
    assert table[:, 0].unique().numel() > 1
    again = LLM(str(tiny_deepseek_v4), device="cpu", dtype="float32", num_gpu_blocks=32, load_format="dummy",
                skip_tokenizer_init=True).engine.model
    assert torch.equal(again.layers[0].ffn.gate.tid2eid, table)               # the same on every rank / run
