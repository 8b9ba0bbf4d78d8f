"""Shared fixtures: tiny checkpoints written once per session, and a private cache dir for `--model tiny`."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# Without a GPU, Triton kernels can only run in the interpreter; Triton reads this when a kernel is defined
# (module import), so it must be set before anything imports runtime.ops.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tools.parity import make_tiny_checkpoint  # noqa: E402

# The GPU machine has no fastapi/uvicorn/openai: there `pytest -m gpu` skips the server tests. The directory
# itself is ignored (a glob over its files would still import tests/server/conftest.py, which needs openai).
if not all(importlib.util.find_spec(name) for name in ("fastapi", "uvicorn", "openai")):
    collect_ignore = ["server"]
    collect_ignore_glob = ["models/*/test_*_server.py"]


@pytest.fixture(scope="session", autouse=True)
def _private_tiny_cache(tmp_path_factory):
    os.environ["RUN_MODEL_CACHE"] = str(tmp_path_factory.mktemp("run-model-cache"))
    os.environ["RUN_MODEL_QUIET"] = "1"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(arch, variant=None) -> a tiny checkpoint's dir, written once per session."""
    made = {}

    def get(arch: str, variant: str | None = None):
        if (arch, variant) not in made:
            root = tmp_path_factory.mktemp("tiny")
            made[(arch, variant)] = make_tiny_checkpoint(arch, root / f"{arch}-{variant or 'base'}", variant)
        return made[(arch, variant)]
    return get


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    return make_tiny_checkpoint("qwen3", tmp_path_factory.mktemp("tiny") / "qwen3")


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tmp_path_factory):
    return make_tiny_checkpoint("qwen3", tmp_path_factory.mktemp("tiny") / "qwen3-moe", variant="moe")
