"""The tiny gpt-oss checkpoint (MXFP4 experts, harmony tokenizer), written once per session."""
from __future__ import annotations

import pytest

from tools.parity import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_gpt_oss(tmp_path_factory):
    return make_tiny_checkpoint("gpt_oss", tmp_path_factory.mktemp("tiny") / "gpt-oss")
