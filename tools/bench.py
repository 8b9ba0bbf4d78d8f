#!/usr/bin/env python
"""Benchmarks. Subcommands:

    sched   one scheduler step + input preparation for N running decode requests, CPU, no model
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from runtime.kv_cache import CacheSpec, KVCacheManager, group_cache_specs  # noqa: E402
from runtime.request import Request, SamplingParams  # noqa: E402
from runtime.runner import ModelRunner  # noqa: E402
from runtime.scheduler import Scheduler  # noqa: E402


def decode_fixture(num_requests: int, prompt_len: int, block_size: int = 16, num_layers: int = 28):
    """A scheduler + runner with `num_requests` requests already past prefill, decoding."""
    specs = [CacheSpec((2, 8, 128), torch.bfloat16)] * num_layers
    layout = group_cache_specs(specs, block_size)
    max_model_len = prompt_len + 4096
    blocks_per_request = -(-max_model_len // block_size)
    kv = KVCacheManager(layout, block_size, [num_requests * blocks_per_request + 1], num_requests, max_model_len,
                        enable_prefix_caching=True)
    scheduler = Scheduler(kv, max_num_seqs=num_requests, max_num_batched_tokens=8192)
    runner = ModelRunner(model=None, kv=kv, caches=[], vocab_size=151936, device=torch.device("cpu"))
    params = SamplingParams(temperature=0.0, max_tokens=4096)
    for i in range(num_requests):
        # distinct prompts: no prefix sharing, every request owns its blocks
        scheduler.add(Request(str(i), [(i * 7919 + j) % 150000 for j in range(prompt_len)], params))
    while scheduler.waiting or any(r.num_output_tokens == 0 for r in scheduler.running):
        batch = scheduler.schedule()
        scheduler.finish_step(batch)
        for r in batch.requests:
            if r.num_computed_tokens == r.num_tokens:
                r.token_ids.append(1)
    return scheduler, runner


def bench_sched(args: argparse.Namespace) -> None:
    scheduler, runner = decode_fixture(args.num_requests, args.prompt_len)
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        batch = scheduler.schedule()
        runner.prepare_inputs(batch)
        elapsed = time.perf_counter() - start
        scheduler.finish_step(batch)
        for r in batch.requests:
            r.token_ids.append(step % 1000)
        if step >= args.warmup:
            times.append(elapsed)
        assert len(batch) == args.num_requests and batch.num_tokens == args.num_requests
    times.sort()
    print(f"schedule + prepare_inputs, {args.num_requests} decode requests (prompt {args.prompt_len}), "
          f"{args.steps} steps: median {statistics.median(times) * 1e3:.3f} ms, "
          f"p90 {times[int(0.9 * len(times))] * 1e3:.3f} ms, min {times[0] * 1e3:.3f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sched = sub.add_parser("sched", help="scheduler step + input preparation, CPU, no model")
    sched.add_argument("--num-requests", type=int, default=256)
    sched.add_argument("--prompt-len", type=int, default=512)
    sched.add_argument("--steps", type=int, default=500)
    sched.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()
    {"sched": bench_sched}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
