"""tools/regress.py: its speed table and feature parity run end to end (on the CPU at toy sizes: the
figures mean nothing here, the code paths are what is checked), and baselines are kept per GPU."""
from __future__ import annotations

import pytest

from tools import regress


def test_speed_table_and_feature_parity_run(tiny_checkpoint):
    path = tiny_checkpoint("qwen3")
    sizes = regress.SpeedSizes(prefill_len=40, prompt_len=12, output_len=4, concurrencies=(1, 2),
                               long_context=64, long_output_len=3, shared_prefix=16)
    figures = regress.speed_table(str(path), "qwen3", sizes, device="cpu",
                                  features={"fp8 kv cache": dict(kv_cache_dtype="fp8")})
    assert set(figures) == {"prefill tok/s, 40-token prompt", "decode TPOT ms, concurrency 1, prompt 12",
                            "decode TPOT ms, concurrency 2, prompt 12", "decode TPOT ms, concurrency 1, context 64",
                            "default: TTFT ms of 8 prompts sharing a 16-token prefix",
                            "fp8 kv cache: decode TPOT ms, concurrency 2",
                            "fp8 kv cache: decode TPOT ms, concurrency 1, context 64"}
    assert all(value > 0 for value in figures.values())
    agreement = regress.feature_parity(path, device="cpu", features={
        "ngram": dict(speculative_config={"method": "ngram", "num_speculative_tokens": 3})})
    assert agreement == {"ngram": 1.0}


def test_baselines_are_kept_per_gpu(capsys):
    baselines = {"NVIDIA H100 80GB HBM3": 100.0}
    assert regress.compare("decode tok/s", 120.0, baselines, "NVIDIA H200", update=False, lower_is_better=False)
    assert baselines == {"NVIDIA H100 80GB HBM3": 100.0, "NVIDIA H200": 120.0}     # recorded, not skipped
    assert "[NEW ]" in capsys.readouterr().out
    assert not regress.compare("decode tok/s", 110.0, baselines, "NVIDIA H200", update=False, lower_is_better=False)
    assert regress.compare("TPOT ms", 1.0, {"NVIDIA H200": 1.04}, "NVIDIA H200", update=False, lower_is_better=True)
    assert not regress.compare("TPOT ms", 1.2, {"NVIDIA H200": 1.0}, "NVIDIA H200", update=False,
                               lower_is_better=True)


def test_old_single_gpu_baseline_files_read_as_their_gpu():
    data = regress.load_baselines("qwen3")
    assert all("values" in figure and "value" not in figure for figure in data["figures"])
    assert any("NVIDIA H100 80GB HBM3" in figure["values"] for figure in data["figures"])
