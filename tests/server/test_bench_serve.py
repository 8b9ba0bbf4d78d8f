"""`tools/bench.py serve` against the test server: closed-loop and Poisson arrivals both complete."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench.py"


@pytest.mark.parametrize("arrivals", [[], ["--request-rate", "50"]], ids=["closed-loop", "poisson"])
def test_bench_serve_completes_every_request(server, arrivals):
    result = subprocess.run([sys.executable, str(BENCH), "serve", "--url", server.base_url, "--concurrency", "2",
                             "--num-prompts", "4", "--input-len", "8", "--output-len", "3", *arrivals],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "---- concurrency 2: 4 completed, 0 failed" in result.stdout
