"""mHC's head (the streams collapsed once after the last layer): kernels.hc_head against mhc.HyperHead's torch
path on random, ragged inputs (hidden sizes past a chunk's end, 1-5 tokens), in Triton's interpreter on the CPU
and in bf16 at the Flash shape on the GPU."""
from __future__ import annotations

import pytest
import torch

from models.deepseek_v4 import kernels
from models.deepseek_v4.mhc import HyperHead

pytest.importorskip("triton")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_hc_head_kernel_matches_reference(device, monkeypatch):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    shapes = ((320, 3), (96, 1), (64, 5)) if device == "cpu" else ((4096, 1), (4096, 3))      # (hidden, tokens)
    for seed, (hidden, tokens) in enumerate(shapes):
        class _Config:
            hc_mult, hc_eps, rms_norm_eps, hidden_size = 4, 1e-6, 1e-6, hidden

        generator = torch.Generator().manual_seed(seed)
        head = HyperHead(_Config())
        with torch.no_grad():
            head.fn.copy_(torch.randn(head.fn.shape, generator=generator) * 0.1)
            head.base.copy_(torch.randn(head.base.shape, generator=generator))
            head.scale.copy_(torch.rand(1, generator=generator) + 0.5)
        head = head.to(device)
        streams = (torch.randn(tokens, 4, hidden, generator=generator) * 3).to(device, dtype)
        with monkeypatch.context() as patch:
            patch.setattr(kernels, "use_kernels", lambda x: False)          # the torch path
            want = head(streams)
        got = kernels.hc_head(streams, head.fn, head.base, head.scale, 1e-6, 1e-6)
        assert got.shape == (tokens, hidden) and got.dtype == dtype
        tolerance = 1e-5 if dtype == torch.float32 else 8e-3            # bf16: one rounding of the output
        torch.testing.assert_close(got.float(), want.float(), atol=tolerance * want.abs().max().item(),
                                   rtol=tolerance)
        # the rows are independent: one token alone gives its row of the batch
        torch.testing.assert_close(kernels.hc_head(streams[-1:], head.fn, head.base, head.scale, 1e-6, 1e-6),
                                   got[-1:], rtol=0, atol=0)
