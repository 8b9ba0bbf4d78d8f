"""Parity of our engine with transformers on a tiny random checkpoint, through the real engine path.

Every logits row the engine computes (prefill chunks, decodes, recomputation after preemption) is compared
with transformers' fp32 forward over the finished sequence at the same position, and greedy outputs are
compared with transformers' `generate`. Used by tests/models/*/test_parity.py and tools/regress.py."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runtime import LLM, SamplingParams
from runtime.registry import get_package
from runtime.tiny import make_tiny

DEFAULT_PROMPT_LENGTHS = (3, 17, 40, 64, 99, 128, 150, 200)

try:   # transformers' per-file progress bars only clutter the reports
    from transformers.utils import logging as _hf_logging
    _hf_logging.disable_progress_bar()
except ImportError:
    pass


def make_tiny_checkpoint(arch: str, out_dir: str | os.PathLike, variant: str | None = None,
                         overrides: dict[str, Any] | None = None) -> Path:
    package = get_package(arch)
    config = dict(package.tiny_variants[variant]) if variant else {}
    config.update(overrides or {})
    return make_tiny(package, out_dir, config)


def stress_options(path: str | os.PathLike, block_size: int, max_num_batched_tokens: int,
                   cache_tokens: int) -> dict[str, int]:
    """Engine options for a stress run: the smallest block size >= `block_size` that every cache group's
    compression ratio divides, and as many blocks as hold `cache_tokens` positions (at least 4)."""
    from runtime.config import EngineConfig
    from runtime.loader import load_hf_config
    from runtime.registry import package_for_architectures
    hf_config = load_hf_config(Path(path))
    package = package_for_architectures(getattr(hf_config, "architectures", None) or [])
    with torch.device("meta"):
        specs = package.build(hf_config, EngineConfig(device="cpu", dtype="float32")).cache_specs()
    block = math.lcm(block_size, *(spec.tokens_per_entry for spec in specs))
    return dict(block_size=block, max_num_batched_tokens=max_num_batched_tokens,
                num_gpu_blocks=max(4, cache_tokens // block))


def random_prompts(vocab_size: int, lengths: tuple[int, ...], num_special: int = 8, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(num_special, vocab_size, (n,), generator=generator).tolist() for n in lengths]


@dataclass
class ParityReport:
    max_logit_diff: float = 0.0
    logit_rows_compared: int = 0
    greedy_matches: int = 0
    greedy_total: int = 0
    first_mismatch: str | None = None
    conditions: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"max |logit diff| vs transformers: {self.max_logit_diff:.2e} over {self.logit_rows_compared} rows",
               f"greedy outputs identical to transformers.generate: {self.greedy_matches}/{self.greedy_total}"]
        if self.first_mismatch:
            out.append(f"first mismatch: {self.first_mismatch}")
        out.append("scheduler conditions: " + ", ".join(f"{k}={v}" for k, v in self.conditions.items()))
        return out


class _LogitRecorder:
    """Stands in for the model inside the runner and keeps (request id, position, logits) for every row."""

    def __init__(self, runner):
        self.model = runner.model
        self.rows: list[tuple[str, int, torch.Tensor]] = []
        self._request_ids: list[str] = []
        self._prepare = runner.prepare_inputs
        runner.prepare_inputs = self._prepare_inputs
        runner.model = self

    def _prepare_inputs(self, batch, *args, **kwargs):
        self._request_ids = list(batch.request_ids)
        return self._prepare(batch, *args, **kwargs)

    def __call__(self, input_ids, positions, ctx):
        hidden = self.model(input_ids, positions, ctx)
        logits = self.model.compute_logits(hidden)
        starts = ctx.query_start_loc_host
        for b, request_id in enumerate(self._request_ids):
            for row in range(int(starts[b]), int(starts[b + 1])):
                self.rows.append((request_id, int(positions[row]), logits[row]))
        return hidden

    def compute_logits(self, hidden):
        return self.model.compute_logits(hidden)


def transformers_load_options(path: str | os.PathLike) -> dict[str, Any]:
    """from_pretrained options the oracle needs for a checkpoint: MXFP4 and FP8 block-scaled checkpoints load
    dequantized (exactly), the only way transformers runs them without its hub kernels (and without accelerate)."""
    quantization = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    if quantization.get("quant_method") == "mxfp4":
        from transformers import Mxfp4Config
        return {"quantization_config": Mxfp4Config(dequantize=True)}
    if quantization.get("quant_method") == "fp8":
        from transformers import FineGrainedFP8Config
        return {"quantization_config": FineGrainedFP8Config(dequantize=True)}
    return {}


def load_transformers(path: str | os.PathLike, config_overrides: dict[str, Any] | None = None):
    """transformers' fp32 model of a checkpoint; `config_overrides` replace config.json fields."""
    from transformers import AutoModelForCausalLM
    options = {**(config_overrides or {}), **transformers_load_options(path)}
    # .float(): a dequantized checkpoint keeps the tensors it stores in bf16 (norms, embeddings) in bf16
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **options).float().eval()


@torch.inference_mode()
def run_parity(path: str | os.PathLike, prompt_lengths: tuple[int, ...] = DEFAULT_PROMPT_LENGTHS,
               max_tokens: int = 32, hf_model=None, **engine_options: Any) -> ParityReport:
    """Generate greedily with the engine (options decide block size, budget, cache size) and compare."""
    options = dict(device="cpu", dtype="float32")
    options.update(engine_options)
    llm = LLM(str(path), **options)
    engine = llm.engine
    recorder = _LogitRecorder(engine.runner)
    prompts = random_prompts(engine.vocab_size, prompt_lengths)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)

    hf = hf_model if hf_model is not None else load_transformers(path)
    report = ParityReport()
    hf_logits = {}
    for request_id, output in zip((str(i) for i in range(len(prompts))), outputs):
        sequence = torch.tensor([output.prompt_token_ids + output.token_ids])
        hf_logits[request_id] = hf(sequence).logits[0].float()                   # [seq_len, vocab]
    for request_id, position, logits in recorder.rows:
        diff = (logits - hf_logits[request_id][position]).abs().max().item()
        report.max_logit_diff = max(report.max_logit_diff, diff)
        report.logit_rows_compared += 1
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False)[0, len(prompt):]
        report.greedy_total += 1
        if expected.tolist() == output.token_ids:
            report.greedy_matches += 1
        elif report.first_mismatch is None:
            report.first_mismatch = f"prompt {i} ({len(prompt)} tokens): ours {output.token_ids} vs {expected.tolist()}"
    stats = engine.scheduler.stats
    report.conditions = {
        "requests": len(prompts), "preemptions": stats.num_preemptions,
        "prefill_chunks": stats.num_prefill_chunks, "mixed_steps": stats.num_mixed_steps,
        "prefix_hit_tokens": engine.kv.stats.hits, "block_size": engine.config.block_size,
        "token_budget": engine.config.max_num_batched_tokens,
        "cache_blocks": engine.kv.pools[0].num_blocks - 1,
    }
    return report
