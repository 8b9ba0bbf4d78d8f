"""DeepSeek V4's Triton kernels against their torch references on random, ragged paged batches: contexts
shorter than the window and than one compressed entry, top-k wider than the entries there are, blocks in
random order. On the CPU they run in Triton's interpreter at small sizes; `-m gpu` runs the release's sizes
(head dim 512, 64 heads, indexer 64 x 128) in bf16. A padded row (position -1, context length 0) whose block
table points far outside the cache must read nothing and write nothing."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from models.deepseek_v4 import kernels
from models.deepseek_v4.attention import window_sparse_attention
from models.deepseek_v4.cache_ops import request_entries, token_requests
from models.deepseek_v4.compressor import Compressor, Projection, indexer_scores_ref
from models.deepseek_v4.rope import TrailingRope
from runtime.forward import ForwardContext
from runtime.ops import RMSNorm
from runtime.ops.norm import rms_norm_ref


@dataclass
class Sizes:
    heads: int
    dim: int
    window: int
    ratio: int
    block_size: int
    top_k: int
    index_heads: int
    index_dim: int
    rope_dim: int


SMALL = Sizes(heads=4, dim=32, window=8, ratio=4, block_size=16, top_k=6, index_heads=16, index_dim=16, rope_dim=8)
RELEASE = Sizes(heads=64, dim=512, window=128, ratio=4, block_size=256, top_k=512, index_heads=64, index_dim=128,
                rope_dim=64)

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def _setup(device: str) -> tuple[Sizes, torch.dtype, list[tuple[int, int]]]:
    """(sizes, dtype, (tokens before the step, tokens in the step) per request)."""
    if device == "cpu":
        # a first chunk; inside the first window; one short of an entry; decodes past several entries
        return SMALL, torch.float32, [(0, 5), (2, 1), (3, 4), (21, 1), (40, 3), (9, 7)]
    return RELEASE, torch.bfloat16, [(0, 37), (100, 1), (2, 1), (3000, 1), (2047, 2), (700, 64), (127, 1), (5000, 3)]


def _context(device, sizes: Sizes, steps, caches, ratios, tables=None) -> tuple[ForwardContext, torch.Tensor]:
    """A ForwardContext over `caches` (one group each, block tables in shuffled block order unless given)
    for requests with (num_computed, query_len) `steps`; -> (ctx, positions)."""
    generator = torch.Generator().manual_seed(1)
    bs = sizes.block_size
    seq_lens = np.array([c + q for c, q in steps], dtype=np.int32)
    max_blocks = int(-(-seq_lens.max() // bs))
    query_start = np.zeros(len(steps) + 1, dtype=np.int32)
    np.cumsum([q for _, q in steps], out=query_start[1:])
    positions = torch.cat([torch.arange(c, c + q) for c, q in steps]).to(device)
    given, tables, slots = tables, [], []
    for g, (cache, ratio) in enumerate(zip(caches, ratios)):
        if given is None:
            num_blocks = cache.shape[0]
            order = torch.randperm(num_blocks - 1, generator=generator)[:len(steps) * max_blocks] + 1
            table = order.view(len(steps), max_blocks).to(torch.int32).to(device)
        else:
            table = given[g]
        tables.append(table)
        rows = torch.from_numpy(np.repeat(np.arange(len(steps)), [q for _, q in steps])).to(device)
        block = table[rows, positions // bs].long()
        slot = block * (bs // ratio) + (positions % bs) // ratio
        if ratio > 1:
            slot = torch.where((positions + 1) % ratio == 0, slot, -1)
        slots.append(slot)
    ctx = ForwardContext(
        positions=positions, query_start_loc=torch.from_numpy(query_start).to(device),
        seq_lens=torch.from_numpy(seq_lens).to(device), num_computed=torch.tensor([c for c, _ in steps]).to(device),
        logits_indices=positions, block_tables=tables, slot_mappings=slots, caches=caches,
        layer_group=list(range(len(caches))), block_size=bs, max_query_len=max(q for _, q in steps),
        max_seq_len=int(seq_lens.max()), query_start_loc_host=query_start, seq_lens_host=seq_lens)
    return ctx, positions


def _num_blocks(sizes: Sizes, steps) -> int:
    return len(steps) * -(-max(c + q for c, q in steps) // sizes.block_size) + 2


def _random_selection(positions, ratio, top_k, generator) -> torch.Tensor:
    """[n, top_k] distinct closed entries per query in random order, -1 padded (top_k may exceed them)."""
    rows = []
    for p in positions.tolist():
        visible = (p + 1) // ratio
        picked = torch.randperm(visible, generator=generator)[:top_k]
        rows.append(torch.cat([picked, torch.full((top_k - len(picked),), -1)]))
    return torch.stack(rows)


@pytest.mark.parametrize("splits", [None, 3], ids=["auto-splits", "3-splits"])
@pytest.mark.parametrize("kind", ["window", "hca", "csa"])
@pytest.mark.parametrize("device", DEVICES)
def test_sparse_attention_matches_reference(device, kind, splits, monkeypatch):
    """With the split count the batch gets, and with the keys split in 3 parts merged by the second kernel."""
    if splits is not None:
        monkeypatch.setattr(kernels, "attention_splits", lambda *args, **kwargs: splits)
    sizes, dtype, steps = _setup(device)
    generator = torch.Generator().manual_seed(0)
    ratio = {"window": 0, "hca": 16 if device == "cpu" else 128, "csa": sizes.ratio}[kind]
    num_blocks = _num_blocks(sizes, steps)
    window_cache = torch.randn(num_blocks, sizes.block_size, sizes.dim, generator=generator).to(device, dtype)
    caches, ratios = [window_cache], [1]
    if ratio:
        caches.append(torch.randn(num_blocks, sizes.block_size // ratio, sizes.dim, generator=generator).to(device, dtype))
        ratios.append(ratio)
    ctx, positions = _context(device, sizes, steps, caches, ratios)
    n = positions.shape[0]
    q = torch.randn(n, sizes.heads, sizes.dim, generator=generator).to(device, dtype)
    sinks = torch.randn(sizes.heads, generator=generator).to(device)
    selected = _random_selection(positions.cpu(), ratio, sizes.top_k, generator).to(device) if kind == "csa" else None
    requests = token_requests(ctx, n)
    scale = sizes.dim ** -0.5
    out = kernels.sparse_attention(q, positions, requests, window_cache, ctx.block_tables[0], sizes.window,
                                   caches[1] if ratio else None, ctx.block_tables[1] if ratio else None, ratio,
                                   selected.to(torch.int32) if selected is not None else None, sinks, scale,
                                   sizes.block_size, ctx.max_seq_len // ratio if ratio else 0)
    # the reference in fp32 on the same (rounded) inputs
    ref_ctx = ForwardContext(**{f: getattr(ctx, f) for f in ForwardContext.__dataclass_fields__})
    ref_ctx.caches = [c.float() for c in caches]
    per_request = None
    if selected is not None:
        per_request = [selected[int(a):int(b)] for a, b in zip(ctx.query_start_loc_host[:-1], ctx.query_start_loc_host[1:])]
    ref = window_sparse_attention(q.float(), positions, ref_ctx, 0, sizes.window, 1 if ratio else None, ratio,
                                  per_request, sinks, scale)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2        # bf16: the output's and P's roundings
    torch.testing.assert_close(out.float(), ref, atol=tolerance, rtol=tolerance)
    # the inverse RoPE inside the split reduction (or after the kernel, unsplit): as norm_rope on the output
    rope = TrailingRope(_hf_config(sizes.dim, sizes.rope_dim), "compress", sizes.rope_dim).to(device)
    rotated = kernels.sparse_attention(q, positions, requests, window_cache, ctx.block_tables[0], sizes.window,
                                       caches[1] if ratio else None, ctx.block_tables[1] if ratio else None, ratio,
                                       selected.to(torch.int32) if selected is not None else None, sinks, scale,
                                       sizes.block_size, ctx.max_seq_len // ratio if ratio else 0,
                                       inverse_rope=rope.inv_freq)
    torch.testing.assert_close(rotated, kernels.norm_rope(out, positions, rope.inv_freq, inverse=True),
                               atol=tolerance / 2, rtol=tolerance / 2)
    torch.testing.assert_close(rotated.float(), rope(ref, positions, inverse=True), atol=tolerance, rtol=tolerance)
    # q raw (the projection's output): its head norm and RoPE as the kernel loads it, as norm_rope before it
    raw = (torch.randn(n, sizes.heads, sizes.dim, generator=generator) * 4).to(device, dtype)
    fused = kernels.sparse_attention(raw, positions, requests, window_cache, ctx.block_tables[0], sizes.window,
                                     caches[1] if ratio else None, ctx.block_tables[1] if ratio else None, ratio,
                                     selected.to(torch.int32) if selected is not None else None, sinks, scale,
                                     sizes.block_size, ctx.max_seq_len // ratio if ratio else 0,
                                     q_rope=rope.inv_freq, q_eps=1e-6)
    prepared = kernels.norm_rope(raw, positions, rope.inv_freq, normalize=True, eps=1e-6)
    torch.testing.assert_close(fused.float(), window_sparse_attention(
        prepared.float(), positions, ref_ctx, 0, sizes.window, 1 if ratio else None, ratio, per_request, sinks, scale),
        atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("programs", [None, 1], ids=["auto-programs", "one-program-a-query"])
@pytest.mark.parametrize("device", DEVICES)
def test_indexer_scores_and_topk_match_reference(device, programs, monkeypatch):
    """With the programs per query the batch gets (one key tile each at these widths), and with one program
    per query walking every tile. The kernel rotates q (RoPE at its position) as the reference path does
    before scoring."""
    if programs is not None:
        monkeypatch.setattr(kernels, "INDEXER_PROGRAMS", programs)
    sizes, dtype, steps = _setup(device)
    generator = torch.Generator().manual_seed(2)
    num_blocks = _num_blocks(sizes, steps)
    keys = torch.randn(num_blocks, sizes.block_size // sizes.ratio, sizes.index_dim, generator=generator)
    keys = keys.to(device, dtype)
    ctx, positions = _context(device, sizes, steps, [keys], [sizes.ratio])
    n = positions.shape[0]
    q = torch.randn(n, sizes.index_heads, sizes.index_dim, generator=generator).to(device, dtype)
    weights = torch.randn(n, sizes.index_heads, generator=generator).to(device, dtype)     # the projection's
    width = ctx.max_seq_len // sizes.ratio + 3                       # wider than any request's entries
    rope = TrailingRope(_hf_config(sizes.index_dim, sizes.rope_dim), "compress", sizes.rope_dim).to(device)
    scores = kernels.indexer_scores(q, weights, keys, ctx.block_tables[0], positions, token_requests(ctx, n),
                                    sizes.ratio, width, sizes.block_size, weight_scale=0.125, rope=rope.inv_freq)
    weights = weights.float() * 0.125                                # as the reference path forms them
    q = rope(q, positions)
    selected = kernels.indexer_topk(scores, positions, sizes.ratio, sizes.top_k)
    starts = ctx.query_start_loc_host
    for b in range(len(steps)):
        rows = slice(int(starts[b]), int(starts[b + 1]))
        num_entries = int(ctx.seq_lens_host[b]) // sizes.ratio
        request_keys = request_entries(keys, ctx.block_tables[0], b, 0, num_entries, sizes.block_size, sizes.ratio)
        ref = indexer_scores_ref(q[rows], weights[rows], request_keys, positions[rows], sizes.ratio)
        tolerance = 1e-5 if dtype == torch.float32 else 1e-3
        torch.testing.assert_close(scores[rows, :num_entries], ref, atol=tolerance, rtol=tolerance)
        assert torch.isinf(scores[rows, num_entries:]).all()
        for r in range(rows.start, rows.stop):           # the kept set: the top entries by the reference's scores
            visible = (int(positions[r]) + 1) // sizes.ratio
            kept = sorted(i for i in selected[r].tolist() if i >= 0)
            assert len(kept) == min(sizes.top_k, visible) and len(set(kept)) == len(kept)
            ref_row = ref[r - rows.start]
            if kept:
                threshold = ref_row[kept].min()
                assert (ref_row[:visible] > threshold + tolerance).sum() <= len(kept)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_kernel_keeps_the_references_set(device, monkeypatch):
    """The top-k kernel against torch.topk on ragged rows: fewer visible entries than k (all kept, no score
    read), exactly k, and more (the largest, whatever order), with ties at the threshold (scores on a coarse
    grid), negative scores, -inf past the visible entries and a padded row (position -1)."""
    monkeypatch.setattr(kernels, "use_kernels", lambda x: True)
    ratio, top_k = 4, (12 if device == "cpu" else 512)
    width = 40 if device == "cpu" else 2048
    visible = [0, 3, top_k, top_k + 1, width - 1, width, 17, width // 2]
    positions = torch.tensor([-1] + [v * ratio + ratio - 2 for v in visible[1:]])     # just short of one more
    generator = torch.Generator().manual_seed(5)
    scores = (torch.randn(len(visible), width, generator=generator) * 4).round() / 4   # many ties
    scores[:, ::7] = -scores[:, ::7].abs() - 1                                          # some negative
    scores.masked_fill_(torch.arange(width)[None, :] >= torch.tensor(visible)[:, None], float("-inf"))
    scores, positions = scores.to(device), positions.to(device)
    got = kernels.indexer_topk(scores, positions, ratio, top_k)
    monkeypatch.setattr(kernels, "use_kernels", lambda x: False)
    want = kernels.indexer_topk(scores, positions, ratio, top_k)
    assert got.shape == want.shape == (len(visible), top_k) and got.dtype == torch.int32
    for r, v in enumerate(visible):
        kept = [i for i in got[r].tolist() if i >= 0]
        ref = [i for i in want[r].tolist() if i >= 0]
        assert len(kept) == len(ref) == min(top_k, v) and len(set(kept)) == len(kept)
        assert all(0 <= i < v for i in kept)
        if v <= top_k:                                  # every visible entry
            assert sorted(kept) == list(range(v))
        elif kept:                                      # the same scores as the reference's (ties aside)
            row = scores[r].cpu()
            assert torch.equal(row[kept].sort().values, row[ref].sort().values)


@pytest.mark.parametrize("lookback", [True, False], ids=["four-launches", "five-launches"])
@pytest.mark.parametrize("device", DEVICES)
def test_wide_topk_is_the_exact_top_k_in_index_order(device, lookback, monkeypatch):
    """Rows just below, at and above the one-program kernel's width, and far wider (the radix kernel, a program
    per chunk, its last pass looking back at the chunks' published counts or a pass of its own counting them):
    the same entries in the same order as the exact selection, on rows with no entry visible, fewer than k, k,
    k + 1, all, more than the width, and random counts; scores on a coarse grid (many ties), a row of equal
    scores, visible -inf scores. In a CUDA graph on the GPU, replayed at other positions."""
    monkeypatch.setattr(kernels, "use_kernels", lambda x: True)
    monkeypatch.setattr(kernels, "TOPK_LOOKBACK", lookback)
    if device == "cpu":     # the radix kernel reached at small widths: a program per 16 entries
        monkeypatch.setattr(kernels, "TOPK_MAX_WIDTH", 24)
        monkeypatch.setattr(kernels, "TOPK_CHUNK", 16)
        ratio, top_k, widths = 4, 12, (23, 24, 25, 70)
    else:
        ratio, top_k = 4, 512
        widths = (kernels.TOPK_MAX_WIDTH - 1, kernels.TOPK_MAX_WIDTH, kernels.TOPK_MAX_WIDTH + 1, 32768 + 5, 1 << 18)
    generator = torch.Generator().manual_seed(7)
    for width in widths:
        visible = [0, 3, top_k, top_k + 1, width, width + 40, width - 1, top_k + 5]
        visible += torch.randint(top_k + 2, width, (4,), generator=generator).tolist()
        positions = torch.tensor([-1] + [v * ratio + ratio - 2 for v in visible[1:]])
        scores = (torch.randn(len(visible), width, generator=generator) * 4).round() / 4
        scores[:, ::7] = -scores[:, ::7].abs() - 1
        scores[6] = 0.5                                                       # every entry a tie
        scores[7, ::3] = float("-inf")                                       # visible, below every score
        scores.masked_fill_(torch.arange(width)[None, :] >= torch.tensor(visible)[:, None], float("-inf"))
        scores, positions = scores.to(device), positions.to(device)
        want = kernels.indexer_topk_exact(scores, positions, ratio, top_k)
        got = kernels.indexer_topk(scores, positions, ratio, top_k)
        assert got.dtype == torch.int32 and torch.equal(got, want), f"width {width}"
        if device == "cuda":
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = kernels.indexer_topk(scores, positions, ratio, top_k)
            for shift in (-1, 1):                                # fewer, then more entries visible
                positions.copy_(torch.roll(positions, shift))
                graph.replay()
                want = kernels.indexer_topk_exact(scores, positions, ratio, top_k)
                assert torch.equal(captured, want), f"width {width}"


@pytest.mark.parametrize("kind", ["hca", "csa"])
@pytest.mark.parametrize("flat", [False, True], ids=["grouped", "flat"])
@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no-prefetch"])
def test_fp8_attention_over_many_key_tiles_matches_reference(prefetch, flat, kind, monkeypatch):
    """FP8 window + every entry (hca: at ratio 4, > 3 key tiles a query) or + a selection (csa: 3 tiles,
    wider than the entries any query has) in one split, a tile's loads issued a tile ahead or not, the scales
    applied per group after the dots or folded into the keys (flat), each switch set for the layer kind that
    reads it: the decode-time loop over many tiles that the other CPU cases (a tile each) do not reach."""
    from tests.models.deepseek_v4.test_deepseek_v4_fp8_kv import _fp8_cache, _formats, _spread
    suffix = "_SELECTED" if kind == "csa" else ""
    monkeypatch.setattr(kernels, "ATTENTION_PREFETCH" + suffix, prefetch)
    monkeypatch.setattr(kernels, "ATTENTION_FLAT" + suffix, flat)
    monkeypatch.setattr(kernels, "ATTENTION_FLAT" if kind == "csa" else "ATTENTION_FLAT_SELECTED", not flat)
    monkeypatch.setattr(kernels, "attention_splits", lambda *args, **kwargs: 1)
    sizes, steps = SMALL, [(150, 1), (97, 2), (40, 1)]
    kv_format, _ = _formats("cpu", sizes)
    generator = torch.Generator().manual_seed(9)
    num_blocks = _num_blocks(sizes, steps)
    caches = [_fp8_cache(_spread((num_blocks, sizes.block_size // r, sizes.dim), generator), kv_format)
              for r in (1, sizes.ratio)]
    ctx, positions = _context("cpu", sizes, steps, caches, [1, sizes.ratio])
    n = positions.shape[0]
    q = torch.randn(n, sizes.heads, sizes.dim, generator=generator) / 16     # scores of order 1: every key counts
    sinks = torch.randn(sizes.heads, generator=generator)
    scale = sizes.dim ** -0.5
    selected = per_request = None
    if kind == "csa":       # 80 a query (3 key tiles with the window), more than any query has (37): -1 padded
        selected = _random_selection(positions, sizes.ratio, 80, generator).to(torch.int32)
        starts = ctx.query_start_loc_host
        per_request = [selected[int(a):int(b)] for a, b in zip(starts[:-1], starts[1:])]
    out = kernels.sparse_attention(q, positions, token_requests(ctx, n), caches[0], ctx.block_tables[0], sizes.window,
                                   caches[1], ctx.block_tables[1], sizes.ratio, selected, sinks, scale,
                                   sizes.block_size, ctx.max_seq_len // sizes.ratio, kv_format, kv_format)
    ref = window_sparse_attention(q, positions, ctx, 0, sizes.window, 1, sizes.ratio, per_request, sinks, scale,
                                  kv_format, kv_format)
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("overlap", [True, False], ids=["csa", "hca"])
@pytest.mark.parametrize("device", DEVICES)
def test_compressor_kernels_match_reference(device, overlap):
    """Three steps (each request's history, a ragged step, one more token each) through the reference and
    through the kernel: the state rows and the entries written agree. The kernel stores a step's state rows
    and reads the same step's window rows from the projection; the projection is a column slice of a wider
    one (the layer's, with other blocks around it)."""
    sizes, dtype, steps = _setup(device)
    ratio = sizes.ratio if overlap else (16 if device == "cpu" else 128)
    hidden = 320 if device == "cpu" else 4096
    torch.manual_seed(3)
    rope = TrailingRope(_hf_config(sizes.dim, sizes.rope_dim), "compress", sizes.rope_dim)
    module = Compressor(sizes.dim, ratio, overlap, 1e-6, rope)
    width = module.width
    projection = Projection(hidden, {"before": 16, "wkv": width, "wgate": width, "after": 8})
    with torch.no_grad():
        for p in (*module.parameters(), projection.weight):
            p.normal_(0, 0.05 if p.dim() > 1 else 0.5)
        module.norm.weight.uniform_(0.5, 1.5)
    module = module.to(device)
    projection = projection.to(device, dtype)
    module.state_layer, module.entry_layer = 0, 1
    final = [(c + q + 1, 0) for c, q in steps]
    num_blocks = _num_blocks(sizes, final)
    phases = [[(0, c) for c, _ in steps], list(steps), [(c + q, 1) for c, q in steps]]
    results = []
    for use in (False, True):
        state = torch.zeros(num_blocks, sizes.block_size, 2, width, device=device)
        entries = torch.zeros(num_blocks, sizes.block_size // ratio, sizes.dim, device=device, dtype=dtype)
        tables = _context(device, sizes, final, [state, entries], [1, ratio])[0].block_tables
        x_gen = torch.Generator().manual_seed(4)
        original = kernels.use_kernels
        kernels.use_kernels = lambda x: use
        try:
            for phase in phases:
                ctx, positions = _context(device, sizes, phase, [state, entries], [1, ratio], tables)
                n = positions.shape[0]
                x = torch.randn(n, hidden, generator=x_gen).to(device, dtype)
                with torch.no_grad():
                    projected = projection.columns(projection(x), "wkv", "wgate")
                    module(projected, positions, token_requests(ctx, n), ctx)
        finally:
            kernels.use_kernels = original
        results.append((state, entries))
    (ref_state, ref_entries), (state, entries) = results
    torch.testing.assert_close(state, ref_state, atol=0, rtol=0)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2       # bf16: a unit where an fp32 sum rounds otherwise
    torch.testing.assert_close(entries.float(), ref_entries.float(), atol=tolerance, rtol=tolerance)
    assert ref_entries.abs().sum() > 0


def _hf_config(dim: int, rope_dim: int):
    """The tiny config at another head / rope size (what TrailingRope reads its YaRN frequencies from)."""
    from transformers import AutoConfig

    from models.deepseek_v4 import PACKAGE
    config = {k: v for k, v in PACKAGE.tiny_config.items() if k != "model_type"}
    config.update(head_dim=dim, qk_rope_head_dim=rope_dim, index_head_dim=max(rope_dim, 16))
    config["rope_scaling"] = dict(config["rope_scaling"])
    return AutoConfig.for_model("deepseek_v4", **config)


@pytest.mark.parametrize("fp8", [False, True], ids=["model-dtype-cache", "fp8-cache"])
@pytest.mark.parametrize("device", DEVICES)
def test_padded_rows_with_context_length_zero_read_and_write_nothing(device, fp8):
    """A padded row: position -1 (context length 0), slot -1, and a block table pointing far past the cache,
    so any read through it would fault (GPU) or raise (interpreter). The indexer keeps nothing, attention
    returns zeros (the sink alone), the compressor and the K insert write nothing; real rows beside it are
    unaffected. With `fp8`, every cache holds FP8 entries (the kernels' FP8 tiles)."""
    from models.deepseek_v4.cache_ops import Fp8Entry, quantize_entries
    sizes, dtype, steps = _setup(device)
    kv_format = Fp8Entry(sizes.dim, sizes.rope_dim, 8 if device == "cpu" else 64) if fp8 else None
    key_format = Fp8Entry(sizes.index_dim, 0, sizes.index_dim) if fp8 else None

    def cache(values: torch.Tensor, fmt) -> torch.Tensor:
        if fmt is None:
            return values.to(device, dtype)
        return quantize_entries(values.flatten(0, 1), fmt).view(*values.shape[:2], -1).to(device)

    generator = torch.Generator().manual_seed(5)
    bs, ratio = sizes.block_size, sizes.ratio
    num_blocks = 4
    window_cache = cache(torch.randn(num_blocks, bs, sizes.dim, generator=generator), kv_format)
    entry_cache = cache(torch.randn(num_blocks, bs // ratio, sizes.dim, generator=generator), kv_format)
    table = torch.tensor([[1, 2], [1 << 30, 1 << 30]], dtype=torch.int32, device=device)
    positions = torch.tensor([bs + 3, -1, -1], device=device)
    requests = torch.tensor([0, 1, 1], device=device)
    q = torch.randn(3, sizes.heads, sizes.dim, generator=generator).to(device, dtype)
    sinks = torch.randn(sizes.heads, generator=generator).to(device)
    width = 2 * bs // ratio
    index_q = torch.randn(3, sizes.index_heads, sizes.index_dim, generator=generator).to(device, dtype)
    index_keys = cache(torch.randn(num_blocks, bs // ratio, sizes.index_dim, generator=generator), key_format)
    scores = kernels.indexer_scores(index_q, torch.ones(3, sizes.index_heads, device=device), index_keys, table,
                                    positions, requests, ratio, width, bs, key_format)
    selected = kernels.indexer_topk(scores, positions, ratio, sizes.top_k)
    assert (selected[1:] == -1).all() and (selected[0] >= 0).sum() == min(sizes.top_k, (bs + 4) // ratio)
    for sel, ratio_used in ((selected, ratio), (None, ratio), (None, 0)):
        out = kernels.sparse_attention(q, positions, requests, window_cache, table, sizes.window,
                                       entry_cache if ratio_used else None, table if ratio_used else None,
                                       ratio_used, sel, sinks, sizes.dim ** -0.5, bs, width, kv_format,
                                       kv_format if ratio_used else None)
        assert torch.isfinite(out).all()
        assert (out[1:] == 0).all()
        assert out[0].abs().sum() > 0
    state = torch.zeros(num_blocks, bs, 2, 2 * sizes.dim, device=device)
    before = (window_cache.view(torch.uint8).clone(), entry_cache.view(torch.uint8).clone())
    nowhere = torch.tensor([-1, -1, -1], device=device)
    kernels.compress(torch.randn(3, 4 * sizes.dim, generator=generator).to(device, dtype),
                     torch.zeros(ratio, 2 * sizes.dim, device=device), state, table, nowhere, entry_cache, nowhere,
                     positions, requests, torch.tensor([0, 1], dtype=torch.int32, device=device),
                     torch.ones(sizes.dim, device=device), 1e-6, torch.ones(sizes.rope_dim // 2, device=device),
                     ratio, True, bs, kv_format)
    if fp8:
        kernels.norm_rope(q[:, :1], positions, torch.ones(sizes.rope_dim // 2, device=device), cache=window_cache,
                          slots=torch.tensor([-1, -1, -1], device=device), fmt=kv_format)
    else:
        kernels.store_rows(window_cache, q[:, 0], torch.tensor([-1, -1, -1], device=device))
    assert torch.equal(window_cache.view(torch.uint8), before[0])
    assert torch.equal(entry_cache.view(torch.uint8), before[1])
    assert (state == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-cache", "fp8-cache"])
def test_graph_replays_at_other_contexts_equal_eager(fp8):
    """The indexer (q rotated inside), its top-k, attention (q normalized and rotated inside), the compressor
    (state rows and entries) captured once in a CUDA graph (contexts of one batch), replayed for batches whose
    contexts are longer and shorter than the capture's: every replay equals the eager run on the same inputs,
    bit for bit. Nothing the kernels read is reset on the host (no memset that a capture could skip): stale
    scores or state would show up here. With `fp8`, the entries and indexer keys are FP8 (the compressor
    quantizes what it writes)."""
    from models.deepseek_v4.cache_ops import Fp8Entry, quantize_entries
    sizes, dtype = RELEASE, torch.bfloat16
    kv_format = Fp8Entry(sizes.dim, sizes.rope_dim, 64) if fp8 else None
    key_format = Fp8Entry(sizes.index_dim, 0, sizes.index_dim) if fp8 else None

    def cache(values: torch.Tensor, fmt) -> torch.Tensor:
        if fmt is None:
            return values.to(device, dtype)
        return quantize_entries(values.flatten(0, 1), fmt).view(*values.shape[:2], -1).to(device)

    device = "cuda"
    generator = torch.Generator().manual_seed(6)
    batches = [[(130, 1), (2, 1), (0, 1)], [(3002, 1), (4095, 1), (127, 1)], [(5, 1), (1, 1), (259, 1)]]
    longest = [(4096, 1)] * 3
    num_blocks = _num_blocks(sizes, longest)
    bs, ratio = sizes.block_size, sizes.ratio
    window = cache(torch.randn(num_blocks, bs, sizes.dim, generator=generator), kv_format)
    entries = cache(torch.randn(num_blocks, bs // ratio, sizes.dim, generator=generator), kv_format)
    index_keys = cache(torch.randn(num_blocks, bs // ratio, sizes.index_dim, generator=generator), key_format)
    state = torch.randn(num_blocks, bs, 2, 2 * sizes.dim, generator=generator).to(device)
    tables = _context(device, sizes, longest, [window, entries, index_keys, state], [1, ratio, ratio, 1])[0].block_tables
    n = 3
    q = torch.randn(n, sizes.heads, sizes.dim, generator=generator).to(device, dtype)
    index_q = torch.randn(n, sizes.index_heads, sizes.index_dim, generator=generator).to(device, dtype)
    weights = torch.randn(n, sizes.index_heads, generator=generator).to(device)
    projected = torch.randn(n, 4 * sizes.dim, generator=generator).to(device, dtype)     # value | gate
    ape = torch.randn(ratio, 2 * sizes.dim, generator=generator).to(device)
    query_start = torch.arange(n + 1, dtype=torch.int32, device=device)                # a token a request
    sinks = torch.randn(sizes.heads, generator=generator).to(device)
    norm = torch.rand(sizes.dim, generator=generator).to(device) + 0.5
    inv_freq = torch.rand(sizes.rope_dim // 2, generator=generator).to(device)
    positions = torch.zeros(n, dtype=torch.int64, device=device)
    state_slots = torch.zeros(n, dtype=torch.int64, device=device)
    entry_slots = torch.zeros(n, dtype=torch.int64, device=device)
    requests = torch.arange(n, device=device)
    width = 4097 // ratio

    def step():
        kernels.compress(projected, ape, state, tables[3], state_slots, entries, entry_slots, positions, requests,
                         query_start, norm, 1e-6, inv_freq, ratio, True, bs, kv_format)
        scores = kernels.indexer_scores(index_q, weights, index_keys, tables[2], positions, requests, ratio, width, bs,
                                        key_format, rope=inv_freq)
        selected = kernels.indexer_topk(scores, positions, ratio, sizes.top_k)
        return selected, kernels.sparse_attention(q, positions, requests, window, tables[0], sizes.window, entries,
                                                  tables[1], ratio, selected, sinks, sizes.dim ** -0.5, bs, width,
                                                  kv_format, kv_format, inv_freq, inv_freq, 1e-6)

    def load(batch):
        ctx, pos = _context(device, sizes, batch, [window, entries, index_keys, state], [1, ratio, ratio, 1], tables)
        positions.copy_(pos)
        state_slots.copy_(ctx.slot_mappings[3])
        entry_slots.copy_(ctx.slot_mappings[1])

    load(batches[0])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()                                                      # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    snapshot = (state.clone(), entries.clone())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_selected, graph_out = step()
    for batch in batches[1:] + batches[:1] + batches[1:]:
        load(batch)
        state.copy_(snapshot[0])
        entries.copy_(snapshot[1])
        graph.replay()
        replayed = (graph_selected.clone(), graph_out.clone(), state.clone(), entries.clone())
        state.copy_(snapshot[0])
        entries.copy_(snapshot[1])
        eager_selected, eager_out = step()
        assert torch.equal(replayed[0], eager_selected)
        assert torch.equal(replayed[1], eager_out)
        # bytes: an FP8 entry's bf16 and scale bytes read as e4m3 may be NaN patterns
        assert torch.equal(replayed[2], state) and torch.equal(replayed[3].view(torch.uint8), entries.view(torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
def test_hyper_connection_kernels_match_reference(device):
    from models.deepseek_v4.mhc import HyperConnection
    hidden = 320 if device == "cpu" else 4096          # on the CPU: chunks of hc_post / hc_pre past the row's end
    dtype = torch.float32 if device == "cpu" else torch.bfloat16

    class _Config:
        hc_mult, hc_sinkhorn_iters, hc_eps, rms_norm_eps, hidden_size = 4, 20, 1e-6, 1e-6, hidden

    generator = torch.Generator().manual_seed(7)
    module = HyperConnection(_Config())
    with torch.no_grad():
        module.fn.copy_(torch.randn(module.fn.shape, generator=generator) * 0.1)
        module.base.copy_(torch.randn(module.base.shape, generator=generator))
        module.scale.copy_(torch.rand(3, generator=generator) + 0.5)
    module = module.to(device)
    streams = (torch.randn(37, 4, hidden, generator=generator) * 3).to(device, dtype)
    ref = module.pre(streams)
    out = kernels.hc_pre(streams, module.fn, module.base, module.scale, 1e-6, 1e-6, 20)
    for got, want in zip(out, ref):
        tolerance = 1e-5 if got.dtype == torch.float32 else 8e-3     # bf16 input: one rounding of the output
        torch.testing.assert_close(got.float(), want.float(), atol=tolerance, rtol=tolerance)
    post, comb, collapsed = ref
    output = torch.randn(collapsed.shape, generator=generator).to(device, dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2       # bf16: a rounding of the stream-scale sum
    new_ref = HyperConnection.post(output, streams, post, comb)[0]
    torch.testing.assert_close(kernels.hc_post(output, streams, post, comb).float(), new_ref.float(),
                               atol=tolerance, rtol=tolerance)
    # the following connection: its projection summed from hc_post's partials, its sublayer's RMSNorm fused
    # (fp32 weight, and the dtype's), against the reference's GEMM + norm of the streams hc_post wrote
    following = HyperConnection(_Config())
    with torch.no_grad():
        following.fn.copy_(torch.randn(following.fn.shape, generator=generator) * 0.1)
        following.base.copy_(torch.randn(following.base.shape, generator=generator))
    following = following.to(device)
    new, mix = kernels.hc_post(output, streams, post, comb, following.fn)
    assert mix.shape == (37, -(-hidden // kernels.HC_MIX_BLOCK), 64)
    torch.testing.assert_close(new.float(), new_ref.float(), atol=tolerance, rtol=tolerance)
    # a sublayer output given as two parts (the MoE's routed and shared experts), added in the launch
    addend = torch.randn(collapsed.shape, generator=generator).to(device, dtype)
    summed_ref = HyperConnection.post(output, streams, post, comb, addend=addend)[0]
    assert not torch.equal(summed_ref, new_ref)
    summed, summed_mix = kernels.hc_post(output, streams, post, comb, following.fn, addend)
    for got in (summed, kernels.hc_post(output, streams, post, comb, addend=addend)):
        torch.testing.assert_close(got.float(), summed_ref.float(), atol=tolerance, rtol=tolerance)
    written = 6 * 4 + 4 * 4                                   # the projection's sums, then the Gram matrix
    torch.testing.assert_close(summed_mix[..., :written],
                               kernels.hc_post(output + addend, streams, post, comb, following.fn)[1][..., :written])
    for weight_in_fp32 in (True, False):
        norm = RMSNorm(hidden, 1e-6, weight_in_fp32=weight_in_fp32)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(hidden, generator=generator) + 0.5)
        norm = norm.to(device, torch.float32 if weight_in_fp32 else dtype)
        want = following.pre(new, norm)
        for got in (kernels.hc_pre(new, following.fn, following.base, following.scale, 1e-6, 1e-6, 20, mix, norm),
                    kernels.hc_pre(new, following.fn, following.base, following.scale, 1e-6, 1e-6, 20, None, norm)):
            for a, b in zip(got, want):
                tol = 1e-5 if a.dtype == torch.float32 else 2e-2   # bf16 input: roundings of the normed output
                torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_norm_rope_kernel_matches_reference(device):
    """q's head norm + RoPE, the inverse RoPE of the output, and K's RoPE stored at its window slots."""
    from models.deepseek_v4.attention import unweighted_rms_norm
    sizes, dtype, _ = _setup(device)
    rope = TrailingRope(_hf_config(sizes.dim, sizes.rope_dim), "compress", sizes.rope_dim).to(device)
    generator = torch.Generator().manual_seed(8)
    n = 29
    x = (torch.randn(n, sizes.heads, sizes.dim, generator=generator) * 2).to(device, dtype)
    positions = torch.randint(0, 1 << 20, (n,), generator=generator).to(device)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=8e-3)
    torch.testing.assert_close(kernels.norm_rope(x, positions, rope.inv_freq, normalize=True, eps=1e-6),
                               rope(unweighted_rms_norm(x, 1e-6), positions), **tolerance)
    torch.testing.assert_close(kernels.norm_rope(x, positions, rope.inv_freq, inverse=True),
                               rope(x, positions, inverse=True), **tolerance)
    cache = torch.zeros(8, 16, sizes.dim, dtype=dtype, device=device)
    slots = torch.randperm(8 * 16, generator=generator)[:n].to(device)
    slots[3] = -1
    kernels.norm_rope(x[:, :1], positions, rope.inv_freq, cache=cache, slots=slots)
    expected = torch.zeros_like(cache).view(-1, sizes.dim)
    keep = slots >= 0
    expected[slots[keep]] = rope(x[:, :1], positions)[keep, 0]
    torch.testing.assert_close(cache.view(-1, sizes.dim), expected, **tolerance)
    # K's RMSNorm (fp32 weight, multiplied before the cast) fused ahead of its RoPE and insert
    weight = (torch.rand(sizes.dim, generator=generator) + 0.5).to(device)
    cache.zero_()
    kernels.norm_rope(x[:, :1], positions, rope.inv_freq, eps=1e-6, cache=cache, slots=slots, weight=weight)
    normed = rms_norm_ref(x[:, :1], weight, 1e-6, weight_in_fp32=True)
    expected[slots[keep]] = rope(normed, positions)[keep, 0]
    torch.testing.assert_close(cache.view(-1, sizes.dim), expected, **tolerance)
    # q's latent RMSNorm in the same launch (a row wider than a head, read from a strided view)
    latent_norm = RMSNorm(3 * sizes.dim + 8, 1e-5, weight_in_fp32=True)
    with torch.no_grad():
        latent_norm.weight.uniform_(0.5, 1.5, generator=generator)
    latent_norm = latent_norm.to(device)
    latent = (torch.randn(n, 4 * sizes.dim, generator=generator) * 3).to(device, dtype)[:, :3 * sizes.dim + 8]
    cache.zero_()
    normed_latent = kernels.norm_rope(x[:, :1], positions, rope.inv_freq, eps=1e-6, cache=cache, slots=slots,
                                      weight=weight, latent=(latent, latent_norm))
    torch.testing.assert_close(cache.view(-1, sizes.dim), expected, **tolerance)
    torch.testing.assert_close(normed_latent, rms_norm_ref(latent, latent_norm.weight, 1e-5, weight_in_fp32=True),
                               **tolerance)


HC_TYPES = {"streams_ptr": "*bf16", "mix_ptr": "*fp32", "base_ptr": "*fp32", "scale_ptr": "*fp32", "post_ptr": "*fp32",
            "comb_ptr": "*fp32", "out_ptr": "*bf16", "norm_ptr": "*fp32", "new_ptr": "*bf16", "fn_ptr": "*fp32",
            "norm_eps": "fp32", "hc_eps": "fp32", "out_eps": "fp32"}


def test_decode_kernels_compile_for_hopper():
    """The interpreter accepts code the compiler rejects: the top-k and mHC variants a decode step runs, at the
    release's sizes, compile for sm_90 (tests/triton_compile.py; nothing is launched)."""
    pytest.importorskip("triton")
    from tests.triton_compile import Case, compile_for_hopper
    module = "models.deepseek_v4.kernels"
    cases = [Case(module, "_indexer_topk_kernel", dict(RATIO=4, K=512, BLOCK_K=512, BLOCK_W=width),
                  {"scores_ptr": "*fp32", "out_ptr": "*i32"}) for width in (2048, kernels.TOPK_MAX_WIDTH)]
    cases += [Case(module, "_topk_radix_kernel", dict(RATIO=4, K=512, BLOCK_K=512, CHUNK=kernels.TOPK_CHUNK,
                                                      BLOCK_C=kernels.TOPK_BLOCK_C, PASS=step, LOOKBACK=lookback),
                   {"scores_ptr": "*fp32", "out_ptr": "*i32", "hist1_ptr": "*i32", "hist23_ptr": "*i32",
                    "state_ptr": "*i32", "counts_ptr": "*i32"}, options={"num_warps": kernels.TOPK_CHUNK_WARPS})
              for lookback, steps in ((True, (1, 2, 3, 5)), (False, (4, 5))) for step in steps]
    cases += [Case(module, "_hc_pre_kernel", dict(N=4, HIDDEN=4096, BLOCK=block, SPAN=span, PARTIALS=partials,
                                                  M=64 if partials else 24, CHUNKS=64 if partials else 1,
                                                  BLOCK_C=64 if partials else 1, NORM=norm, WEIGHT_IN_FP32=True,
                                                  LANES=32 * warps),
                   HC_TYPES, options={"num_warps": warps})
              for partials, norm, block, span, warps in (
                  (True, True, kernels.HC_PRE_SPAN, kernels.HC_PRE_SPAN, kernels.HC_PRE_WARPS),
                  (False, True, 1024, 4096, 4), (False, False, 1024, 4096, 4))]
    cases += [Case(module, "_hc_post_kernel", dict(N=4, HIDDEN=4096, BLOCK=block, ROUND=True, ADD=add, MIX=mix,
                                                   M=24, BLOCK_M=64, BLOCK_FN=32), {**HC_TYPES, "addend_ptr": "*bf16"})
              for block, mix, add in ((kernels.HC_MIX_BLOCK, True, True), (kernels.HC_MIX_BLOCK, True, False),
                                      (512, False, False))]
    cases += [Case(module, "_norm_rope_kernel", dict(HEADS=1, BLOCK_H=1, HALF=256, BLOCK_HALF=256, ROPE_HALF=32,
                                                     NORMALIZE=True, WEIGHTED=True, INVERSE=False, TO_SLOTS=True,
                                                     ROUND=True, FP8=False, NOPE=512, QBLOCK=512, NUM_SCALES=1,
                                                     SCALES_AT=512, ENTRY=512, LATENT_DIM=latent,
                                                     BLOCK_LATENT=max(latent, 1)),
                   {"x_ptr": "*bf16", "out_ptr": "*bf16", "inv_freq_ptr": "*fp32", "weight_ptr": "*fp32",
                    "latent_ptr": "*bf16", "latent_out_ptr": "*bf16", "latent_weight_ptr": "*fp32", "eps": "fp32",
                    "latent_eps": "fp32"}) for latent in (1024, 0)]
    cases += [Case(module, "_sparse_attention_reduce_kernel", dict(HEADS=64, DIM=512, BLOCK_D=512, BLOCK_S=8, ROPE=rope,
                                                                   ROPE_HALF=32, ROUND=True),
                   {"part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "sinks_ptr": "*fp32", "out_ptr": "*bf16",
                    "inv_freq_ptr": "*fp32"}) for rope in (True, False)]
    cases += [Case(module, "_compress_kernel", dict(HEAD_DIM=512, HALF=256, BLOCK_HALF=256, ROPE_HALF=32, WIDTH=width,
                                                    BLOCK_W=width, RATIO=ratio, WINDOW=window, OVERLAP=overlap,
                                                    ROUND=True, DTYPE="tl.bfloat16", FP8=False, NOPE=512, QBLOCK=512,
                                                    NUM_SCALES=1, SCALES_AT=512, ENTRY=512),
                   {"proj_ptr": "*bf16", "ape_ptr": "*fp32", "state_ptr": "*fp32", "query_start_ptr": "*i32",
                    "norm_ptr": "*fp32", "inv_freq_ptr": "*fp32", "cache_ptr": "*bf16", "eps": "fp32"})
              for width, ratio, window, overlap in ((1024, 4, 8, True), (512, 128, 128, False))]
    cases.append(Case(module, "_indexer_kernel", dict(HEADS=64, BLOCK_HEADS=64, DIM=128, BLOCK_D=128, RATIO=4,
                                                      BLOCK_N=64, PER_BLOCK=64, FP32=False, ROPE_HALF=32, FP8=False,
                                                      NOPE=128, QBLOCK=128, NUM_SCALES=1, SCALES_AT=128, ENTRY=128),
                      {"q_ptr": "*bf16", "weights_ptr": "*bf16", "keys_ptr": "*bf16", "out_ptr": "*fp32",
                       "inv_freq_ptr": "*fp32", "scale": "fp32", "weight_scale": "fp32"}))
    cases += [Case(module, "_sparse_attention_kernel", dict(HEADS=64, BLOCK_H=16, DIM=512, BLOCK_D=512, BLOCK_N=32,
                                                            RATIO=ratio, BLOCK_SIZE=256, PER_BLOCK=256 // ratio,
                                                            HAS_ENTRIES=True, SELECTED=ratio == 4, SPLIT=True,
                                                            FP32=False, WINDOW_FP8=False, ENTRY_FP8=False, NOPE=512,
                                                            QBLOCK=512, NUM_SCALES=1, SCALES_AT=512, ENTRY=512,
                                                            GROUPS=1, GROUP_D=512, TAIL_D=16, Q_ROPE_HALF=32),
                   {"q_ptr": "*bf16", "window_ptr": "*bf16", "entries_ptr": "*bf16", "sinks_ptr": "*fp32",
                    "out_ptr": "*bf16", "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "q_inv_freq_ptr": "*fp32",
                    "scale": "fp32", "q_eps": "fp32"}) for ratio in (4, 128)]
    fp8 = dict(NOPE=448, QBLOCK=64, NUM_SCALES=7, SCALES_AT=576, ENTRY=584, GROUPS=8, GROUP_D=64, TAIL_D=64)
    cases += [Case(module, "_sparse_attention_kernel", dict(HEADS=64, BLOCK_H=kernels.BLOCK_HEADS, DIM=512, BLOCK_D=512,
                                                            BLOCK_N=kernels.ATTENTION_BLOCK_N, RATIO=ratio,
                                                            BLOCK_SIZE=256, PER_BLOCK=256 // ratio, HAS_ENTRIES=True,
                                                            SELECTED=ratio == 4, SPLIT=True, FP32=False,
                                                            WINDOW_FP8=True, ENTRY_FP8=True, **fp8, Q_ROPE_HALF=32,
                                                            PREFETCH=prefetch, FLAT=flat),
                   {"q_ptr": "*bf16", "window_ptr": "*fp8e4nv", "entries_ptr": "*fp8e4nv", "sinks_ptr": "*fp32",
                    "out_ptr": "*bf16", "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "q_inv_freq_ptr": "*fp32",
                    "scale": "fp32", "q_eps": "fp32"},
                   options={"num_warps": kernels.ATTENTION_WARPS, "num_stages": kernels.ATTENTION_STAGES or 3})
              for ratio, prefetch, flat in (
                  (4, kernels.ATTENTION_PREFETCH_SELECTED, kernels.ATTENTION_FLAT_SELECTED),
                  (4, kernels.ATTENTION_PREFETCH_SELECTED, not kernels.ATTENTION_FLAT_SELECTED),
                  (128, kernels.ATTENTION_PREFETCH, kernels.ATTENTION_FLAT), (128, True, not kernels.ATTENTION_FLAT))]
    for case, result in zip(cases, compile_for_hopper(cases)):
        assert result["error"] is None, f"{case.kernel} {case.constexprs}: {result['error']}"
        assert f".entry {case.kernel}" in result["ptx"]


@pytest.mark.parametrize("kv", ["float32", "fp8"])
def test_fill_caches_writes_every_cache_as_the_model_stores_it(kv):
    """bench.py context's fill (the model's fill_caches): every cache of every layer kind overwritten with
    distinct, finite, non-zero entries that read back as what was stored (FP8: values that the cache's
    format holds exactly), so the indexer's scores differ and the keys are not zeros."""
    from transformers import AutoConfig
    from models.deepseek_v4.cache_ops import Fp8Entry, dequantize_entries, quantize_entries
    from models.deepseek_v4.model import DeepseekV4ForCausalLM
    from runtime.registry import get_package
    from runtime.runner import allocate_caches
    from runtime.kv_cache import group_cache_specs
    tiny = dict(get_package("deepseek_v4").tiny_config)
    config = AutoConfig.for_model(tiny.pop("model_type"), **tiny)
    dtype = torch.float8_e4m3fn if kv == "fp8" else torch.float32
    model = DeepseekV4ForCausalLM(config, torch.float32, kv_dtype=lambda window: dtype)
    block_size = 16
    layout = group_cache_specs(model.cache_specs(), block_size)
    caches = allocate_caches(layout, [3] * len(layout.groups), block_size, torch.device("cpu"))
    torch.manual_seed(0)
    model.fill_caches(caches)
    formats = {}
    for layer in model.layers:
        formats[layer.attn.window_layer] = layer.attn.window_format
        compressors = [layer.attn.compressor] + ([layer.attn.indexer.compressor] if layer.attn.indexer else [])
        for compressor in filter(None, compressors):
            formats[compressor.state_layer] = None
            formats[compressor.entry_layer] = compressor.entry_format
    assert sorted(formats) == list(range(len(caches)))                     # every cache of the model
    for index, cache in enumerate(caches):
        fmt = formats[index]
        assert (fmt is not None) == (kv == "fp8" and cache.dtype == torch.float8_e4m3fn)
        if fmt is None:
            values = cache.reshape(-1, cache[0, 0].numel()).float()
        else:
            assert isinstance(fmt, Fp8Entry)
            raw = cache.reshape(-1, fmt.num_bytes)
            values = dequantize_entries(raw, fmt, torch.float32)
            assert torch.equal(dequantize_entries(quantize_entries(values, fmt), fmt, torch.float32), values)
        assert torch.isfinite(values).all() and (values.abs().amax(dim=1) > 0).all()
        assert values.unique(dim=0).shape[0] == values.shape[0]             # no two entries alike
        assert 0.8 < values.std().item() < 1.2                              # an RMS-normed entry's scale
