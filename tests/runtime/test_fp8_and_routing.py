"""The FP8 block-scale format agrees with transformers' dequantizer bit for bit, and score_topk routes as
transformers' DeepSeek V4 routers do (sqrt-softplus scores, a bias that only selects, a fixed id table)."""
from __future__ import annotations

import pytest
import torch

from runtime.ops import score_topk
from runtime.ops.fp8 import fp8_block_dequantize, fp8_block_quantize


@pytest.mark.parametrize("block", [(16, 32), (32, 16), (128, 128)])
def test_fp8_dequantize_matches_transformers_for_non_square_blocks(block):
    # imported here: the GPU machine's older transformers lacks it, and `pytest -m gpu` still collects this file
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 384, generator=generator) * torch.logspace(-3, 2, 384)     # very uneven columns
    quantized, scale = fp8_block_quantize(weight, block)
    assert scale.shape == (256 // block[0], 384 // block[1]) and scale.dtype == torch.float8_e8m0fnu
    ours = fp8_block_dequantize(quantized, scale)
    assert torch.equal(ours, _dequantize_fp8_weight(quantized, scale, list(block), torch.float32))
    step = scale.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1) * 2.0 ** -9   # subnormals
    assert ((ours - weight).abs() <= weight.abs() / 16 + step).all()                     # 3 mantissa bits


def test_fp8_scale_grid_that_does_not_tile_is_refused_by_name():
    quantized, scale = fp8_block_quantize(torch.randn(64, 96), (16, 32))
    with pytest.raises(ValueError, match="layers.0.wq_a"):
        fp8_block_dequantize(quantized, scale[:, :2].contiguous().view(torch.uint8)[:, :1].view(torch.float8_e8m0fnu)
                             .expand(4, 5).contiguous(), name="layers.0.wq_a")


def _hf_router(logits, bias, top_k, scaling):
    scores = torch.nn.functional.softplus(logits).sqrt()
    ids = torch.topk(scores + bias, top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * scaling, ids


def test_sqrtsoftplus_routing_selects_with_the_bias_and_weights_without_it():
    generator = torch.Generator().manual_seed(0)
    logits, bias = torch.randn(33, 16, generator=generator), torch.randn(16, generator=generator)
    weights, ids = score_topk(logits, 4, "sqrtsoftplus", selection_bias=bias, scaling=1.5)
    expected_weights, expected_ids = _hf_router(logits, bias, 4, 1.5)
    assert torch.equal(ids, expected_ids) and torch.equal(weights, expected_weights)
    unbiased_ids = score_topk(logits, 4, "sqrtsoftplus")[1]
    assert not torch.equal(unbiased_ids.sort(dim=-1).values, ids.sort(dim=-1).values)
    assert torch.allclose(weights.sum(dim=-1), torch.full((33,), 1.5))


def test_fixed_ids_route_by_table_and_weight_by_score():
    logits = torch.randn(5, 8)
    table = torch.tensor([[3, 1], [0, 7], [2, 5], [6, 4], [1, 0]])
    weights, ids = score_topk(logits, 2, "sqrtsoftplus", fixed_ids=table)
    scores = torch.nn.functional.softplus(logits).sqrt().gather(1, table)
    assert torch.equal(ids, table) and torch.allclose(weights, scores / scores.sum(dim=-1, keepdim=True))
