"""gpt-oss on the GPU (run with `pytest -m gpu` on the GPU machine): bf16 teacher-forced parity of the tiny
MXFP4 checkpoint with transformers (criteria in tools/gpu_parity.py), through the Triton MoE and attention."""
from __future__ import annotations

import pytest

from tools.gpu_parity import assert_parity, teacher_forced
from tools.parity import random_prompts

pytestmark = pytest.mark.gpu


def test_tiny_bf16_parity_on_gpu(tiny_gpt_oss):
    prompts = random_prompts(1024, (3, 17, 40, 64, 99, 128, 150, 200))
    result = teacher_forced(tiny_gpt_oss, prompts, 32, block_size=16, max_num_batched_tokens=64)
    print("tiny gpt-oss", result)
    assert result["rows"] == 701 + 8 * 31        # every prompt token and every fed-back output token
    assert_parity(result, moe=True)
