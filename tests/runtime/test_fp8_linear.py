"""The FP8 block-scaled linear (runtime/ops/fp8.py) against its torch reference: the few-row GEMV (plain and
split-K, whose last program adds the partial sums) and the many-row dequantize + matmul, plain and
block-diagonal (grouped) weights, non-square blocks (a transposed scale grid would show), ragged row counts. In Triton's interpreter on
the CPU (fp32, small shapes); `-m gpu` at DeepSeek V4 Flash's shapes in bf16."""
from __future__ import annotations

import pytest
import torch

from runtime.ops.fp8 import Fp8Linear, fp8_block_quantize, fp8_linear, fp8_linear_ref

triton = pytest.importorskip("triton")

from runtime.ops.fp8 import (Fp8GemvTiles, fp8_block_dequantize, fp8_dequantize_triton,  # noqa: E402
                             fp8_gemv, fp8_matmul)

# (rows, out per group, in, groups, [out, in] block)
GEMV_CASES = {
    "cpu": [(1, 64, 128, 1, (16, 32)), (3, 48, 64, 2, (8, 32)), (4, 32, 256, 4, (8, 32)), (2, 40, 192, 1, (8, 64))],
    "cuda": [(1, 1024, 4096, 1, (128, 128)), (1, 32768, 1024, 1, (128, 128)), (1, 1024, 4096, 8, (128, 128)),
             (4, 4096, 8192, 1, (128, 128)), (3, 512, 4096, 1, (128, 128)), (2, 2048, 4096, 1, (128, 128))],
}
GEMV_TILES = [None, Fp8GemvTiles(8, 64, 1, 4), Fp8GemvTiles(4, 64, 3, 4), Fp8GemvTiles(16, 128, 8, 4),
              Fp8GemvTiles(8, 16, 2, 4)]
GEMM_CASES = {
    "cpu": [(20, 32, 64, 1, (16, 32)), (33, 16, 96, 2, (16, 32)), (7, 64, 32, 1, (32, 16)), (5, 24, 48, 1, (8, 16))],
    "cuda": [(300, 1024, 4096, 1, (128, 128)), (77, 32768, 1024, 1, (128, 128)), (129, 1024, 4096, 8, (128, 128)),
             (2048, 4096, 8192, 1, (128, 128))],
}


def _layer(rows, out, inputs, groups, block, device, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    weight, scale = fp8_block_quantize(torch.randn(groups * out, inputs, generator=generator)
                                       * torch.rand(groups * out, 1, generator=generator), block)
    x = torch.randn(rows, groups * inputs, generator=generator).to(device, dtype)
    return x, weight.to(device), scale.float().to(device)


def _close(got, want, dtype):
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2              # bf16: the output's rounding
    torch.testing.assert_close(got.float(), want, atol=tolerance * want.abs().max().item(), rtol=tolerance)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fp8_gemv_matches_reference(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    for seed, (rows, out, inputs, groups, block) in enumerate(GEMV_CASES[device]):
        x, weight, scale = _layer(rows, out, inputs, groups, block, device, dtype, seed)
        want = fp8_linear_ref(x.float(), weight, scale, groups)
        for tiles in GEMV_TILES:
            if tiles is not None and out % tiles.block_n:
                continue
            counters = torch.zeros(groups * out, dtype=torch.int32, device=device)
            for _ in range(2):                      # the counters are back at zero: a second launch agrees
                got = fp8_gemv(x, weight, scale, groups, tiles, counters)
                assert got.shape == (rows, groups * out) and got.dtype == dtype
                _close(got, want, dtype)
            assert not counters.any()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fp8_matmul_matches_reference(device):
    """Many rows: the one-launch dequantization is exact, the product that of cuBLAS on it."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    for seed, (rows, out, inputs, groups, block) in enumerate(GEMM_CASES[device]):
        x, weight, scale = _layer(rows, out, inputs, groups, block, device, dtype, seed)
        assert torch.equal(fp8_dequantize_triton(weight, scale, dtype), fp8_block_dequantize(weight, scale, dtype))
        _close(fp8_matmul(x, weight, scale, groups), fp8_linear_ref(x.float(), weight, scale, groups), dtype)


def test_fp8_linear_module_reference_path_is_the_dequantized_linear():
    """Off the GPU the module's product is exactly F.linear with the dequantized weight (any leading dims);
    grouped, the block-diagonal product."""
    generator = torch.Generator().manual_seed(3)
    weight, scale = fp8_block_quantize(torch.randn(32, 64, generator=generator), (16, 32))
    dense = weight.float() * scale.float().repeat_interleave(16, 0).repeat_interleave(32, 1)
    for groups in (1, 2):
        layer = Fp8Linear(64, 32, (16, 32), groups=groups)
        layer.weight.data.copy_(weight)
        layer.scale.data.copy_(scale.float())
        x = torch.randn(2, 3, 64 * groups, generator=generator)
        if groups == 1:
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, dense), rtol=0, atol=0)
        else:
            want = torch.einsum("bsgi,goi->bsgo", x.view(2, 3, 2, 64), dense.view(2, 16, 64)).reshape(2, 3, 32)
            torch.testing.assert_close(layer(x), want)
        assert fp8_linear(x[0], layer.weight, layer.scale, groups).shape == (3, 32)


def test_grouped_reference_is_block_diagonal():
    generator = torch.Generator().manual_seed(1)
    weight, scale = fp8_block_quantize(torch.randn(2 * 16, 32, generator=generator), (8, 16))
    x = torch.randn(3, 64, generator=generator)
    full = fp8_linear_ref(x, weight, scale, 2)
    dense = fp8_linear_ref(x[:, 32:], weight[16:], scale[2:])
    torch.testing.assert_close(full[:, 16:], dense)
