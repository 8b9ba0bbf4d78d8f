"""The tiny DeepSeek V4 checkpoints (release layout: FP8 linears, MXFP4 experts, two shards), written once per
session: the default one (window 8, HCA ratio 8) and one with the release's ratios 4 / 128 and window 128."""
from __future__ import annotations

import pytest

from tools.parity import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_deepseek_v4(tmp_path_factory):
    return make_tiny_checkpoint("deepseek_v4", tmp_path_factory.mktemp("tiny") / "deepseek-v4")


@pytest.fixture(scope="session")
def tiny_deepseek_v4_released(tmp_path_factory):
    return make_tiny_checkpoint("deepseek_v4", tmp_path_factory.mktemp("tiny") / "deepseek-v4-released",
                                variant="released-ratios")
