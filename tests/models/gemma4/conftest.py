"""The tiny Gemma 4 checkpoints, written once per session: E2B-like (multimodal layout, PLE + KV sharing),
26B-A4B-like (text-only layout, MoE) and 31B-like (multimodal layout, dense, K=V global layers)."""
from __future__ import annotations

import pytest

from tools.parity import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_gemma4(tmp_path_factory):
    return make_tiny_checkpoint("gemma4", tmp_path_factory.mktemp("tiny") / "gemma4")


@pytest.fixture(scope="session")
def tiny_gemma4_moe(tmp_path_factory):
    return make_tiny_checkpoint("gemma4", tmp_path_factory.mktemp("tiny") / "gemma4-moe", variant="moe")


@pytest.fixture(scope="session")
def tiny_gemma4_dense(tmp_path_factory):
    return make_tiny_checkpoint("gemma4", tmp_path_factory.mktemp("tiny") / "gemma4-dense", variant="dense")
