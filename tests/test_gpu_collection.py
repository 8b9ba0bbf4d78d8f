"""`pytest -m gpu`, as the README writes it, collects on the GPU machine, which has no fastapi, uvicorn or
openai: the server tests are left out there instead of failing the whole run at collection."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIDE = "import sys\nfor name in ('openai', 'fastapi', 'uvicorn'):\n    sys.modules[name] = None\n"


def test_gpu_tests_collect_without_the_server_dependencies(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(HIDE)        # imports of these three now fail
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider",
         "--ignore=tests/runtime", "--ignore=tests/models/qwen3", "--ignore=tests/test_gpu_collection.py"],
        cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path), "HOME": str(tmp_path)},
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "error" not in result.stdout.lower()
