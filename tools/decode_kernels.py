#!/usr/bin/env python
"""Check and time the decode kernels on the GPU: the dense GEMV against cuBLAS, the MXFP4 decode GEMV against
the grouped GEMM, the fused QKV step against the separate ops. Prints one table per family; every variant is
checked against its torch reference first (relative error) and timed from a CUDA graph, over enough weight
copies that L2 cannot hold them (each copy read once per replay).

    python tools/decode_kernels.py [--only gemv,mxfp4,qkv] [--json out.jsonl]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from runtime.ops.activation import silu_and_mul  # noqa: E402
from runtime.ops.linear import gemv_tiles, gemv_triton, linear_ref  # noqa: E402
from runtime.ops.mxfp4 import (GatedActivation, GemvTiles, MoeTiles, Mxfp4Linear, mxfp4_moe_gemv,  # noqa: E402
                               mxfp4_moe_reference, mxfp4_moe_triton)

L2_BYTES = 60 << 20
RECORDS: list[dict] = []


def timed_us(fn, copies: int) -> float:
    """Median microseconds of one call of fn(i) for i in range(copies), all captured in one graph."""
    def run():
        for i in range(copies):
            fn(i)
    return triton.testing.do_bench_cudagraph(run, rep=50, return_mode="median") * 1e3 / copies


def copies_for(nbytes: int) -> int:
    return max(1, min(64, -(-4 * L2_BYTES // nbytes)))


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = triton.testing.do_bench(lambda: dst.copy_(src), rep=200, return_mode="median") * 1e3
    return 2 * src.numel() / (us * 1e-6)


def bench_gemv(bandwidth: float) -> None:
    from runtime.ops.linear import norm_linear_ref
    from runtime.ops.norm import RMSNorm, rms_norm
    shapes = [("0.6b qkv+norm", 4096, 1024, "norm"), ("0.6b o", 1024, 2048, ""),
              ("0.6b gate_up+norm", 6144, 1024, "norm"), ("0.6b down+silu", 1024, 3072, "silu"),
              ("8b qkv+norm", 6144, 4096, "norm"), ("8b o", 4096, 4096, ""), ("8b gate_up+norm", 24576, 4096, "norm"),
              ("8b down+silu", 4096, 12288, "silu"), ("oss qkv+norm", 5120, 2880, "norm"), ("oss o", 2880, 4096, ""),
              ("0.6b lm_head", 151936, 1024, "")]
    print(f"\n{'GEMV, 1 row':<20}{'separate us':>12}{'GB/s':>7}{'gemv us':>9}{'GB/s':>7}"
          f"{'best variant':>20}{'us':>8}{'GB/s':>7}{'err':>9}")
    for name, n, k, fusion in shapes:
        nbytes = n * k * 2
        copies = copies_for(nbytes)
        weights = [(torch.randn(n, k, device="cuda") * k ** -0.5).to(torch.bfloat16) for _ in range(copies)]
        silu = fusion == "silu"
        x = torch.randn(1, 2 * k if silu else k, device="cuda").to(torch.bfloat16)
        norm = res = None
        if fusion == "norm":
            norm = RMSNorm(k, 1e-6).cuda().to(torch.bfloat16)
            res = torch.randn(1, k, device="cuda").to(torch.bfloat16)
            want = norm_linear_ref(x.float(), res.float(), RMSNorm(k, 1e-6).cuda(), weights[0].float())[0]
            separate = lambda i: F.linear(rms_norm(x, norm.weight, 1e-6, res)[0], weights[i])  # noqa: E731
        elif silu:
            want = linear_ref(x.float(), weights[0].float(), None, True)
            separate = lambda i: F.linear(silu_and_mul(x), weights[i])        # noqa: E731
        else:
            want = linear_ref(x.float(), weights[0].float())
            separate = lambda i: F.linear(x, weights[i])                      # noqa: E731
        t_separate = timed_us(separate, copies)
        default = gemv_tiles(1, n, k)
        results = {}
        for tiles in {default, (default[0], 256 if default[1] == 512 else 512, 4), (default[0] * 2, default[1], 4)}:
            def call(i, tiles=tiles):
                out = gemv_triton(x, weights[i], None, silu, tiles, norm=norm, residual=res)
                return out[0] if norm is not None else out
            err = rel_error(call(0), want)
            results[tiles] = (timed_us(call, copies), err)
        best = min(results, key=lambda t: results[t][0])
        t_default, err = results[default]
        gbs = lambda us: nbytes / (us * 1e-6) / 1e9                          # noqa: E731
        print(f"{name:<20}{t_separate:>12.1f}{gbs(t_separate):>7.0f}{t_default:>9.1f}{gbs(t_default):>7.0f}"
              f"{str(best):>20}{results[best][0]:>8.1f}{gbs(results[best][0]):>7.0f}{err:>9.1e}")
        RECORDS.append(dict(kind="gemv", name=name, separate_us=t_separate, gemv_us=t_default,
                            best=list(best), best_us=results[best][0], err=err,
                            all={str(t): r for t, r in results.items()}))
        del weights
    print(f"(separate: cuBLAS after the norm / SiLU-and-mul kernel; copy bandwidth {bandwidth / 1e9:.0f} GB/s)")


def bench_mxfp4(bandwidth: float) -> None:
    experts, hidden, inter, top_k = 32, 2880, 2880, 4
    activation = GatedActivation(alpha=1.702, limit=7.0, up_offset=1.0, interleaved=True)

    def layer():
        g = torch.Generator(device="cuda").manual_seed(len(layers))
        w13 = Mxfp4Linear(torch.randint(0, 256, (experts, 2 * inter, hidden // 32, 16), generator=g,
                                        device="cuda", dtype=torch.uint8),
                          torch.randint(118, 124, (experts, 2 * inter, hidden // 32), generator=g, device="cuda",
                                        dtype=torch.uint8),
                          torch.randn(experts, 2 * inter, generator=g, device="cuda"))
        w2 = Mxfp4Linear(torch.randint(0, 256, (experts, hidden, inter // 32, 16), generator=g, device="cuda",
                                       dtype=torch.uint8),
                         torch.randint(116, 122, (experts, hidden, inter // 32), generator=g, device="cuda",
                                       dtype=torch.uint8),
                         torch.randn(experts, hidden, generator=g, device="cuda"))
        return w13, w2

    layers: list = []
    for _ in range(4):                                       # 4 x 420 MB: far past L2
        layers.append(layer())
    expert_bytes = sum(t.numel() for t in (layers[0][0].blocks[0], layers[0][0].scales[0],
                                           layers[0][1].blocks[0], layers[0][1].scales[0]))
    variants = [GemvTiles(), GemvTiles(8, 4, 8, 4), GemvTiles(16, 8, 8, 8), GemvTiles(8, 8, 16, 4),
                GemvTiles(4, 4, 8, 4), GemvTiles(8, 8, 4, 4), GemvTiles(16, 16, 8, 8)]
    print(f"\n{'MXFP4 MoE':<10}{'pairs':>6}{'experts':>8}{'MB':>7}{'grouped us':>11}{'TB/s':>6}"
          f"{'gemv us':>9}{'TB/s':>6}{'best variant':>28}{'us':>8}{'TB/s':>6}{'err':>9}")
    for tokens in (1, 4, 8, 16):
        g = torch.Generator(device="cuda").manual_seed(tokens)
        x = torch.randn(tokens, hidden, generator=g, device="cuda").to(torch.bfloat16)
        ids = torch.stack([torch.randperm(experts, generator=g, device="cuda")[:top_k] for _ in range(tokens)])
        weights = torch.softmax(torch.randn(tokens, top_k, generator=g, device="cuda"), -1).to(torch.bfloat16)
        nbytes = ids.unique().numel() * expert_bytes
        want = mxfp4_moe_reference(x, *layers[0], weights, ids, activation)
        grouped = timed_us(lambda i: mxfp4_moe_triton(x, *layers[i], weights, ids, activation), len(layers))
        results = {}
        for tiles in variants:
            try:
                err = rel_error(mxfp4_moe_gemv(x, *layers[0], weights, ids, activation, tiles), want)
                us = timed_us(lambda i: mxfp4_moe_gemv(x, *layers[i], weights, ids, activation, tiles), len(layers))
                results[tiles] = (us, err)
            except Exception as e:                                               # noqa: BLE001
                print(f"  tokens {tokens} {tiles}: {type(e).__name__}: {str(e)[:80]}")
        best = min(results, key=lambda t: results[t][0])
        t_default, err = results[variants[0]]
        tbs = lambda us: nbytes / (us * 1e-6) / 1e12                             # noqa: E731
        short = lambda t: f"{t.block_n_gate_up}/{t.block_n_down}/g{t.block_g}/w{t.num_warps}"  # noqa: E731
        print(f"{'':<10}{tokens * top_k:>6}{ids.unique().numel():>8}{nbytes / 1e6:>7.1f}{grouped:>11.1f}"
              f"{tbs(grouped):>6.2f}{t_default:>9.1f}{tbs(t_default):>6.2f}{short(best):>28}{results[best][0]:>8.1f}"
              f"{tbs(results[best][0]):>6.2f}{max(r[1] for r in results.values()):>9.1e}")
        RECORDS.append(dict(kind="mxfp4", tokens=tokens, grouped_us=grouped, mb=nbytes / 1e6,
                            all={short(t): r for t, r in results.items()}))


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default="gemv,mxfp4,qkv")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    only = args.only.split(",")
    if "qkv" in only:
        bench_qkv()
    if "mxfp4" in only:
        bench_mxfp4(bandwidth)
    if "gemv" in only:
        bench_gemv(bandwidth)
    if args.json:
        with open(args.json, "w") as f:
            for record in RECORDS:
                f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
