"""The Triton kernels of runtime/ops against their torch references: in the interpreter on CPU (fp32 and fp16,
small ragged shapes) and, marked `gpu`, in bf16 at Qwen3 shapes and inside CUDA graphs.

Tolerances are stated in units in the last place (ulps) of the output dtype. Where a kernel repeats every
rounding of its reference, the two differ only where an fp32 intermediate (a sum of squares, an exp, a matmul
accumulated in another order) lands on the other side of a rounding boundary of the output dtype: at most one
unit, and rarely, so those tests also bound the fraction of elements that differ at all. That fraction is what
would expose a rounding done in the wrong place (e.g. the weight multiplied before the cast instead of after)."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # triton reads this when a kernel is defined (runtime.ops import), not when it is launched; tests/conftest.py
    # sets it too, before any test module imports runtime.ops
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from runtime.ops import activation, moe, norm, rope  # noqa: E402
from runtime.ops.rope import RotaryEmbedding  # noqa: E402

# ---- helpers ----------------------------------------------------------------------------------------

SIGNIFICAND_BITS = {torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}


def ulps_apart(ours: torch.Tensor, expected: torch.Tensor, unit: torch.dtype | None = None) -> torch.Tensor:
    """|ours - expected| in units of the last place at |expected| of `unit` (default: expected's dtype)."""
    assert ours.dtype == expected.dtype, f"kernel returned {ours.dtype}, reference {expected.dtype}"
    dtype = unit or expected.dtype
    smallest_normal_exponent = torch.frexp(torch.tensor(torch.finfo(dtype).tiny, dtype=torch.float64)).exponent
    exponent = torch.frexp(expected.double()).exponent.clamp(min=smallest_normal_exponent.item())
    ulp = torch.ldexp(torch.ones_like(expected, dtype=torch.float64), exponent - SIGNIFICAND_BITS[dtype])
    return (ours.double() - expected.double()).abs() / ulp


def assert_rounds_like(ours: torch.Tensor, expected: torch.Tensor, max_ulps: float, max_mismatch: float,
                       unit: torch.dtype | None = None) -> None:
    """Every element within `max_ulps` (of `unit`), and at most a fraction `max_mismatch` not bit-identical."""
    apart = ulps_apart(ours, expected, unit)
    assert apart.max().item() <= max_ulps, f"{apart.max().item():.2f} ulps apart (allowed {max_ulps})"
    mismatch = (ours != expected).double().mean().item()
    assert mismatch <= max_mismatch, f"{mismatch:.2%} of elements differ (allowed {max_mismatch:.2%})"


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
          scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=generator)).to(dtype).to(device)


@pytest.fixture
def interpreter():
    from triton.runtime.interpreter import InterpretedFunction
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the kernels are checked by the gpu tests")
    if not isinstance(norm._rms_norm_kernel, InterpretedFunction):
        pytest.skip("the kernels were built for a GPU: TRITON_INTERPRET was unset when runtime.ops was imported")


def needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


# Per dtype: how far an fp32-intermediate difference can move the output. fp32 outputs carry the intermediate's
# own error (a few ulps: reduction order, rsqrt/exp implementations). fp16/bf16 outputs round it away except in
# rare ties, where one rounding flips by a unit; when the reference then multiplies the flipped value (silu * up,
# normed * weight) and rounds again, the product can be two units apart.
ROUNDED = {torch.float32: dict(max_ulps=4, max_mismatch=1.0),
           torch.float16: dict(max_ulps=2, max_mismatch=1e-2),
           torch.bfloat16: dict(max_ulps=2, max_mismatch=1e-3)}


# ---- RMSNorm ----------------------------------------------------------------------------------------


def norm_case(num_tokens: int, hidden: int, dtype: torch.dtype, weight_dtype: torch.dtype, device: str = "cpu"):
    x = randn(num_tokens, hidden, seed=1, dtype=dtype, device=device)
    residual = randn(num_tokens, hidden, seed=2, dtype=dtype, device=device)
    weight = (1.0 + randn(hidden, seed=3, scale=0.3)).to(weight_dtype).to(device)
    return x, residual, weight


@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("weight_in_fp32", [False, True])
@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                                (torch.float16, torch.float32)])
def test_rms_norm_kernel_matches_reference_with_residual(interpreter, num_tokens, weight_in_fp32, dtype,
                                                         weight_dtype):
    x, residual, weight = norm_case(num_tokens, 100, dtype, weight_dtype)
    out, summed = norm.rms_norm_triton(x, weight, 1e-6, residual, weight_in_fp32)
    expected_out, expected_sum = norm.rms_norm_ref(x, weight, 1e-6, residual, weight_in_fp32)
    assert torch.equal(summed, expected_sum)              # the sum is one rounding of x + residual, as in torch
    if expected_out.dtype == dtype:
        assert_rounds_like(out, expected_out, **ROUNDED[dtype])
    else:   # an fp32 weight times normed rounded to fp16: a flip of that rounding, scaled by the weight
        assert expected_out.dtype == torch.float32
        assert_rounds_like(out, expected_out, max_ulps=2, max_mismatch=ROUNDED[dtype]["max_mismatch"], unit=dtype)


@pytest.mark.parametrize("weight_in_fp32", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_kernel_matches_reference_without_residual(interpreter, weight_in_fp32, dtype):
    x, _, weight = norm_case(7, 1000, dtype, dtype)           # hidden 1000: one row per program, masked tail
    out = norm.rms_norm_triton(x, weight, 1e-5, None, weight_in_fp32)
    assert_rounds_like(out, norm.rms_norm_ref(x, weight, 1e-5, None, weight_in_fp32), **ROUNDED[dtype])


def test_rms_norm_kernel_rounding_order_is_observable(interpreter):
    """The mismatch bound above is tight enough to tell the two weight orders apart: if it were not, a kernel
    with the order swapped would pass the tests."""
    x, _, weight = norm_case(33, 100, torch.float16, torch.float16)
    out = norm.rms_norm_triton(x, weight, 1e-6, None, weight_in_fp32=False)
    other_order = norm.rms_norm_ref(x, weight, 1e-6, None, weight_in_fp32=True)
    assert (out != other_order).double().mean().item() > 10 * ROUNDED[torch.float16]["max_mismatch"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_kernel_reads_heads_out_of_a_fused_projection(interpreter, dtype):
    """Per-head QK norm: q is a strided view of the qkv output ([tokens, heads, head_dim], row stride of qkv)."""
    num_tokens, heads, kv_heads, head_dim = 7, 6, 2, 48
    qkv = randn(num_tokens, (heads + 2 * kv_heads) * head_dim, seed=4, dtype=dtype)
    q = qkv[:, :heads * head_dim].view(num_tokens, heads, head_dim)
    weight = (1.0 + randn(head_dim, seed=5, scale=0.3)).to(dtype)
    out = norm.rms_norm_triton(q, weight, 1e-6)
    assert out.shape == q.shape
    assert_rounds_like(out, norm.rms_norm_ref(q, weight, 1e-6), **ROUNDED[dtype])


# ---- RoPE -------------------------------------------------------------------------------------------


def rope_case(num_tokens: int, heads: int, kv_heads: int, head_dim: int, rotary_dim: int, style: str,
              dtype: torch.dtype, device: str = "cpu"):
    """q and k as strided views of one qkv tensor, positions anywhere in the table."""
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
    rotary = RotaryEmbedding(inv_freq, max_positions=40960, scale=1.0, style=style).to(device)
    qkv = randn(num_tokens, (heads + 2 * kv_heads) * head_dim, seed=6, dtype=dtype, device=device)
    q = qkv[:, :heads * head_dim].view(num_tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(num_tokens, kv_heads, head_dim)
    positions = torch.randint(0, 40960, (num_tokens,), generator=torch.Generator().manual_seed(7)).to(device)
    return rotary, positions, q, k


# The kernel repeats the reference's roundings (cos/sin to x's dtype, each product, the sum) in the same order,
# and the interpreter does not contract a product and a sum into an FMA: the results are bit-identical.
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (80, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_kernel_matches_reference_bit_for_bit(interpreter, style, head_dim, rotary_dim, dtype):
    rotary, positions, q, k = rope_case(7, 6, 2, head_dim, rotary_dim, style, dtype)
    q_out, k_out = rope.rope_triton(positions, q, k, rotary.cos_sin, style)
    q_expected, k_expected = rotary(positions, q, k)                          # the reference on CPU
    torch.testing.assert_close(q_out, q_expected, rtol=0, atol=0)
    torch.testing.assert_close(k_out, k_expected, rtol=0, atol=0)


@pytest.mark.parametrize("num_tokens", [1, 33])
def test_rope_kernel_matches_reference_for_one_and_many_tokens(interpreter, num_tokens):
    rotary, positions, q, k = rope_case(num_tokens, 5, 1, 32, 32, "neox", torch.float16)
    q_out, k_out = rope.rope_triton(positions, q, k, rotary.cos_sin, "neox")
    q_expected, k_expected = rotary(positions, q, k)
    torch.testing.assert_close(q_out, q_expected, rtol=0, atol=0)
    torch.testing.assert_close(k_out, k_expected, rtol=0, atol=0)


# ---- SiLU-and-mul -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 96), (7, 200), (33, 2 * 1500), (2, 5, 2 * 40)])   # d = 1500: two blocks
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_and_mul_kernel_matches_reference(interpreter, shape, dtype):
    x = randn(*shape, seed=8, dtype=dtype, scale=3.0)
    out = activation.silu_and_mul_triton(x)
    expected = activation.silu_and_mul_ref(x)
    assert out.shape == expected.shape
    assert_rounds_like(out, expected, **ROUNDED[dtype])


@pytest.mark.parametrize("limit", [None, 7.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_mul_kernel_on_separate_halves_matches_reference(interpreter, limit, dtype):
    """Gate and up from separate projections (up a strided view), with and without the clamped SwiGLU's limit
    (scale 6: a share of both halves past it)."""
    gate = randn(9, 1500, seed=21, dtype=dtype, scale=6.0)
    up = randn(9, 2 * 1500, seed=22, dtype=dtype, scale=6.0)[:, 1500:]
    out = activation.silu_mul_triton(gate, up, limit)
    expected = activation.silu_mul_ref(gate, up, limit)
    assert out.shape == expected.shape
    if limit is not None:
        assert (gate > limit).any() and (up.abs() > limit).any()
    assert_rounds_like(out, expected, **ROUNDED[dtype])


@pytest.mark.parametrize("shape", [(7, 200), (2, 5, 2 * 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gelu_tanh_and_mul_kernel_matches_reference(interpreter, shape, dtype):
    x = randn(*shape, seed=8, dtype=dtype, scale=3.0)
    out = activation.silu_and_mul_triton(x, activation="gelu_tanh")
    expected = activation.gelu_tanh_and_mul_ref(x)
    assert out.shape == expected.shape
    # torch computes 0.5 * x * (1 + tanh(u)), which cancels for negative x: only the absolute error is small
    atol = 4 * torch.finfo(dtype).eps * expected.abs().max().item()
    torch.testing.assert_close(out, expected, rtol=0, atol=atol)


# ---- MoE routing ------------------------------------------------------------------------------------


def distinct_logits(num_tokens: int, num_experts: int, dtype: torch.dtype, seed: int,
                    device: str = "cpu") -> torch.Tensor:
    """Router logits without ties in any row (exact multiples of 1/16 in every float dtype), so the top-k set
    is unique: torch.topk does not say which of two equal probabilities it keeps."""
    generator = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(num_experts, generator=generator) for _ in range(num_tokens)])
    return ((ranks.float() - num_experts / 2) / 16).to(dtype).to(device)


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 10, 1), (7, 10, 3), (33, 60, 8)])
@pytest.mark.parametrize("renormalize", [False, True])
def test_softmax_topk_kernel_matches_reference(interpreter, num_tokens, num_experts, top_k, renormalize):
    logits = distinct_logits(num_tokens, num_experts, torch.float32, seed=9)
    weights, ids = moe.softmax_topk_triton(logits, top_k, renormalize)
    expected_weights, expected_ids = moe.softmax_topk_ref(logits, top_k, renormalize)
    assert ids.dtype == expected_ids.dtype and torch.equal(ids, expected_ids)
    assert_rounds_like(weights, expected_weights, **ROUNDED[torch.float32])


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 10, 1), (7, 10, 3), (33, 60, 8)])
def test_softmax_after_topk_kernel_matches_reference(interpreter, num_tokens, num_experts, top_k):
    """Top k of the logits, softmax over those k only; the logits are negative and positive."""
    logits = distinct_logits(num_tokens, num_experts, torch.float32, seed=11)
    weights, ids = moe.softmax_topk_triton(logits, top_k, False, softmax_after_topk=True)
    expected_weights, expected_ids = moe.softmax_topk_ref(logits, top_k, False, softmax_after_topk=True)
    assert torch.equal(ids, expected_ids)
    assert_rounds_like(weights, expected_weights, **ROUNDED[torch.float32])
    chosen = torch.topk(logits, top_k, dim=-1).values
    torch.testing.assert_close(expected_weights, torch.softmax(chosen, dim=-1), rtol=0, atol=0)


def test_softmax_topk_kernel_applies_per_expert_scales(interpreter):
    logits = distinct_logits(7, 10, torch.float32, seed=9)
    expert_scale = 1.0 + randn(10, seed=3)
    weights, ids = moe.softmax_topk_triton(logits, 3, True, expert_scale)
    expected_weights, expected_ids = moe.softmax_topk_ref(logits, 3, True, expert_scale)
    unscaled, _ = moe.softmax_topk_ref(logits, 3, True)
    assert torch.equal(ids, expected_ids)
    assert_rounds_like(weights, expected_weights, **ROUNDED[torch.float32])
    assert (expected_weights - unscaled).abs().max() > 0.01


def test_softmax_topk_kernel_returns_weights_in_the_logits_dtype(interpreter):
    logits = distinct_logits(7, 12, torch.float16, seed=10)
    weights, ids = moe.softmax_topk_triton(logits, 4, renormalize=True)
    expected_weights, expected_ids = moe.softmax_topk_ref(logits, 4, renormalize=True)
    assert torch.equal(ids, expected_ids)
    assert_rounds_like(weights, expected_weights, **ROUNDED[torch.float16])


def _by_expert(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's (ids, weights) sorted by expert id: score_topk's reference returns the k in no set order."""
    order = ids.argsort(dim=-1)
    return ids.gather(1, order), weights.gather(1, order)


def router_logits(num_tokens: int, num_experts: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Logits over softplus's three regimes: far below zero, around it, above its linear threshold of 20."""
    logits = randn(num_tokens, num_experts, seed=seed, scale=4.0)
    logits[:, 0], logits[:, -1] = -30.0 + logits[:, 0], 25.0 + logits[:, -1]
    return logits.to(dtype)


@pytest.mark.parametrize("scoring", ["sqrtsoftplus", "sigmoid", "softmax"])
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 10, 1), (7, 24, 6), (33, 60, 8), (3, 256, 6), (2, 200, 6)])
def test_score_topk_kernel_matches_reference(interpreter, scoring, num_tokens, num_experts, top_k):
    """The experts chosen by score + an fp32 selection-only bias (distinct sums), the weights renormalized from
    the unbiased scores and scaled. fp32 here: the interpreter truncates fp32 -> bf16 where the GPU rounds to
    nearest, so the rounding steps in bf16 are checked on the GPU (below)."""
    dtype = torch.float32
    logits = router_logits(num_tokens, num_experts, dtype, seed=21)
    bias = randn(num_experts, seed=22)
    weights, ids = moe.score_topk_triton(logits, top_k, scoring, selection_bias=bias, scaling=2.5)
    expected_weights, expected_ids = moe.score_topk_ref(logits, top_k, scoring, selection_bias=bias, scaling=2.5)
    ids, weights = _by_expert(weights, ids)
    expected_ids, expected_weights = _by_expert(expected_weights, expected_ids)
    assert weights.dtype == dtype and torch.equal(ids, expected_ids)
    assert_rounds_like(weights, expected_weights, **ROUNDED[dtype])
    unbiased = moe.score_topk_ref(logits, top_k, scoring, scaling=2.5)[1].sort(dim=-1).values
    assert top_k == 1 or not torch.equal(unbiased, expected_ids)        # the bias changed some choices


@pytest.mark.parametrize("num_experts", [256, 200, 32])
def test_route_topk_kernel_breaks_ties_toward_the_lower_expert(interpreter, num_experts):
    """Logits from a few values, so most rows tie at the top (-0.0 beside 0.0 too), at 256 experts (one warp),
    a width that pads to 256, and 32: the k come in falling order, equal logits by rising expert id, which is
    what a stable sort of the negated logits gives."""
    generator = torch.Generator().manual_seed(5)
    values = torch.tensor([-2.0, -0.0, 0.0, 0.5, 1.0, 1.0])
    logits = values[torch.randint(0, len(values), (5, num_experts), generator=generator)]
    weights, ids = moe.softmax_topk_triton(logits, 6, False, softmax_after_topk=True)
    expected_ids = torch.argsort(-logits, dim=-1, stable=True)[:, :6]
    assert torch.equal(ids, expected_ids)
    assert_rounds_like(weights, torch.softmax(logits.gather(1, expected_ids), dim=-1), **ROUNDED[torch.float32])


def test_score_topk_kernel_takes_the_experts_of_a_table(interpreter):
    dtype = torch.float32
    logits = router_logits(9, 16, dtype, seed=23)
    table = routing_ids(9, 16, 3, seed=24)
    weights, ids = moe.score_topk_triton(logits, 3, "sqrtsoftplus", fixed_ids=table, scaling=1.5)
    expected_weights, expected_ids = moe.score_topk_ref(logits, 3, "sqrtsoftplus", fixed_ids=table, scaling=1.5)
    assert torch.equal(ids, table) and torch.equal(expected_ids, table)
    assert_rounds_like(weights, expected_weights, **ROUNDED[dtype])


# ---- MoE alignment ----------------------------------------------------------------------------------


def routing_ids(num_tokens: int, num_experts: int, top_k: int, seed: int, skip_experts=()) -> torch.Tensor:
    """[num_tokens, top_k] distinct experts per token, never one of `skip_experts`."""
    generator = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(num_experts) if e not in skip_experts])
    return torch.stack([allowed[torch.randperm(len(allowed), generator=generator)[:top_k]]
                        for _ in range(num_tokens)])


alignment_cases = pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m,skip", [
    (1, 6, 2, 16, ()),                   # fewer pairs than one block
    (7, 6, 3, 4, (2,)),                  # an expert with no pair
    (8, 4, 2, 4, (0, 3)),                # every run an exact multiple of block_m: no padding rows
    (33, 10, 1, 16, (0, 9)),             # top-1, empty first and last experts
    (300, 5, 2, 16, ()),                 # several chunks of pairs
])


@alignment_cases
def test_alignment_reference_puts_every_pair_once_in_blocks_of_its_expert(num_tokens, num_experts, top_k,
                                                                          block_m, skip):
    ids = routing_ids(num_tokens, num_experts, top_k, seed=11, skip_experts=skip)
    alignment = moe.align_by_expert_ref(ids, num_experts, block_m)
    num_pairs = ids.numel()
    blocks = alignment.sorted_pair_ids.view(-1, block_m)
    real = blocks[blocks < num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs))
    for block, expert in zip(blocks, alignment.block_expert.tolist()):
        pairs = block[block < num_pairs].long()
        if expert < 0:
            assert pairs.numel() == 0
        else:
            assert pairs.numel() > 0 and (ids.flatten()[pairs] == expert).all()
            assert torch.equal(pairs, pairs.sort().values)      # an expert's pairs keep their order


def assert_same_alignment(ours: moe.ExpertAlignment, expected: moe.ExpertAlignment, num_pairs: int) -> None:
    """Same blocks per expert, same pairs in each expert's run, padding at the end of each run. The kernel
    takes rows by atomic increments, so the pairs inside a run may come in another order."""
    assert torch.equal(ours.block_expert, expected.block_expert)
    row_expert = expected.block_expert.long().repeat_interleave(expected.block_m)
    row_expert = torch.where(row_expert < 0, row_expert.max() + 1, row_expert)      # unused blocks sort last

    def by_run(sorted_pair_ids: torch.Tensor) -> torch.Tensor:
        return torch.sort(row_expert * (num_pairs + 1) + sorted_pair_ids.long()).values

    assert torch.equal(by_run(ours.sorted_pair_ids), by_run(expected.sorted_pair_ids))
    # padding rows (id num_pairs) are exactly where the reference has them: after each run's pairs
    assert torch.equal(ours.sorted_pair_ids == num_pairs, expected.sorted_pair_ids == num_pairs)


@alignment_cases
def test_alignment_kernel_matches_reference(interpreter, num_tokens, num_experts, top_k, block_m, skip):
    ids = routing_ids(num_tokens, num_experts, top_k, seed=11, skip_experts=skip)
    ours = moe.align_by_expert_triton(ids, num_experts, block_m)
    assert_same_alignment(ours, moe.align_by_expert_ref(ids, num_experts, block_m), ids.numel())


# ---- fused MoE --------------------------------------------------------------------------------------


def moe_case(num_tokens: int, num_experts: int, hidden: int, inter: int, top_k: int, dtype: torch.dtype,
             skip_experts=(), device: str = "cpu"):
    """Weights scaled so every activation is O(1); routing through the reference router."""
    x = randn(num_tokens, hidden, seed=12, dtype=dtype, device=device)
    w13 = randn(num_experts, 2 * inter, hidden, seed=13, dtype=dtype, device=device, scale=hidden ** -0.5)
    w2 = randn(num_experts, hidden, inter, seed=14, dtype=dtype, device=device, scale=inter ** -0.5)
    logits = randn(num_tokens, num_experts, seed=15, dtype=dtype, device=device)
    logits[:, list(skip_experts)] = -30.0                    # these experts never make the top k
    weights, ids = moe.softmax_topk_ref(logits, top_k, renormalize=True)
    return x, w13, w2, weights, ids


# The kernels round where the reference rounds; what differs is the fp32 accumulation order of the matmuls and
# of the sum over k (the reference adds one pair at a time in x's dtype, the kernel sums in fp32 and rounds once).
# fp32: accumulation order over K = 80 / 48 terms, a few ulps of the output scale; fp16: one rounding flip of an
# intermediate, or of a partial sum, at the output scale.
MOE_ATOL_ULPS = {torch.float32: 8, torch.float16: 2}


@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_moe_kernel_matches_reference(interpreter, num_tokens, dtype):
    # hidden 80 and inter 48 are not multiples of the 32-wide tiles; experts 1 and 4 get no token
    x, w13, w2, weights, ids = moe_case(num_tokens, 6, 80, 48, 2, dtype, skip_experts=(1, 4))
    assert not torch.isin(ids, torch.tensor([1, 4])).any()
    tiles = moe.MoeTiles(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2)
    out = moe.fused_moe_triton(x, w13, w2, weights, ids, tiles)
    expected = moe.fused_moe_ref(x, w13, w2, weights, ids)
    atol = MOE_ATOL_ULPS[dtype] * torch.finfo(dtype).eps * expected.abs().max().item()
    torch.testing.assert_close(out, expected, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_moe_kernel_with_gelu_tanh_matches_reference(interpreter, dtype):
    x, w13, w2, weights, ids = moe_case(7, 6, 80, 48, 2, dtype, skip_experts=(1, 4))
    tiles = moe.MoeTiles(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2)
    out = moe.fused_moe_triton(x, w13, w2, weights, ids, tiles, activation="gelu_tanh")
    expected = moe.fused_moe_ref(x, w13, w2, weights, ids, activation="gelu_tanh")
    silu = moe.fused_moe_ref(x, w13, w2, weights, ids)
    atol = MOE_ATOL_ULPS[dtype] * torch.finfo(dtype).eps * expected.abs().max().item()
    torch.testing.assert_close(out, expected, rtol=0, atol=atol)
    assert (expected - silu).abs().max() > 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_moe_kernel_with_clamped_swiglu_matches_reference(interpreter, dtype):
    """A limit low enough that many gates and ups are clamped (both signs of up)."""
    x, w13, w2, weights, ids = moe_case(7, 6, 80, 48, 2, dtype, skip_experts=(1, 4))
    x = x * 4
    tiles = moe.MoeTiles(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2)
    out = moe.fused_moe_triton(x, w13, w2, weights, ids, tiles, swiglu_limit=0.5)
    expected = moe.fused_moe_ref(x, w13, w2, weights, ids, swiglu_limit=0.5)
    unclamped = moe.fused_moe_ref(x, w13, w2, weights, ids)
    atol = MOE_ATOL_ULPS[dtype] * torch.finfo(dtype).eps * expected.abs().max().item()
    torch.testing.assert_close(out, expected, rtol=0, atol=atol)
    assert (expected - unclamped).abs().max() > 10 * atol


def test_fused_moe_kernel_matches_reference_for_a_prefill_sized_batch(interpreter):
    """300 tokens, top-2 of 6 experts: the large-batch tiles (block_m 64), several row blocks per expert."""
    x, w13, w2, weights, ids = moe_case(300, 6, 64, 32, 2, torch.float32, skip_experts=(5,))
    tiles = moe.MoeTiles.for_batch(ids.numel(), 6)
    assert tiles.block_m == 64
    out = moe.fused_moe_triton(x, w13, w2, weights, ids, tiles)
    expected = moe.fused_moe_ref(x, w13, w2, weights, ids)
    atol = MOE_ATOL_ULPS[torch.float32] * torch.finfo(torch.float32).eps * expected.abs().max().item()
    torch.testing.assert_close(out, expected, rtol=0, atol=atol)


# ---- on the GPU: bf16 at real shapes ----------------------------------------------------------------
# Qwen3-0.6B: hidden 1024, 16 q / 8 kv heads, inter 3072; Qwen3-8B: hidden 4096, 32 / 8 heads, inter 12288;
# Qwen3-30B-A3B: hidden 2048, 32 / 4 heads, 128 experts, top-8, moe inter 768. head_dim 128 everywhere.

GPU_TOKENS = [1, 33, 4099]


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [1024, 4096, 2048])
@pytest.mark.parametrize("num_tokens", GPU_TOKENS)
@pytest.mark.parametrize("weight_in_fp32", [False, True])
def test_rms_norm_kernel_bf16_on_gpu(hidden, num_tokens, weight_in_fp32):
    needs_cuda()
    x, residual, weight = norm_case(num_tokens, hidden, torch.bfloat16, torch.bfloat16, device="cuda")
    out, summed = norm.rms_norm_triton(x, weight, 1e-6, residual, weight_in_fp32)
    expected_out, expected_sum = norm.rms_norm_ref(x, weight, 1e-6, residual, weight_in_fp32)
    assert torch.equal(summed, expected_sum)
    assert_rounds_like(out, expected_out, **ROUNDED[torch.bfloat16])
    plain = norm.rms_norm_triton(x, weight, 1e-6, None, weight_in_fp32)
    assert_rounds_like(plain, norm.rms_norm_ref(x, weight, 1e-6, None, weight_in_fp32), **ROUNDED[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads", [(16, 8), (32, 4)])
def test_qk_norm_kernel_bf16_on_gpu(heads, kv_heads):
    needs_cuda()
    qkv = randn(4099, (heads + 2 * kv_heads) * 128, seed=16, dtype=torch.bfloat16, device="cuda")
    q = qkv[:, :heads * 128].view(-1, heads, 128)
    weight = (1.0 + randn(128, seed=17, scale=0.3)).to(torch.bfloat16).cuda()
    assert_rounds_like(norm.rms_norm_triton(q, weight, 1e-6), norm.rms_norm_ref(q, weight, 1e-6),
                       **ROUNDED[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,head_dim,rotary_dim,style", [
    (16, 8, 128, 128, "neox"), (32, 8, 128, 128, "neox"), (32, 4, 128, 128, "neox"),
    (32, 8, 128, 128, "gptj"), (16, 4, 512, 128, "neox"), (16, 4, 256, 64, "gptj")])
@pytest.mark.parametrize("num_tokens", GPU_TOKENS)
def test_rope_kernel_bf16_on_gpu_is_bit_exact(heads, kv_heads, head_dim, rotary_dim, style, num_tokens):
    """Same roundings in the same order; products are rounded to bf16 before the sum, so no FMA can form."""
    needs_cuda()
    rotary, positions, q, k = rope_case(num_tokens, heads, kv_heads, head_dim, rotary_dim, style, torch.bfloat16,
                                        device="cuda")
    q_out, k_out = rope.rope_triton(positions, q, k, rotary.cos_sin, style)
    cos, sin = rotary.cos_sin[positions].chunk(2, dim=-1)
    torch.testing.assert_close(q_out, rope.apply_rope(q, cos, sin, style), rtol=0, atol=0)
    torch.testing.assert_close(k_out, rope.apply_rope(k, cos, sin, style), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("inter", [3072, 12288, 768])
@pytest.mark.parametrize("num_tokens", GPU_TOKENS)
def test_silu_and_mul_kernel_bf16_on_gpu(inter, num_tokens):
    needs_cuda()
    x = randn(num_tokens, 2 * inter, seed=18, dtype=torch.bfloat16, device="cuda", scale=3.0)
    assert_rounds_like(activation.silu_and_mul_triton(x), activation.silu_and_mul_ref(x), **ROUNDED[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", GPU_TOKENS)
def test_clamped_silu_mul_kernel_bf16_on_gpu(num_tokens):
    needs_cuda()
    gate = randn(num_tokens, 2048, seed=23, dtype=torch.bfloat16, device="cuda", scale=12.0)
    up = randn(num_tokens, 2048, seed=24, dtype=torch.bfloat16, device="cuda", scale=12.0)
    assert_rounds_like(activation.silu_mul_triton(gate, up, 10.0), activation.silu_mul_ref(gate, up, 10.0),
                       **ROUNDED[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", GPU_TOKENS)
@pytest.mark.parametrize("renormalize", [False, True])
def test_softmax_topk_kernel_bf16_on_gpu(num_tokens, renormalize):
    needs_cuda()
    logits = distinct_logits(num_tokens, 128, torch.bfloat16, seed=19, device="cuda")
    weights, ids = moe.softmax_topk_triton(logits, 8, renormalize)
    expected_weights, expected_ids = moe.softmax_topk_ref(logits, 8, renormalize)
    assert torch.equal(ids, expected_ids)
    assert_rounds_like(weights, expected_weights, max_ulps=1, max_mismatch=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", GPU_TOKENS)
def test_score_topk_kernel_bf16_on_gpu(num_tokens):
    """DeepSeek V4's router shape: 256 experts, 6 chosen by sqrt(softplus) + a selection bias."""
    needs_cuda()
    logits = router_logits(num_tokens, 256, torch.bfloat16, seed=25).cuda()
    bias = randn(256, seed=26, device="cuda")
    ids, weights = _by_expert(*moe.score_topk_triton(logits, 6, "sqrtsoftplus", selection_bias=bias, scaling=2.5))
    expected_ids, expected_weights = _by_expert(*moe.score_topk_ref(logits, 6, "sqrtsoftplus", selection_bias=bias,
                                                                    scaling=2.5))
    assert torch.equal(ids, expected_ids)
    assert_rounds_like(weights, expected_weights, max_ulps=1, max_mismatch=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 33, 64, 512, 4099, 16384])
@pytest.mark.parametrize("block_m", [16, 64])
def test_alignment_kernel_on_gpu(num_tokens, block_m):
    needs_cuda()
    ids = routing_ids(num_tokens, 128, 8, seed=20, skip_experts=(0, 77)).cuda()
    ours = moe.align_by_expert_triton(ids, 128, block_m)
    assert_same_alignment(ours, moe.align_by_expert_ref(ids, 128, block_m), ids.numel())


QWEN3_30B_A3B_MOE = dict(num_experts=128, hidden=2048, inter=768, top_k=8)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 33, 512, 2048])          # the three tile shapes of MoeTiles.for_batch
def test_fused_moe_kernel_bf16_on_gpu(num_tokens):
    """bf16 against the bf16 reference, and both against the same computation in fp32: the kernel may differ
    from the reference only by its (fp32) sum order and must be at least as accurate."""
    needs_cuda()
    x, w13, w2, weights, ids = moe_case(num_tokens, **QWEN3_30B_A3B_MOE, dtype=torch.bfloat16, skip_experts=(5,),
                                        device="cuda")
    out = moe.fused_moe_triton(x, w13, w2, weights, ids)
    assert torch.equal(moe.fused_moe_triton(x, w13, w2, weights, ids), out)   # whatever order rows were placed in
    expected = moe.fused_moe_ref(x, w13, w2, weights, ids)
    exact = moe.fused_moe_ref(x.float(), w13.float(), w2.float(), weights.float(), ids)
    # the reference adds the 8 pair terms one at a time in bf16: up to 4 roundings of a partial sum apart
    atol = 4 * torch.finfo(torch.bfloat16).eps * expected.abs().max().item()
    torch.testing.assert_close(out, expected, rtol=0, atol=atol)
    ours_error = (out.float() - exact).norm() / exact.norm()
    reference_error = (expected.float() - exact).norm() / exact.norm()
    assert ours_error <= 1.05 * reference_error, f"kernel error {ours_error:.2e}, reference {reference_error:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 64])
def test_fused_moe_replays_in_a_cuda_graph_like_eager(num_tokens):
    """Routing + alignment + both GEMMs captured once, replayed on new inputs: no host sync (capture would
    fail), a grid that does not depend on the routing, and the same bits as an eager call."""
    needs_cuda()
    x, w13, w2, _, _ = moe_case(num_tokens, **QWEN3_30B_A3B_MOE, dtype=torch.bfloat16, device="cuda")
    static_x = x.clone()
    static_logits = randn(num_tokens, 128, seed=21, dtype=torch.bfloat16, device="cuda")

    def step() -> torch.Tensor:
        weights, ids = moe.softmax_topk(static_logits, 8, renormalize=True)
        return moe.fused_moe(static_x, w13, w2, weights, ids)

    step()                                                     # compile the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = step()
    for seed in (22, 23):                                      # new routing each replay
        static_x.copy_(randn(num_tokens, 2048, seed=seed, dtype=torch.bfloat16, device="cuda"))
        static_logits.copy_(randn(num_tokens, 128, seed=seed + 100, dtype=torch.bfloat16, device="cuda"))
        graph.replay()
        eager = step()
        assert torch.equal(graph_out, eager)
        weights, ids = moe.softmax_topk_ref(static_logits, 8, renormalize=True)
        expected = moe.fused_moe_ref(static_x, w13, w2, weights, ids)
        torch.testing.assert_close(graph_out, expected, rtol=0,
                                   atol=4 * torch.finfo(torch.bfloat16).eps * expected.abs().max().item())


@pytest.mark.gpu
def test_dense_ops_replay_in_a_cuda_graph_like_eager():
    """RMSNorm with residual, QK norm, RoPE and SiLU-and-mul of one Qwen3-8B-shaped step, captured and replayed."""
    needs_cuda()
    num_tokens, hidden = 8, 4096
    x, residual, weight = norm_case(num_tokens, hidden, torch.bfloat16, torch.bfloat16, device="cuda")
    rotary, positions, q, k = rope_case(num_tokens, 32, 8, 128, 128, "neox", torch.bfloat16, device="cuda")
    gate_up = randn(num_tokens, 2 * 12288, seed=24, dtype=torch.bfloat16, device="cuda")
    head_weight = weight[:128].contiguous()

    def step():
        normed, summed = norm.rms_norm(x, weight, 1e-6, residual)
        q_rot, k_rot = rotary(positions, norm.rms_norm(q, head_weight, 1e-6), norm.rms_norm(k, head_weight, 1e-6))
        return normed, summed, q_rot, k_rot, activation.silu_and_mul(gate_up)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_outs = step()
    x.copy_(randn(num_tokens, hidden, seed=25, dtype=torch.bfloat16, device="cuda"))
    positions.copy_(positions.flip(0))
    gate_up.copy_(randn(num_tokens, 2 * 12288, seed=26, dtype=torch.bfloat16, device="cuda"))
    graph.replay()
    for replayed, eager in zip(graph_outs, step()):
        assert torch.equal(replayed, eager)


@pytest.mark.gpu
def test_public_ops_dispatch_to_triton_on_cuda_unless_torch_ops_are_forced(monkeypatch):
    needs_cuda()
    calls = []
    for module, name in [(norm, "rms_norm_triton"), (activation, "silu_and_mul_triton"), (rope, "rope_triton"),
                         (moe, "softmax_topk_triton"), (moe, "fused_moe_triton")]:
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    x, w13, w2, _, _ = moe_case(4, 8, 64, 32, 2, torch.bfloat16, device="cuda")
    rotary, positions, q, k = rope_case(4, 4, 2, 64, 64, "neox", torch.bfloat16, device="cuda")

    def run_all():
        norm.rms_norm(x, torch.ones(64, dtype=torch.bfloat16, device="cuda"), 1e-6)
        activation.silu_and_mul(x)
        rotary(positions, q, k)
        weights, ids = moe.softmax_topk(x[:, :8], 2, renormalize=True)
        moe.fused_moe(x, w13, w2, weights, ids)

    run_all()
    assert sorted(calls) == sorted(["rms_norm_triton", "silu_and_mul_triton", "rope_triton", "softmax_topk_triton",
                                    "fused_moe_triton"])
    calls.clear()
    monkeypatch.setenv("RUN_MODEL_TORCH_OPS", "1")
    run_all()
    assert calls == []
