"""The few-row GEMV over FP8 block-scaled weights (runtime/ops/fp8.py) against its torch reference: plain and
block-diagonal (grouped) weights, non-square blocks (a transposed scale grid would show), 1 to 5 rows. In
Triton's interpreter on the CPU (fp32); `-m gpu` at DeepSeek V4 Flash's shapes in bf16."""
from __future__ import annotations

import pytest
import torch

from runtime.ops.fp8 import fp8_block_quantize, fp8_linear_ref

triton = pytest.importorskip("triton")

from runtime.ops.fp8 import fp8_gemv  # noqa: E402

CASES = {
    "cpu": [(1, 64, 128, 1, (16, 32)), (3, 48, 64, 2, (8, 32)), (5, 32, 96, 4, (8, 32))],
    "cuda": [(1, 1024, 4096, 1, (128, 128)), (2, 32768, 1024, 1, (128, 128)), (1, 1024, 4096, 8, (128, 128)),
             (4, 4096, 8192, 1, (128, 128)), (3, 512, 4096, 1, (128, 128))],
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fp8_gemv_matches_reference(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    generator = torch.Generator().manual_seed(0)
    for rows, out, inputs, groups, block in CASES[device]:
        weight, scale = fp8_block_quantize(torch.randn(groups * out, inputs, generator=generator) * 0.05, block)
        weight, scale = weight.to(device), scale.float().to(device)
        x = torch.randn(rows, groups * inputs, generator=generator).to(device, dtype)
        ref = fp8_linear_ref(x.float(), weight, scale, groups)
        for ksteps in (1, 2):                                         # scale blocks per K iteration
            if inputs % (ksteps * block[1]):
                continue
            got = fp8_gemv(x, weight, scale, groups, ksteps=ksteps)
            assert got.shape == (rows, groups * out) and got.dtype == dtype
            tolerance = 1e-5 if dtype == torch.float32 else 1e-2      # bf16: the output's rounding
            torch.testing.assert_close(got.float(), ref, atol=tolerance * ref.abs().max().item(), rtol=tolerance)


def test_grouped_reference_is_block_diagonal():
    generator = torch.Generator().manual_seed(1)
    weight, scale = fp8_block_quantize(torch.randn(2 * 16, 32, generator=generator), (8, 16))
    x = torch.randn(3, 64, generator=generator)
    full = fp8_linear_ref(x, weight, scale, 2)
    dense = fp8_linear_ref(x[:, 32:], weight[16:], scale[2:])
    torch.testing.assert_close(full[:, 16:], dense)
