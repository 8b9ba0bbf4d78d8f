"""The decode-path kernels against their torch references: the dense GEMV (with and without the SiLU-and-mul
input) and the fused QKV step (QK-norm + RoPE + K/V cache write). Interpreter on CPU in fp32, bf16 on a GPU."""
from __future__ import annotations

import pytest
import torch

from runtime.ops.linear import GemvTiles, gemv_triton, linear_ref, norm_linear_ref
from runtime.ops.norm import RMSNorm
from runtime.ops.qkv import qkv_rope_write_kv_ref, qkv_rope_write_kv_triton
from runtime.ops.rope import RotaryEmbedding


def _interpreted(function_name: str, module) -> None:
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction
    if not isinstance(getattr(module, function_name), InterpretedFunction):
        pytest.skip("the kernels were built for a GPU (TRITON_INTERPRET unset)")


def _gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


# ---- GEMV -------------------------------------------------------------------------------------------

# K = 300: in one step (the whole weight block loaded at once), and in steps of 128 (the last one 44 wide)
ONE_STEP_TILES, STEP_TILES = GemvTiles(block_n=4, block_k=512), GemvTiles(block_n=4, block_k=128)


@pytest.mark.parametrize("rows", [1, 3, 4])
@pytest.mark.parametrize("silu_mul", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_reference_in_the_interpreter(rows, silu_mul, bias):
    from runtime.ops import linear
    _interpreted("_gemv_kernel", linear)
    generator = torch.Generator().manual_seed(rows)
    n, k = 37, 300                                             # neither a multiple of BLOCK_N nor of BLOCK_K
    x = torch.randn(rows, 2 * k if silu_mul else k, generator=generator)
    weight = torch.randn(n, k, generator=generator)
    b = torch.randn(n, generator=generator) if bias else None
    expected = linear_ref(x, weight, b, silu_mul)
    for tiles in [None, ONE_STEP_TILES, STEP_TILES]:
        torch.testing.assert_close(gemv_triton(x, weight, b, silu_mul, tiles), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("weight_in_fp32", [False, True])
def test_gemv_with_fused_norm_matches_reference_in_the_interpreter(residual, weight_in_fp32):
    from runtime.ops import linear
    _interpreted("_gemv_kernel", linear)
    generator = torch.Generator().manual_seed(5)
    n, k = 37, 300
    norm = RMSNorm(k, 1e-5, weight_in_fp32)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(k, generator=generator))
    x = torch.randn(1, k, generator=generator) * 3
    res = torch.randn(1, k, generator=generator) if residual else None
    weight, bias = torch.randn(n, k, generator=generator), torch.randn(n, generator=generator)
    expected, expected_sum = norm_linear_ref(x, res, norm, weight, bias)
    for tiles in [None, ONE_STEP_TILES, STEP_TILES]:
        ours, ours_sum = gemv_triton(x, weight, bias, tiles=tiles, norm=norm, residual=res)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(ours_sum, expected_sum, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(4096, 1024), (24576, 4096), (5120, 2880)])
@pytest.mark.parametrize("weight_in_fp32", [False, True])
def test_gemv_with_fused_norm_matches_reference_in_bf16_on_gpu(n, k, weight_in_fp32):
    _gpu()
    generator = torch.Generator(device="cuda").manual_seed(n)
    norm = RMSNorm(k, 1e-6, weight_in_fp32).cuda().to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(k, generator=generator, device="cuda"))
    x = (3 * torch.randn(1, k, generator=generator, device="cuda")).to(torch.bfloat16)
    res = torch.randn(1, k, generator=generator, device="cuda").to(torch.bfloat16)
    weight = (torch.randn(n, k, generator=generator, device="cuda") * k ** -0.5).to(torch.bfloat16)
    expected, expected_sum = norm_linear_ref(x, res, norm, weight)
    ours, ours_sum = gemv_triton(x, weight, norm=norm, residual=res)
    assert torch.equal(ours_sum, expected_sum)
    error = (ours.float() - expected.float()).norm() / expected.float().norm()
    assert error < 1e-2, error


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("n,k,silu_mul", [(4096, 1024, False), (1024, 3072, True), (151936, 1024, False),
                                           (5120, 2880, False), (4096, 12288, True)])
def test_gemv_matches_reference_in_bf16_on_gpu(rows, n, k, silu_mul):
    _gpu()
    generator = torch.Generator(device="cuda").manual_seed(n + rows)
    x = torch.randn(rows, 2 * k if silu_mul else k, generator=generator, device="cuda").to(torch.bfloat16)
    weight = (torch.randn(n, k, generator=generator, device="cuda") * k ** -0.5).to(torch.bfloat16)
    bias = torch.randn(n, generator=generator, device="cuda").to(torch.bfloat16)
    expected = linear_ref(x.float(), weight.float(), bias.float(), silu_mul)
    ours = gemv_triton(x, weight, bias, silu_mul)
    assert ours.dtype == torch.bfloat16
    error = (ours.float() - expected).norm() / expected.norm()
    assert error < 1e-2, error


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,fusion", [(256, 4096, ""), (1024, 3072, "silu"), (2624, 4096, "norm"),
                                        (1000, 2880, "")])
@pytest.mark.parametrize("tiles", [None, GemvTiles(2, 1024, 4), GemvTiles(1, 2048, 8), GemvTiles(2, 4096, 8)])
def test_gemv_replays_in_a_cuda_graph(n, k, fusion, tiles):
    """The default tiles, steps and one step, replayed from a CUDA graph over changing inputs: each replay
    matches the reference."""
    _gpu()
    generator = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.zeros(1, 2 * k if fusion == "silu" else k, dtype=torch.bfloat16, device="cuda")
    res = torch.zeros(1, k, dtype=torch.bfloat16, device="cuda") if fusion == "norm" else None
    norm = RMSNorm(k, 1e-6).cuda().to(torch.bfloat16) if fusion == "norm" else None
    weight = (torch.randn(n, k, generator=generator, device="cuda") * k ** -0.5).to(torch.bfloat16)
    bias = torch.randn(n, generator=generator, device="cuda").to(torch.bfloat16) if fusion == "" else None
    call = lambda: gemv_triton(x, weight, bias, fusion == "silu", tiles, norm=norm, residual=res)  # noqa: E731
    call()                                                   # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    for step in range(3):
        x.copy_(torch.randn(x.shape, generator=generator, device="cuda"))
        if res is not None:
            res.copy_(torch.randn(res.shape, generator=generator, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        if norm is not None:
            expected, expected_sum = norm_linear_ref(x, res, norm, weight)
            assert torch.equal(out[1], expected_sum)
            got = out[0]
        else:
            expected, got = linear_ref(x.float(), weight.float(), None if bias is None else bias.float(),
                                       fusion == "silu"), out
        error = (got.float() - expected.float()).norm() / expected.float().norm()
        assert error < 1e-2, (step, error)


# ---- QKV: QK-norm + RoPE + K/V write ----------------------------------------------------------------


def _qkv_case(num_tokens: int, heads: int, kv_heads: int, head_dim: int, dtype, device, seed: int):
    generator = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, generator=generator, device=device).to(dtype)
    positions = torch.randint(0, 500, (num_tokens,), generator=generator, device=device)
    num_blocks, block_size = 6, 4
    cache = torch.randn(num_blocks, block_size, 2, kv_heads, head_dim, generator=generator, device=device).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=generator, device=device)[:num_tokens]
    slots[::3] = -1                                              # padding rows write nothing
    norm_weights = [1 + 0.3 * torch.randn(head_dim, generator=generator, device=device).to(dtype) for _ in range(2)]
    return qkv, positions, cache, slots, norm_weights


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("norm", [True, False])
def test_qkv_rope_write_kv_matches_reference_in_the_interpreter(style, norm):
    from runtime.ops import qkv as qkv_module
    _interpreted("_qkv_rope_write_kv_kernel", qkv_module)
    heads, kv_heads, head_dim = 6, 2, 16                          # heads not a power of two
    qkv, positions, cache, slots, (q_w, k_w) = _qkv_case(7, heads, kv_heads, head_dim, torch.float32, "cpu", 3)
    rotary = RotaryEmbedding(1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)), 512, 1.0, style)
    weights = (q_w, k_w) if norm else (None, None)
    expected_cache = cache.clone()
    expected = qkv_rope_write_kv_ref(qkv, positions, rotary.cos_sin, style, expected_cache, slots, heads, kv_heads,
                                     head_dim, *weights, 1e-6)
    ours = qkv_rope_write_kv_triton(qkv, positions, rotary.cos_sin, style, cache, slots, heads, kv_heads,
                                    head_dim, *weights, 1e-6)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache, expected_cache, rtol=1e-5, atol=1e-5)   # untouched slots too


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,head_dim,norm", [(16, 8, 128, True), (32, 8, 128, True),
                                                          (64, 8, 64, False)])
def test_qkv_rope_write_kv_matches_reference_in_bf16_on_gpu(heads, kv_heads, head_dim, norm):
    _gpu()
    qkv, positions, cache, slots, (q_w, k_w) = _qkv_case(21, heads, kv_heads, head_dim, torch.bfloat16, "cuda", 4)
    rotary = RotaryEmbedding(1.0 / (1e6 ** (torch.arange(0, head_dim, 2).float() / head_dim)), 512).cuda()
    weights = (q_w, k_w) if norm else (None, None)
    expected_cache = cache.clone()
    expected = qkv_rope_write_kv_ref(qkv, positions, rotary.cos_sin, "neox", expected_cache, slots, heads,
                                     kv_heads, head_dim, *weights, 1e-6)
    ours = qkv_rope_write_kv_triton(qkv, positions, rotary.cos_sin, "neox", cache, slots, heads, kv_heads,
                                    head_dim, *weights, 1e-6)
    # the roundings are the reference's; only the norm's fp32 sum order differs (a rare one-unit tie)
    for got, want in ((ours, expected), (cache, expected_cache)):
        mismatched = (got != want).float().mean().item()
        assert mismatched < 1e-3, mismatched
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


# ---- routing ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 4, 300])
def test_softmax_after_topk_matches_reference_in_bf16_on_gpu(num_tokens):
    """The decode routing of a 32-expert, top-4 router (bf16 logits), one launch against topk + softmax."""
    _gpu()
    from runtime.ops.moe import softmax_topk_ref, softmax_topk_triton
    generator = torch.Generator().manual_seed(num_tokens)
    ranks = torch.stack([torch.randperm(32, generator=generator) for _ in range(num_tokens)])
    logits = ((ranks.float() - 16) / 4).to(torch.bfloat16).cuda()        # distinct in bf16: a unique top 4
    weights, ids = softmax_topk_triton(logits, 4, False, softmax_after_topk=True)
    expected_weights, expected_ids = softmax_topk_ref(logits, 4, False, softmax_after_topk=True)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights.float(), expected_weights.float(), rtol=0, atol=2 ** -8)   # 1 bf16 ulp
