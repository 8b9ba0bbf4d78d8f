#!/usr/bin/env python
"""Per-model regression harness: parity with transformers on the package's tiny checkpoints, through the
engine under small blocks, chunked prefill, a cache small enough to force preemption, and prefix hits.

    python tools/regress.py qwen3
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.registry import get_package  # noqa: E402
from tools.parity import make_tiny_checkpoint, run_parity  # noqa: E402

LOGIT_TOLERANCE = 1e-4
# small blocks, a 16-token budget (chunked prefill), and a cache too small for all 8 prompts (preemption)
STRESS = dict(block_size=4, max_num_batched_tokens=16, num_gpu_blocks=80)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arch")
    args = parser.parse_args()
    package = get_package(args.arch)
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for variant in [None, *package.tiny_variants]:
            name = f"{package.name}{'/' + variant if variant else ''}"
            path = make_tiny_checkpoint(package.name, Path(tmp) / (variant or "base"), variant)
            report = run_parity(path, **STRESS)
            ok = report.max_logit_diff <= LOGIT_TOLERANCE and report.greedy_matches == report.greedy_total
            failed |= not ok
            print(f"[{'PASS' if ok else 'FAIL'}] {name}")
            for line in report.lines():
                print(f"    {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
