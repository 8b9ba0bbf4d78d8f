#!/usr/bin/env python
"""Sweep the MXFP4 MoE kernel's tiles at gpt-oss-20b shapes on the GPU; prints a table, fastest first.

    python tools/tune_mxfp4.py [--tokens 1,64,1024]
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402

from runtime.ops.mxfp4 import GatedActivation, MoeTiles, Mxfp4Linear, mxfp4_moe_triton, mxfp4_quantize  # noqa: E402


def random_linear(experts: int, out_features: int, in_features: int) -> Mxfp4Linear:
    blocks, scales = mxfp4_quantize(torch.randn(experts, out_features, in_features, device="cuda") * 0.05)
    return Mxfp4Linear(blocks, scales, torch.randn(experts, out_features, device="cuda") * 0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", default="1,64")
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=2880)
    parser.add_argument("--inter", type=int, default=2880)
    parser.add_argument("--top-k", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    w13 = random_linear(args.experts, 2 * args.inter, args.hidden)
    w2 = random_linear(args.experts, args.hidden, args.inter)
    activation = GatedActivation(alpha=1.702, limit=7.0, up_offset=1.0, interleaved=True)
    for num_tokens in map(int, args.tokens.split(",")):
        x = torch.randn(num_tokens, args.hidden, device="cuda", dtype=torch.bfloat16)
        ids = torch.stack([torch.randperm(args.experts, device="cuda")[:args.top_k] for _ in range(num_tokens)])
        weights = torch.softmax(torch.randn(num_tokens, args.top_k, device="cuda"), -1).to(torch.bfloat16)
        touched = ids.unique().numel()
        weight_bytes = touched * (w13.blocks[0].numel() + w13.scales[0].numel() + w2.blocks[0].numel()
                                  + w2.scales[0].numel())
        reference = mxfp4_moe_triton(x, w13, w2, weights, ids, activation, MoeTiles.for_batch(num_tokens * args.top_k))
        rows = []
        for bm, bn, bk, warps, stages in itertools.product((16,), (16, 32, 64), (128, 256), (4, 8), (3, 4)):
            tiles = MoeTiles(bm, bn, bk, warps, stages)
            try:
                out = mxfp4_moe_triton(x, w13, w2, weights, ids, activation, tiles)
                ms = triton.testing.do_bench(lambda: mxfp4_moe_triton(x, w13, w2, weights, ids, activation, tiles),
                                             warmup=5, rep=20, return_mode="median")
            except Exception as exc:                     # out of shared memory, for one
                print(f"skip {tiles}: {type(exc).__name__}")
                continue
            error = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
            rows.append((ms, tiles, error))
        rows.sort(key=lambda r: r[0])
        print(f"tokens {num_tokens}: {touched} experts touched, {weight_bytes / 1e6:.1f} MB of weights")
        for ms, tiles, error in rows[:8]:
            print(f"  {ms * 1e3:8.1f} us  {weight_bytes / (ms * 1e-3) / 1e12:5.2f} TB/s  rel.diff {error:.1e}  {tiles}")
        default = [r for r in rows if r[1] == MoeTiles.for_batch(num_tokens * args.top_k)]
        if default:
            print(f"  default: {default[0][0] * 1e3:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
