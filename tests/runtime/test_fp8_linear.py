"""The FP8 block-scaled linear (runtime/ops/fp8.py) against its torch reference: the few-row GEMV (plain and
split-K, whose last program adds the partial sums) and the many-row dequantize + matmul, plain and
block-diagonal (grouped) weights, non-square blocks (a transposed scale grid would show), ragged row counts. In Triton's interpreter on
the CPU (fp32, small shapes); `-m gpu` at DeepSeek V4 Flash's shapes in bf16."""
from __future__ import annotations


import pytest
import torch

from runtime.ops.fp8 import Fp8Linear, fp8_block_quantize, fp8_linear, fp8_linear_ref

triton = pytest.importorskip("triton")

from runtime.ops.fp8 import (FP8_GEMV_MMA_MAX_ROWS, Fp8GemvTiles, fp8_act_quant, fp8_act_quant_ref,  # noqa: E402
                             fp8_block_dequantize, fp8_dequantize_triton, fp8_gemv, fp8_gemv_silu_mul, fp8_matmul,
                             fp8_silu_mul_ref, fp8_w8a8_matmul, fp8_w8a8_preferred, fp8_w8a8_ref, fp8_w8a8_supported)

# (rows, out per group, in, groups, [out, in] block)
GEMV_CASES = {
    "cpu": [(1, 64, 128, 1, (16, 32)), (3, 48, 64, 2, (8, 32)), (4, 32, 256, 4, (8, 32)), (2, 40, 192, 1, (8, 64))],
    "cuda": [(1, 1024, 4096, 1, (128, 128)), (1, 32768, 1024, 1, (128, 128)), (1, 1024, 4096, 8, (128, 128)),
             (4, 4096, 8192, 1, (128, 128)), (3, 512, 4096, 1, (128, 128)), (2, 2048, 4096, 1, (128, 128))],
}
# the table's tiles, the N-major layout (integer decode) and the K-major one (integer decode or the hardware's)
GEMV_TILES = {
    "cpu": [None, Fp8GemvTiles(8, 64, 1, 4), Fp8GemvTiles(4, 64, 3, 4), Fp8GemvTiles(16, 128, 8, 4),
            Fp8GemvTiles(8, 16, 2, 4), Fp8GemvTiles(8, 64, 1, 4, layout_k=True, vec=8),
            Fp8GemvTiles(4, 32, 3, 4, layout_k=True, vec=4, cvt=True),
            Fp8GemvTiles(16, 128, 2, 4, layout_k=True, vec=16, cvt=True)],
    "cuda": [None, Fp8GemvTiles(16, 512, 2, 4), Fp8GemvTiles(16, 1024, 2, 4, layout_k=True, vec=8, cvt=True),
             Fp8GemvTiles(8, 1024, 3, 4, layout_k=True, vec=8), Fp8GemvTiles(4, 256, 1, 4, layout_k=True, vec=4,
                                                                             cvt=True)],
}
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
        for tiles in GEMV_TILES[device]:
            if tiles is not None and out % tiles.block_n:
                continue
            counters = torch.zeros(groups * out, dtype=torch.int32, device=device)
            for _ in range(2):                      # the counters are back at zero: a second launch agrees
                got = fp8_gemv(x, weight, scale, groups, tiles, counters)
                assert got.shape == (rows, groups * out) and got.dtype == dtype
                _close(got, want, dtype)
            assert not counters.any()


# the tensor-core GEMV: (rows, out per group, in, groups, [out, in] block, tiles); odd step counts (the loop's
# second operand set past the end), splits that do not divide the steps, 1-8 rows, 256-wide K blocks
MMA_CASES = {
    "cpu": [(1, 64, 384, 1, (64, 128), Fp8GemvTiles(64, split_k=1, num_warps=4, mma=True)),
            (3, 32, 640, 2, (32, 128), Fp8GemvTiles(32, split_k=2, num_warps=2, mma=True)),
            (8, 128, 512, 1, (128, 256), Fp8GemvTiles(32, split_k=3, num_warps=2, mma=True)),
            (5, 48, 256, 1, (16, 128), Fp8GemvTiles(16, split_k=1, num_warps=1, mma=True)),
            (2, 40, 256, 1, (8, 128), Fp8GemvTiles(16, split_k=1, num_warps=1, mma=True))],     # falls back
    "cuda": [(1, 1024, 4096, 1, (128, 128), Fp8GemvTiles(64, split_k=8, num_warps=4, mma=True)),
             (1, 32768, 1024, 1, (128, 128), Fp8GemvTiles(128, split_k=1, num_warps=8, mma=True)),
             (8, 1024, 4096, 8, (128, 128), Fp8GemvTiles(128, split_k=2, num_warps=8, mma=True)),
             (3, 4096, 8192, 1, (128, 128), Fp8GemvTiles(64, split_k=5, num_warps=4, mma=True)),
             (6, 512, 4096, 1, (128, 128), Fp8GemvTiles(64, split_k=16, num_warps=4, mma=True))],
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fp8_gemv_tensor_core_matches_reference(device):
    """bf16 activations (the mma's B operand); on the CPU the interpreter runs its emulation of the mma."""
    for seed, (rows, out, inputs, groups, block, tiles) in enumerate(MMA_CASES[device]):
        x, weight, scale = _layer(rows, out, inputs, groups, block, device, torch.bfloat16, seed)
        want = fp8_linear_ref(x.float(), weight, scale, groups)
        counters = torch.zeros(groups * out, dtype=torch.int32, device=device)
        for _ in range(2):
            got = fp8_gemv(x, weight, scale, groups, tiles, counters)
            assert got.shape == (rows, groups * out) and got.dtype == torch.bfloat16
            _close(got, want, torch.bfloat16)
        assert not counters.any()


# silu_mul_output: (rows, out of each half, in, [out, in] block, tiles, limit); one launch where a program's rows
# divide a half (split or not), else the GEMV then silu_mul (the last CPU case: 48-row halves, 32-row programs)
SILU_MUL_CASES = {
    "cpu": [(1, 64, 256, (64, 128), Fp8GemvTiles(64, split_k=1, num_warps=4, mma=True), None),
            (3, 32, 384, (32, 128), Fp8GemvTiles(32, split_k=2, num_warps=2, mma=True), 0.75),
            (8, 32, 256, (16, 128), Fp8GemvTiles(16, split_k=3, num_warps=1, mma=True), 1.5),
            (2, 48, 256, (16, 128), Fp8GemvTiles(32, split_k=1, num_warps=2, mma=True), 0.5)],
    "cuda": [(1, 2048, 4096, (128, 128), None, 10.0), (1, 2048, 4096, (128, 128), None, None),
             (5, 1024, 4096, (128, 128), Fp8GemvTiles(64, split_k=16, num_warps=4, mma=True), 10.0),
             (2, 2048, 4096, (128, 128), Fp8GemvTiles(128, split_k=1, num_warps=8, mma=True), 0.5)],
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fp8_gemv_silu_mul_matches_reference(device):
    """The gate and up halves' sums paired by the last of their programs, rounded as two linears' outputs, then
    the (clamped) SwiGLU; the arrival counters are back at zero after each launch."""
    for seed, (rows, half, inputs, block, tiles, limit) in enumerate(SILU_MUL_CASES[device]):
        x, weight, scale = _layer(rows, 2 * half, inputs, 1, block, device, torch.bfloat16, seed)
        x = x * 4                                                  # sums past a small limit
        want = fp8_silu_mul_ref(x, weight, scale, limit)
        counters = torch.zeros(2 * half, dtype=torch.int32, device=device)
        for _ in range(2):
            got = fp8_gemv_silu_mul(x, weight, scale, limit, tiles, counters)
            assert got.shape == (rows, half) and got.dtype == torch.bfloat16
            torch.testing.assert_close(got.float(), want.float(), atol=2e-2 * want.abs().max().item(), rtol=2e-2)
        assert not counters.any()
        if limit is not None and limit < 1:
            assert (want.float().abs() <= limit * limit + 1e-2).all()       # the clamps bite
    assert fp8_linear(x, weight, scale, silu_mul_output=True, limit=limit).shape == (rows, half)


@pytest.mark.gpu
def test_fp8_gemv_tensor_core_decodes_every_code_exactly():
    """Row i holds E4M3 code i once (NaNs zeroed), at column 37 i mod 128: each output is one product, so it is
    the reference's rounding of it exactly, for every code (subnormals included), column position and row."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0
    weight = torch.zeros(256, 128, dtype=torch.uint8)
    weight[torch.arange(256), (torch.arange(256) * 37) % 128] = codes
    weight = weight.view(torch.float8_e4m3fn).cuda()
    scale = torch.tensor([[0.125], [4.0]], device="cuda")
    for rows in (1, 3, 8):
        x = torch.randn(rows, 128, device="cuda").to(torch.bfloat16)
        want = fp8_linear_ref(x.float(), weight, scale).to(torch.bfloat16)
        for tiles in (Fp8GemvTiles(64, split_k=1, num_warps=4, mma=True),
                      Fp8GemvTiles(128, split_k=1, num_warps=8, mma=True),
                      Fp8GemvTiles(32, split_k=1, num_warps=2, mma=True)):
            assert torch.equal(fp8_gemv(x, weight, scale, 1, tiles), want)


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


ACT_QUANT_CASES = [(1, 128, 1, 128, None), (5, 384, 1, 128, 16), (7, 256, 2, 128, 8), (3, 96, 3, 32, 4),
                   (9, 64 * 6, 2, 64, 9)]                          # (rows, width, groups, block_in, m_pad)


def _act_rows(rows, width, seed):
    """Rows whose magnitudes span many powers of two, a zero row, an exact 448 * 2^e block maximum."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=generator) * torch.exp2(torch.randint(-12, 12, (rows, 1),
                                                                                generator=generator).float())
    x[0, :16] = 0.0 if rows > 2 else x[0, :16]
    x[-1] = 0.0 if rows > 1 else x[-1]
    x[0, 1] = 448.0 * 2.0 ** -3 if rows > 2 else x[0, 1]
    return x


def test_fp8_act_quant_ref_scales_are_powers_of_two():
    x = _act_rows(6, 256, 0)
    q, scale = fp8_act_quant_ref(x)
    mantissa, _ = torch.frexp(scale)
    assert (mantissa == 0.5).all() and scale[-1].eq(2.0 ** -22).all()       # a zero row: amax 1e-4
    blocks = x.view(6, 2, 128).abs().amax(-1)
    assert (blocks <= 448 * scale).all() and ((blocks.clamp(min=1e-4) > 224 * scale) | (blocks == 0)).all()
    assert q.float().abs().max() <= 448


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fp8_act_quant_matches_reference(device):
    """The Triton quantization is exact: the reference's E4M3 bytes in each group's slab, its scales column-major,
    padding rows zero (scale 2^-22)."""
    for seed, (rows, width, groups, block_in, m_pad) in enumerate(ACT_QUANT_CASES):
        x = _act_rows(rows, width, seed)
        for dtype in (torch.float32, torch.bfloat16):
            x_in = x.to(dtype)
            want_q, want_s = fp8_act_quant_ref(x_in, block_in)
            q, scales = fp8_act_quant(x_in.to(device), groups, m_pad, block_in)
            pad = rows if m_pad is None else m_pad
            assert q.shape == (groups, pad, width // groups) and scales.shape == (width // block_in, pad)
            q, scales = q.cpu(), scales.cpu()
            assert torch.equal(q[:, :rows].transpose(0, 1).reshape(rows, width).view(torch.uint8),
                               want_q.view(torch.uint8))
            assert torch.equal(scales[:, :rows].t(), want_s)
            assert not q[:, rows:].float().any() and scales[:, rows:].eq(2.0 ** -22).all()


def test_fp8_act_quant_rounds_ties_and_subnormals_like_the_cast():
    """A block whose maximum is 448 (scale 1): ties to even, mantissas that round up into the next power of two,
    subnormals (multiples of 2^-9) and their ties, negative values that round to -0."""
    values = [448.0, 432.0, 31.5, -31.5, 30.5, 15.9, 0.0146, 2.0 ** -10, 3 * 2.0 ** -10, -2.0 ** -11, -1e-30,
              2.0 ** -6 - 2.0 ** -12, 5.5 * 2.0 ** -9, 6.5 * 2.0 ** -9, 1.0 + 2.0 ** -4, 1.0 + 3 * 2.0 ** -4]
    x = torch.zeros(2, 128)
    x[0, :len(values)] = torch.tensor(values)
    x[1] = -x[0]
    q, scales = fp8_act_quant(x, 1, 2)
    assert scales.eq(1.0).all()
    assert torch.equal(q[0].view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8))


# (rows, out per group, in, groups): ragged rows (padded to 16 for the GEMM), DeepSeek V4 Flash's shapes on the GPU
W8A8_CASES = {
    "cpu": [(5, 256, 384, 1), (17, 128, 256, 3), (2, 128, 128, 1)],
    "cuda": [(5, 1024, 4096, 1), (16, 32768, 1024, 1), (33, 1024, 4096, 8), (300, 4096, 8192, 1),
             (2048, 512, 4096, 1), (7, 4096, 2048, 1), (129, 1024, 4096, 8)],
}


def _scaled_mm_emulated(a, b, scale_a, scale_b, out_dtype):
    """torch._scaled_mm's 1 x 128 / 128 x 128 block-scaled product in fp32, with the layouts cuBLAS takes (a
    row-major, b column-major, scale_a column-major, scale_b a transposed contiguous grid)."""
    (m, k), n = a.shape, b.shape[1]
    assert a.is_contiguous() and b.stride(0) == 1 and b.stride(1) == k
    assert scale_a.shape == (m, k // 128) and scale_a.stride() == (1, m)
    assert scale_b.shape == (k // 128, n // 128) and scale_b.stride() == (1, k // 128)
    a_full = a.float() * scale_a.repeat_interleave(128, 1)
    b_full = b.float() * scale_b.repeat_interleave(128, 0).repeat_interleave(128, 1)
    return (a_full @ b_full).to(out_dtype)


def test_fp8_w8a8_matmul_layouts_with_an_emulated_gemm(monkeypatch):
    """On the CPU, torch._scaled_mm replaced by its fp32 emulation that checks the operand layouts: the quantized
    activations, their scales and each group's slices reach the GEMM as it takes them, and give the reference."""
    monkeypatch.setattr(torch, "_scaled_mm", lambda a, b, scale_a, scale_b, out_dtype:
                        _scaled_mm_emulated(a, b, scale_a, scale_b, out_dtype), raising=False)
    for seed, (rows, out, inputs, groups) in enumerate(W8A8_CASES["cpu"]):
        x, weight, scale = _layer(rows, out, inputs, groups, (128, 128), "cpu", torch.float32, seed)
        got = fp8_w8a8_matmul(x, weight, scale, groups)
        assert got.shape == (rows, groups * out)
        torch.testing.assert_close(got, fp8_w8a8_ref(x, weight, scale, groups), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_fp8_w8a8_matmul_matches_reference():
    """cuBLAS's block-scaled FP8 GEMM on the activations quantized per 1 x 128 against the torch reference of the
    same quantization (bf16 output rounding); `fp8_linear` takes it past the GEMV's rows where preferred. Its
    distance to the unquantized activations is the activations' E4M3 rounding (printed)."""
    for seed, (rows, out, inputs, groups) in enumerate(W8A8_CASES["cuda"]):
        x, weight, scale = _layer(rows, out, inputs, groups, (128, 128), "cuda", torch.bfloat16, seed)
        assert fp8_w8a8_supported(x, weight, scale)
        want = fp8_w8a8_ref(x.float(), weight, scale, groups)
        got = fp8_w8a8_matmul(x, weight, scale, groups)
        assert got.shape == (rows, groups * out) and got.dtype == torch.bfloat16
        _close(got, want, torch.bfloat16)
        unquantized = fp8_linear_ref(x.float(), weight, scale, groups)
        print(f"W8A8 {rows}x{groups * inputs} -> {groups * out}: rel. distance to unquantized activations "
              f"{((got.float() - unquantized).norm() / unquantized.norm()).item():.2e}")
        if rows > FP8_GEMV_MMA_MAX_ROWS and fp8_w8a8_preferred(rows, groups * out, inputs, groups):
            assert torch.equal(fp8_linear(x, weight, scale, groups), got)      # up to 8 rows the GEMV takes it


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True])
def test_fp8_gemv_dependent_launch_in_a_graph(monkeypatch, pdl):
    """With and without programmatic dependent launch: a chain of dependent GEMVs (each one's output the next
    one's input, split-K partials and SwiGLU arrivals, the SwiGLU one on a side stream, an elementwise kernel
    between two of them) replayed from a CUDA graph with new inputs equals the same chain run eagerly in plain
    stream order, bit for bit, and every arrival counter is back at zero."""
    import runtime.ops.fp8 as fp8

    shapes = [(2048, 1024, None), (4096, 2048, "silu"), (2048, 2048, None), (1024, 2048, "add"), (2048, 1024, None)]
    layers = []
    for seed, (out, inputs, kind) in enumerate(shapes):
        x, weight, scale = _layer(1, out, inputs, 1, (128, 128), "cuda", torch.bfloat16, seed)
        layers.append((weight, scale, kind, torch.zeros(out, dtype=torch.int32, device="cuda")))

    side = torch.cuda.Stream()

    def chain(x, tiles):
        for weight, scale, kind, counters in layers:
            if kind == "silu":                          # on a side stream, as the model's shared expert
                main = torch.cuda.current_stream()
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    x = fp8_gemv_silu_mul(x, weight, scale, 10.0, tiles[0], counters)
                main.wait_stream(side)
                x.record_stream(main)
            else:
                x = fp8_gemv(x, weight, scale, 1, tiles[1], counters)
                if kind == "add":
                    x = x + 1.0
        return x

    plain = (Fp8GemvTiles(64, split_k=4, num_warps=4, mma=True), Fp8GemvTiles(128, split_k=2, num_warps=8, mma=True))
    inputs = [torch.randn(rows, 1024, device="cuda").to(torch.bfloat16) for rows in (1, 1, 3)]
    monkeypatch.setattr(fp8, "FP8_GEMV_PDL", False)
    wants = [chain(x, plain) for x in inputs]
    monkeypatch.setattr(fp8, "FP8_GEMV_PDL", pdl)
    for x, want in zip(inputs, wants):
        assert torch.equal(chain(x, plain), want)
    static = inputs[0].clone()
    chain(static, plain)                                             # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = chain(static, plain)
    for x, want in zip(inputs[:2], wants[:2]):
        static.copy_(x)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(result, want)
    assert all(not counters.any() for *_, counters in layers)
