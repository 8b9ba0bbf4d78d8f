#!/usr/bin/env python
"""Check and time the decode kernels on the GPU: the dense GEMV against cuBLAS, the MXFP4 decode GEMV against
the grouped GEMM, the fused QKV step against the separate ops, the FP8
block-scaled GEMV/GEMM against cuBLAS on the dequantized weights. Prints one table per family; every variant is
checked against its torch reference first (relative error) and timed from a CUDA graph, over enough weight
copies that L2 cannot hold them (each copy read once per replay).

    python tools/decode_kernels.py [--only gemv,mxfp4,route,qkv,fp8,attention,step] [--json out.jsonl]
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from runtime.ops.activation import silu_and_mul  # noqa: E402
from runtime.ops.linear import linear_ref  # noqa: E402
from runtime.ops.mxfp4 import (GatedActivation, GemvTiles, MoeTiles, Mxfp4Linear, mxfp4_moe_gemv,  # noqa: E402
                               mxfp4_moe_reference, mxfp4_moe_triton)

L2_BYTES = 60 << 20
RECORDS: list[dict] = []


def timed_us(fn, copies: int, rep: int = 50) -> float:
    """Median microseconds of one call of fn(i) for i in range(copies), all captured in one graph."""
    def run():
        for i in range(copies):
            fn(i)
    return triton.testing.do_bench_cudagraph(run, rep=rep, return_mode="median") * 1e3 / copies


def copies_for(nbytes: int) -> int:
    return max(1, min(64, -(-4 * L2_BYTES // nbytes)))


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = triton.testing.do_bench(lambda: dst.copy_(src), rep=200, return_mode="median") * 1e3
    return 2 * src.numel() / (us * 1e-6)


# The dense GEMV's shapes at one row: name -> (N, K, fusion), fusion "norm" (residual + RMSNorm read in), "silu"
# (SiLU-and-mul read in) or "" (plain). The DeepSeek V4 ones are its bf16 projections: the router (256 experts)
# and the attention's compressor/indexer projections of a ratio-4 and a ratio-128 layer.
GEMV_SHAPES = {
    "0.6b qkv+norm": (4096, 1024, "norm"), "0.6b o": (1024, 2048, ""), "0.6b gate_up+norm": (6144, 1024, "norm"),
    "0.6b down+silu": (1024, 3072, "silu"),
    "dsv4 router": (256, 4096, ""), "dsv4 wx r4": (2624, 4096, ""), "dsv4 wx r128": (1024, 4096, ""),
    "8b qkv+norm": (6144, 4096, "norm"), "8b o": (4096, 4096, ""), "8b gate_up+norm": (24576, 4096, "norm"),
    "8b down+silu": (4096, 12288, "silu"),
    "oss qkv+norm": (5120, 2880, "norm"), "oss o": (2880, 4096, ""),
}


def gemv_variants(n: int, k: int) -> list:
    """Launch shapes swept for an (N, K) weight beside gemv_tiles' choice: steps of 512-2048 inputs, or one step
    (BLOCK_K >= K: the whole weight block requested at once); BLOCK_N with 2K-16K weight elements a step, 16-64
    of them a thread (two to eight 16-byte loads). (K split over programs lost at every shape on 2026-11-29 and
    was removed from the kernel.)"""
    from runtime.ops.linear import GemvTiles
    variants = []
    for block_k in dict.fromkeys((512, 1024, 2048, triton.next_power_of_2(k))):
        if block_k > triton.next_power_of_2(k):
            continue
        for block_n in (1, 2, 4, 8, 16):
            elements = block_n * block_k
            for warps in (4, 8):
                if not (2048 <= elements <= 16384 and 16 <= elements // (32 * warps) <= 64):
                    continue
                variants.append(GemvTiles(block_n, block_k, warps))
    return variants


def _gemv_case(n: int, k: int, fusion: str, copies: int):
    """(weights, x, norm, residual, the fp32 reference of copy 0, a cuBLAS call of copy i with its separate
    norm / activation kernel)."""
    from runtime.ops.linear import norm_linear_ref
    from runtime.ops.norm import RMSNorm, rms_norm
    weights = [(torch.randn(n, k, device="cuda") * k ** -0.5).to(torch.bfloat16) for _ in range(copies)]
    silu = fusion == "silu"
    x = torch.randn(1, 2 * k if silu else k, device="cuda").to(torch.bfloat16)
    norm = res = None
    if fusion == "norm":
        norm = RMSNorm(k, 1e-6).cuda().to(torch.bfloat16)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.3 * torch.randn(k, device="cuda"))
        res = torch.randn(1, k, device="cuda").to(torch.bfloat16)
        want = norm_linear_ref(x.float(), res.float(), norm.float(), weights[0].float())[0]
        norm = norm.to(torch.bfloat16)
        separate = lambda i: F.linear(rms_norm(x, norm.weight, 1e-6, res)[0], weights[i])  # noqa: E731
    elif silu:
        want = linear_ref(x.float(), weights[0].float(), None, True)
        separate = lambda i: F.linear(silu_and_mul(x), weights[i])            # noqa: E731
    else:
        want = linear_ref(x.float(), weights[0].float())
        separate = lambda i: F.linear(x, weights[i])                          # noqa: E731
    return weights, x, norm, res, want, separate


def _gemv_call(module, x, weight, norm, res, fusion: str, tiles):
    out = module.gemv_triton(x, weight, None, fusion == "silu", tiles, norm=norm, residual=res)
    return out[0] if norm is not None else out


def _precompile_gemv(jobs: list) -> None:
    """Launch each (module, N, K, fusion, tiles) once on uninitialized data: the kernels' binaries land in
    Triton's on-disk cache, where the timing process finds them."""
    for module_name, n, k, fusion, tiles in jobs:
        module = importlib.import_module(module_name)
        weight = torch.empty(n, k, dtype=torch.bfloat16, device="cuda")
        x = torch.zeros(1, 2 * k if fusion == "silu" else k, dtype=torch.bfloat16, device="cuda")
        norm = res = None
        if fusion == "norm":
            from runtime.ops.norm import RMSNorm
            norm, res = RMSNorm(k, 1e-6).cuda().to(torch.bfloat16), torch.zeros_like(x)
        try:
            _gemv_call(module, x, weight, norm, res, fusion, tiles)
        except Exception as exc:                        # noqa: BLE001  reported again by the timing process
            print(f"precompile {module_name} {n}x{k} {fusion} {tiles}: {type(exc).__name__}: {str(exc)[:200]}")
    torch.cuda.synchronize()


def bench_gemv(bandwidth: float, names=None, before=None, workers: int = 0, rep: int = 20) -> dict:
    """Each GEMV_SHAPES entry at one row: cuBLAS after the separate norm / activation kernel, `before` (a module
    with an older gemv_triton / gemv_tiles, e.g. a copy of main's runtime/ops/linear.py) at its tiles, this
    gemv_tiles' choice, and every gemv_variants launch shape (each checked against the fp32 reference).
    `workers` > 0 compiles every variant first in that many processes. Returns {(N, K): the fastest tiles}."""
    from runtime.ops import linear as current
    names = names or list(GEMV_SHAPES)
    plans = {}
    for name in names:
        n, k, fusion = GEMV_SHAPES[name]
        plans[name] = list(dict.fromkeys([current.gemv_tiles(1, n, k)] + gemv_variants(n, k)))
    if workers:
        import multiprocessing
        jobs = {}                    # one launch per kernel: the shapes' N and K are all multiples of 16
        for name in names:
            n, k, fusion = GEMV_SHAPES[name]
            for tiles in plans[name]:
                jobs.setdefault((fusion, tiles), ("runtime.ops.linear", n, k, fusion, tiles))
        jobs = list(jobs.values())
        if before is not None:
            jobs += [(before.__name__, *GEMV_SHAPES[name], None) for name in names]
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.map(_precompile_gemv, [jobs[i::workers] for i in range(workers)])
    short = lambda t: f"{t.block_n}/{t.block_k}/{t.num_warps}"                     # noqa: E731
    print(f"\n{'GEMV, 1 row':<18}{'N x K':>12}{'cuBLAS us':>10}{'before':>8}{'default':>8}{'best':>7}{'TB/s':>6}"
          f"{'err':>9}  best tiles (block_n/block_k/warps); next")
    chosen = {}
    for name in names:
        n, k, fusion = GEMV_SHAPES[name]
        nbytes = n * k * 2
        copies = copies_for(nbytes)
        weights, x, norm, res, want, separate = _gemv_case(n, k, fusion, copies)
        t_separate = timed_us(separate, copies, rep)
        t_before = float("nan")
        if before is not None:
            t_before = timed_us(lambda i: _gemv_call(before, x, weights[i], norm, res, fusion, None), copies, rep)
        results = {}
        for tiles in plans[name]:
            try:
                err = rel_error(_gemv_call(current, x, weights[0], norm, res, fusion, tiles), want)
                if not err < 1e-2:
                    print(f"  {name} {short(tiles)}: rel error {err:.1e}: dropped")
                    continue
                results[tiles] = (timed_us(lambda i: _gemv_call(current, x, weights[i], norm, res, fusion, tiles),
                                           copies, rep), err)
            except Exception as exc:                    # noqa: BLE001  one broken variant does not end the sweep
                print(f"  {name} {short(tiles)}: {type(exc).__name__}: {str(exc)[:200]}")
        ranked = sorted(results, key=lambda t: results[t][0])
        best = ranked[0]
        chosen[(n, k)] = best
        t_default = results.get(current.gemv_tiles(1, n, k), (float("nan"),))[0]
        t_best, err = results[best]
        print(f"{name:<18}{f'{n}x{k}':>12}{t_separate:>10.1f}{t_before:>8.1f}{t_default:>8.1f}{t_best:>7.1f}"
              f"{nbytes / t_best / 1e6:>6.2f}{err:>9.1e}  {short(best)}; "
              + "; ".join(f"{short(t)} {results[t][0]:.1f}" for t in ranked[1:5]), flush=True)
        RECORDS.append(dict(kind="gemv", name=name, n=n, k=k, fusion=fusion, separate_us=t_separate,
                            before_us=t_before, default_us=t_default, best=list(best), best_us=t_best, err=err,
                            sweep={short(t): r[0] for t, r in results.items()}))
        del weights
    print(f"(us per call from CUDA-graph replays over weight copies L2 cannot hold; cuBLAS: after the separate "
          f"norm / SiLU-and-mul kernel; TB/s of the weight bytes at the best tiles; copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s)")
    return chosen


def write_gemv_tile_table(chosen: dict) -> None:
    """Rewrite GEMV_TILE_TABLE in runtime/ops/linear.py with the sweep's choice (the entries of shapes not swept
    this time stay)."""
    from runtime.ops import linear
    path = Path(__file__).resolve().parents[1] / "runtime" / "ops" / "linear.py"
    text = path.read_text()
    head = "GEMV_TILE_TABLE: dict[tuple[int, int], GemvTiles] = {\n"
    start = text.index(head) + len(head)
    end = text.index("}\n", start)
    table = {**linear.GEMV_TILE_TABLE, **chosen}
    text = text[:start] + "".join(f"    {shape}: {tiles!r},\n" for shape, tiles in sorted(table.items())) + text[end:]
    path.write_text(text)


MXFP4_SHAPES = {   # name: experts held, hidden, intermediate, top-k, biases, activation
    "gpt-oss-20b": (32, 2880, 2880, 4, True, GatedActivation(alpha=1.702, limit=7.0, up_offset=1.0, interleaved=True)),
    "deepseek-v4": (32, 4096, 2048, 6, False, GatedActivation(limit=10.0)),     # 32 of its 256 experts
}
# Each GEMV's variants swept beside the table's tiles: name -> GemvTiles fields.
# "mma wW sS": the tensor-core kernels (W warps: 8 W gate/up columns or 16 W down rows a program; S K splits, of
# each slot for the down GEMV). The Triton and explicit-layout (Gluon) tiles lost to them at every shape on
# 2026-11-29 (docs/PERFORMANCE.md) and are no longer swept; they stay the fallback for non-bf16 activations.
# L2 prefetches (each walk's range as bulk requests first, lines 4 steps ahead, the down rows asked for by the
# gate/up launch) were swept on 2026-11-30 and lost everywhere (docs/PERFORMANCE.md); not kept.
GATE_UP_VARIANTS = {
    "mma w4 s2": dict(mma=True, mma_warps=4, mma_split=2),
    "mma w8 s2": dict(mma=True, mma_warps=8, mma_split=2),
    "mma w4 s4": dict(mma=True, mma_warps=4, mma_split=4),
    "mma w4 s1": dict(mma=True, mma_warps=4, mma_split=1),
}
DOWN_VARIANTS = {
    "mma w4 s2": dict(mma_down=True, mma_warps_down=4, mma_split_down=2),
    "mma w4 s4": dict(mma_down=True, mma_warps_down=4, mma_split_down=4),
    "mma w2 s2": dict(mma_down=True, mma_warps_down=2, mma_split_down=2),
    "mma w4 s1": dict(mma_down=True, mma_warps_down=4, mma_split_down=1),
}


def checked_timing(error, call, copies: int, mb: float) -> tuple[float, float, float]:
    """(us, TB/s, relative error) of one variant; a variant that fails to compile or run is reported and
    costs infinity, so one broken variant does not end the sweep."""
    try:
        err = error()
        us = timed_us(call, copies)
    except Exception as exc:                            # noqa: BLE001  reported, then skipped by the choice
        print(f"    variant failed: {type(exc).__name__}: {str(exc)[:300]}")
        return float("inf"), 0.0, float("inf")
    return us, mb / us, err


def bench_mxfp4(bandwidth: float, before=None, with_grouped: bool = True, token_counts=(1, 4)) -> None:
    """The MoE of each expert shape at each of `token_counts`: the module `before` (an older runtime.ops.mxfp4, its
    default tiles), the table's tiles (whole MoE, then each GEMV alone) and a sweep of each GEMV's tiles."""
    from dataclasses import replace

    from runtime.ops.mxfp4 import mxfp4_gemv_down, mxfp4_gemv_gate_up
    for name, (experts, hidden, inter, top_k, bias, activation) in MXFP4_SHAPES.items():
        def layer(seed):
            g = torch.Generator(device="cuda").manual_seed(seed)
            packed = lambda rows, k, lo: Mxfp4Linear(                              # noqa: E731
                torch.randint(0, 256, (experts, rows, k // 32, 16), generator=g, device="cuda", dtype=torch.uint8),
                torch.randint(lo, lo + 6, (experts, rows, k // 32), generator=g, device="cuda", dtype=torch.uint8),
                torch.randn(experts, rows, generator=g, device="cuda") if bias else None)
            return packed(2 * inter, hidden, 118), packed(hidden, inter, 116)

        layers = [layer(i) for i in range(4)]                                    # 4 x 400 MB: far past L2
        w13_bytes = 2 * inter * hidden // 2 * 17 // 16                          # blocks + scales per expert
        w2_bytes = hidden * inter // 2 * 17 // 16
        table = GemvTiles.for_shape(hidden, inter)
        print(f"\nMXFP4 MoE {name} (hidden {hidden}, intermediate {inter}, top-{top_k}); table tiles {table}")
        print(f"{'tokens':>6}{'experts':>8}{'MB':>7}{'grouped us':>11}{'before us':>10}{'TB/s':>6}{'after us':>9}"
              f"{'TB/s':>6}{'gate_up us':>11}{'TB/s':>6}{'down us':>8}{'TB/s':>6}{'err':>9}")
        def inputs(tokens):
            g = torch.Generator(device="cuda").manual_seed(tokens)
            x = torch.randn(tokens, hidden, generator=g, device="cuda").to(torch.bfloat16)
            ids = torch.stack([torch.randperm(experts, generator=g, device="cuda")[:top_k] for _ in range(tokens)])
            weights = torch.softmax(torch.randn(tokens, top_k, generator=g, device="cuda"), -1).to(torch.bfloat16)
            return x, ids, weights

        shape_records = []
        for tokens in token_counts:
            x, ids, weights = inputs(tokens)
            unique = ids.unique().numel()
            up_mb, down_mb = unique * w13_bytes / 1e6, unique * w2_bytes / 1e6
            tbs = lambda mb, us: mb / us                                            # noqa: E731  MB/us = TB/s
            want = mxfp4_moe_reference(x, *layers[0], weights, ids, activation)
            grouped = timed_us(lambda i: mxfp4_moe_triton(x, *layers[i], weights, ids, activation), len(layers)) \
                if with_grouped else float("nan")
            t_before = float("nan")
            if before is not None:
                t_before = timed_us(lambda i: before.mxfp4_moe_gemv(
                    x, *(before.Mxfp4Linear(w.blocks, w.scales, w.bias) for w in layers[i]), weights, ids,
                    before.GatedActivation(activation.alpha, activation.limit, activation.up_offset,
                                           activation.interleaved)), len(layers))
            err = rel_error(mxfp4_moe_gemv(x, *layers[0], weights, ids, activation), want)
            t_after = timed_us(lambda i: mxfp4_moe_gemv(x, *layers[i], weights, ids, activation), len(layers))
            h = mxfp4_gemv_gate_up(x, layers[0][0], ids, activation, table)
            t_up = timed_us(lambda i: mxfp4_gemv_gate_up(x, layers[i][0], ids, activation, table), len(layers))
            t_down = timed_us(lambda i: mxfp4_gemv_down(h, layers[i][1], weights, ids, table), len(layers))
            print(f"{tokens:>6}{unique:>8}{up_mb + down_mb:>7.1f}{grouped:>11.1f}{t_before:>10.1f}"
                  f"{tbs(up_mb + down_mb, t_before):>6.2f}{t_after:>9.1f}{tbs(up_mb + down_mb, t_after):>6.2f}"
                  f"{t_up:>11.1f}{tbs(up_mb, t_up):>6.2f}{t_down:>8.1f}{tbs(down_mb, t_down):>6.2f}{err:>9.1e}")
            record = dict(kind="mxfp4", shape=name, hidden=hidden, inter=inter, tokens=tokens, experts=unique, grouped_us=grouped,
                          before_us=t_before, after_us=t_after, gate_up_us=t_up, down_us=t_down, err=err,
                          gate_up_mb=up_mb, down_mb=down_mb, sweep={})
            for key, fields in GATE_UP_VARIANTS.items():
                tiles = replace(table, ptx_decode=True, prefetch=True, **fields)
                record["sweep"][f"gate_up {key}"] = checked_timing(
                    lambda: rel_error(mxfp4_gemv_gate_up(x, layers[0][0], ids, activation, tiles), h),
                    lambda i: mxfp4_gemv_gate_up(x, layers[i][0], ids, activation, tiles), len(layers), up_mb)
            counters = torch.zeros(tokens * hidden, dtype=torch.int32, device="cuda")  # the split's, left at 0
            for key, fields in DOWN_VARIANTS.items():
                tiles = replace(table, ptx_decode=True, prefetch=True, **fields)
                record["sweep"][f"down {key}"] = checked_timing(
                    lambda: rel_error(mxfp4_gemv_down(h, layers[0][1], weights, ids, tiles, counters),
                                      mxfp4_gemv_down(h, layers[0][1], weights, ids, table)),
                    lambda i: mxfp4_gemv_down(h, layers[i][1], weights, ids, tiles, counters), len(layers), down_mb)
            for kernel in ("gate_up", "down"):
                ranked = sorted((v[0], k, v[1], v[2]) for k, v in record["sweep"].items() if k.startswith(kernel))
                print(f"    {kernel} best: " + "; ".join(f"{k[len(kernel) + 1:]} {us:.1f} us {tb:.2f} TB/s (err {e:.0e})"
                                                        for us, k, tb, e in ranked[:4]))
            RECORDS.append(record)
            shape_records.append(record)
        # the whole MoE at the tiles the sweep chose, beside `before` (what --write-table would make the table)
        source = choose_gemv_tiles(shape_records)[(hidden, inter)]
        chosen = eval(source, {"GemvTiles": GemvTiles})
        print(f"  chosen {source}")
        for record in shape_records:
            x, ids, weights = inputs(record["tokens"])
            mb = record["gate_up_mb"] + record["down_mb"]
            us, _, err = checked_timing(
                lambda: rel_error(mxfp4_moe_gemv(x, *layers[0], weights, ids, activation, chosen),
                                  mxfp4_moe_reference(x, *layers[0], weights, ids, activation)),
                lambda i: mxfp4_moe_gemv(x, *layers[i], weights, ids, activation, chosen), len(layers), mb)
            record.update(chosen_us=us, chosen_err=err, chosen=source)
            before_us = record["before_us"]
            print(f"  {record['tokens']} tokens: before {before_us:.1f} us ({mb / before_us:.2f} TB/s)"
                  f" -> chosen {us:.1f} us ({mb / us:.2f} TB/s), err {err:.1e}")
            # the same with the down GEMV a programmatic dependent launch of the gate/up one
            dependent = replace(chosen, mma_pdl=True)
            pdl_us, _, pdl_err = checked_timing(
                lambda: rel_error(mxfp4_moe_gemv(x, *layers[0], weights, ids, activation, dependent),
                                  mxfp4_moe_reference(x, *layers[0], weights, ids, activation)),
                lambda i: mxfp4_moe_gemv(x, *layers[i], weights, ids, activation, dependent), len(layers), mb)
            record.update(pdl_us=pdl_us, pdl_err=pdl_err)
            print(f"  {record['tokens']} tokens, down GEMV a dependent launch: {pdl_us:.1f} us ({mb / pdl_us:.2f} TB/s),"
                  f" err {pdl_err:.1e}")
        del layers


# the routing launch before the experts: name -> (experts, top-k, scoring); "softmax-after" is softmax_topk's
# softmax over the k chosen logits, the others score_topk's scores with a selection-only bias
ROUTE_SHAPES = {"gpt-oss-20b": (32, 4, "softmax-after"), "deepseek-v4": (256, 6, "sqrtsoftplus")}


def bench_route(before=None, token_counts=(1, 4)) -> None:
    """The one-launch routing top-k at each shape: `before` (an older runtime.ops.moe) beside this one at its
    warp count and at 4 warps; ids must agree with the torch reference's (distinct logits: no ties)."""
    from runtime.ops import moe

    def call(module, logits, top_k, scoring, bias, num_warps=None):
        if scoring == "softmax-after":
            args = (logits, top_k, 1, True)
            kwargs = {}
        else:
            args = (logits, top_k, {"softmax": 0, "sigmoid": 2, "sqrtsoftplus": 3}[scoring], True)
            kwargs = dict(selection_bias=bias, rounded=True)
        if num_warps is not None:
            kwargs["num_warps"] = num_warps
        return module._route_topk(*args, **kwargs)

    print(f"\nrouting top-k, us a launch (CUDA graph of 64 launches)")
    print(f"{'shape':>14}{'tokens':>7}{'before':>8}{'after':>8}{'4 warps':>9}  ids agree")
    for name, (experts, top_k, scoring) in ROUTE_SHAPES.items():
        for tokens in token_counts:
            ranks = torch.stack([torch.randperm(experts, device="cuda") for _ in range(tokens)]).float()
            logits = ((ranks - experts / 2) / 16).to(torch.bfloat16)
            bias = torch.randn(experts, device="cuda") * 1e-3
            if scoring == "softmax-after":
                want = moe.softmax_topk_ref(logits, top_k, False, softmax_after_topk=True)[1]
            else:
                want = moe.score_topk_ref(logits, top_k, scoring, selection_bias=bias)[1].sort(-1).values
            got = call(moe, logits, top_k, scoring, bias)[1]
            agree = torch.equal(got if scoring == "softmax-after" else got.sort(-1).values, want)
            t_before = timed_us(lambda i: call(before, logits, top_k, scoring, bias), 64, rep=20) \
                if before is not None else float("nan")
            t_after = timed_us(lambda i: call(moe, logits, top_k, scoring, bias), 64, rep=20)
            t_four = timed_us(lambda i: call(moe, logits, top_k, scoring, bias, 4), 64, rep=20)
            print(f"{name:>14}{tokens:>7}{t_before:>8.2f}{t_after:>8.2f}{t_four:>9.2f}  {agree}")
            RECORDS.append(dict(kind="route", shape=name, tokens=tokens, before_us=t_before, after_us=t_after,
                                four_warps_us=t_four, ids_agree=agree))


def choose_gemv_tiles(records: list[dict]) -> dict[tuple[int, int], str]:
    """Per expert shape, the sweep's fastest gate_up and down variants (relative error < 1e-2), weighting 1
    token fully and 4 tokens by a quarter. Returns GemvTiles(...) sources (PTX decode, prefetching)."""
    from dataclasses import replace
    chosen = {}
    for shape in {(r["hidden"], r["inter"]) for r in records if r["kind"] == "mxfp4"}:
        cost: dict[str, float] = {}
        pdl_cost = {False: 0.0, True: 0.0}                  # the whole MoE at the choice, with the down GEMV a
        for r in records:                                    # dependent launch and not (when timed)
            if r["kind"] == "mxfp4" and (r["hidden"], r["inter"]) == shape:
                weight = 1.0 if r["tokens"] == 1 else 0.25
                for key, (us, _, err) in r["sweep"].items():
                    cost[key] = cost.get(key, 0.0) + (weight * us if err < 1e-2 else float("inf"))
                if "pdl_us" in r:
                    pdl_cost[False] += weight * r["chosen_us"]
                    pdl_cost[True] += weight * (r["pdl_us"] if r["pdl_err"] < 1e-2 else float("inf"))
        up = min(GATE_UP_VARIANTS, key=lambda k: cost[f"gate_up {k}"])
        down = min(DOWN_VARIANTS, key=lambda k: cost[f"down {k}"])
        # the explicit-layout kernels stay the fallback of the tensor-core ones (fp32 / fp16 activations)
        t = replace(GemvTiles(16, 16, 32, 4, block_g_down=32, num_warps_down=4, gluon=True, gluon_down=True),
                    **GATE_UP_VARIANTS[up], **DOWN_VARIANTS[down], mma_pdl=pdl_cost[True] < pdl_cost[False])
        flags = ", gluon=True" if t.gluon else ""
        flags += f", gluon_down=True, split_down={t.split_down}" if t.gluon_down else ""
        flags += f", mma=True, mma_warps={t.mma_warps}, mma_split={t.mma_split}" if t.mma else ""
        flags += (f", mma_down=True, mma_warps_down={t.mma_warps_down}, mma_split_down={t.mma_split_down}"
                  if t.mma_down else "")
        flags += ", mma_pdl=True" if t.mma_pdl else ""
        chosen[shape] = (f"GemvTiles({t.block_n_gate_up}, {t.block_n_down}, {t.block_g}, {t.num_warps}, "
                         f"block_g_down={t.block_g_down}, num_warps_down={t.num_warps_down}{flags})")
    return chosen


def write_tile_table(chosen: dict[tuple[int, int], str]) -> None:
    """Rewrite the GEMV_TILE_TABLE rows of runtime/ops/mxfp4.py for the shapes swept."""
    import re
    path = Path(__file__).resolve().parents[1] / "runtime" / "ops" / "mxfp4.py"
    text = path.read_text()
    for (hidden, inter), tiles in chosen.items():
        text, count = re.subn(rf"^    \({hidden}, {inter}\): GemvTiles\(.*\),$", f"    ({hidden}, {inter}): {tiles},",
                              text, flags=re.M)
        if count != 1:
            raise SystemExit(f"no GEMV_TILE_TABLE row for ({hidden}, {inter}) in {path}")
    path.write_text(text)


def bench_qkv() -> None:
    from runtime.ops.attention import write_kv
    from runtime.ops.norm import rms_norm
    from runtime.ops.qkv import qkv_rope_write_kv_ref, qkv_rope_write_kv_triton
    from runtime.ops.rope import RotaryEmbedding
    print(f"\n{'QKV step':<24}{'tokens':>7}{'separate us':>12}{'fused us':>10}{'mismatch':>10}{'max diff':>10}")
    for name, heads, kv_heads, head_dim, norm in (("qwen3-0.6b", 16, 8, 128, True), ("qwen3-8b", 32, 8, 128, True),
                                                  ("gpt-oss-20b", 64, 8, 64, False)):
        rotary = RotaryEmbedding(1.0 / (1e6 ** (torch.arange(0, head_dim, 2).float() / head_dim)), 4096).cuda()
        cache = torch.randn(256, 16, 2, kv_heads, head_dim, device="cuda").to(torch.bfloat16)
        q_w, k_w = (1 + 0.3 * torch.randn(head_dim, device="cuda")).to(torch.bfloat16), \
            (1 + 0.3 * torch.randn(head_dim, device="cuda")).to(torch.bfloat16)
        weights = (q_w, k_w) if norm else (None, None)
        for tokens in (1, 64):
            qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device="cuda").to(torch.bfloat16)
            positions = torch.randint(0, 4000, (tokens,), device="cuda")
            slots = torch.randperm(256 * 16, device="cuda")[:tokens]
            ref_cache = cache.clone()
            want = qkv_rope_write_kv_ref(qkv, positions, rotary.cos_sin, "neox", ref_cache, slots, heads, kv_heads,
                                         head_dim, *weights, 1e-6)
            got = qkv_rope_write_kv_triton(qkv, positions, rotary.cos_sin, "neox", cache, slots, heads, kv_heads,
                                           head_dim, *weights, 1e-6)
            mismatch = max((got != want).float().mean().item(), (cache != ref_cache).float().mean().item())
            diff = max((got.float() - want.float()).abs().max().item(),
                       (cache.float() - ref_cache.float()).abs().max().item())

            def separate():
                q, k, v = qkv.split((heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), dim=-1)
                q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
                if norm:
                    q, k = rms_norm(q, q_w, 1e-6), rms_norm(k, k_w, 1e-6)
                q, k = rotary(positions, q, k)
                write_kv(cache, k, v.view(tokens, kv_heads, head_dim), slots)

            t_sep = timed_us(lambda i: separate(), 8)
            t_fused = timed_us(lambda i: qkv_rope_write_kv_triton(
                qkv, positions, rotary.cos_sin, "neox", cache, slots, heads, kv_heads, head_dim, *weights, 1e-6), 8)
            print(f"{name:<24}{tokens:>7}{t_sep:>12.1f}{t_fused:>10.1f}{mismatch:>10.1e}{diff:>10.1e}")
            RECORDS.append(dict(kind="qkv", name=name, tokens=tokens, separate_us=t_sep, fused_us=t_fused,
                                mismatch=mismatch, max_diff=diff))


# DeepSeek V4 Flash's FP8 linears: name -> (out per group, in, groups)
FP8_SHAPES = {"wq_a": (1024, 4096, 1), "wq_b": (32768, 1024, 1), "wkv": (512, 4096, 1), "wo_a": (1024, 4096, 8),
              "wo_b": (4096, 8192, 1), "indexer wq_b": (8192, 1024, 1), "shared w1|w3": (2048, 4096, 1),
              "shared w2": (4096, 2048, 1), "mtp e_proj": (4096, 4096, 1)}


# The FP8 GEMV's tiles before the K-major layout (2026-11-29 sweep; integer decode, warps along N): the "before"
# column of the comparison.
FP8_GEMV_TILES_BEFORE = {(512, 4096): (32, 512, 8), (1024, 4096): (8, 1024, 1), (2048, 4096): (8, 1024, 1),
                         (4096, 2048): (16, 512, 1), (4096, 4096): (16, 512, 1), (4096, 8192): (16, 512, 2),
                         (8192, 1024): (16, 512, 1), (8192, 4096): (8, 512, 1), (32768, 1024): (16, 512, 1)}


def fp8_gemv_variants(n: int, k: int, rows: int) -> list:
    """GEMV tiles worth timing for one group's [n, k] at `rows` rows: a few hundred to a few thousand programs
    (the H200 has 132 SMs), 1-32 K splits. The tensor-core GEMV (1-8 rows: 16 rows a warp, 2/4/8 warps, 128
    bytes of K a step); up to 4 rows the CUDA-core one too: the N-major layout (integer decode, 512 or 1024 bytes
    of a row a step) and the K-major one (8 bytes a thread, the 4 warps' 1024 bytes a step, the hardware's E4M3
    widening)."""
    from runtime.ops.fp8 import Fp8GemvTiles
    variants = []
    for warps in (2, 4, 8):
        for split in (1, 2, 4, 8, 16, 32):
            programs = n // (16 * warps) * split
            if n % (16 * warps) or k // 128 < 2 * split or not (120 <= programs <= 1100 or split == 1):
                continue
            variants.append(Fp8GemvTiles(16 * warps, split_k=split, num_warps=warps, mma=True))
    if rows > 4:
        return variants
    for block_n in (8, 16, 32):
        for block_k in (512, 1024):
            for split in (1, 2, 4, 8):
                programs = n // block_n * split
                if n % block_n or k % block_k or k // block_k < split or not 128 <= programs <= 2048:
                    continue
                variants.append(Fp8GemvTiles(block_n, block_k, split, 4))
    for block_n in ((8, 16) if rows == 1 else (4, 8)):
        for split in (1, 2, 4, 8):
            programs = n // block_n * split
            if n % block_n or k // 1024 < split or not 128 <= programs <= 8192:
                continue
            variants.append(Fp8GemvTiles(block_n, 1024, split, 4, layout_k=True, vec=8, cvt=True))
    return variants


def bench_fp8(bandwidth: float, rows_list=(1, 2, 4, 8, 16, 64, 256, 2048)) -> dict:
    """Each FP8 linear of DeepSeek V4 Flash at each row count: the path before the tensor-core GEMV against the
    best of the sweep, cuBLAS on the dequantized bf16 weight beside them. 1-8 rows: before = the CUDA-core GEMV
    (integer decode, warps along N, FP8_GEMV_TILES_BEFORE) up to 4 rows, W8A8 or dequantize + cuBLAS past that
    (as `fp8_linear` chose), against the best of `fp8_gemv_variants` (the K-major layout's integer decode and the
    tensor-core GEMV's 7-instruction decode at the best tiles too); more rows: dequantize + cuBLAS against the
    W8A8 GEMM (activations quantized per 1 x 128, cuBLAS's block-scaled FP8 GEMM), whose activation quantization
    is also timed alone. Returns the sweep's fastest tiles per whole weight (out, in) and row count."""
    from dataclasses import replace

    from runtime.ops.fp8 import (FP8_GEMV_MMA_MAX_ROWS, Fp8GemvTiles, _fp8_gemv_mma, fp8_act_quant,
                                 fp8_block_dequantize, fp8_gemv, fp8_linear_ref, fp8_matmul, fp8_w8a8_matmul,
                                 fp8_w8a8_preferred, fp8_w8a8_ref)
    print(f"\n{'FP8 linear':<14}{'N x K':>12}{'rows':>5}{'bf16 us':>8}{'before us':>10}{'TB/s':>6}{'after us':>9}"
          f"{'TB/s':>6}{'x':>6}{'err':>9}  notes")
    chosen = {}
    for name, (n, k, groups) in FP8_SHAPES.items():
        nbytes = groups * n * k
        copies = copies_for(nbytes)
        g = torch.Generator(device="cuda").manual_seed(0)
        weights = [torch.randn(groups * n, k, generator=g, device="cuda").mul(0.25).to(torch.float8_e4m3fn)
                   for _ in range(copies)]
        scales = [torch.exp2(torch.randint(-8, -4, (groups * n // 128, k // 128), generator=g, device="cuda").float())
                  for _ in range(copies)]
        dense = [fp8_block_dequantize(w, s, torch.bfloat16) for w, s in zip(weights, scales)]
        counters = torch.zeros(groups * n, dtype=torch.int32, device="cuda")

        def cublas(i, x):
            if groups == 1:
                return F.linear(x, dense[i])
            return torch.einsum("ngi,gri->ngr", x.view(x.shape[0], groups, k), dense[i].view(groups, n, k)).flatten(1)

        for rows in rows_list:
            x = torch.randn(rows, groups * k, generator=g, device="cuda").to(torch.bfloat16)
            t_bf16 = timed_us(lambda i: cublas(i, x), copies, 20)
            note = ""
            if rows <= FP8_GEMV_MMA_MAX_ROWS:
                want = fp8_linear_ref(x.float(), weights[0], scales[0], groups)
                if rows <= 4:
                    before = Fp8GemvTiles(*FP8_GEMV_TILES_BEFORE[(groups * n, k)], 4)
                    t_before = timed_us(lambda i: fp8_gemv(x, weights[i], scales[i], groups, before, counters),
                                        copies, 20)
                elif fp8_w8a8_preferred(rows, groups * n, k, groups):
                    t_before = timed_us(lambda i: fp8_w8a8_matmul(x, weights[i], scales[i], groups), copies, 20)
                else:
                    t_before = timed_us(lambda i: fp8_matmul(x, weights[i], scales[i], groups), copies, 20)
                timings = {}
                for tiles in fp8_gemv_variants(n, k, rows):
                    e = rel_error(fp8_gemv(x, weights[0], scales[0], groups, tiles, counters), want)
                    assert e < 1e-2, (name, rows, tiles, e)
                    timings[tiles] = timed_us(lambda i: fp8_gemv(x, weights[i], scales[i], groups, tiles, counters),
                                              copies, 20)
                ranked = sorted(timings.items(), key=lambda item: item[1])
                tiles, t_after = ranked[0]
                chosen[(groups * n, k, rows)] = tiles
                t_int = float("nan")
                if tiles.layout_k:
                    integer = replace(tiles, cvt=False)
                    t_int = timed_us(lambda i: fp8_gemv(x, weights[i], scales[i], groups, integer, counters),
                                     copies, 20)
                elif tiles.mma:                               # the 7-instruction pair decode instead of prmt
                    t_int = timed_us(lambda i: _fp8_gemv_mma(x, weights[i], scales[i], groups, tiles, counters,
                                                             torch.empty(rows, groups * n, dtype=x.dtype,
                                                                         device="cuda"), False), copies, 20)
                err = rel_error(fp8_gemv(x, weights[0], scales[0], groups, tiles, counters), want)
                note = f"int decode {t_int:.1f}; " + "; ".join(
                    f"{'T' if t.mma else 'K' if t.layout_k else 'N'} {t.block_n}/{t.block_k}/{t.split_k}: {us:.1f}"
                    for t, us in ranked[:4])
                record = dict(tiles=str(tiles), sweep={str(t): us for t, us in ranked}, int_us=t_int)
            else:
                want = fp8_w8a8_ref(x.float(), weights[0], scales[0], groups)
                t_before = timed_us(lambda i: fp8_matmul(x, weights[i], scales[i], groups), copies, 20)
                t_w8a8 = timed_us(lambda i: fp8_w8a8_matmul(x, weights[i], scales[i], groups), copies, 20)
                m_pad = -(-rows // 16) * 16
                t_quant = timed_us(lambda i: fp8_act_quant(x, groups, m_pad), 1, 20)
                err = rel_error(fp8_w8a8_matmul(x, weights[0], scales[0], groups), want)
                w8a8 = fp8_w8a8_preferred(rows, groups * n, k, groups)
                t_after = t_w8a8 if w8a8 else t_before
                note = f"W8A8 {t_w8a8:.1f} (act quant {t_quant:.1f}); fp8_linear: {'W8A8' if w8a8 else 'dequantize'}"
                record = dict(quant_us=t_quant, w8a8_us=t_w8a8, w8a8=w8a8)
            tbs = lambda b, us: b / us / 1e6                                        # noqa: E731
            print(f"{name:<14}{f'{groups * n}x{k}':>12}{rows:>5}{t_bf16:>8.1f}{t_before:>10.1f}"
                  f"{tbs(nbytes, t_before):>6.2f}{t_after:>9.1f}{tbs(nbytes, t_after):>6.2f}{t_before / t_after:>6.2f}"
                  f"{err:>9.1e}  {note}", flush=True)
            RECORDS.append(dict(kind="fp8", name=name, n=n, k=k, groups=groups, rows=rows, bf16_us=t_bf16,
                                before_us=t_before, after_us=t_after, err=err, **record))
        del weights, scales, dense
    print(f"(TB/s of the FP8 weight bytes, copy bandwidth {bandwidth / 1e12:.2f} TB/s; err: against the fp32 torch "
          f"reference of the same numerics: unquantized activations up to 8 rows, W8A8 past that; T = tensor-core "
          f"GEMV, N / K = CUDA-core GEMV N- / K-major)")
    return chosen


def write_fp8_tile_table(chosen: dict) -> None:
    """Rewrite the GEMV tables in runtime/ops/fp8.py with the sweep's choice: FP8_GEMV_MMA_TABLE, the tensor-core
    tiles chosen at one row, else at 2 or 4 rows (then FP8_GEMV_MMA_MIN_ROWS says from which row count);
    FP8_GEMV_TILE_TABLE (1 row) and FP8_GEMV_FEW_ROWS_TABLE (4 rows, K-major) where the CUDA-core GEMV won."""
    path = Path(__file__).resolve().parents[1] / "runtime" / "ops" / "fp8.py"
    text = path.read_text()
    weights = sorted({(n, k) for n, k, _ in chosen})
    mma, min_rows = {}, {}
    for n, k in weights:
        for rows in (1, 2, 4, 8):
            tiles = chosen.get((n, k, rows))
            if tiles is not None and tiles.mma:
                mma[(n, k)] = tiles
                if rows > 1:
                    min_rows[(n, k)] = rows
                break
    one = {(n, k): t for (n, k, rows), t in chosen.items() if rows == 1 and not t.mma}
    few = {(n, k): t for (n, k, rows), t in chosen.items() if rows == 4 and t.layout_k}
    for name, table in (("FP8_GEMV_MMA_TABLE", mma), ("FP8_GEMV_TILE_TABLE", one), ("FP8_GEMV_FEW_ROWS_TABLE", few)):
        head = f"{name}: dict[tuple[int, int], Fp8GemvTiles] = {{\n"
        start = text.index(head) + len(head)
        end = text.index("}\n", start)
        rows = "".join(f"    ({n}, {k}): {tiles!r},\n" for (n, k), tiles in sorted(table.items()))
        text = text[:start] + rows + text[end:]
        print(f"{name}:\n" + rows)
    head = "FP8_GEMV_MMA_MIN_ROWS: dict[tuple[int, int], int] = "
    start = text.index(head) + len(head)
    end = text.index("\n", start)
    text = text[:start] + repr(min_rows) + text[end:]
    print(f"FP8_GEMV_MMA_MIN_ROWS: {min_rows}")
    path.write_text(text)


# Decode attention launch shapes timed beside each dtype's default: (block_n, num_warps, num_stages, programs per
# SM, fp16_dot[, ahead[, max_registers[, max_splits[, lazy_rescale]]]]), as DecodeTiles. fp8 with fp16_dot reads
# K/V as words widened in registers; without, entries widen to q's dtype; ahead: tiles loaded into registers ahead
# by hand (0: Triton's pipeline); max_registers: ptxas's cap per thread (0: its choice), so more programs fit an SM.
ATTENTION_VARIANTS = {
    "bfloat16": [(64, 4, 3, 4, False), (64, 4, 3, 4, False, 0, 0, 128), (64, 4, 3, 6, False, 0, 0, 128),
                 (64, 4, 2, 4, False), (64, 4, 1, 2, False, 1), (32, 2, 1, 4, False, 1),
                 (64, 4, 1, 3, False, 1, 168)],
    "float8_e4m3fn": [(16, 1, 1, 8, True, 2, 0, 128), (16, 1, 1, 8, True, 1, 0, 128),
                      (16, 1, 1, 8, True, 2, 0, 128, True), (16, 1, 1, 10, True, 2, 0, 128),
                      (32, 2, 1, 6, True, 1), (32, 2, 1, 4, True, 2)],
}
ATTENTION_SHAPES = ((1, 32768), (4, 32768), (8, 32768), (1, 4096), (64, 4096))      # (batch, context)


def bench_attention(bandwidth: float, dtypes: tuple[str, ...] = ("bfloat16", "float8_e4m3fn"),
                    shapes=ATTENTION_SHAPES, before=None) -> None:
    """The split-K paged decode kernel at long contexts (Qwen3-8B's heads: 32 query, 8 KV, dim 128, 16-token
    pages scattered over the cache) in bf16 and fp8: the default tiles against ATTENTION_VARIANTS. KV TB/s
    counts the cache bytes one call reads. `before`: a module with an older paged_decode_triton / decode_tiles /
    DecodeTiles (e.g. a copy of main's runtime/ops/attention.py), timed at its default tiles (for fp8 also with
    its fp16_dot) as the first columns."""
    from dataclasses import replace
    from itertools import product

    from runtime.ops.attention import DecodeTiles, decode_tiles, paged_attention_ref, paged_decode_triton
    heads, kv_heads, dim, page = 32, 8, 128, 16
    short = lambda t: (f"{t.block_n}/{t.num_warps}/{t.num_stages}/{t.programs_per_sm}"   # noqa: E731
                       + ("/fp16" if t.fp16_dot else "") + (f"/a{t.ahead}" if getattr(t, "ahead", 0) else "")
                       + (f"/r{t.max_registers}" if getattr(t, "max_registers", 0) else "")
                       + (f"/s{t.max_splits}" if getattr(t, "max_splits", 64) != 64 else "")
                       + ("/lazy" if getattr(t, "lazy_rescale", False) else ""))
    print(f"\n{'decode attention':<18}{'cache':>7}{'batch':>6}{'context':>8}{'before us':>10}{'TB/s':>6}"
          f"{'default us':>11}{'TB/s':>6}{'best us':>9}{'TB/s':>6}  default tiles; best (block_n/warps/stages/"
          f"programs per SM[/fp16 dot][/a tiles ahead][/r registers][/s split cap][/lazy rescale]): us")
    for name, (batch, context) in product(dtypes, shapes):
        dtype = getattr(torch, name)
        g = torch.Generator(device="cuda").manual_seed(0)
        pages_per_seq = context // page
        num_pages = batch * pages_per_seq + 1
        cache = torch.randn(num_pages, page, 2, kv_heads, dim, generator=g, device="cuda").mul(0.5).to(dtype)
        table = torch.randperm(num_pages - 1, generator=g, device="cuda")[:batch * pages_per_seq]
        table = table.view(batch, pages_per_seq).to(torch.int32)
        lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, heads, dim, generator=g, device="cuda").to(torch.bfloat16)
        scale = dim ** -0.5
        nbytes = batch * context * 2 * kv_heads * dim * cache.element_size()
        tbs = lambda us: nbytes / us / 1e6                                         # noqa: E731
        want = paged_attention_ref(q, cache, table, list(range(batch + 1)), [context] * batch, scale)
        default = decode_tiles(dim, dtype, batch)

        def timed(decode, tiles) -> float:
            err = rel_error(decode(q, cache, table, lens, context, scale, tiles=tiles), want)
            if err > 1e-2:
                print(f"  {short(tiles)}: rel error {err:.1e}: dropped")
                return float("nan")
            return timed_us(lambda i: decode(q, cache, table, lens, context, scale, tiles=tiles), 1, 20)

        before_us = {}
        if before is not None:
            old = before.decode_tiles(dim, dtype)
            before_us[short(old)] = timed(before.paged_decode_triton, old)
            if dtype == torch.float8_e4m3fn:
                old = replace(old, fp16_dot=True)
                before_us[short(old) + " (before)"] = timed(before.paged_decode_triton, old)
        timings = {}
        for tiles in dict.fromkeys([default] + [DecodeTiles(*variant) for variant in ATTENTION_VARIANTS[name]]):
            try:
                timings[tiles] = timed(paged_decode_triton, tiles)
            except Exception as e:                      # e.g. out of shared memory
                print(f"  {short(tiles)}: {type(e).__name__}: {str(e)[:200]}")
        ranked = sorted((us, short(t)) for t, us in timings.items() if us == us)
        t_default = timings.get(default, float("nan"))
        t_before = next(iter(before_us.values()), float("nan"))
        print(f"{'':<18}{name[:7]:>7}{batch:>6}{context:>8}{t_before:>10.1f}{tbs(t_before):>6.2f}{t_default:>11.1f}"
              f"{tbs(t_default):>6.2f}{ranked[0][0]:>9.1f}{tbs(ranked[0][0]):>6.2f}  {short(default)}; "
              + "; ".join(f"{t}: {us:.1f}" for us, t in ranked[:4]))
        print(f"{'':<18}all: " + "; ".join(f"{short(t)}: {us:.1f}" for t, us in timings.items()))
        if len(before_us) > 1:
            print(f"{'':<18}before: " + "; ".join(f"{t}: {us:.1f}" for t, us in before_us.items()))
        RECORDS.append(dict(kind="attention", dtype=name, batch=batch, context=context, default=short(default),
                            default_us=t_default, before=before_us,
                            sweep={short(t): us for t, us in timings.items()}))
        del cache, want
    print(f"(copy bandwidth {bandwidth / 1e12:.2f} TB/s)")


# The decode step's attention per model: name -> (query heads, KV heads, head_dim, QK-norm, sinks, window)
DECODE_STEP_SHAPES = {"qwen3-0.6b": (16, 8, 128, True, False, None), "qwen3-8b": (32, 8, 128, True, False, None),
                      "gpt-oss-20b": (64, 8, 64, False, True, None), "gpt-oss-20b slide": (64, 8, 64, False, True, 128)}
DECODE_STEP_CASES = ((1, 300), (1, 4096), (1, 32768), (8, 1024), (64, 1024))              # (batch, context)


def bench_decode_step(dtypes: tuple[str, ...] = ("bfloat16", "float8_e4m3fn"), max_seq_len: int = 40960,
                      models=None, cases=DECODE_STEP_CASES) -> None:
    """From the QKV projection's output to the attention output, as a decode step runs it inside a CUDA graph
    (the split count fixed by `max_seq_len`, as the runner's graphs fix it): the QKV kernel, the split-K decode
    and its reduce kernel (3 launches, "before"); the same with the reduction in the decode launch (2); the
    decode kernel reading the QKV row itself (1). Each checked against the torch reference."""
    from dataclasses import replace
    from itertools import product

    from runtime.ops.attention import QkvRope, decode_tiles, paged_attention_ref, paged_decode_triton
    from runtime.ops.qkv import qkv_rope_write_kv_ref, qkv_rope_write_kv_triton
    from runtime.ops.rope import RotaryEmbedding
    print(f"\n{'decode step':<19}{'cache':>7}{'batch':>6}{'context':>8}{'3 launches':>11}{'2 launches':>11}"
          f"{'1 launch':>9}{'err':>9}  (us per call, CUDA graph)")
    for name, dtype_name, (batch, context) in product(models or DECODE_STEP_SHAPES, dtypes, cases):
        heads, kv_heads, dim, norm, has_sinks, window = DECODE_STEP_SHAPES[name]
        dtype = getattr(torch, dtype_name)
        g = torch.Generator(device="cuda").manual_seed(0)
        page = 16
        pages_per_seq = -(-context // page)
        num_pages = batch * pages_per_seq + 1
        cache = torch.randn(num_pages, page, 2, kv_heads, dim, generator=g, device="cuda").mul(0.5).to(dtype)
        table = torch.randperm(num_pages - 1, generator=g, device="cuda")[:batch * pages_per_seq] + 1
        table = table.view(batch, pages_per_seq).to(torch.int32)
        lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        positions = (lens - 1).long()
        slots = table[:, (context - 1) // page].long() * page + (context - 1) % page
        qkv = torch.randn(batch, (heads + 2 * kv_heads) * dim, generator=g, device="cuda").to(torch.bfloat16)
        rotary = RotaryEmbedding(1.0 / (1e6 ** (torch.arange(0, dim, 2).float() / dim)), context + 1).cuda()
        weights = [(1 + 0.3 * torch.randn(dim, generator=g, device="cuda")).to(torch.bfloat16) for _ in range(2)] \
            if norm else [None, None]
        sinks = torch.randn(heads, generator=g, device="cuda") if has_sinks else None
        scales = dict(k_scale=torch.ones(1, device="cuda"), v_scale=torch.ones(1, device="cuda")) \
            if dtype != torch.bfloat16 else {}
        scale = dim ** -0.5
        ref_cache = cache.clone()
        q = qkv_rope_write_kv_ref(qkv, positions, rotary.cos_sin, "neox", ref_cache, slots, heads, kv_heads, dim,
                                  *weights, 1e-6, **scales)
        want = paged_attention_ref(q, ref_cache, table, list(range(batch + 1)), [context] * batch, scale, window,
                                   sinks, **scales)
        del ref_cache
        tiles = decode_tiles(dim, dtype, batch)
        two_launch = replace(tiles, fused_reduce=False)
        one_launch = replace(tiles, fused_reduce=True)
        fused = QkvRope(positions, rotary.cos_sin, "neox", slots, heads, *weights, 1e-6)

        def separate(t):
            q = qkv_rope_write_kv_triton(qkv, positions, rotary.cos_sin, "neox", cache, slots, heads, kv_heads, dim,
                                         *weights, 1e-6, **scales)
            return paged_decode_triton(q, cache, table, lens, max_seq_len, scale, window, sinks, tiles=t, **scales)

        def single(t):
            return paged_decode_triton(qkv, cache, table, lens, max_seq_len, scale, window, sinks, tiles=t,
                                       qkv_rope=fused, **scales)

        calls = {"3": lambda: separate(two_launch), "2": lambda: separate(one_launch), "1": lambda: single(one_launch)}
        times, errors = {}, []
        for key, call in calls.items():
            try:
                errors.append(rel_error(call(), want))
                times[key] = timed_us(lambda i: call(), 1, 20)
            except Exception as exc:                    # noqa: BLE001  reported, the sweep goes on
                print(f"  {name} {dtype_name} {batch}x{context} {key} launches: {type(exc).__name__}: "
                      f"{str(exc)[:300]}")
                times[key] = float("nan")
        err = max(errors) if errors else float("nan")
        print(f"{name:<19}{dtype_name[:7]:>7}{batch:>6}{context:>8}{times['3']:>11.1f}{times['2']:>11.1f}"
              f"{times['1']:>9.1f}{err:>9.1e}", flush=True)
        RECORDS.append(dict(kind="decode_step", name=name, dtype=dtype_name, batch=batch, context=context,
                            us_3_launches=times["3"], us_2_launches=times["2"], us_1_launch=times["1"], err=err))
        del cache


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default="gemv,mxfp4,qkv")
    parser.add_argument("--json")
    parser.add_argument("--fp8-rows", default="1,2,4,8,16,64,256,2048", help="fp8: the row counts timed")
    parser.add_argument("--mxfp4-tokens", default="1,4", help="mxfp4: the token counts timed (with the grouped "
                        "GEMM's column, e.g. 8,16 to place GEMV_MAX_PAIRS)")
    parser.add_argument("--no-grouped", action="store_true", help="skip the grouped GEMM column")
    parser.add_argument("--write-table", action="store_true",
                        help="write the sweep's choice into GEMV_TILE_TABLE in runtime/ops/mxfp4.py (with "
                             "fp8: FP8_GEMV_TILE_TABLE in runtime/ops/fp8.py; with gemv: GEMV_TILE_TABLE in "
                             "runtime/ops/linear.py)")
    parser.add_argument("--before", help="a module with an older mxfp4_moe_gemv to time beside this one "
                                         "(e.g. a copy of the previous runtime/ops/mxfp4.py)")
    parser.add_argument("--route-before", help="route: a module with an older _route_topk to time beside this "
                                               "one (e.g. a copy of main's runtime/ops/moe.py)")
    parser.add_argument("--gemv-shapes", help="gemv: names of GEMV_SHAPES, comma-separated (default all)")
    parser.add_argument("--gemv-before", help="gemv: a module with an older gemv_triton to time at its own tiles "
                                              "(e.g. a copy of main's runtime/ops/linear.py)")
    parser.add_argument("--gemv-workers", type=int, default=0, help="gemv: compile the variants in this many "
                                                                    "processes first")
    parser.add_argument("--gemv-rep", type=int, default=20, help="gemv: ms of replays per timing")
    parser.add_argument("--attention-dtypes", default="bfloat16,float8_e4m3fn", help="KV cache dtypes to sweep")
    parser.add_argument("--attention-shapes", default=",".join(f"{b}x{c}" for b, c in ATTENTION_SHAPES),
                        help="attention: BATCHxCONTEXT list")
    parser.add_argument("--attention-before", help="attention: a module with an older paged_decode_triton to "
                                                   "time at its default tiles (e.g. a copy of main's "
                                                   "runtime/ops/attention.py)")
    parser.add_argument("--step-models", help="step: names of DECODE_STEP_SHAPES, comma-separated (default all)")
    parser.add_argument("--step-cases", default=",".join(f"{b}x{c}" for b, c in DECODE_STEP_CASES),
                        help="step: BATCHxCONTEXT list")
    args = parser.parse_args()
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    only = args.only.split(",")
    if "qkv" in only:
        bench_qkv()
    if "route" in only:
        bench_route(importlib.import_module(args.route_before) if args.route_before else None)
    if "mxfp4" in only:
        bench_mxfp4(bandwidth, importlib.import_module(args.before) if args.before else None, not args.no_grouped,
                    tuple(int(n) for n in args.mxfp4_tokens.split(",")))
        chosen = choose_gemv_tiles(RECORDS)
        for shape, tiles in sorted(chosen.items()):
            print(f"chosen for {shape}: {tiles}")
        if args.write_table:
            write_tile_table(chosen)
    if "gemv" in only:
        chosen = bench_gemv(bandwidth, args.gemv_shapes.split(",") if args.gemv_shapes else None,
                            importlib.import_module(args.gemv_before) if args.gemv_before else None,
                            args.gemv_workers, args.gemv_rep)
        print("GEMV_TILE_TABLE entries:\n" + "".join(f"    {shape}: {tiles!r},\n"
                                                      for shape, tiles in sorted(chosen.items())))
        if args.write_table:
            write_gemv_tile_table(chosen)
    if "attention" in only:
        shapes = tuple(tuple(int(x) for x in shape.split("x")) for shape in args.attention_shapes.split(","))
        bench_attention(bandwidth, tuple(args.attention_dtypes.split(",")), shapes,
                        importlib.import_module(args.attention_before) if args.attention_before else None)
    if "step" in only:
        bench_decode_step(tuple(args.attention_dtypes.split(",")), models=args.step_models.split(",")
                          if args.step_models else None,
                          cases=tuple(tuple(int(x) for x in case.split("x")) for case in args.step_cases.split(",")))
    if "fp8" in only:
        chosen = bench_fp8(bandwidth, tuple(int(r) for r in args.fp8_rows.split(",")))
        if args.write_table:
            write_fp8_tile_table(chosen)
    if args.json:
        with open(args.json, "w") as f:
            for record in RECORDS:
                f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
