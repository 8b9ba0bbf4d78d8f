#!/usr/bin/env python
"""Per-model regression harness: parity with transformers on the package's tiny checkpoints, through the
engine under small blocks, chunked prefill, a cache small enough to force preemption, and prefix hits.

With --gpu (on the GPU machine) also bf16 parity on the GPU, then the speed table at the package's real
shapes (dummy weights), compared with the baseline of the GPU it runs on in tools/baselines/ARCH.json:
  - prefill tok/s of a long prompt, apart from decode;
  - decode time per output token at concurrency 1, 8 and 64, and at a 32K context;
  - each feature toggled alone against the default engine (CUDA graphs off, prefix caching off, ngram
    speculative decoding, FP8 KV cache): its speed, and its greedy tokens against the default engine's
    on the tiny checkpoint in fp32 (identical, except FP8 KV, whose agreement is reported);
  - the tools/bench.py figures listed in the baseline file.
Baselines are kept per GPU model side by side; a figure measured on a GPU that has no baseline for it is
recorded as that GPU's baseline (NEW), never skipped. A figure more than 5% below its baseline fails.

    python tools/regress.py qwen3
    python tools/regress.py qwen3 --gpu [--update-baseline] [--speed-model tools/configs/qwen3-0.6b]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.registry import get_package  # noqa: E402
from tools.parity import make_tiny_checkpoint, run_parity, stress_options  # noqa: E402

LOGIT_TOLERANCE = 1e-4
SPEED_TOLERANCE = 0.05          # a figure may drop this much below its baseline
BASELINES = Path(__file__).resolve().parent / "baselines"
CONFIGS = Path(__file__).resolve().parent / "configs"
# the real shapes the speed table runs at, per package (dummy weights)
SPEED_MODELS = {"qwen3": "qwen3-0.6b", "gpt_oss": "gpt-oss-20b", "gemma4": "gemma4-e4b",
                "deepseek_v4": "deepseek-v4-flash-24l"}
# small blocks (4 positions, or the smallest multiple of a model's compression ratios), a 16-token budget
# (chunked prefill), and a cache of 320 positions, too small for all 8 prompts (preemption)
STRESS = dict(block_size=4, max_num_batched_tokens=16, cache_tokens=320)
# the features toggled one at a time: name -> engine options that differ from the default engine
FEATURES = {
    "graphs off": dict(enforce_eager=True),
    "prefix caching off": dict(enable_prefix_caching=False),
    "ngram speculation (k=3)": dict(speculative_config={"method": "ngram", "num_speculative_tokens": 3}),
    "fp8 kv cache": dict(kv_cache_dtype="fp8"),
}


@dataclass(slots=True)
class SpeedSizes:
    """The workloads of the speed table (the GPU defaults; tests shrink them)."""
    prefill_len: int = 8192
    prompt_len: int = 512
    output_len: int = 128
    concurrencies: tuple[int, ...] = (1, 8, 64)
    long_context: int = 32768
    long_output_len: int = 64
    shared_prefix: int = 4096


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


# ---- the speed table --------------------------------------------------------------------------------------

def _prompts(vocab_size: int, count: int, length: int, seed: int) -> list[list[int]]:
    """Fresh random prompts (a new seed per run, so no run hits another's prefix cache)."""
    rng = random.Random(seed)
    low = min(1000, vocab_size // 4)                   # past the special tokens
    return [[rng.randrange(low, vocab_size - low) for _ in range(length)] for _ in range(count)]


def _run(engine, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]], float]:
    """Seconds to finish every prompt (greedy, ignore_eos), the tokens, and the seconds until every prompt had
    its first token (launched, with async scheduling)."""
    from runtime import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids = [f"regress-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts):
        engine.add_request(request_id, prompt, params)
    tokens: dict[str, list[int]] = {}
    first_tokens = None
    start = time.perf_counter()
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                tokens[output.request_id] = output.token_ids
        if first_tokens is None and all(request_id in tokens or engine.scheduler.requests[request_id].num_output_tokens
                                        for request_id in ids):
            first_tokens = time.perf_counter() - start
    return time.perf_counter() - start, [tokens[i] for i in ids], first_tokens


class _Figures(dict):
    """The table's figures, each printed as it is measured (a run cut short still shows what it measured)."""

    def __setitem__(self, name: str, value: float) -> None:
        print(f"    measured {name}: {value:.3f}", flush=True)
        super().__setitem__(name, value)


class _Seeds:
    def __init__(self):
        self.next = 100

    def __call__(self) -> int:
        self.next += 1
        return self.next


def decode_tpot(engine, concurrency: int, prompt_len: int, output_len: int, seed: _Seeds) -> float:
    """Seconds per output token of `concurrency` requests decoding together: from the step that gave every
    request its first token to the end of the same run, over the remaining tokens (fresh prompts each run;
    one run, so the figure never mixes two runs' noise)."""
    vocab = engine.vocab_size
    _run(engine, _prompts(vocab, concurrency, prompt_len, seed()), 4)                       # warm-up
    total, _, first_tokens = _run(engine, _prompts(vocab, concurrency, prompt_len, seed()), output_len)
    return (total - first_tokens) / (output_len - 1)


def prefill_tok_s(engine, prompt_len: int, seed: _Seeds) -> float:
    _run(engine, _prompts(engine.vocab_size, 1, prompt_len, seed()), 1)                     # warm-up
    seconds, _, _ = _run(engine, _prompts(engine.vocab_size, 1, prompt_len, seed()), 1)
    return prompt_len / seconds


def shared_prefix_seconds(engine, prefix_len: int, seed: _Seeds, count: int = 8) -> float:
    """Seconds to first token of `count` requests that share a `prefix_len` prefix already served once."""
    prefix = _prompts(engine.vocab_size, 1, prefix_len, seed())[0]
    _run(engine, [prefix + [7]], 1)
    prompts = [prefix + suffix for suffix in _prompts(engine.vocab_size, count, 64, seed())]
    return _run(engine, prompts, 1)[0]


def speed_table(model: str, arch: str, sizes: SpeedSizes, device: str = "cuda",
                features: dict[str, dict] | None = None) -> dict[str, float]:
    """Every speed figure of the table, by name. One engine for the default rows, one per feature."""
    from runtime import LLM
    features = FEATURES if features is None else features
    base = dict(arch=arch, load_format="dummy", device=device, skip_tokenizer_init=True,
                max_model_len=sizes.long_context + sizes.long_output_len + 64,
                max_num_seqs=max(sizes.concurrencies), max_num_batched_tokens=max(2048, min(sizes.prefill_len, 16384)),
                gpu_memory_utilization=0.85)
    if device == "cuda":
        base["dtype"] = "bfloat16"
    figures = _Figures()
    seed = _Seeds()
    c = sizes.concurrencies[len(sizes.concurrencies) // 2]
    for feature, options in [("default", {}), *features.items()]:
        llm = LLM(model, **{**base, **options})
        engine = llm.engine
        if feature == "default":
            figures[f"prefill tok/s, {sizes.prefill_len}-token prompt"] = prefill_tok_s(engine, sizes.prefill_len, seed)
            for concurrency in sizes.concurrencies:
                figures[f"decode TPOT ms, concurrency {concurrency}, prompt {sizes.prompt_len}"] = 1e3 * decode_tpot(
                    engine, concurrency, sizes.prompt_len, sizes.output_len, seed)
            figures[f"decode TPOT ms, concurrency 1, context {sizes.long_context}"] = 1e3 * decode_tpot(
                engine, 1, sizes.long_context, sizes.long_output_len, seed)
        else:
            figures[f"{feature}: decode TPOT ms, concurrency {c}"] = 1e3 * decode_tpot(
                engine, c, sizes.prompt_len, sizes.output_len, seed)
        if feature in ("default", "prefix caching off"):
            figures[f"{feature}: TTFT ms of 8 prompts sharing a {sizes.shared_prefix}-token prefix"] = \
                1e3 * shared_prefix_seconds(engine, sizes.shared_prefix, seed)
        if feature == "fp8 kv cache":
            figures[f"{feature}: decode TPOT ms, concurrency 1, context {sizes.long_context}"] = 1e3 * decode_tpot(
                engine, 1, sizes.long_context, sizes.long_output_len, seed)
        del llm, engine
        _free()
    return dict(figures)


def feature_parity(path: Path, device: str = "cuda", features: dict[str, dict] | None = None) -> dict[str, float]:
    """Per feature: the share of greedy tokens equal to the default engine's, on the tiny checkpoint in fp32
    (several requests, small blocks, chunked prefill)."""
    from runtime import LLM
    from tools.parity import random_prompts
    features = FEATURES if features is None else features
    prompts = random_prompts(1024, (5, 77, 200, 13, 64, 9), seed=9)
    prompts[1] = [100 + i % 7 for i in range(77)]                    # periodic: ngram drafts get accepted
    base = dict(device=device, dtype="float32", skip_tokenizer_init=True, block_size=16, max_num_seqs=8,
                max_num_batched_tokens=64, gpu_memory_utilization=0.5)
    results = {}
    reference = None
    for feature, options in [("default", {}), *features.items()]:
        llm = LLM(str(path), **{**base, **options})
        _, tokens, _ = _run(llm.engine, prompts, 32)
        del llm
        _free()
        if reference is None:
            reference = tokens
            continue
        same = sum(a == b for ours, ref in zip(tokens, reference) for a, b in zip(ours, ref))
        results[feature] = same / sum(len(ref) for ref in reference)
    return results


def _free() -> None:
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- baselines ---------------------------------------------------------------------------------------------

def compare(name: str, measured: float, baselines: dict[str, float], gpu: str, update: bool,
            lower_is_better: bool) -> bool:
    """Check one figure against this GPU's baseline, record it where there is none (or on --update-baseline),
    print the row with the other GPUs' baselines beside it."""
    others = ", ".join(f"{g}: {v:.1f}" for g, v in sorted(baselines.items()) if g != gpu)
    known = baselines.get(gpu)
    if known is None:
        status, ok = "NEW ", True
    else:
        ratio = known / measured if lower_is_better else measured / known
        ok = ratio >= 1 - SPEED_TOLERANCE
        status = "PASS" if ok else "FAIL"
    if known is None or update:
        baselines[gpu] = round(measured, 3)
    shown = f"baseline {known:.1f}" if known is not None else "no baseline on this GPU: recorded"
    print(f"[{status}] {name}: {measured:.2f} ({shown}{'; ' + others if others else ''})")
    return ok


def load_baselines(package_name: str) -> dict:
    """tools/baselines/ARCH.json: {"figures": [bench.py figures with "values" per GPU], "table": {row: {gpu:
    value}}}. A file of the older single-GPU layout ("gpu", and "value" per figure) is read as that GPU's."""
    path = BASELINES / f"{package_name}.json"
    if not path.is_file():
        return {"figures": [], "table": {}}
    data = json.loads(path.read_text())
    old_gpu = data.pop("gpu", None)
    for figure in data.get("figures", []):
        if "value" in figure:
            figure["values"] = {old_gpu: figure.pop("value")}
    data.setdefault("table", {})
    return data


def gpu_speed(package_name: str, update: bool, speed_model: str | None, tmp: str, table_only: bool = False) -> bool:
    import torch

    from tools.bench import build_parser, run_gpu_workload
    gpu = torch.cuda.get_device_name()
    baselines = load_baselines(package_name)
    ok_all = True
    model = speed_model or (str(CONFIGS / SPEED_MODELS[package_name]) if package_name in SPEED_MODELS else None)
    if model is None:
        print(f"no real-shape config for {package_name}: give --speed-model")
    else:
        print(f"speed table: {model}, dummy weights, {gpu}")
        for name, value in speed_table(model, package_name, SpeedSizes()).items():
            ok_all &= compare(name, value, baselines["table"].setdefault(name, {}), gpu, update,
                              lower_is_better="ms" in name)
        path = make_tiny_checkpoint(package_name, Path(tmp) / "features")
        for feature, agreement in feature_parity(path).items():
            ok = agreement == 1.0 or feature == "fp8 kv cache"
            ok_all &= ok
            print(f"[{'PASS' if ok else 'FAIL'}] {feature}: greedy tokens equal to the default engine's "
                  f"{agreement:.1%} (tiny checkpoint, fp32{', reported only' if feature == 'fp8 kv cache' else ''})")
    for figure in [] if table_only else baselines["figures"]:
        args = build_parser().parse_args(figure["args"])
        args.argv = figure["args"]
        measured = run_gpu_workload(args)[figure["metric"]]
        ok_all &= compare(f"bench.py {' '.join(figure['args'][:3])}: {figure['metric']}", measured,
                          figure["values"], gpu, update, lower_is_better=False)
    (BASELINES / f"{package_name}.json").write_text(json.dumps(baselines, indent=2) + "\n")
    return ok_all


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arch")
    parser.add_argument("--gpu", action="store_true", help="also bf16 parity and speed on the GPU")
    parser.add_argument("--update-baseline", action="store_true", help="store the measured speeds as the baseline")
    parser.add_argument("--speed-model", help="config dir of the real shapes the speed table runs at")
    parser.add_argument("--skip-parity", action="store_true", help="no parity runs: the GPU speed figures only")
    parser.add_argument("--table-only", action="store_true", help="of the speed figures, only the table (not the "
                        "bench.py figures of the baseline file)")
    args = parser.parse_args()
    package = get_package(args.arch)
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for variant in [] if args.skip_parity else [None, *package.tiny_variants]:
            name = f"{package.name}{'/' + variant if variant else ''}"
            path = make_tiny_checkpoint(package.name, Path(tmp) / (variant or "base"), variant)
            report = run_parity(path, **stress_options(path, **STRESS))
            ok = report.max_logit_diff <= LOGIT_TOLERANCE and report.greedy_matches == report.greedy_total
            failed |= not ok
            print(f"[{'PASS' if ok else 'FAIL'}] {name}")
            for line in report.lines():
                print(f"    {line}")
        if args.gpu:
            if not args.skip_parity:
                failed |= not gpu_parity(package.name, [None, *package.tiny_variants], tmp)
            failed |= not gpu_speed(package.name, args.update_baseline, args.speed_model, tmp, args.table_only)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
