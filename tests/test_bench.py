"""tools/bench.py as a user runs it: every subcommand's --help, and the CPU workload (sched). The serving
benchmark runs against the test server in tests/server/test_bench_serve.py."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tools import bench

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench.py"


@pytest.mark.parametrize("command", ["sched", "kv", "latency", "throughput", "profile", "sampling", "cpu", "serve"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    assert f" {command} [-h]" in capsys.readouterr().out


def test_sched_runs_on_the_cpu():
    result = subprocess.run([sys.executable, str(BENCH), "sched", "--num-requests", "8", "--prompt-len", "32",
                             "--steps", "5", "--warmup", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "schedule + prepare_inputs, 8 decode requests" in result.stdout
