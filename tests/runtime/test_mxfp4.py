"""MXFP4: the format (against transformers and the OCP rules), the MoE reference (against transformers'
GptOssExperts) and the Triton kernel (against the reference; interpreter on CPU, bf16 on a GPU)."""
from __future__ import annotations

import pytest
import torch

from runtime.ops.mxfp4 import (FP4_VALUES, GatedActivation, GemvTiles, MoeTiles, Mxfp4Linear,
                               mxfp4_dequantize, mxfp4_moe_reference, mxfp4_quantize)

GPT_OSS_ACTIVATION = GatedActivation(alpha=1.702, limit=7.0, up_offset=1.0, interleaved=True)


def random_mxfp4(*shape: int, generator: torch.Generator, scale_range: tuple[int, int] = (118, 130)):
    """Random packed weights of logical shape [..., rows, K]: every byte value, scales in a given range."""
    *lead, rows, k = shape
    blocks = torch.randint(0, 256, (*lead, rows, k // 32, 16), generator=generator, dtype=torch.uint8)
    scales = torch.randint(*scale_range, (*lead, rows, k // 32), generator=generator, dtype=torch.uint8)
    return blocks, scales


# ---- the format -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_is_bit_exact_with_transformers(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    generator = torch.Generator().manual_seed(0)
    blocks, scales = random_mxfp4(3, 40, 96, generator=generator, scale_range=(0, 256))   # every scale byte
    ours = mxfp4_dequantize(blocks, scales, dtype)                                        # [E, rows, K]
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)                      # [E, K, rows]
    assert ours.dtype == theirs.dtype == dtype
    torch.testing.assert_close(ours.transpose(1, 2), theirs, rtol=0, atol=0, equal_nan=True)


def test_low_nibble_is_the_even_element():
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x2B                      # low nibble 0xB = -1.5 (element 0), high nibble 0x2 = 1.0
    scales = torch.full((1, 1), 128, dtype=torch.uint8)          # 2^(128 - 127) = 2
    values = mxfp4_dequantize(blocks, scales)
    assert values.shape == (1, 32)
    assert values[0, :3].tolist() == [-3.0, 2.0, 0.0]


def test_quantize_rounds_to_nearest_with_ties_to_even():
    # a block whose max is 6 has scale 2^0; the midpoints between E2M1 values must go to the even code
    block = torch.zeros(32)
    block[:8] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    blocks, scales = mxfp4_quantize(block[None])
    assert scales.tolist() == [[127]]
    assert mxfp4_dequantize(blocks, scales)[0, :8].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


def test_quantize_round_trips_representable_weights():
    generator = torch.Generator().manual_seed(1)
    weight = mxfp4_dequantize(*random_mxfp4(2, 8, 64, generator=generator))
    assert torch.equal(mxfp4_dequantize(*mxfp4_quantize(weight)), weight)


def test_quantize_never_clips_and_errs_by_at_most_one_scale_step():
    weight = torch.randn(16, 128, generator=torch.Generator().manual_seed(2)) * 3
    blocks, scales = mxfp4_quantize(weight)
    step = torch.ldexp(torch.ones(scales.shape), scales.int() - 127).repeat_interleave(32, dim=-1)
    restored = mxfp4_dequantize(blocks, scales)
    assert ((restored - weight).abs() <= step).all()       # E2M1 values are at most 2 steps apart
    grouped = lambda t: t.abs().unflatten(-1, (-1, 32)).amax(-1)  # noqa: E731
    assert (grouped(restored) >= grouped(weight) - grouped(step)).all()


def test_fp4_table_is_e2m1():
    for code, value in enumerate(FP4_VALUES):
        sign, exponent, mantissa = code >> 3, (code >> 1) & 3, code & 1
        magnitude = mantissa * 0.5 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1)
        assert value == (-magnitude if sign else magnitude)


# ---- the MoE reference ------------------------------------------------------------------------------


def make_experts(num_experts: int, hidden: int, inter: int, seed: int, bias: bool = True,
                 gate_up_scale: int = 0) -> tuple[Mxfp4Linear, Mxfp4Linear]:
    """Random packed experts; gate_up_scale raises the gate/up scales so the SwiGLU clamp at 7 engages."""
    generator = torch.Generator().manual_seed(seed)
    w13 = Mxfp4Linear(*random_mxfp4(num_experts, 2 * inter, hidden, generator=generator,
                                    scale_range=(120 + gate_up_scale, 124 + gate_up_scale)))
    w2 = Mxfp4Linear(*random_mxfp4(num_experts, hidden, inter, generator=generator, scale_range=(118, 122)))
    if bias:
        w13.bias = torch.randn(num_experts, 2 * inter, generator=generator)
        w2.bias = torch.randn(num_experts, hidden, generator=generator)
    return w13, w2


def make_routing(num_tokens: int, num_experts: int, top_k: int, seed: int, skip_experts: tuple[int, ...] = ()):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=generator)
    logits[:, list(skip_experts)] = -1e9                       # experts that receive no token
    values, ids = torch.topk(logits, top_k, dim=-1)
    return torch.softmax(values, dim=-1), ids


def test_reference_matches_transformers_gpt_oss_experts():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    num_experts, hidden, inter, top_k, num_tokens = 4, 64, 96, 2, 9
    w13, w2 = make_experts(num_experts, hidden, inter, seed=3, gate_up_scale=3)
    config = GptOssConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=num_experts,
                          num_experts_per_tok=top_k)
    experts = GptOssExperts(config)
    with torch.no_grad():                                      # transformers keeps [E, in, out]
        experts.gate_up_proj.copy_(mxfp4_dequantize(w13.blocks, w13.scales).transpose(1, 2))
        experts.down_proj.copy_(mxfp4_dequantize(w2.blocks, w2.scales).transpose(1, 2))
        experts.gate_up_proj_bias.copy_(w13.bias)
        experts.down_proj_bias.copy_(w2.bias)
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(4))
    weights, ids = make_routing(num_tokens, num_experts, top_k, seed=5)
    gate_up = torch.einsum("th,ehn->ten", x, experts.gate_up_proj) + experts.gate_up_proj_bias
    gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    assert (gate > 7).any() and (gate < -7).any() and (up.abs() > 7).any(), "the clamp must engage"
    with torch.no_grad():
        expected = experts(x, ids, weights)
    ours = mxfp4_moe_reference(x, w13, w2, weights, ids, GPT_OSS_ACTIVATION)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-4)


def test_gpt_oss_activation_clamps_gate_above_only_and_offsets_up():
    gate_up = torch.tensor([[-20.0, 9.0, 9.0, -9.0]])        # (gate, up) pairs, interleaved
    gate, up = torch.tensor([-20.0, 7.0]), torch.tensor([7.0, -7.0])
    expected = gate * torch.sigmoid(1.702 * gate) * (up + 1)
    torch.testing.assert_close(GPT_OSS_ACTIVATION(gate_up)[0], expected)


# ---- the Triton kernel ------------------------------------------------------------------------------


triton_case = pytest.mark.parametrize("num_tokens,activation,bias", [
    (7, GPT_OSS_ACTIVATION, True),                            # ragged rows, clamp, interleaved gate/up
    (1, GPT_OSS_ACTIVATION, True),                            # a decode step
    (5, GatedActivation(), False),                            # plain SwiGLU, halves, no bias
])


@triton_case
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_moe_matches_reference_in_the_interpreter(num_tokens, activation, bias, dtype):
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    from runtime.ops import mxfp4
    if not isinstance(mxfp4._moe_down_kernel, InterpretedFunction):
        pytest.skip("the kernels were built for a GPU (TRITON_INTERPRET unset)")
    # hidden 96 and inter 160: not powers of two, not multiples of BLOCK_K; expert 1 gets no token
    num_experts, hidden, inter, top_k = 5, 96, 160, 2
    w13, w2 = make_experts(num_experts, hidden, inter, seed=7, bias=bias, gate_up_scale=3)
    weights, ids = make_routing(num_tokens, num_experts, top_k, seed=8, skip_experts=(1,))
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(9)).to(dtype)
    expected = mxfp4_moe_reference(x, w13, w2, weights, ids, activation)
    ours = mxfp4.mxfp4_moe_triton(x, w13, w2, weights, ids, activation, MoeTiles(block_m=8, block_n=64, block_k=64))
    tolerance = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(ours.float(), expected.float(), **tolerance)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 33, 300])
def test_triton_moe_matches_reference_in_bf16_on_gpu(num_tokens):
    """gpt-oss-20b expert shapes, bf16 activations."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from runtime.ops.mxfp4 import mxfp4_moe_triton
    num_experts, hidden, inter, top_k = 32, 2880, 2880, 4
    w13, w2 = make_experts(num_experts, hidden, inter, seed=10)
    w13, w2 = (Mxfp4Linear(w.blocks.cuda(), w.scales.cuda(), w.bias.cuda()) for w in (w13, w2))
    weights, ids = make_routing(num_tokens, num_experts, top_k, seed=11)
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(12)).to(torch.bfloat16).cuda()
    expected = mxfp4_moe_reference(x, w13, w2, weights.cuda(), ids.cuda(), GPT_OSS_ACTIVATION)
    ours = mxfp4_moe_triton(x, w13, w2, weights.cuda(), ids.cuda(), GPT_OSS_ACTIVATION)
    torch.testing.assert_close(ours.float(), expected.float(), rtol=2e-2, atol=2e-2 * expected.abs().max().item())


# ---- the decode GEMV --------------------------------------------------------------------------------


@triton_case
@pytest.mark.parametrize("tiles", [GemvTiles(8, 16, 2, 4, block_g_down=2),
                                   GemvTiles(4, 8, 4, 4, prefetch=False, block_g_down=4)])
def test_gemv_moe_matches_reference_in_the_interpreter(num_tokens, activation, bias, tiles):
    """fp32 activations; hidden 96 / inter 160 are not multiples of the K step (BLOCK_G * 32), nor of
    BLOCK_N; every byte value (so every E2M1 code and both signs of zero) occurs."""
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    from runtime.ops import mxfp4
    if not isinstance(mxfp4._mxfp4_gemv_down_kernel, InterpretedFunction):
        pytest.skip("the kernels were built for a GPU (TRITON_INTERPRET unset)")
    num_experts, hidden, inter, top_k = 5, 96, 160, 2
    w13, w2 = make_experts(num_experts, hidden, inter, seed=17, bias=bias, gate_up_scale=3)
    weights, ids = make_routing(num_tokens, num_experts, top_k, seed=18, skip_experts=(1,))
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(19))
    expected = mxfp4_moe_reference(x, w13, w2, weights, ids, activation)
    ours = mxfp4.mxfp4_moe_gemv(x, w13, w2, weights, ids, activation, tiles)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("interleaved,bias,num_tokens,tiles", [
    (True, True, 2, GemvTiles(mma=True, mma_warps=2, mma_split=2, mma_down=True, mma_warps_down=1, mma_split_down=2)),
    (False, False, 1, GemvTiles(mma=True, mma_warps=1, mma_split=1, mma_down=True, mma_warps_down=2,
                                mma_split_down=1)),
    # the programmatic dependent launch is a GPU launch option (the emulation runs the kernels in order): 3 tokens,
    # uneven splits of both GEMVs
    (True, False, 3, GemvTiles(mma=True, mma_warps=1, mma_split=3, mma_down=True, mma_warps_down=1, mma_split_down=3,
                               mma_pdl=True))])
def test_tensor_core_gemv_matches_reference_in_the_interpreter(interleaved, bias, num_tokens, tiles):
    """bf16 activations through the tensor-core GEMVs' emulation (the same lanes' operands and sums as the
    mma): K = 96 and 160 are not multiples of a K step (128), the rows not of a tile, the K splits uneven, one
    expert receives no token, one slot names another rank's expert (a negative id); each gate/up row equals the fp32 one up to h's bf16 conversion, and the MoE matches
    the reference to the bf16 output's rounding. The split counters are left at zero."""
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    from runtime.ops import mxfp4
    if not isinstance(mxfp4._mxfp4_mma_down_kernel, InterpretedFunction):
        pytest.skip("the kernels were built for a GPU (TRITON_INTERPRET unset)")
    activation = GPT_OSS_ACTIVATION if interleaved else GatedActivation(limit=10.0)
    num_experts, hidden, inter, top_k = 5, 96, 160, 2
    w13, w2 = make_experts(num_experts, hidden, inter, seed=24, bias=bias, gate_up_scale=3)
    weights, ids = make_routing(num_tokens, num_experts, top_k, seed=25, skip_experts=(1,))
    ids[-1, -1] = -1                                   # another rank's expert (expert parallelism): contributes 0
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(26)).to(torch.bfloat16)
    h = mxfp4.mxfp4_gemv_gate_up(x, w13, ids, activation, tiles)
    for pair, expert in enumerate(ids.flatten().tolist()):
        if expert < 0:
            assert not h[pair].any()
            continue
        gate_up = x[pair // top_k].float() @ mxfp4_dequantize(w13.blocks[expert], w13.scales[expert]).t()
        if bias:
            gate_up = gate_up + w13.bias[expert]
        want = activation(gate_up[None])[0]
        # the interpreter converts fp32 to bf16 by truncation (a GPU rounds to nearest): up to 1 ulp, 2^-7
        torch.testing.assert_close(h[pair].float(), want, rtol=2 ** -7, atol=1e-5)
    expected = mxfp4_moe_reference(x, w13, w2, weights, ids, activation)
    ours = mxfp4.mxfp4_moe_gemv(x, w13, w2, weights, ids, activation, tiles)
    torch.testing.assert_close(ours.float(), expected.float(), rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    assert all(not counters.any() for counters in mxfp4._MMA_COUNTERS.get(x.device, []))


def test_scales_outside_the_tensor_core_range_take_the_other_gemvs():
    """The tensor-core GEMVs' bf16 weights are exact only for E8M0 scales in [MMA_SCALE_SHIFT, 128 +
    MMA_SCALE_SHIFT]: a weight with one scale outside (here 2^25 times a block) goes to the other GEMVs and still
    matches the reference; the answer is kept on the scales tensor, so later calls do not check again."""
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    from runtime.ops import mxfp4
    if not isinstance(mxfp4._mxfp4_mma_down_kernel, InterpretedFunction):
        pytest.skip("the kernels were built for a GPU (TRITON_INTERPRET unset)")
    num_experts, hidden, inter, top_k = 3, 64, 64, 2
    w13, w2 = make_experts(num_experts, hidden, inter, seed=31, bias=False)
    assert mxfp4.scales_fit_mma(w13) and mxfp4.scales_fit_mma(w2)
    w2.scales[1, 5, 0] = 128 + mxfp4.MMA_SCALE_SHIFT + 25
    w2 = Mxfp4Linear(w2.blocks, w2.scales.clone())              # a fresh tensor: not checked yet
    assert not mxfp4.scales_fit_mma(w2) and w2.scales._fits_mma is False
    weights, ids = make_routing(2, num_experts, top_k, seed=32)
    ids[:, 0] = 1                                               # every token reads the large block
    x = torch.randn(2, hidden, generator=torch.Generator().manual_seed(33)).to(torch.bfloat16)
    tiles = GemvTiles(mma=True, mma_warps=1, mma_split=1, mma_down=True, mma_warps_down=1, mma_split_down=1)
    expected = mxfp4_moe_reference(x, w13, w2, weights, ids, GatedActivation())
    ours = mxfp4.mxfp4_moe_gemv(x, w13, w2, weights, ids, GatedActivation(), tiles)
    torch.testing.assert_close(ours.float(), expected.float(), rtol=2e-2, atol=2e-2 * expected.abs().max().item())


# the GPU kernel variants: the Triton GEMVs (PTX decode), the explicit-layout (Gluon) GEMVs with the down GEMV's
# slots split over programs (one a program) or not; tiles among tools/decode_kernels.py's sweep
GPU_VARIANTS = {
    "triton": dict(gluon=False, gluon_down=False, ptx_decode=True),
    "gluon-split": dict(gluon=True, gluon_down=True, block_n_gate_up=16, block_g=32, num_warps=4, block_n_down=16,
                        block_g_down=32, num_warps_down=4, split_down=8),
    "gluon": dict(gluon=True, gluon_down=True, block_n_gate_up=16, block_g=16, num_warps=4, block_n_down=16,
                  block_g_down=32, num_warps_down=4, split_down=1),
    # the tensor-core GEMVs (bf16 activations; fp32 ones take the Gluon kernels): split K, and not
    "mma-split": dict(gluon=True, gluon_down=True, mma=True, mma_warps=4, mma_split=4, mma_down=True, mma_warps_down=4,
                      mma_split_down=2),
    "mma": dict(gluon=True, gluon_down=True, mma=True, mma_warps=8, mma_split=1, mma_down=True, mma_warps_down=2,
                mma_split_down=1),
    "mma-up-gluon-split-down": dict(gluon=True, gluon_down=True, mma=True, mma_warps=4, mma_split=2, mma_down=False,
                                    split_down=2),
    # the down GEMV a programmatic dependent launch of the gate/up one
    "mma-pdl": dict(gluon=True, gluon_down=True, mma=True, mma_warps=4, mma_split=2, mma_down=True, mma_warps_down=4,
                    mma_split_down=4, mma_pdl=True),
}


def gpu_experts(shape: str, seed: int):
    """The two expert shapes of the tile table on the GPU: gpt-oss's (biases, interleaved gate/up) or DeepSeek
    V4's (clamped halves)."""
    if shape.startswith("2880"):
        num_experts, hidden, inter, top_k, bias, activation = 32, 2880, 2880, 4, True, GPT_OSS_ACTIVATION
    else:
        num_experts, hidden, inter, top_k, bias, activation = 16, 4096, 2048, 6, False, GatedActivation(limit=10.0)
    w13, w2 = make_experts(num_experts, hidden, inter, seed=seed, bias=bias)
    w13, w2 = (Mxfp4Linear(w.blocks.cuda(), w.scales.cuda(), w.bias.cuda() if bias else None) for w in (w13, w2))
    return num_experts, hidden, inter, top_k, activation, w13, w2


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 3])
@pytest.mark.parametrize("shape", ["2880x2880 top-4, biases, interleaved", "4096x2048 top-6, halves"])
@pytest.mark.parametrize("variant", list(GPU_VARIANTS))
def test_gemv_moe_matches_reference_in_bf16_on_gpu(num_tokens, shape, variant):
    """The two expert shapes of the tile table, bf16 activations, each kernel variant (the table's tiles
    otherwise)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from dataclasses import replace

    from runtime.ops.mxfp4 import mxfp4_moe_gemv
    num_experts, hidden, inter, top_k, activation, w13, w2 = gpu_experts(shape, seed=20)
    weights, ids = make_routing(num_tokens, num_experts, top_k, seed=21)
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(22)).to(torch.bfloat16).cuda()
    expected = mxfp4_moe_reference(x, w13, w2, weights.cuda(), ids.cuda(), activation)
    tiles = replace(GemvTiles.for_shape(hidden, inter), **GPU_VARIANTS[variant])
    for _ in range(2):                     # twice: the split down GEMV's counters must be back at zero
        ours = mxfp4_moe_gemv(x, w13, w2, weights.cuda(), ids.cuda(), activation, tiles)
        torch.testing.assert_close(ours.float(), expected.float(), rtol=2e-2,
                                   atol=2e-2 * expected.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["2880x2880 top-4, biases, interleaved", "4096x2048 top-6, halves"])
def test_dependent_launch_gemv_replays_from_a_graph_like_the_plain_one_on_gpu(shape):
    """The down GEMV launched as a programmatic dependent of the gate/up GEMV, captured in a CUDA graph and
    replayed over new tokens and routing (written in place, 1 then 2 of 2 rows routed, a negative id): bit for
    bit the eager launches without the dependency, whose arithmetic is the same."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from dataclasses import replace

    from runtime.ops.mxfp4 import mxfp4_moe_gemv
    num_experts, hidden, inter, top_k, activation, w13, w2 = gpu_experts(shape, seed=40)
    plain = replace(GemvTiles.for_shape(hidden, inter), mma=True, mma_down=True, mma_pdl=False)
    dependent = replace(plain, mma_pdl=True)
    rounds = []
    for seed in (41, 42, 43):
        weights, ids = make_routing(2, num_experts, top_k, seed=seed)
        if seed == 42:
            ids[1, 0] = -1                                   # another rank's expert
        x = torch.randn(2, hidden, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
        rounds.append((x.cuda(), weights.cuda(), ids.cuda()))
    x, weights, ids = (t.clone() for t in rounds[0])
    mxfp4_moe_gemv(x, w13, w2, weights, ids, activation, dependent)          # compiles; makes the counters
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mxfp4_moe_gemv(x, w13, w2, weights, ids, activation, dependent)
    for round_x, round_weights, round_ids in rounds:
        x.copy_(round_x), weights.copy_(round_weights), ids.copy_(round_ids)
        graph.replay()
        want = mxfp4_moe_gemv(round_x, w13, w2, round_weights, round_ids, activation, plain)
        assert torch.equal(out, want)


@pytest.mark.gpu
def test_gemv_decodes_every_code_exactly_on_gpu():
    """One-hot activations pick single weight columns: the GEMV must return the dequantized weights bit for
    bit (every byte value, so every E2M1 code incl. the subnormal 0.5 and -0, under scales 2^-9..2^2)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from dataclasses import replace

    from runtime.ops.mxfp4 import mxfp4_gemv_gate_up
    hidden, inter, rows = 256, 32, 64
    generator = torch.Generator().manual_seed(23)
    blocks, scales = random_mxfp4(1, rows, hidden, generator=generator, scale_range=(118, 130))
    w13 = Mxfp4Linear(blocks.cuda(), scales.cuda())
    dense = mxfp4_dequantize(blocks, scales)[0]                                      # [rows, hidden]
    x = torch.eye(hidden, dtype=torch.float32, device="cuda")                         # token t picks column t
    ids = torch.zeros(hidden, 1, dtype=torch.int64, device="cuda")
    identity = GatedActivation(alpha=0.0, up_offset=0.0)        # gate * sigmoid(0) * up = gate * up / 2
    for variant in GPU_VARIANTS.values():
        tiles = replace(GemvTiles.for_shape(hidden, inter), **variant)
        for dtype in (torch.float32, torch.bfloat16):    # the one-hot rows are exact in either; fp32 keeps h exact
            if dtype == torch.bfloat16 and not tiles.gluon:
                continue                    # (bf16 with tiles.mma: the tensor-core kernel, every code exact)
            h = mxfp4_gemv_gate_up(x.to(dtype), w13, ids, identity, tiles)                 # [hidden, inter]
            want = (dense[:inter] * dense[inter:] / 2).t()
            torch.testing.assert_close(h.cpu().float(), want.to(dtype).float(), rtol=0, atol=0)
