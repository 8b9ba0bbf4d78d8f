"""Triton paged attention (write, decode split-K, prefill) against the torch reference.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), in fp32 and at
small sizes; the `gpu` tests run them compiled, in bf16, at real sizes."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from runtime.ops.attention import (DecodeTiles, paged_attention_ref, paged_decode_triton,  # noqa: E402
                                   paged_prefill_triton, to_cache_dtype, write_kv_ref, write_kv_triton)

INTERPRETED = not torch.cuda.is_available()


def paged_case(seq_lens, query_lens, num_heads, kv_heads, head_dim, page, dtype, device, seed=0):
    """A cache whose blocks are handed out in shuffled order, filled with random K/V for every position;
    queries for the last `query_len` positions of each request."""
    generator = torch.Generator().manual_seed(seed)
    blocks_per_req = [-(-s // page) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + 3
    order = (torch.randperm(num_blocks - 1, generator=generator) + 1).tolist()  # block 0 stays the null block
    width = max(blocks_per_req)
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    for b, n in enumerate(blocks_per_req):
        table[b, :n] = torch.tensor([order.pop() for _ in range(n)])
    cache = torch.randn(num_blocks, page, 2, kv_heads, head_dim, generator=generator).to(dtype)
    query_start = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    query_start[1:] = torch.cumsum(torch.tensor(query_lens), 0)
    q = torch.randn(int(query_start[-1]), num_heads, head_dim, generator=generator).to(dtype)
    sinks = 2.0 * torch.randn(num_heads, generator=generator)
    to = lambda t: t.to(device)  # noqa: E731
    return to(q), to(cache), to(table), to(query_start), to(torch.tensor(seq_lens, dtype=torch.int32)), to(sinks)


VARIANTS = {
    "causal": dict(),
    "window": dict(window=5),
    "sinks": dict(sinks=True),
    "softcap": dict(softcap=3.0),
    "all": dict(window=7, sinks=True, softcap=5.0),
}


def _options(variant, sinks):
    options = dict(VARIANTS[variant])
    options["sinks"] = sinks if options.get("sinks") else None
    return options


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_kernel_matches_reference_interpreted(variant):
    seq_lens = [1, 5, 17, 33]                     # one key, a partial block, block boundaries crossed
    q, cache, table, _, lens, sinks = paged_case(seq_lens, [1] * 4, 4, 2, 32, 4, torch.float32, "cpu")
    options = _options(variant, sinks)
    scale = 32 ** -0.5
    expected = paged_attention_ref(q, cache, table, list(range(5)), seq_lens, scale, **options)
    for splits in (1, 3):                         # split-K with uneven and empty splits
        out = paged_decode_triton(q, cache, table, lens, max(seq_lens), scale, num_splits=splits, **options)
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    for splits, ahead in ((1, 1), (3, 2)):        # the hand pipeline: 1 or 2 tiles in flight into registers
        tiles = DecodeTiles(block_n=16, num_warps=4, num_stages=1, programs_per_sm=2, ahead=ahead,
                            max_registers=128 * (ahead - 1), lazy_rescale=ahead == 2)   # 0: the compiler's choice
        out = paged_decode_triton(q, cache, table, lens, max(seq_lens), scale, num_splits=splits, tiles=tiles,
                                  **options)
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_kernel_matches_reference_interpreted(variant):
    seq_lens = [6, 40, 19, 3]
    query_lens = [6, 23, 1, 2]                    # a fresh prompt, chunks after cached tokens, a decode row
    q, cache, table, starts, lens, sinks = paged_case(seq_lens, query_lens, 4, 2, 32, 4, torch.float32, "cpu",
                                                      seed=1)
    options = _options(variant, sinks)
    scale = 32 ** -0.5
    expected = paged_attention_ref(q, cache, table, starts.tolist(), seq_lens, scale, **options)
    out = paged_prefill_triton(q, cache, table, starts, lens, max(query_lens), scale, **options)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_write_kv_kernel_matches_reference_interpreted():
    generator = torch.Generator().manual_seed(2)
    k = torch.randn(9, 2, 16, generator=generator)
    v = torch.randn(9, 2, 16, generator=generator)
    slots = torch.tensor([3, -1, 0, 7, 12, -1, 5, 19, 8])
    expected = torch.randn(5, 4, 2, 2, 16, generator=generator)
    out = expected.clone()
    write_kv_ref(expected, k, v, slots)
    write_kv_triton(out, k, v, slots)
    assert torch.equal(out, expected)


FP8 = torch.float8_e4m3fn


def to_fp8_cache(cache: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor) -> torch.Tensor:
    return torch.stack([to_cache_dtype(cache[:, :, 0], FP8, k_scale), to_cache_dtype(cache[:, :, 1], FP8, v_scale)],
                       dim=2)


@pytest.mark.parametrize("head_dim", [32, 48])                # 48: words past the head masked
@pytest.mark.parametrize("variant", ["causal", "all"])
def test_decode_kernel_fp8_cache_fp16_dots_interpreted(variant, head_dim):
    """fp16 queries over an e4m3 cache with scales (K 0.5, V 2), K and V read as int32 words and widened in
    registers (here by Triton's casts, the interpreter's stand-in for the hardware conversion). The fp16 dots
    round q * scale and the probabilities to fp16 (2^-11 relative): within 1e-3 of the fp32 reference, where a
    misplaced byte or a lost scale errs by ~1."""
    seq_lens = [1, 5, 17, 33]
    q, cache, table, _, lens, sinks = paged_case(seq_lens, [1] * 4, 8, 2, head_dim, 4, torch.float32, "cpu", seed=3)
    k_scale, v_scale = torch.tensor([0.5]), torch.tensor([2.0])
    cache, q = to_fp8_cache(cache, k_scale, v_scale), q.half()
    options = _options(variant, sinks)
    scale = head_dim ** -0.5
    expected = paged_attention_ref(q.float(), cache, table, list(range(5)), seq_lens, scale, k_scale=k_scale,
                                   v_scale=v_scale, **options)
    for splits, ahead, lazy in ((1, 1, False), (3, 2, False), (2, 2, True)):  # tiles in flight into registers
        tiles = DecodeTiles(block_n=16, num_warps=4, num_stages=1, programs_per_sm=2, fp16_dot=True, ahead=ahead,
                            lazy_rescale=lazy)
        out = paged_decode_triton(q, cache, table, lens, max(seq_lens), scale, num_splits=splits, k_scale=k_scale,
                                  v_scale=v_scale, tiles=tiles, **options)
        torch.testing.assert_close(out.float(), expected, atol=1e-3, rtol=1e-3)


# ---- GPU: compiled, bf16, real shapes --------------------------------------------------------------------

GPU_SHAPES = [(16, 8, 128), (32, 8, 128), (64, 8, 64), (8, 1, 512), (8, 4, 256)]   # heads, kv_heads, head_dim


@pytest.mark.gpu
@pytest.mark.parametrize("heads, kv_heads, head_dim", GPU_SHAPES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_kernel_bf16_on_gpu(heads, kv_heads, head_dim, variant):
    seq_lens = [1, 100, 1000, 4097, 31]
    q, cache, table, _, lens, sinks = paged_case(seq_lens, [1] * 5, heads, kv_heads, head_dim, 16,
                                                 torch.bfloat16, "cuda")
    options = _options(variant, sinks)
    expected = paged_attention_ref(q, cache, table, list(range(6)), seq_lens, head_dim ** -0.5, **options)
    out = paged_decode_triton(q, cache, table, lens, 8192, head_dim ** -0.5, **options)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("heads, kv_heads, head_dim", GPU_SHAPES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_kernel_bf16_on_gpu(heads, kv_heads, head_dim, variant):
    seq_lens = [300, 1100, 17, 64]
    query_lens = [300, 77, 1, 33]
    q, cache, table, starts, lens, sinks = paged_case(seq_lens, query_lens, heads, kv_heads, head_dim, 16,
                                                      torch.bfloat16, "cuda")
    options = _options(variant, sinks)
    expected = paged_attention_ref(q, cache, table, starts.tolist(), seq_lens, head_dim ** -0.5, **options)
    out = paged_prefill_triton(q, cache, table, starts, lens, max(query_lens), head_dim ** -0.5, **options)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_write_kv_kernel_on_gpu():
    k = torch.randn(300, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(300, 8, 128, device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(64 * 16, device="cuda")[:300]
    slots[::7] = -1
    expected = torch.randn(64, 16, 2, 8, 128, device="cuda", dtype=torch.bfloat16)
    out = expected.clone()
    write_kv_ref(expected, k, v, slots)
    write_kv_triton(out, k, v, slots)
    assert torch.equal(out, expected)


@pytest.mark.gpu
def test_decode_kernel_reads_every_e4m3_value_exactly_on_gpu():
    """One key per request, so its probability is exactly 1 and the output is V times v_scale, exact in bf16:
    every finite e4m3 byte (the subnormals included), at every byte position of a word, through the hardware
    conversion of the default fp8 tiles."""
    kv_heads, head_dim, page = 8, 128, 16
    finite = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)     # 0x7F/0xFF: NaN
    cache = torch.randn(3, page, 2, kv_heads, head_dim).to(FP8)
    v_bytes = finite[(torch.arange(2 * kv_heads * head_dim) * 37) % len(finite)].view(2, kv_heads, head_dim)
    cache[1:, 0, 1] = v_bytes.view(FP8)                          # block 1: request 0's key, block 2: request 1's
    table = torch.tensor([[1], [2]], dtype=torch.int32)
    q = torch.randn(2, 4 * kv_heads, head_dim).to(torch.bfloat16)
    k_scale, v_scale = torch.tensor([0.25]), torch.tensor([2.0])
    out = paged_decode_triton(q.cuda(), cache.cuda(), table.cuda(), torch.ones(2, dtype=torch.int32).cuda(), 1,
                              head_dim ** -0.5, k_scale=k_scale.cuda(), v_scale=v_scale.cuda())
    expected = (v_bytes.view(FP8).float() * 2.0).repeat_interleave(4, dim=1)                 # [2, heads, head_dim]
    assert torch.equal(out.float().cpu(), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [FP8, torch.bfloat16])
@pytest.mark.parametrize("tiles", [DecodeTiles(32, 2, 1, 6, fp16_dot=True, ahead=1),
                                   DecodeTiles(16, 1, 1, 8, fp16_dot=True, ahead=2, max_splits=128),
                                   DecodeTiles(64, 4, 1, 3, fp16_dot=True, ahead=2),
                                   DecodeTiles(16, 1, 1, 8, fp16_dot=True, ahead=2, max_splits=128,
                                               lazy_rescale=True),
                                   DecodeTiles(16, 1, 1, 8, fp16_dot=True, ahead=1, max_splits=128),
                                   DecodeTiles(64, 4, 1, 4, ahead=1), DecodeTiles(32, 4, 1, 4, ahead=2)],
                         ids=lambda t: f"{t.block_n}-{t.num_warps}-{t.programs_per_sm}-ahead{t.ahead}"
                                       + ("-lazy" if t.lazy_rescale else ""))
def test_decode_hand_pipeline_on_gpu(tiles, dtype):
    """The hand pipeline (tiles in flight into registers, the loop unrolled ahead + 1 times) on ragged lengths
    (shorter than a tile, splits that end mid-step, empty splits), scattered pages, both cache dtypes."""
    seq_lens = [1, 100, 1000, 4097, 31, 200]
    q, cache, table, _, lens, _ = paged_case(seq_lens, [1] * 6, 32, 8, 128, 16, torch.float32, "cpu")
    scales = dict(k_scale=torch.tensor([0.5]), v_scale=torch.tensor([2.0])) if dtype == FP8 else {}
    cache = to_fp8_cache(cache, **scales) if dtype == FP8 else cache.to(dtype)
    q = q.to(torch.bfloat16)
    expected = paged_attention_ref(q.float(), cache, table, list(range(7)), seq_lens, 128 ** -0.5, **scales)
    scales = {name: scale.cuda() for name, scale in scales.items()}
    for splits in (None, 7):
        out = paged_decode_triton(q.cuda(), cache.cuda(), table.cuda(), lens.cuda(), 8192, 128 ** -0.5,
                                  num_splits=splits, tiles=tiles, **scales)
        torch.testing.assert_close(out.float().cpu(), expected, atol=2e-2, rtol=2e-2)


# ---- one launch: the last split reduces; the fused QKV step ---------------------------------------------

from runtime.ops.attention import QkvRope, _decode_counters  # noqa: E402
from runtime.ops.qkv import qkv_rope_write_kv_ref, qkv_rope_write_kv_triton  # noqa: E402
from runtime.ops.rope import RotaryEmbedding  # noqa: E402

RAGGED = [1, 3, 16, 17, 64, 150, 33]              # shorter than a split, one step, many splits, batch > 1


@pytest.mark.parametrize("variant", ["causal", "all"])
def test_decode_one_launch_matches_two_launches_interpreted(variant):
    """The reduction in the launch (live splits only) against the reduce kernel and the reference, at one
    split, a few, and more splits than most requests have keys for; the counters are left at zero."""
    q, cache, table, _, lens, sinks = paged_case(RAGGED, [1] * len(RAGGED), 8, 2, 32, 4, torch.float32, "cpu", seed=5)
    options = _options(variant, sinks)
    scale = 32 ** -0.5
    expected = paged_attention_ref(q, cache, table, list(range(len(RAGGED) + 1)), RAGGED, scale, **options)
    for splits in (1, 4, 16):
        for fused in (False, True):
            tiles = DecodeTiles(block_n=16, num_warps=4, num_stages=1, programs_per_sm=2, ahead=0,
                                fused_reduce=fused)
            out = paged_decode_triton(q, cache, table, lens, max(RAGGED), scale, num_splits=splits, tiles=tiles,
                                      **options)
            torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    assert not _decode_counters(q.device, 1).any()


def _qkv_decode_case(seq_lens, heads, kv_heads, head_dim, dtype, device, seed):
    q, cache, table, _, lens, sinks = paged_case(seq_lens, [1] * len(seq_lens), heads, kv_heads, head_dim, 4,
                                                 torch.float32, "cpu", seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    qkv = torch.randn(len(seq_lens), (heads + 2 * kv_heads) * head_dim, generator=generator)
    positions = torch.tensor(seq_lens) - 1
    page = cache.shape[1]
    slots = torch.stack([table[b, p // page].long() * page + p % page for b, p in enumerate(positions.tolist())])
    slots[1] = -1                                 # a padding row writes nothing
    weights = [1 + 0.3 * torch.randn(head_dim, generator=generator) for _ in range(2)]
    to = lambda t: t.to(device)  # noqa: E731
    return (to(qkv.to(dtype)), to(cache), to(table), to(lens), to(sinks), to(positions), to(slots),
            [to(w.to(dtype)) for w in weights])


@pytest.mark.parametrize("style, norm, variant", [("neox", True, "causal"), ("gptj", False, "all"),
                                                  ("neox", False, "sinks")])
def test_decode_with_fused_qkv_matches_reference_interpreted(style, norm, variant):
    """The decode kernel reading the QKV projection row (QK-norm, RoPE, the newest K/V written by the split
    that holds it) against qkv_rope_write_kv_ref + the reference attention: output and cache."""
    seq_lens = [5, 1, 40, 17]
    heads, kv_heads, head_dim = 8, 2, 16
    qkv, cache, table, lens, sinks, positions, slots, (q_w, k_w) = _qkv_decode_case(
        seq_lens, heads, kv_heads, head_dim, torch.float32, "cpu", 7)
    rotary = RotaryEmbedding(1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)), 64, 1.0, style)
    weights = (q_w, k_w) if norm else (None, None)
    options = _options(variant, sinks)
    scale = head_dim ** -0.5
    expected_cache = cache.clone()
    q = qkv_rope_write_kv_ref(qkv, positions, rotary.cos_sin, style, expected_cache, slots, heads, kv_heads,
                              head_dim, *weights, 1e-6)
    expected = paged_attention_ref(q, expected_cache, table, list(range(5)), seq_lens, scale, **options)
    for splits, fused in ((1, True), (3, True), (3, False)):
        tiles = DecodeTiles(block_n=16, num_warps=4, num_stages=1, programs_per_sm=2, ahead=1, fused_reduce=fused)
        ours_cache = cache.clone()
        out = paged_decode_triton(qkv, ours_cache, table, lens, max(seq_lens), scale, num_splits=splits, tiles=tiles,
                                  qkv_rope=QkvRope(positions, rotary.cos_sin, style, slots, heads, *weights, 1e-6),
                                  **options)
        torch.testing.assert_close(ours_cache, expected_cache, atol=1e-5, rtol=1e-5)
        keep = torch.tensor([b != 1 for b in range(len(seq_lens))])        # row 1 read an unwritten key
        torch.testing.assert_close(out[keep], expected[keep], atol=2e-5, rtol=2e-5)


def test_decode_with_fused_qkv_fp8_cache_interpreted():
    """The fused QKV step into an e4m3 cache with scales (stored / k_scale, saturated), read back as words."""
    seq_lens = [9, 1, 30]
    heads, kv_heads, head_dim = 8, 2, 32
    qkv, cache, table, lens, _, positions, slots, (q_w, k_w) = _qkv_decode_case(
        seq_lens, heads, kv_heads, head_dim, torch.float32, "cpu", 9)
    k_scale, v_scale = torch.tensor([0.5]), torch.tensor([2.0])
    cache = to_fp8_cache(cache, k_scale, v_scale)
    qkv, q_w, k_w = qkv.half(), q_w.half(), k_w.half()
    rotary = RotaryEmbedding(1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)), 64, 1.0, "neox")
    # the interpreter's e4m3 stores round a few values apart from torch's (the separate QKV kernel's too): the
    # expected cache is that kernel's, the expected queries the reference's
    expected_cache = cache.clone()
    qkv_rope_write_kv_triton(qkv, positions, rotary.cos_sin, "neox", expected_cache, slots, heads, kv_heads,
                             head_dim, q_w, k_w, 1e-6, k_scale, v_scale)
    q = qkv_rope_write_kv_ref(qkv, positions, rotary.cos_sin, "neox", cache.clone(), slots, heads, kv_heads,
                              head_dim, q_w, k_w, 1e-6, k_scale, v_scale)
    expected = paged_attention_ref(q.float(), expected_cache, table, list(range(4)), seq_lens, head_dim ** -0.5,
                                   k_scale=k_scale, v_scale=v_scale)
    tiles = DecodeTiles(block_n=16, num_warps=4, num_stages=1, programs_per_sm=2, fp16_dot=True, ahead=1)
    out = paged_decode_triton(qkv, cache, table, lens, max(seq_lens), head_dim ** -0.5, num_splits=2, tiles=tiles,
                              k_scale=k_scale, v_scale=v_scale,
                              qkv_rope=QkvRope(positions, rotary.cos_sin, "neox", slots, heads, q_w, k_w, 1e-6))
    assert torch.equal(cache.view(torch.uint8), expected_cache.view(torch.uint8))
    torch.testing.assert_close(out.float()[[0, 2]], expected[[0, 2]], atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("heads, kv_heads, head_dim, norm, variant", [(16, 8, 128, True, "causal"),
                                                                      (64, 8, 64, False, "all"),
                                                                      (32, 8, 128, True, "window")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8])
def test_decode_with_fused_qkv_on_gpu(heads, kv_heads, head_dim, norm, variant, dtype):
    """The one-launch decode reading the QKV row, compiled, at real shapes (ragged contexts, a padding row,
    default tiles and the graphs' split count) against qkv_rope_write_kv_ref + the reference attention, and
    again inside a CUDA graph replayed three times (the arrival counters reset themselves)."""
    seq_lens = [300, 1, 4097, 17, 64]
    qkv, cache, table, lens, sinks, positions, slots, (q_w, k_w) = _qkv_decode_case(
        seq_lens, heads, kv_heads, head_dim, torch.bfloat16, "cpu", 11)
    scales = dict(k_scale=torch.tensor([0.5]), v_scale=torch.tensor([2.0])) if dtype == FP8 else {}
    cache = to_fp8_cache(cache, **scales) if dtype == FP8 else cache.to(dtype)
    rotary = RotaryEmbedding(1.0 / (1e6 ** (torch.arange(0, head_dim, 2).float() / head_dim)), 8192)
    weights = (q_w, k_w) if norm else (None, None)
    options = _options(variant, sinks)
    scale = head_dim ** -0.5
    expected_cache = cache.clone()
    q = qkv_rope_write_kv_ref(qkv, positions, rotary.cos_sin, "neox", expected_cache, slots, heads, kv_heads,
                              head_dim, *weights, 1e-6, **scales)
    expected = paged_attention_ref(q.float(), expected_cache, table, list(range(6)), seq_lens, scale, **options,
                                   **scales)
    cuda = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
    args = [cuda(t) for t in (qkv, cache, table, lens)]
    fused = QkvRope(cuda(positions), rotary.cos_sin.cuda(), "neox", cuda(slots), heads, *map(cuda, weights), 1e-6)
    options = {name: cuda(value) for name, value in options.items()}
    scales = {name: cuda(value) for name, value in scales.items()}
    call = lambda: paged_decode_triton(*args, 40960, scale, qkv_rope=fused, **options, **scales)  # noqa: E731
    out = call()
    keep = torch.tensor([b != 1 for b in range(len(seq_lens))])                  # row 1: padding, reads no key
    got_cache = args[1].cpu()
    if dtype == FP8:
        mismatched = (got_cache.view(torch.uint8) != expected_cache.view(torch.uint8)).float().mean().item()
    else:
        mismatched = (got_cache != expected_cache).float().mean().item()
    assert mismatched < 1e-4, mismatched                      # the norm's sum order: a rare one-unit tie
    torch.testing.assert_close(got_cache.float(), expected_cache.float(), atol=0.1, rtol=0.13)
    torch.testing.assert_close(out.float().cpu()[keep], expected[keep], atol=2e-2, rtol=2e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = call()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(replayed[keep.cuda()], out[keep.cuda()])
    assert not _decode_counters(out.device, 1).any()
