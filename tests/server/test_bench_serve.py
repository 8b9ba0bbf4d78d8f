"""`tools/bench.py serve` against the test server: two concurrency levels with Poisson arrivals complete."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench.py"


def test_bench_serve_completes_every_request(server):
    result = subprocess.run([sys.executable, str(BENCH), "serve", "--url", server.base_url, "--concurrency", "1,2",
                             "--num-prompts", "4", "--input-len", "8", "--output-len", "3", "--request-rate", "50"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for level in (1, 2):
        assert f"---- concurrency {level}: 4 completed, 0 failed" in result.stdout
    assert "Poisson arrivals at 50 req/s" in result.stdout
