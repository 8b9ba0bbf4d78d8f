"""The gate + routing launch (runtime.ops.moe.gate_score_topk) against its reference, score_topk_ref of the
linear's logits rounded to the input dtype: in the interpreter on CPU (fp32, ragged shapes: experts that do not
fill a program, K that does not fill a split, 1-16 rows, a bias, a table) and, marked `gpu`, in bf16 at DeepSeek V4
Flash's gate [256, 4096] with the launch replayed from a CUDA graph (its arrival counter left at zero)."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from runtime.ops import moe  # noqa: E402


@pytest.fixture
def interpreter():
    from triton.runtime.interpreter import InterpretedFunction
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the kernel is checked by the gpu test")
    if not isinstance(moe._gate_route_kernel, InterpretedFunction):
        pytest.skip("the kernels were built for a GPU: TRITON_INTERPRET was unset when runtime.ops was imported")


def _by_expert(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = ids.argsort(dim=-1)
    return ids.gather(1, order), weights.gather(1, order)


def _reference(x, weight, top_k, scoring, bias=None, table=None, rows=None, scaling=1.0):
    logits = torch.nn.functional.linear(x.float(), weight.float()).to(x.dtype)
    fixed = table[rows] if table is not None else None
    return moe.score_topk_ref(logits, top_k, scoring, selection_bias=bias, fixed_ids=fixed, scaling=scaling)


def _inputs(rows, experts, k, seed, dtype=torch.float32, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=generator)
    weight = torch.randn(experts, k, generator=generator) * (3.0 / k ** 0.5)       # logits of a few units
    bias = torch.randn(experts, generator=generator) * 0.3
    return x.to(dtype).to(device), weight.to(dtype).to(device), bias.to(device)


@pytest.mark.parametrize("rows,experts,k,top_k", [(1, 24, 96, 1), (3, 40, 1024 + 32, 6), (16, 256, 512, 8)])
@pytest.mark.parametrize("scoring", ["sqrtsoftplus", "sigmoid"])
def test_gate_route_kernel_matches_reference(interpreter, rows, experts, k, top_k, scoring):
    x, weight, bias = _inputs(rows, experts, k, seed=rows + experts)
    counters = torch.zeros(1, dtype=torch.int32)
    weights, ids = moe.gate_score_topk_triton(x, weight, top_k, scoring, selection_bias=bias, scaling=1.5,
                                              counters=counters)
    expected_weights, expected_ids = _reference(x, weight, top_k, scoring, bias=bias, scaling=1.5)
    ids, weights = _by_expert(weights, ids)
    expected_ids, expected_weights = _by_expert(expected_weights, expected_ids)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)
    assert counters.item() == 0                                          # left at zero for the next launch
    unbiased = _reference(x, weight, top_k, scoring, scaling=1.5)[1].sort(dim=-1).values
    assert top_k == 1 or not torch.equal(unbiased, expected_ids)        # the bias changed some choices


def test_gate_route_kernel_takes_the_experts_of_a_table_row(interpreter):
    x, weight, _ = _inputs(5, 24, 160, seed=3)
    generator = torch.Generator().manual_seed(4)
    table = torch.stack([torch.randperm(24, generator=generator)[:3] for _ in range(11)])    # 11 token ids
    rows = torch.tensor([7, 0, 10, 7, 2])
    weights, ids = moe.gate_score_topk_triton(x, weight, 3, "sqrtsoftplus", fixed_ids=table, table_rows=rows,
                                              scaling=1.5)
    expected_weights, expected_ids = _reference(x, weight, 3, "sqrtsoftplus", table=table, rows=rows, scaling=1.5)
    assert torch.equal(ids, table[rows]) and torch.equal(expected_ids, table[rows])
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)


def test_gate_score_topk_falls_back_to_linear_and_routing_on_cpu():
    """(on a GPU too, from GATE_ROUTE_MAX_ROWS + 1 rows)"""
    x, weight, bias = _inputs(4, 24, 64, seed=5)
    weights, ids = moe.gate_score_topk(x, weight, 4, "sqrtsoftplus", selection_bias=bias, scaling=2.0)
    expected_weights, expected_ids = _reference(x, weight, 4, "sqrtsoftplus", bias=bias, scaling=2.0)
    assert torch.equal(ids, expected_ids) and torch.equal(weights, expected_weights)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_gate_route_kernel_matches_reference_on_gpu_in_a_graph(rows):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x, weight, bias = _inputs(rows, 256, 4096, seed=rows, dtype=torch.bfloat16, device="cuda")
    table = torch.stack([torch.randperm(256)[:6] for _ in range(64)]).cuda()
    token_ids = torch.randint(0, 64, (rows,), device="cuda")
    counters = torch.zeros(1, dtype=torch.int32, device="cuda")

    def route():
        return (moe.gate_score_topk_triton(x, weight, 6, "sqrtsoftplus", selection_bias=bias, scaling=1.5,
                                           counters=counters),
                moe.gate_score_topk_triton(x, weight, 6, "sqrtsoftplus", fixed_ids=table, table_rows=token_ids,
                                           scaling=1.5, counters=counters))

    route()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        scored, hashed = route()
    for seed in range(3):                                               # new rows each replay
        generator = torch.Generator().manual_seed(100 + seed)
        x.copy_(torch.randn(x.shape, generator=generator).to(x))
        token_ids.copy_(torch.randint(0, 64, (rows,), generator=generator))
        graph.replay()
        torch.cuda.synchronize()
        expected_weights, expected_ids = _reference(x, weight, 6, "sqrtsoftplus", bias=bias, scaling=1.5)
        ids, weights = _by_expert(scored[0], scored[1])
        expected_ids, expected_weights = _by_expert(expected_weights, expected_ids)
        # the logits' fp32 sums run in another order than cuBLAS's: a logit may round to the neighbouring bf16
        # value, which can swap two experts whose biased scores tie at bf16 precision (rare at 6 of 256)
        same = (ids == expected_ids).all(dim=-1)
        assert (~same).sum() <= 1
        torch.testing.assert_close(weights[same].float(), expected_weights[same].float(), rtol=2e-2, atol=1e-3)
        hashed_weights, hashed_expected = hashed[0], _reference(x, weight, 6, "sqrtsoftplus", table=table,
                                                                rows=token_ids, scaling=1.5)[0]
        assert torch.equal(hashed[1], table[token_ids])
        torch.testing.assert_close(hashed_weights.float(), hashed_expected.float(), rtol=2e-2, atol=1e-3)
        assert counters.item() == 0
