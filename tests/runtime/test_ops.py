"""The shared ops against independent references: RMSNorm, rotary embeddings (vs transformers), paged attention
(vs dense attention with explicit masks) and the MoE routing and expert computation (vs a per-token loop)."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding, apply_rotary_pos_emb

from runtime.ops import (RotaryEmbedding, apply_rope, fused_moe, paged_attention_ref, rms_norm, rope_inv_freq,
                         silu_and_mul, softmax_topk, write_kv)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(dtype)


# ---------------------------------------------------------------- rms_norm


def normalized_fp64(x: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return x64 / torch.sqrt((x64 * x64).sum(-1, keepdim=True) / x.shape[-1] + eps)


def assert_mostly_bit_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """bf16 results whose fp32 intermediate sits on a rounding boundary may differ by one ulp; no more."""
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, rtol=2 ** -7, atol=0)
    assert (actual == expected).float().mean() > 0.99


def test_rms_norm_fp32_matches_the_formula():
    x, weight = randn(5, 96, seed=0, scale=3.0), randn(96, seed=1)
    for weight_in_fp32 in (False, True):
        out = rms_norm(x, weight, 1e-6, weight_in_fp32=weight_in_fp32)
        torch.testing.assert_close(out.double(), weight.double() * normalized_fp64(x, 1e-6), rtol=1e-5, atol=1e-6)


def test_rms_norm_bf16_rounds_in_the_requested_order():
    eps = 1e-5
    x, weight = randn(6, 96, seed=2, dtype=torch.bfloat16, scale=2.0), randn(96, seed=3, dtype=torch.bfloat16)
    normed = normalized_fp64(x, eps)
    # Llama/Qwen: round the normalized value to bf16, then multiply by the bf16 weight (one more rounding).
    expected_cast_first = (weight.double() * normed.to(torch.bfloat16).double()).to(torch.bfloat16)
    # gpt-oss: multiply in fp32, round once.
    expected_fp32_weight = (weight.double() * normed).float().to(torch.bfloat16)
    assert (expected_cast_first != expected_fp32_weight).any(), "inputs do not tell the two orders apart"
    assert_mostly_bit_equal(rms_norm(x, weight, eps), expected_cast_first)
    assert_mostly_bit_equal(rms_norm(x, weight, eps, weight_in_fp32=True), expected_fp32_weight)


def test_rms_norm_with_residual_returns_norm_of_sum_and_the_sum():
    eps = 1e-6
    x, residual = randn(4, 80, seed=4, dtype=torch.bfloat16), randn(4, 80, seed=5, dtype=torch.bfloat16)
    weight = randn(80, seed=6, dtype=torch.bfloat16)
    out, new_residual = rms_norm(x, weight, eps, residual=residual)
    expected_sum = (x.double() + residual.double()).to(torch.bfloat16)       # one correctly rounded add
    assert torch.equal(new_residual, expected_sum)
    expected = (weight.double() * normalized_fp64(expected_sum, eps).to(torch.bfloat16).double()).to(torch.bfloat16)
    assert_mostly_bit_equal(out, expected)


# ---------------------------------------------------------------- rotary embeddings


def qwen3_config(rope_parameters: dict) -> Qwen3Config:
    return Qwen3Config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       max_position_embeddings=4096, rope_parameters=rope_parameters)


@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "default", "rope_theta": 1e6},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "rope_theta": 1e6},
], ids=["default", "yarn"])
def test_neox_rope_matches_transformers_qwen3_in_fp32(rope_parameters):
    config = qwen3_config(rope_parameters)
    num_tokens = 11
    positions = torch.tensor(random.Random(0).sample(range(4096), num_tokens))
    q, k = randn(num_tokens, 4, 64, seed=7), randn(num_tokens, 2, 64, seed=8)

    inv_freq, scale = rope_inv_freq(config, 64)
    q_out, k_out = RotaryEmbedding(inv_freq, 4096, scale, style="neox")(positions, q, k)

    hf_rope = Qwen3RotaryEmbedding(config)
    cos, sin = hf_rope(q, positions[None])                                   # [1, num_tokens, head_dim]
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    assert torch.equal(q_out, hf_q[0].transpose(0, 1))
    assert torch.equal(k_out, hf_k[0].transpose(0, 1))


def angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """theta[t, i] = position_t * inv_freq_i, formed in fp32 as every implementation does, then widened."""
    return (positions.float()[:, None] * inv_freq[None, :]).double()        # [num_tokens, rotary_dim / 2]


def test_gptj_rope_rotates_interleaved_pairs():
    num_tokens, heads, head_dim = 6, 3, 32
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    positions = torch.tensor([0, 1, 5, 17, 100, 999])
    x = randn(num_tokens, heads, head_dim, seed=9)
    theta = angles(positions, inv_freq)
    out = apply_rope(x, theta.cos().float(), theta.sin().float(), style="gptj")
    expected = torch.empty(num_tokens, heads, head_dim, dtype=torch.float64)
    x64 = x.double()
    for i in range(head_dim // 2):
        cos, sin = theta[:, i, None].cos(), theta[:, i, None].sin()
        expected[..., 2 * i] = x64[..., 2 * i] * cos - x64[..., 2 * i + 1] * sin
        expected[..., 2 * i + 1] = x64[..., 2 * i + 1] * cos + x64[..., 2 * i] * sin
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_partial_rotary_leaves_the_tail_untouched(style):
    num_tokens, heads, head_dim, rotary_dim = 5, 2, 64, 24
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
    positions = torch.tensor([3, 0, 7, 64, 200])
    q, k = randn(num_tokens, heads, head_dim, seed=10), randn(num_tokens, 1, head_dim, seed=11)
    q_out, k_out = RotaryEmbedding(inv_freq, 256, style=style)(positions, q, k)
    assert torch.equal(q_out[..., rotary_dim:], q[..., rotary_dim:])
    assert torch.equal(k_out[..., rotary_dim:], k[..., rotary_dim:])
    theta = angles(positions, inv_freq)[:, None, :]                         # [num_tokens, 1, rotary_dim / 2]
    head = q[..., :rotary_dim].double()
    if style == "neox":
        x1, x2 = head[..., :rotary_dim // 2], head[..., rotary_dim // 2:]
        expected = torch.cat([x1 * theta.cos() - x2 * theta.sin(), x2 * theta.cos() + x1 * theta.sin()], dim=-1)
    else:
        x1, x2 = head[..., 0::2], head[..., 1::2]
        expected = torch.stack([x1 * theta.cos() - x2 * theta.sin(), x2 * theta.cos() + x1 * theta.sin()],
                               dim=-1).flatten(-2)
    torch.testing.assert_close(q_out[..., :rotary_dim].double(), expected, rtol=1e-5, atol=1e-6)


def test_default_rope_inv_freq_is_theta_to_the_minus_two_i_over_d():
    inv_freq, scale = rope_inv_freq(qwen3_config({"rope_type": "default", "rope_theta": 1e6}), 64)
    expected = torch.tensor([1e6 ** (-2 * i / 64) for i in range(32)], dtype=torch.float64)
    torch.testing.assert_close(inv_freq.double(), expected, rtol=1e-6, atol=0)
    assert scale == 1.0


def yarn_reference(base: float, dim: int, factor: float, original_max: int, beta_fast: float = 32,
                   beta_slow: float = 1) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): interpolate the low frequencies by `factor`, keep the high ones, blend linearly
    between the dims that turn beta_fast and beta_slow times over the original context."""
    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))
    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    inv_freq = []
    for i in range(dim // 2):
        extrapolation = base ** (-2 * i / dim)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)                  # 0 = keep, 1 = interpolate
        inv_freq.append(extrapolation * (1 - ramp) + extrapolation / factor * ramp)
    return torch.tensor(inv_freq, dtype=torch.float64), 0.1 * math.log(factor) + 1.0


def test_yarn_rope_inv_freq_matches_transformers_and_the_paper():
    config = qwen3_config({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
                           "rope_theta": 1e6})
    inv_freq, scale = rope_inv_freq(config, 64)
    hf_inv_freq, hf_scale = ROPE_INIT_FUNCTIONS["yarn"](config, torch.device("cpu"))
    assert torch.equal(inv_freq, hf_inv_freq.float()) and scale == hf_scale
    expected, expected_scale = yarn_reference(1e6, 64, 4.0, 32768)
    torch.testing.assert_close(inv_freq.double(), expected, rtol=1e-5, atol=0)
    assert scale == pytest.approx(expected_scale)
    default_inv_freq, _ = rope_inv_freq(qwen3_config({"rope_type": "default", "rope_theta": 1e6}), 64)
    assert (inv_freq < default_inv_freq).any(), "YaRN should interpolate some frequencies"


# ---------------------------------------------------------------- paged attention


BLOCK_SIZE = 4
# (tokens already in the cache, new query tokens) per request: a chunk crossing block boundaries after a
# computed prefix, a prefill, decodes after full and partial blocks, a single-token prompt.
REQUESTS = [(6, 7), (0, 9), (8, 1), (0, 1), (11, 3), (5, 1)]
HEADS, KV_HEADS = 4, 2


def build_paged_cache(head_dim: int, dtype: torch.dtype, seed: int):
    """Random K/V for every request, written through write_kv into blocks handed out in shuffled order.
    Unwritten slots hold NaN, so reading one poisons the result."""
    rng = random.Random(seed)
    seq_lens = [computed + new for computed, new in REQUESTS]
    blocks_per_request = [-(-seq_len // BLOCK_SIZE) for seq_len in seq_lens]
    free_blocks = list(range(sum(blocks_per_request) + 3))
    rng.shuffle(free_blocks)
    block_table = torch.full((len(REQUESTS), max(blocks_per_request)), free_blocks[-1], dtype=torch.int32)
    for b, count in enumerate(blocks_per_request):
        block_table[b, :count] = torch.tensor([free_blocks.pop(0) for _ in range(count)])
    cache = torch.full((len(free_blocks) + sum(blocks_per_request), BLOCK_SIZE, 2, KV_HEADS, head_dim), float("nan"),
                       dtype=dtype)
    keys = [randn(seq_len, KV_HEADS, head_dim, seed=seed * 100 + b).to(dtype) for b, seq_len in enumerate(seq_lens)]
    values = [randn(seq_len, KV_HEADS, head_dim, seed=seed * 100 + 50 + b).to(dtype)
              for b, seq_len in enumerate(seq_lens)]

    def slots(b: int, positions: range) -> list[int]:
        return [int(block_table[b, p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE for p in positions]

    # Earlier steps wrote the computed prefix; this step writes the new tokens, with two padding rows (slot -1).
    for phase in ("prefix", "new"):
        slot_mapping, k_rows, v_rows = [], [], []
        for b, (computed, new) in enumerate(REQUESTS):
            positions = range(0, computed) if phase == "prefix" else range(computed, computed + new)
            slot_mapping += slots(b, positions)
            k_rows.append(keys[b][list(positions)])
            v_rows.append(values[b][list(positions)])
        if phase == "new":
            slot_mapping += [-1, -1]
            k_rows.append(randn(2, KV_HEADS, head_dim, seed=seed + 7).to(dtype))
            v_rows.append(randn(2, KV_HEADS, head_dim, seed=seed + 8).to(dtype))
        write_kv(cache, torch.cat(k_rows), torch.cat(v_rows), torch.tensor(slot_mapping))
    return cache, block_table, seq_lens, keys, values


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, computed: int, scale: float,
                    window: int | None, sinks: torch.Tensor | None, softcap: float | None) -> torch.Tensor:
    """One request in float64: q [query_len, heads, d] at positions computed.., k/v [seq_len, kv_heads, d]."""
    query_len, seq_len = q.shape[0], k.shape[0]
    group = HEADS // KV_HEADS
    out = torch.zeros(query_len, HEADS, q.shape[-1], dtype=torch.float64)
    mask = torch.tensor([[j <= computed + i and (window is None or computed + i - j < window)
                          for j in range(seq_len)] for i in range(query_len)])  # [query_len, seq_len]
    for h in range(HEADS):
        kh, vh = k[:, h // group].double(), v[:, h // group].double()      # [seq_len, d]
        scores = q[:, h].double() @ kh.t() * scale                          # [query_len, seq_len]
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        weights = torch.where(mask, torch.exp(scores - scores.max()), torch.zeros(()))
        denominator = weights.sum(-1, keepdim=True)
        if sinks is not None:
            denominator = denominator + torch.exp(sinks[h].double() - scores.max())
        out[:, h] = (weights / denominator) @ vh
    return out


VARIANTS = {
    "causal": dict(window=None, sinks=False, softcap=None),
    "sliding_window": dict(window=3, sinks=False, softcap=None),
    "sinks": dict(window=None, sinks=True, softcap=None),
    "softcap": dict(window=None, sinks=False, softcap=2.0),
    "window_sinks_softcap": dict(window=5, sinks=True, softcap=3.0),
}


@pytest.mark.parametrize("head_dim", [64, 256, 512])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_paged_attention_matches_dense_attention(variant, head_dim):
    options = VARIANTS[variant]
    cache, block_table, seq_lens, keys, values = build_paged_cache(head_dim, torch.float32, seed=head_dim)
    query_lens = [new for _, new in REQUESTS]
    query_start_loc = [sum(query_lens[:b]) for b in range(len(REQUESTS) + 1)]
    q = randn(query_start_loc[-1], HEADS, head_dim, seed=head_dim + 1)
    sinks = randn(HEADS, seed=head_dim + 2) if options["sinks"] else None
    scale = head_dim ** -0.5 * 2.0           # sharper than usual, so that masking mistakes show
    out = paged_attention_ref(q, cache, block_table, query_start_loc, seq_lens, scale, window=options["window"],
                              sinks=sinks, softcap=options["softcap"])
    for b, (computed, new) in enumerate(REQUESTS):
        start, end = query_start_loc[b], query_start_loc[b + 1]
        expected = dense_attention(q[start:end], keys[b], values[b], computed, scale, options["window"], sinks,
                                   options["softcap"])
        torch.testing.assert_close(out[start:end].double(), expected, rtol=1e-4, atol=1e-5, msg=f"request {b}")


def test_paged_attention_bf16_matches_dense_attention():
    head_dim = 128
    cache, block_table, seq_lens, keys, values = build_paged_cache(head_dim, torch.bfloat16, seed=3)
    query_lens = [new for _, new in REQUESTS]
    query_start_loc = [sum(query_lens[:b]) for b in range(len(REQUESTS) + 1)]
    q = randn(query_start_loc[-1], HEADS, head_dim, seed=4, dtype=torch.bfloat16)
    out = paged_attention_ref(q, cache, block_table, query_start_loc, seq_lens, head_dim ** -0.5, window=4)
    assert out.dtype == torch.bfloat16
    for b, (computed, _) in enumerate(REQUESTS):
        start, end = query_start_loc[b], query_start_loc[b + 1]
        expected = dense_attention(q[start:end], keys[b], values[b], computed, head_dim ** -0.5, 4, None, None)
        torch.testing.assert_close(out[start:end].double(), expected, rtol=2e-2, atol=1e-2)


def test_write_kv_skips_slot_minus_one():
    num_blocks, head_dim = 3, 8
    cache = randn(num_blocks, BLOCK_SIZE, 2, KV_HEADS, head_dim, seed=12)
    before = cache.clone()
    k, v = randn(5, KV_HEADS, head_dim, seed=13), randn(5, KV_HEADS, head_dim, seed=14)
    slot_mapping = torch.tensor([-1, 9, -1, 2, -1])
    write_kv(cache, k, v, slot_mapping)
    flat, flat_before = cache.view(-1, 2, KV_HEADS, head_dim), before.view(-1, 2, KV_HEADS, head_dim)
    for slot in range(num_blocks * BLOCK_SIZE):
        if slot == 9:
            assert torch.equal(flat[slot, 0], k[1]) and torch.equal(flat[slot, 1], v[1])
        elif slot == 2:
            assert torch.equal(flat[slot, 0], k[3]) and torch.equal(flat[slot, 1], v[3])
        else:
            assert torch.equal(flat[slot], flat_before[slot]), f"slot {slot} changed"


# ---------------------------------------------------------------- MoE


@pytest.mark.parametrize("renormalize", [False, True])
def test_softmax_topk_matches_a_per_token_loop(renormalize):
    num_tokens, num_experts, top_k = 9, 7, 3
    router_logits = randn(num_tokens, num_experts, seed=15, scale=2.0)
    weights, ids = softmax_topk(router_logits, top_k, renormalize)
    for t in range(num_tokens):
        exps = [math.exp(value) for value in router_logits[t].tolist()]
        probs = [e / sum(exps) for e in exps]
        chosen = sorted(range(num_experts), key=lambda e: -probs[e])[:top_k]
        expected = [probs[e] for e in chosen]
        if renormalize:
            expected = [p / sum(expected) for p in expected]
        assert ids[t].tolist() == chosen
        torch.testing.assert_close(weights[t].double(), torch.tensor(expected, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-7)


def test_softmax_topk_returns_weights_in_the_logits_dtype():
    weights, ids = softmax_topk(randn(4, 8, seed=16, dtype=torch.bfloat16), 2, renormalize=True)
    assert weights.dtype == torch.bfloat16 and ids.dtype == torch.int64
    torch.testing.assert_close(weights.float().sum(-1), torch.ones(4), rtol=0, atol=1e-2)


def test_fused_moe_matches_a_per_token_loop():
    num_tokens, num_experts, top_k, hidden, inter = 7, 6, 2, 48, 40
    x = randn(num_tokens, hidden, seed=17)
    w13 = randn(num_experts, 2 * inter, hidden, seed=18, scale=0.2)
    w2 = randn(num_experts, hidden, inter, seed=19, scale=0.2)
    rng = random.Random(20)
    # Expert 5 gets no token; expert ids are not sorted within a row.
    topk_ids = torch.tensor([rng.sample(range(5), top_k) for _ in range(num_tokens)])
    topk_weights = torch.rand(num_tokens, top_k, generator=torch.Generator().manual_seed(21)) + 0.1
    out = fused_moe(x, w13, w2, topk_weights, topk_ids)
    expected = torch.zeros(num_tokens, hidden, dtype=torch.float64)
    for t in range(num_tokens):
        for slot in range(top_k):
            e = int(topk_ids[t, slot])
            gate = w13[e, :inter].double() @ x[t].double()
            up = w13[e, inter:].double() @ x[t].double()
            expected[t] += topk_weights[t, slot].double() * (w2[e].double() @ (gate * torch.sigmoid(gate) * up))
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


def test_silu_and_mul_is_silu_of_gate_times_up():
    x = randn(3, 2 * 10, seed=22)
    expected = F.silu(x[:, :10].double()) * x[:, 10:].double()
    torch.testing.assert_close(silu_and_mul(x).double(), expected, rtol=1e-6, atol=1e-6)
