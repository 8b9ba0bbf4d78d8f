#!/usr/bin/env python
"""Per-model regression harness: parity with transformers on the package's tiny checkpoints, through the
engine under small blocks, chunked prefill, a cache small enough to force preemption, and prefix hits.
With --gpu (on the GPU machine) also bf16 parity on the GPU and the speed figures of
tools/baselines/ARCH.json, failing when one drops by more than 5%.

    python tools/regress.py qwen3
    python tools/regress.py qwen3 --gpu [--update-baseline]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.registry import get_package  # noqa: E402
from tools.parity import make_tiny_checkpoint, run_parity, stress_options  # noqa: E402

LOGIT_TOLERANCE = 1e-4
SPEED_TOLERANCE = 0.05          # a figure may drop this much below its baseline
BASELINES = Path(__file__).resolve().parent / "baselines"
# small blocks (4 positions, or the smallest multiple of a model's compression ratios), a 16-token budget
# (chunked prefill), and a cache of 320 positions, too small for all 8 prompts (preemption)
STRESS = dict(block_size=4, max_num_batched_tokens=16, cache_tokens=320)


def gpu_parity(package_name: str, variants: list, tmp: str) -> bool:
    from tools.gpu_parity import assert_parity, teacher_forced
    from tools.parity import random_prompts
    ok_all = True
    for variant in variants:
        path = make_tiny_checkpoint(package_name, Path(tmp) / f"gpu-{variant or 'base'}", variant)
        result = teacher_forced(path, random_prompts(1024, (3, 17, 40, 64, 99, 128, 150, 200)), 32,
                                block_size=16, max_num_batched_tokens=64)
        try:
            assert_parity(result, moe="moe" in (variant or ""))
            ok = True
        except AssertionError:
            ok = False
        ok_all &= ok
        shown = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in result.items()}
        print(f"[{'PASS' if ok else 'FAIL'}] {package_name}{'/' + variant if variant else ''} bf16 on the GPU: {shown}")
    return ok_all


def gpu_speed(package_name: str, update: bool) -> bool:
    """Re-measure every figure of the baseline file; fail on a drop of more than SPEED_TOLERANCE."""
    import torch

    from tools.bench import build_parser, run_gpu_workload
    path = BASELINES / f"{package_name}.json"
    if not path.is_file():
        print(f"no speed baseline at {path}")
        return True
    baseline = json.loads(path.read_text())
    gpu = torch.cuda.get_device_name()
    comparable = baseline["gpu"] == gpu
    ok_all = True
    for figure in baseline["figures"]:
        args = build_parser().parse_args(figure["args"])
        args.argv = figure["args"]
        measured = run_gpu_workload(args)[figure["metric"]]
        ok = not comparable or measured >= (1 - SPEED_TOLERANCE) * figure["value"]
        ok_all &= ok
        print(f"[{'PASS' if ok else 'FAIL'}] {' '.join(figure['args'][:3])}: {figure['metric']} {measured:.1f} "
              f"(baseline {figure['value']:.1f}{'' if comparable else ', other GPU: not compared'})")
        figure["value"] = measured if update else figure["value"]
    if update:
        baseline["gpu"] = gpu
        path.write_text(json.dumps(baseline, indent=2) + "\n")
    return ok_all


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arch")
    parser.add_argument("--gpu", action="store_true", help="also bf16 parity and speed on the GPU")
    parser.add_argument("--update-baseline", action="store_true", help="store the measured speeds as the baseline")
    args = parser.parse_args()
    package = get_package(args.arch)
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for variant in [None, *package.tiny_variants]:
            name = f"{package.name}{'/' + variant if variant else ''}"
            path = make_tiny_checkpoint(package.name, Path(tmp) / (variant or "base"), variant)
            report = run_parity(path, **stress_options(path, **STRESS))
            ok = report.max_logit_diff <= LOGIT_TOLERANCE and report.greedy_matches == report.greedy_total
            failed |= not ok
            print(f"[{'PASS' if ok else 'FAIL'}] {name}")
            for line in report.lines():
                print(f"    {line}")
        if args.gpu:
            failed |= not gpu_parity(package.name, [None, *package.tiny_variants], tmp)
            failed |= not gpu_speed(package.name, args.update_baseline)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
