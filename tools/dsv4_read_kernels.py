#!/usr/bin/env python
"""Time DeepSeek V4's decode read kernels at batch 1 on the GPU, release sizes, FP8 and bf16 KV: the indexer's
scores over every key slot of a 1M-position engine (262,144), its top-k, CSA attention (window + 512
selected entries) and HCA attention (window + every entry), at each context. Timed from CUDA-graph replays
(20 calls a replay, best of 5). With --old PATH (a kernels.py of another build), that build runs the same
inputs: its times beside ours, and the largest difference of our outputs from its, relative to its largest.

    python tools/dsv4_read_kernels.py [--contexts 4096 1048000] [--old /path/to/kernels.py]
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.deepseek_v4 import kernels  # noqa: E402
from models.deepseek_v4.cache_ops import Fp8Entry, quantize_entries  # noqa: E402

BLOCK_SIZE, MAX_LEN, HEADS, DIM, INDEX_HEADS, INDEX_DIM, TOP_K, WINDOW = 256, 1 << 20, 64, 512, 64, 128, 512, 128
KV, KEY = Fp8Entry(DIM, 64, 64), Fp8Entry(INDEX_DIM, 0, INDEX_DIM)


def _load_old(path: str):
    spec = importlib.util.spec_from_file_location("models.deepseek_v4.kernels_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _cache(entries_per_block: int, dim: int, fmt: Fp8Entry | None) -> torch.Tensor:
    """[blocks, entries_per_block, entry] of random entries whose magnitude varies from channel to channel."""
    blocks = MAX_LEN // BLOCK_SIZE
    if fmt is None:
        return torch.randn(blocks, entries_per_block, dim, device="cuda", dtype=torch.bfloat16)
    rows = blocks * entries_per_block
    out = torch.empty(rows, fmt.num_bytes, dtype=torch.float8_e4m3fn, device="cuda")
    for a in range(0, rows, 1 << 16):
        b = min(rows, a + (1 << 16))
        spread = 2.0 ** torch.randint(-6, 7, (dim,), device="cuda")
        out[a:b] = quantize_entries(torch.randn(b - a, dim, device="cuda") * spread, fmt)
    return out.view(blocks, entries_per_block, -1)


def _timed_us(fn, calls: int = 20) -> float:
    fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / calls)
    return best


def _relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    finite = torch.isfinite(theirs)
    assert torch.equal(finite, torch.isfinite(ours)), "the builds disagree on which scores are -inf"
    ours, theirs = ours[finite].float(), theirs[finite].float()
    return ((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1e-30)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 1048000])
    parser.add_argument("--old", help="a kernels.py of another build to time and compare against")
    args = parser.parse_args()
    old = _load_old(args.old) if args.old else None
    torch.manual_seed(0)
    table = torch.randperm(MAX_LEN // BLOCK_SIZE, device="cuda").to(torch.int32)[None]
    requests = torch.zeros(1, dtype=torch.int64, device="cuda")
    print(f"{'kv':5s} {'context':>9s} {'kernel':10s} {'us':>8s} {'old us':>8s} {'rel diff':>9s}")
    for kv in ("fp8", "bf16"):
        kv_format, key_format = (KV, KEY) if kv == "fp8" else (None, None)
        keys = _cache(BLOCK_SIZE // 4, INDEX_DIM, key_format)
        window = _cache(BLOCK_SIZE, DIM, kv_format)
        csa, hca = _cache(BLOCK_SIZE // 4, DIM, kv_format), _cache(BLOCK_SIZE // 128, DIM, kv_format)
        index_q = torch.randn(1, INDEX_HEADS, INDEX_DIM, device="cuda", dtype=torch.bfloat16)
        head_weights = torch.randn(1, INDEX_HEADS, device="cuda")
        q = torch.randn(1, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
        sinks = torch.randn(HEADS, device="cuda")
        for context in args.contexts:
            positions = torch.tensor([context - 1], device="cuda")
            runs = {}
            for name, module in (("new", kernels), ("old", old)):
                if module is None:
                    continue
                scores = lambda m=module: m.indexer_scores(index_q, head_weights, keys, table, positions, requests, 4,
                                                           MAX_LEN // 4, BLOCK_SIZE, key_format)
                selected = kernels.indexer_topk(scores(), positions, 4, TOP_K)
                cases = {"indexer": scores,
                         "top-k": lambda m=module, s=scores(): m.indexer_topk(s, positions, 4, TOP_K)}
                for kind, entries, ratio, picked in (("csa", csa, 4, selected), ("hca", hca, 128, None)):
                    cases[kind] = lambda m=module, e=entries, r=ratio, p=picked: m.sparse_attention(
                        q, positions, requests, window, table, WINDOW, e, table, r, p, sinks, DIM ** -0.5,
                        BLOCK_SIZE, MAX_LEN // r, kv_format, kv_format)
                runs[name] = {case: (_timed_us(fn), fn()) for case, fn in cases.items()}
            for case, (us, out) in runs["new"].items():
                line = f"{kv:5s} {context:9,d} {case:10s} {us:8.1f}"
                if "old" in runs:
                    old_us, old_out = runs["old"][case]
                    diff = f"{_relative(out, old_out):9.1e}" if case != "top-k" else f"{'-':>9s}"
                    line += f" {old_us:8.1f} {diff}"
                print(line, flush=True)
        del keys, window, csa, hca
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
