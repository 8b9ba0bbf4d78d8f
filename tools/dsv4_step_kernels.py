#!/usr/bin/env python
"""Time parts of DeepSeek V4's batch-1 decode step on the GPU at the Flash shape, from CUDA-graph replays
(best of 5; each replay cycles through enough weight copies to read them from HBM, not L2):

- `moe`: one MoE block (gate, routing, 6 of 256 MXFP4 experts, the FP8 shared expert) at 1, 2 and 3 tokens,
  with the shared expert on its side stream and without (streams.SIDE_STREAMS); their outputs must be
  identical (the same kernels, scheduled differently).
- `hc`: mHC's hc_post (with the next connection's partial projections) + hc_pre at one token, at each
  HC_MIX_BLOCK (channels an hc_post program projects): 48 connections of distinct `fn` weights.
- `fp8-sweep`: the tensor-core FP8 GEMV of each Flash linear at its table tiles, as a programmatic dependent
  launch or not, and half / twice the K splits (`--tokens 1`: at one row; `--linears`,
  `--compile-only` to warm the Triton cache from several processes first).
- `fp8-layer`: one layer's FP8 linears in the model's order, elementwise kernels between them, those variants.
- `fp8`: the FP8 GEMV of each Flash linear at 1, 2 and 3 rows (the shared expert's gate/up with the SwiGLU in
  its launch too): whether the 2-3 row path of an MTP verification step costs more than one row. Each output
  against `fp8_linear_ref` (largest difference relative to the reference's largest).

    python tools/dsv4_step_kernels.py [--only moe,hc,fp8,fp8-sweep,fp8-layer] [--layers 8]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tools.dsv4_read_kernels import _timed_us  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "configs/deepseek-v4-flash-24l/config.json"


def _graph_us(calls, per_replay: int) -> float:
    """us per call of `calls()` (which makes per_replay calls), from CUDA-graph replays, best of 5."""
    return _timed_us(calls, calls=1) / per_replay


def time_moe(layers: int, token_counts: list[int]) -> list[dict]:
    from models.deepseek_v4 import moe, streams
    from models.deepseek_v4.linear import Linears
    from runtime.loader import init_dummy_weights

    config = SimpleNamespace(**json.loads(CONFIG.read_text()))
    blocks = []
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)               # as the engine builds a model (fp32 stays where named)
    try:
        for i in range(layers):                # distinct layers: ~3.3 GB of experts each, read past L2
            with torch.device("cuda"):
                block = moe.MoE(config, hashed=False, linears=Linears((128, 128)))
            init_dummy_weights(block, seed=i)
            blocks.append(block.eval())
    finally:
        torch.set_default_dtype(previous)
    results = []
    for tokens in token_counts:
        x = torch.randn(tokens, config.hidden_size, device="cuda", dtype=torch.bfloat16)
        ids = torch.zeros(tokens, dtype=torch.long, device="cuda")
        row = {"tokens": tokens}
        outputs = {}
        for side in (False, True):
            streams.SIDE_STREAMS = side
            with torch.inference_mode():
                outputs[side] = [b.parts(x, ids) for b in blocks]
                torch.cuda.synchronize()

                def calls():
                    for b in blocks:
                        b.parts(x, ids)

                row["side stream us" if side else "one stream us"] = round(_graph_us(calls, len(blocks)), 2)
        row["identical"] = all(torch.equal(a, b) for one, two in zip(outputs[False], outputs[True])
                               for a, b in zip(one, two))
        streams.SIDE_STREAMS = True
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def time_hc(blocks: list[int]) -> list[dict]:
    from models.deepseek_v4 import kernels
    from runtime.ops import RMSNorm

    hc, hidden, count = 4, 4096, 48
    fns = [torch.randn((2 + hc) * hc, hc * hidden, device="cuda") * 0.01 for _ in range(count)]
    base = torch.randn((2 + hc) * hc, device="cuda") * 0.1
    scale = torch.ones(3, device="cuda")
    norm = RMSNorm(hidden, 1e-6, weight_in_fp32=True).cuda()
    streams = torch.randn(1, hc, hidden, device="cuda", dtype=torch.bfloat16)
    output = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)
    post = torch.rand(1, hc, device="cuda") * 2
    comb = torch.softmax(torch.randn(1, hc, hc, device="cuda"), -1)
    results, reference = [], None
    default = kernels.HC_MIX_BLOCK
    for block in blocks:
        kernels.HC_MIX_BLOCK = block

        def pair(fn):
            new, mix = kernels.hc_post(output, streams, post, comb, fn)
            return kernels.hc_pre(new, fn, base, scale, 1e-6, 1e-6, 20, mix, norm)

        def calls():
            for fn in fns:
                pair(fn)

        out = pair(fns[0])
        if reference is None:
            reference = out
        error = max((a.float() - b.float()).abs().max().item() for a, b in zip(out, reference))
        row = {"HC_MIX_BLOCK": block, "hc_post + hc_pre us": round(_graph_us(calls, count), 2),
               "max diff from the first": f"{error:.1e}"}
        results.append(row)
        print(json.dumps(row), flush=True)
    kernels.HC_MIX_BLOCK = default
    return results


# (name, out, in, groups, silu_mul_output): the whole weight [out, in]; wo_a's input is groups * in wide
FP8_SHAPES = [("wq_a + wkv", 1536, 4096, 1, False), ("wq_b", 32768, 1024, 1, False),
              ("wo_a", 8192, 4096, 8, False), ("wo_b", 4096, 8192, 1, False),
              ("shared w1 + w3", 4096, 4096, 1, False), ("shared w1 + w3, SwiGLU", 4096, 4096, 1, True),
              ("shared w2", 4096, 2048, 1, False), ("indexer wq_b", 8192, 1024, 1, False)]


def time_fp8(row_counts: list[int]) -> list[dict]:
    from runtime.ops.fp8 import fp8_block_quantize, fp8_linear, fp8_linear_ref, fp8_silu_mul_ref

    results = []
    for name, n, k, groups, silu in FP8_SHAPES:
        copies = max(2, -(-200_000_000 // (n * k)))         # 200 MB of weights a replay: past the 50 MB L2
        weight, scale = fp8_block_quantize(torch.randn(n, k, device="cuda") * 0.05, (128, 128))
        scale = scale.float()                           # the model's scale grid is fp32 (the release's E8M0 values)
        weights = [(weight.clone(), scale.clone()) for _ in range(copies)]
        counters = [torch.zeros(n, dtype=torch.int32, device="cuda") for _ in range(copies)]
        row = {"linear": name, "N x K": f"{n} x {k}", "MB": round(n * k / 1e6, 1)}
        for rows in row_counts:
            x = torch.randn(rows, groups * k, device="cuda", dtype=torch.bfloat16)
            out = fp8_linear(x, weight, scale, groups, counters[0], silu_mul_output=silu, limit=10.0 if silu else None)
            ref = fp8_silu_mul_ref(x, weight, scale, 10.0) if silu else fp8_linear_ref(x.float(), weight, scale, groups)
            error = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()

            def calls():
                for (w, s), c in zip(weights, counters):
                    fp8_linear(x, w, s, groups, c, silu_mul_output=silu, limit=10.0 if silu else None)

            us = _graph_us(calls, copies)
            row[f"{rows} row us"] = round(us, 2)
            row[f"{rows} row rel err"] = f"{error:.1e}"
        row["TB/s at 1 row"] = round(n * k / (row[f"{row_counts[0]} row us"] * 1e-6) / 1e12, 2)
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def _fp8_weights(n: int, k: int, copies: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`copies` distinct-address copies of one random FP8 weight (fp32 power-of-two scales) and their counters."""
    from runtime.ops.fp8 import fp8_block_quantize

    weight, scale = fp8_block_quantize(torch.randn(n, k, device="cuda") * 0.05, (128, 128))
    return [(weight.clone(), scale.float().clone(), torch.zeros(n, dtype=torch.int32, device="cuda"))
            for _ in range(copies)]


def _fp8_variants(tiles) -> list[tuple[str, object, bool]]:
    """(name, tiles, PDL) of the tensor-core GEMV around its table tiles: programmatic dependent launch or not,
    half and twice the K splits."""
    import dataclasses

    out = [("plain", tiles, False), ("pdl", tiles, True)]
    for split in (tiles.split_k // 2, tiles.split_k * 2):
        if split >= 1:
            out += [(f"split {split}", dataclasses.replace(tiles, split_k=split), False),
                    (f"pdl split {split}", dataclasses.replace(tiles, split_k=split), True)]
    return out


def time_fp8_sweep(rows: int, names: set[str] | None, compile_only: bool) -> list[dict]:
    """Each Flash linear alone (back to back over weight copies past L2) at each variant of `_fp8_variants`;
    each variant's output must equal the plain one's bit for bit where the K split is the same."""
    import runtime.ops.fp8 as fp8

    default_pdl = fp8.FP8_GEMV_PDL
    results = []
    for name, n, k, groups, silu in FP8_SHAPES:
        if names and name not in names:
            continue
        base = fp8.Fp8GemvTiles.for_shape(n, k, rows)
        weights = _fp8_weights(n, k, 2 if compile_only else max(2, -(-200_000_000 // (n * k))))
        x = torch.randn(rows, groups * k, device="cuda", dtype=torch.bfloat16)
        limit = 10.0 if silu else None
        row = {"linear": name, "N x K": f"{n} x {k}", "tiles": f"{base.block_n}/{base.num_warps}/{base.split_k}"}
        plain = None
        for label, tiles, pdl in _fp8_variants(base):
            fp8.FP8_GEMV_PDL = pdl

            def one(w, s, c):
                if silu:
                    return fp8.fp8_gemv_silu_mul(x, w, s, limit, tiles, c)
                return fp8.fp8_gemv(x, w, s, groups, tiles, c)

            out = one(*weights[0])
            if plain is None:
                plain = out
            same = torch.equal(out, plain) if tiles.split_k == base.split_k else None
            if compile_only:
                continue

            def calls():
                for w, s, c in weights:
                    one(w, s, c)

            us = _graph_us(calls, len(weights))
            row[label] = f"{us:.2f}" + ("" if same is not False else " DIFF")
        fp8.FP8_GEMV_PDL = default_pdl
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def time_fp8_layer(rows: int, compile_only: bool) -> list[dict]:
    """One layer's FP8 linears in the model's order, an elementwise kernel (not a dependent launch) writing
    the input of those that follow other kernels: [ew] wq_a+wkv [ew] wq_b [ew] indexer wq_b [ew] wo_a, wo_b
    [ew] shared w1+w3 (SwiGLU), w2; 8 copies of the layer (past L2). us a layer, table tiles, launched as
    programmatic dependents or not."""
    import runtime.ops.fp8 as fp8

    order = ["wq_a + wkv", "wq_b", "indexer wq_b", "wo_a", "wo_b", "shared w1 + w3, SwiGLU", "shared w2"]
    after_other = {"wq_a + wkv", "wq_b", "indexer wq_b", "wo_a", "shared w1 + w3, SwiGLU"}
    shapes = {name: (n, k, groups, silu) for name, n, k, groups, silu in FP8_SHAPES}
    copies = 2 if compile_only else 8
    weights = {name: _fp8_weights(shapes[name][0], shapes[name][1], copies) for name in order}
    inputs = {name: torch.randn(rows, shapes[name][2] * shapes[name][1], device="cuda", dtype=torch.bfloat16)
              for name in order}
    sources = {name: x.clone() for name, x in inputs.items()}
    default_pdl = fp8.FP8_GEMV_PDL
    results = []
    for label, pdl in (("plain", False), ("pdl", True)):
        fp8.FP8_GEMV_PDL = pdl

        def layer(copy):
            for name in order:
                n, k, groups, silu = shapes[name]
                w, s, c = weights[name][copy]
                tiles = fp8.Fp8GemvTiles.for_shape(n, k, rows)
                if name in after_other:
                    inputs[name].copy_(sources[name])
                if silu:
                    fp8.fp8_gemv_silu_mul(inputs[name], w, s, 10.0, tiles, c)
                else:
                    fp8.fp8_gemv(inputs[name], w, s, groups, tiles, c)

        layer(0)
        if compile_only:
            continue

        def calls():
            for copy in range(copies):
                layer(copy)

        row = {"layer (7 FP8 linears + 5 copies)": label, "us a layer": round(_graph_us(calls, copies), 2)}
        results.append(row)
        print(json.dumps(row), flush=True)
    fp8.FP8_GEMV_PDL = default_pdl
    return results


def _table(results: list[dict]) -> None:
    if not results:
        return
    keys = list(results[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in results:
        print("| " + " | ".join(str(row.get(key, "")) for key in keys) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="moe,hc,fp8")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", default="1,2,3")
    parser.add_argument("--linears", default="", help="fp8-sweep: only these FP8_SHAPES names (comma-separated)")
    parser.add_argument("--compile-only", action="store_true", help="fp8-sweep / fp8-layer: run each variant once")
    args = parser.parse_args()
    counts = [int(t) for t in args.tokens.split(",")]
    print(torch.cuda.get_device_name(), f"torch {torch.__version__}", flush=True)
    tables = []
    for section in args.only.split(","):
        start = time.time()
        results = {"moe": lambda: time_moe(args.layers, counts), "hc": lambda: time_hc([64, 32, 128]),
                   "fp8": lambda: time_fp8(counts),
                   "fp8-sweep": lambda: time_fp8_sweep(counts[0], set(filter(None, args.linears.split(","))),
                                                       args.compile_only),
                   "fp8-layer": lambda: time_fp8_layer(counts[0], args.compile_only)}[section]()
        print(f"{section}: {time.time() - start:.1f} s", flush=True)
        tables.append(results)
    for results in tables:
        _table(results)


if __name__ == "__main__":
    main()
