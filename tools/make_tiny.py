#!/usr/bin/env python
"""Write a tiny random checkpoint (HF format) + tokenizer for an architecture.

    python tools/make_tiny.py qwen3 /tmp/tiny-qwen3 [--variant moe] [--config overrides.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.registry import get_package  # noqa: E402
from runtime.tiny import make_tiny  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arch")
    parser.add_argument("out_dir")
    parser.add_argument("--variant", help="one of the package's tiny_variants (e.g. qwen3: moe)")
    parser.add_argument("--config", help="JSON file whose keys override the tiny config")
    args = parser.parse_args()
    package = get_package(args.arch)
    overrides = {}
    if args.variant:
        if args.variant not in package.tiny_variants:
            parser.error(f"unknown variant {args.variant!r}; {package.name} has {sorted(package.tiny_variants)}")
        overrides.update(package.tiny_variants[args.variant])
    if args.config:
        overrides.update(json.loads(Path(args.config).read_text()))
    out = make_tiny(package, args.out_dir, overrides)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
