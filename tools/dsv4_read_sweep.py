#!/usr/bin/env python
"""Sweep the launch shapes of DeepSeek V4's wide top-k, FP8 indexer scores and FP8 sparse attention on the GPU,
batch 1, release sizes, CUDA-graph replays (tools/dsv4_read_kernels.py's timer): the radix top-k over 131,072 /
262,144 slots (four or five launches, chunk, warps, counts read at a time) against torch.topk, each checked
equal to the exact index-ordered selection; the indexer's scores over 262,144 FP8 key slots at 4K, 128K and 1M
per variant (keys a tile, programs); then FP8 HCA / CSA attention at 4K and 1M per variant (tile
prefetch, scales folded or per group, heads a program, warps, pipeline stages, keys a tile, target programs).
Each variant's largest difference from the first is printed. The module constants are set per variant; the
defaults are what this sweep picked (docs/PERFORMANCE.md).

    python tools/dsv4_read_sweep.py [--all] [--only topk indexer attention] [--attention-only]
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import dsv4_read_kernels as rk  # noqa: E402
from models.deepseek_v4 import kernels  # noqa: E402

t0 = time.time()
torch.manual_seed(0)
K = 512
def torch_topk(scores, positions, ratio, k):
    top = torch.topk(scores, k, dim=-1, sorted=False).indices
    visible = (positions.clamp(min=-1) + 1) // ratio
    return torch.where(top >= visible[:, None], -1, top).to(torch.int32)

only = {"topk", "indexer", "attention"}
if "--only" in sys.argv:
    only = set(sys.argv[sys.argv.index("--only") + 1:])
if "--attention-only" in sys.argv:
    only = {"attention"}
defaults = {name: getattr(kernels, name) for name in (
    "INDEXER_BLOCK_N", "INDEXER_PROGRAMS", "TOPK_LOOKBACK", "TOPK_CHUNK", "TOPK_CHUNK_WARPS",
    "TOPK_BLOCK_C", "ATTENTION_PREFETCH",
    "ATTENTION_PREFETCH_SELECTED", "ATTENTION_FLAT", "ATTENTION_FLAT_SELECTED", "BLOCK_HEADS",
    "ATTENTION_WARPS", "ATTENTION_STAGES", "ATTENTION_BLOCK_N", "TARGET_PROGRAMS", "MAX_SPLITS")}
TOPK = [(True, 4096, 8, 16), (False, 4096, 8, 16), (True, 4096, 4, 16), (True, 4096, 8, 64), (True, 2048, 4, 64)]
print("| width | context | n | torch.topk us | "
      + " | ".join(f"{'4' if lb else '5'} launches {c}/{w}w/C{bc}" for lb, c, w, bc in TOPK) + " | exact |")
ROWS = [(1 << 18, 4096, 1), (1 << 18, 131072, 1), (1 << 18, 1048000, 1), (1 << 18, 1048000, 4), (1 << 17, 500000, 8)]
for width, context, n in ROWS if "topk" in only else []:
    positions = torch.full((n,), context - 1, device="cuda") - torch.arange(n, device="cuda") * 4
    scores = torch.randn(n, width, device="cuda") * 3
    visible = (positions + 1) // 4
    scores.masked_fill_(torch.arange(width, device="cuda")[None, :] >= visible[:, None], float("-inf"))
    want = kernels.indexer_topk_exact(scores, positions, 4, K)
    times, ok = [rk._timed_us(lambda: torch_topk(scores, positions, 4, K))], True
    for lookback, chunk, warps, block_c in TOPK:
        kernels.TOPK_LOOKBACK, kernels.TOPK_CHUNK = lookback, chunk
        kernels.TOPK_CHUNK_WARPS, kernels.TOPK_BLOCK_C = warps, block_c
        ok &= torch.equal(kernels.indexer_topk(scores, positions, 4, K), want)
        times.append(rk._timed_us(lambda: kernels.indexer_topk(scores, positions, 4, K)))
    for name, value in defaults.items():
        setattr(kernels, name, value)
    print(f"| {width} | {context} | {n} | " + " | ".join(f"{t:.1f}" for t in times)
          + f" | {ok} | [{time.time() - t0:.0f}s]", flush=True)

BS, MAX_LEN, HEADS, DIM, WINDOW = rk.BLOCK_SIZE, rk.MAX_LEN, rk.HEADS, rk.DIM, rk.WINDOW
table = torch.randperm(MAX_LEN // BS, device="cuda").to(torch.int32)[None]
requests = torch.zeros(1, dtype=torch.int64, device="cuda")

# (keys a tile, programs)
INDEXER = [(64, 528), (64, 264), (128, 264), (128, 528), (32, 396)]
if "indexer" in only:
    print("\n| context | " + " | ".join(f"{b} keys/{p} programs" for b, p in INDEXER)
          + " | rel diff |")
    keys = rk._cache(BS // 4, rk.INDEX_DIM, rk.KEY)
    index_q = torch.randn(1, rk.INDEX_HEADS, rk.INDEX_DIM, device="cuda", dtype=torch.bfloat16)
    head_weights = torch.randn(1, rk.INDEX_HEADS, device="cuda")
    for context in (4096, 131072, 1048000):
        positions = torch.tensor([context - 1], device="cuda")
        times, base, diff = [], None, 0.0
        for block_n, programs in INDEXER:
            kernels.INDEXER_BLOCK_N, kernels.INDEXER_PROGRAMS = block_n, programs
            fn = lambda: kernels.indexer_scores(index_q, head_weights, keys, table, positions, requests, 4,
                                                MAX_LEN // 4, BS, rk.KEY)
            out = fn()
            base = out if base is None else base
            diff = max(diff, rk._relative(out, base))
            times.append(rk._timed_us(fn))
        print(f"| {context} | " + " | ".join(f"{t:.1f}" for t in times) + f" | {diff:.1e} | [{time.time() - t0:.0f}s]",
              flush=True)
    for name, value in defaults.items():
        setattr(kernels, name, value)
    del keys
if "attention" not in only:
    sys.exit(0)
window = rk._cache(BS, DIM, rk.KV)
hca = rk._cache(BS // 128, DIM, rk.KV)
csa = rk._cache(BS // 4, DIM, rk.KV)
q = torch.randn(1, HEADS, DIM, device="cuda", dtype=torch.bfloat16) / 8
sinks = torch.randn(HEADS, device="cuda")
# (prefetch HCA, prefetch CSA, flat, heads a program, warps, stages, keys a tile, target programs, max splits)
variants = [(False, False, False, 16, 8, None, 32, 132, 64),       # before this sweep
            (True, False, False, 16, 8, 1, 32, 132, 64),           # the defaults it picked
            (True, True, True, 16, 8, 1, 32, 132, 64),             # scales folded into the keys (ATTENTION_FLAT)
            (False, False, True, 16, 8, 1, 32, 132, 64),
            (True, True, True, 16, 4, 1, 32, 132, 64),             # flat: fewer warps, more programs
            (True, True, True, 16, 8, 1, 32, 264, 128),
            (True, True, True, 16, 4, 1, 32, 264, 128),
            (True, True, True, 16, 8, 1, 64, 132, 64)]
if "--all" in sys.argv:                                            # what the first sweep also tried
    variants += [(True, True, False, 32, 8, None, 32, 132, 64), (True, True, False, 16, 4, None, 32, 132, 64),
                 (True, True, False, 16, 4, None, 32, 264, 128), (True, True, False, 16, 8, None, 64, 132, 64)]
print("\n| kind | context | prefetch | flat | heads/program | warps | stages | keys/tile | target programs | us "
      "| rel diff vs first |")
for context in (4096, 1048000):
    positions = torch.tensor([context - 1], device="cuda")
    selected = torch.randperm(context // 4, device="cuda")[:K].to(torch.int32)[None]
    for kind, entries, ratio, picked in (("hca", hca, 128, None), ("csa", csa, 4, selected)):
        base = None
        for prefetch, prefetch_selected, flat, heads, warps, stages, block_n, target, max_splits in variants:
            kernels.ATTENTION_PREFETCH, kernels.ATTENTION_PREFETCH_SELECTED = prefetch, prefetch_selected
            kernels.ATTENTION_FLAT = kernels.ATTENTION_FLAT_SELECTED = flat
            kernels.BLOCK_HEADS = heads
            kernels.ATTENTION_WARPS, kernels.ATTENTION_STAGES = warps, stages
            kernels.ATTENTION_BLOCK_N, kernels.TARGET_PROGRAMS, kernels.MAX_SPLITS = block_n, target, max_splits
            fn = lambda: kernels.sparse_attention(q, positions, requests, window, table, WINDOW, entries, table,
                                                  ratio, picked, sinks, DIM ** -0.5, BS, MAX_LEN // ratio,
                                                  rk.KV, rk.KV)
            out = fn().float()
            base = out if base is None else base
            diff = ((out - base).abs().max() / base.abs().max()).item()
            us = rk._timed_us(fn)
            fetched = prefetch_selected if picked is not None else prefetch
            print(f"| {kind} | {context} | {fetched} | {flat} | {heads} | {warps} | {stages} | {block_n} | {target} "
                  f"| {us:.1f} | {diff:.1e} | [{time.time() - t0:.0f}s]", flush=True)
for name, value in defaults.items():
    setattr(kernels, name, value)
