"""tools/bench.py as a user runs it: every subcommand's --help, and the CPU workload (sched). The serving
benchmark runs against the test server in tests/server/test_bench_serve.py."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench.py"


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", ["sched", "latency", "throughput", "profile", "serve"])
def test_every_subcommand_has_help(command):
    result = bench(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: bench.py {command}")


def test_sched_runs_on_the_cpu():
    result = bench("sched", "--num-requests", "8", "--prompt-len", "32", "--steps", "5", "--warmup", "1")
    assert result.returncode == 0, result.stderr
    assert "schedule + prepare_inputs, 8 decode requests" in result.stdout
