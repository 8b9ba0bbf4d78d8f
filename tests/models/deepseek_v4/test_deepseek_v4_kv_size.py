"""At the real shapes (built on the meta device) the cache costs what vLLM's DeepSeek V4 write-up says:
Flash 6,880 B/token and Pro 9,848 B/token in bf16 at long context, Pro 9.62 GiB at 1M tokens."""
from __future__ import annotations

from pathlib import Path

import pytest

from tools.bench import bench_kv, build_parser

CONFIGS = Path(__file__).resolve().parents[3] / "tools" / "configs"


@pytest.mark.parametrize("model, bytes_per_token, gib_at_1m", [("deepseek-v4-flash", 6880, 6.72),
                                                                ("deepseek-v4-pro", 9848, 9.62)])
def test_kv_bytes_per_token_and_at_one_million_tokens(model, bytes_per_token, gib_at_1m, capsys):
    args = build_parser().parse_args(["kv", "--model", str(CONFIGS / model)])
    result = bench_kv(args)
    assert result["bytes_per_token"] == bytes_per_token
    assert round(result["kv_bytes_at_tokens"] / 2**30, 2) == gib_at_1m
    assert f"{bytes_per_token:,} B/token" in capsys.readouterr().out


@pytest.mark.parametrize("model, bytes_per_token, gib_at_1m", [("deepseek-v4-flash", 3850, 3.76),
                                                                ("deepseek-v4-pro", 5511, 5.39)])
def test_fp8_kv_bytes_per_token(model, bytes_per_token, gib_at_1m, capsys):
    """--kv-cache-dtype fp8: 584-byte K=V entries and 132-byte indexer keys. Flash: 21 CSA layers x (584 + 132) / 4
    + 20 HCA layers x 584 / 128 = 3,850.25 B/token."""
    args = build_parser().parse_args(["kv", "--model", str(CONFIGS / model), "--kv-cache-dtype", "fp8"])
    result = bench_kv(args)
    assert round(result["bytes_per_token"]) == bytes_per_token
    assert round(result["kv_bytes_at_tokens"] / 2**30, 2) == gib_at_1m
    assert f"{bytes_per_token:,} B/token" in capsys.readouterr().out
