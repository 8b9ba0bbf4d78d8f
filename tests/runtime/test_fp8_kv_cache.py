"""--kv-cache-dtype fp8: e4m3 K/V with a per-tensor scale. The kernels (write, fused QKV write, decode,
prefill) against the torch reference on an fp8 cache; every tiny model's logits with an fp8 cache against the
model-dtype cache through the engine; the cache holding twice the tokens; sliding layers kept at the model
dtype on request; checkpoint scales loaded.

On CPU the kernels run in Triton's interpreter at small sizes; the `gpu` tests run them compiled in bf16."""
from __future__ import annotations

import shutil

import pytest
import torch

from runtime import LLM, SamplingParams
from runtime.config import EngineConfig
from runtime.loader import kv_scale_target
from runtime.ops.attention import FP8_MAX, paged_attention_ref, to_cache_dtype, write_kv_ref
from runtime.ops.qkv import qkv_rope_write_kv_ref
from runtime.ops.rope import RotaryEmbedding
from tools.parity import _LogitRecorder, random_prompts

triton = pytest.importorskip("triton")

from runtime.ops.attention import paged_decode_triton, paged_prefill_triton, write_kv_triton  # noqa: E402
from runtime.ops.qkv import qkv_rope_write_kv_triton  # noqa: E402
from tests.runtime.test_attention_kernels import paged_case  # noqa: E402

FP8 = torch.float8_e4m3fn
GPU = torch.cuda.is_available()


def fp8_case(seq_lens, query_lens, num_heads, kv_heads, head_dim, page, dtype, device, seed=0):
    """paged_case with its cache quantized to e4m3 (K scaled by 0.5, V by 2: the scales must be applied)."""
    q, cache, table, starts, lens, sinks = paged_case(seq_lens, query_lens, num_heads, kv_heads, head_dim, page,
                                                      torch.float32, "cpu", seed)
    k_scale, v_scale = torch.tensor([0.5]), torch.tensor([2.0])
    fp8 = torch.stack([to_cache_dtype(cache[:, :, 0], FP8, k_scale), to_cache_dtype(cache[:, :, 1], FP8, v_scale)],
                      dim=2)
    to = lambda t: t.to(device)  # noqa: E731
    return (to(q.to(dtype)), to(fp8), to(table), to(starts), to(lens), to(sinks), to(k_scale), to(v_scale))


def test_fp8_store_saturates_and_scales():
    x = torch.tensor([1000.0, -1000.0, 1.0, 0.3])
    stored = to_cache_dtype(x, FP8, torch.tensor([2.0]))
    assert stored.dtype == FP8
    assert stored.float().tolist()[:2] == [FP8_MAX, -FP8_MAX]
    assert stored.float()[2].item() == 0.5
    assert to_cache_dtype(x, torch.bfloat16, torch.tensor([2.0])).float()[2].item() == 1.0   # scales: fp8 only


def test_reference_attention_dequantizes_fp8_cache():
    q, cache, table, starts, lens, sinks, k_scale, v_scale = fp8_case([9, 3], [2, 3], 4, 2, 16, 4, torch.float32,
                                                                      "cpu")
    wide = torch.stack([cache[:, :, 0].float() * k_scale, cache[:, :, 1].float() * v_scale], dim=2)
    expected = paged_attention_ref(q, wide, table, starts.tolist(), lens.tolist(), 0.25)
    out = paged_attention_ref(q, cache, table, starts.tolist(), lens.tolist(), 0.25, k_scale=k_scale,
                              v_scale=v_scale)
    torch.testing.assert_close(out, expected)


def e4m3_values(shape, scale: float, generator) -> torch.Tensor:
    """Random values that are e4m3 numbers times `scale` (some past the e4m3 range, which must saturate).
    Triton's interpreter rounds fp32 -> e4m3 wrongly (31.5 becomes 16: the carry into the exponent is lost,
    and ties round up), so interpreted kernels get inputs that need no rounding; the GPU tests use any."""
    x = (40 * torch.randn(shape, generator=generator)).to(FP8).float()
    x[0, 0, :3] = torch.tensor([600.0, -1000.0, 460.0])
    return x * scale


def write_kv_case(scaled: bool, device, dtype, representable: bool):
    generator = torch.Generator().manual_seed(3)
    scales = (torch.tensor([0.25]), torch.tensor([4.0])) if scaled else (None, None)
    if representable:
        k = e4m3_values((9, 2, 16), 0.25 if scaled else 1.0, generator)
        v = e4m3_values((9, 2, 16), 4.0 if scaled else 1.0, generator)
    else:
        k, v = 40 * torch.randn(9, 2, 16, generator=generator), torch.randn(9, 2, 16, generator=generator)
    slots = torch.tensor([3, -1, 0, 7, 12, 5, -1, 9, 1])
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(k.to(dtype)), to(v.to(dtype)), to(slots), [to(s) for s in scales]


@pytest.mark.parametrize("scaled", [False, True])
def test_write_kv_kernel_fp8_matches_reference_interpreted(scaled):
    k, v, slots, scales = write_kv_case(scaled, "cpu", torch.float32, representable=True)
    expected = torch.zeros(4, 4, 2, 2, 16, dtype=FP8)
    write_kv_ref(expected, k, v, slots, *scales)
    out = torch.zeros(4, 4, 2, 2, 16, dtype=FP8)
    write_kv_triton(out, k, v, slots, *scales)
    assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("scaled", [False, True])
def test_write_kv_kernel_fp8_matches_reference_gpu(scaled):
    k, v, slots, scales = write_kv_case(scaled, "cuda", torch.bfloat16, representable=False)
    expected = torch.zeros(4, 4, 2, 2, 16, dtype=FP8, device="cuda")
    write_kv_ref(expected, k, v, slots, *scales)
    out = torch.zeros_like(expected)
    write_kv_triton(out, k, v, slots, *scales)
    assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.gpu
def test_fused_qkv_write_fp8_matches_reference_gpu():
    generator = torch.Generator().manual_seed(4)
    heads, kv_heads, head_dim = 16, 8, 128
    qkv = torch.randn(37, (heads + 2 * kv_heads) * head_dim, generator=generator).to(torch.bfloat16).cuda()
    positions = torch.randint(0, 4096, (37,), generator=generator).cuda()
    slots = torch.randperm(64, generator=generator)[:37].cuda()
    slots[5] = -1
    rotary = RotaryEmbedding(1.0 / 1e6 ** (torch.arange(0, head_dim, 2).float() / head_dim), 4096, 1.0,
                             style="neox").cuda()
    norms = (1 + 0.3 * torch.randn(2, head_dim, generator=generator)).to(torch.bfloat16).cuda()
    scales = torch.tensor([0.05]).cuda(), torch.tensor([0.5]).cuda()
    expected = torch.zeros(4, 16, 2, kv_heads, head_dim, dtype=FP8, device="cuda")
    out = torch.zeros_like(expected)
    q_ref = qkv_rope_write_kv_ref(qkv, positions, rotary.cos_sin, "neox", expected, slots, heads, kv_heads, head_dim,
                                  norms[0], norms[1], 1e-6, *scales)
    q = qkv_rope_write_kv_triton(qkv, positions, rotary.cos_sin, "neox", out, slots, heads, kv_heads, head_dim,
                                 norms[0], norms[1], 1e-6, *scales)
    assert (q.float() - q_ref.float()).abs().max() <= 2 ** -6 * q_ref.float().abs().max()   # the norm's sum order
    differ = (out.view(torch.uint8) != expected.view(torch.uint8)).float().mean().item()
    assert differ < 1e-3, differ                 # the same one-unit bf16 ties, seen through e4m3 rounding


@pytest.mark.parametrize("variant", [dict(), dict(window=5, sinks=True, softcap=5.0)])
def test_fp8_decode_and_prefill_kernels_match_reference_interpreted(variant):
    seq_lens, query_lens = [6, 40, 19, 3], [6, 23, 1, 2]
    q, cache, table, starts, lens, sinks, k_scale, v_scale = fp8_case(seq_lens, query_lens, 4, 2, 32, 4,
                                                                      torch.float32, "cpu", seed=1)
    options = dict(variant, sinks=sinks if variant.get("sinks") else None)
    expected = paged_attention_ref(q, cache, table, starts.tolist(), seq_lens, 32 ** -0.5, k_scale=k_scale,
                                   v_scale=v_scale, **options)
    out = paged_prefill_triton(q, cache, table, starts, lens, max(query_lens), 32 ** -0.5, k_scale=k_scale,
                               v_scale=v_scale, **options)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    last = starts[1:] - 1                                          # each request's newest token: a decode step
    expected = paged_attention_ref(q[last], cache, table, list(range(5)), seq_lens, 32 ** -0.5, k_scale=k_scale,
                                   v_scale=v_scale, **options)
    for splits in (1, 3):
        out = paged_decode_triton(q[last], cache, table, lens, max(seq_lens), 32 ** -0.5, num_splits=splits,
                                  k_scale=k_scale, v_scale=v_scale, **options)
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


# ---- through the engine, every tiny model ------------------------------------------------------------

MODELS = [("qwen3", None), ("gpt_oss", None), ("gemma4", None)]     # gpt-oss stands for the MoE models


@pytest.fixture(scope="module")
def tiny_checkpoints(tiny_checkpoint):
    return {(arch, variant): tiny_checkpoint(arch, variant) for arch, variant in MODELS}


def prompt_logits(path, **options) -> dict[tuple[str, int], torch.Tensor]:
    """Logits at every prompt position of a few prompts (small blocks, chunked prefill), by (request, position)."""
    llm = LLM(str(path), device="cpu", skip_tokenizer_init=True, block_size=4, max_num_batched_tokens=32, **options)
    recorder = _LogitRecorder(llm.engine.runner)
    prompts = random_prompts(llm.engine.vocab_size, (5, 23, 61))
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    return {(request_id, position): logits.float() for request_id, position, logits in recorder.rows}


def logit_error(ours: dict, reference: dict) -> tuple[float, float, float]:
    """(median relative L2 error, min cosine, top-1 agreement) over the rows both computed."""
    rows = sorted(set(ours) & set(reference))
    assert len(rows) == 5 + 23 + 61
    errors = torch.stack([(ours[r] - reference[r]).norm() / reference[r].norm() for r in rows])
    cosines = torch.stack([torch.nn.functional.cosine_similarity(ours[r], reference[r], dim=0) for r in rows])
    top1 = sum(int(ours[r].argmax() == reference[r].argmax()) for r in rows) / len(rows)
    return errors.median().item(), cosines.min().item(), top1


@pytest.mark.parametrize("arch,variant", MODELS)
def test_fp8_cache_costs_what_its_mantissa_costs(tiny_checkpoints, arch, variant):
    """fp32 model, the logits of every prompt position with an fp8 and a bf16 cache against the fp32 cache.
    e4m3 keeps 3 mantissa bits to bf16's 7: a correct fp8 cache errs about 2^4 = 16 times as much as a bf16
    one (measured on the tiny Qwen3: median relative logit error fp16 0.0005, bf16 0.0041, fp8 0.065). A wrong
    scale, a lost sign or a misread entry costs far more. These tiny random models pass a cache's relative
    error straight into their logits, so the per-row cosine of fp8 is ~0.994-0.998 here, not 0.999 (the
    real-shape check of that bar runs on the GPU: tests/models/qwen3/test_qwen3_gpu.py). In MoE models a
    perturbed router input flips an expert now and then (a bf16 cache does it too), so there the median
    error is the measure."""
    path = tiny_checkpoints[(arch, variant)]
    reference = prompt_logits(path)
    bf16_error, bf16_cosine, bf16_top1 = logit_error(prompt_logits(path, kv_cache_dtype="bfloat16"), reference)
    fp8_error, fp8_cosine, fp8_top1 = logit_error(prompt_logits(path, kv_cache_dtype="fp8"), reference)
    print(f"{arch}/{variant}: bf16 cache err {bf16_error:.4f} cos {bf16_cosine:.5f} top1 {bf16_top1:.3f}; "
          f"fp8 cache err {fp8_error:.4f} cos {fp8_cosine:.5f} top1 {fp8_top1:.3f}")
    assert 0 < bf16_error and fp8_error <= 1.5 * 16 * bf16_error, (bf16_error, fp8_error)
    if variant != "moe" and arch != "gpt_oss":   # a router near a tie picks another expert: such rows move far
        assert fp8_cosine >= 0.99


def test_fp8_cache_doubles_capacity(tiny_checkpoints):
    path = tiny_checkpoints[("qwen3", None)]
    blocks = {}
    for kv_dtype in ("auto", "fp8"):
        llm = LLM(str(path), device="cpu", dtype="bfloat16", skip_tokenizer_init=True, block_size=16,
                  cpu_kv_cache_gib=0.01, kv_cache_dtype=kv_dtype)
        blocks[kv_dtype] = llm.engine.kv.pools[0].num_blocks
        assert str(llm.engine.kv.groups[0].spec.dtype) == ("torch.bfloat16" if kv_dtype == "auto" else str(FP8))
        assert ("float8_e4m3fn" in llm.engine.cache_report()) == (kv_dtype == "fp8")
    assert blocks["fp8"] in (2 * blocks["auto"], 2 * blocks["auto"] + 1), blocks


def test_skip_layers_keep_sliding_window_groups_at_model_dtype(tiny_checkpoints):
    path = tiny_checkpoints[("gpt_oss", None)]
    llm = LLM(str(path), device="cpu", skip_tokenizer_init=True, kv_cache_dtype="fp8",
              kv_cache_dtype_skip_layers=("sliding_window",))
    dtypes = {group.spec.window: group.spec.dtype for group in llm.engine.kv.groups}
    assert dtypes == {None: FP8, 8: torch.float32}


def test_kv_cache_dtype_options():
    assert EngineConfig(device="cpu", kv_cache_dtype="fp8_e4m3").kv_dtype() == FP8
    assert EngineConfig(device="cpu").kv_dtype(window=8) == torch.float32
    assert EngineConfig(device="cpu", kv_cache_dtype="fp8", kv_cache_dtype_skip_layers="sliding_window"
                        ).kv_dtype(window=8) == torch.float32
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineConfig(device="cpu", kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="skip_layers accepts"):
        EngineConfig(device="cpu", kv_cache_dtype_skip_layers=("full",))


def test_checkpoint_kv_scales_are_loaded(tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file
    assert kv_scale_target("model.layers.3.self_attn.k_proj.k_scale") == ("model.layers.3.self_attn", "k_scale")
    assert kv_scale_target("model.layers.3.self_attn.v_scale") == ("model.layers.3.self_attn", "v_scale")
    assert kv_scale_target("model.layers.3.self_attn.k_proj.weight") is None
    path = tmp_path / "scaled"
    shutil.copytree(tiny_checkpoints[("qwen3", None)], path)
    shard = next(path.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["model.layers.1.self_attn.k_proj.k_scale"] = torch.tensor(0.25)
    tensors["model.layers.1.self_attn.v_scale"] = torch.tensor(3.0)
    save_file(tensors, shard, metadata={"format": "pt"})
    llm = LLM(str(path), device="cpu", skip_tokenizer_init=True, kv_cache_dtype="fp8")
    layers = llm.engine.model.model.layers
    assert (layers[1].self_attn.k_scale.item(), layers[1].self_attn.v_scale.item()) == (0.25, 3.0)
    assert (layers[0].self_attn.k_scale.item(), layers[0].self_attn.v_scale.item()) == (1.0, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [dict(), dict(window=100, sinks=True), dict(softcap=30.0)])
def test_fp8_decode_and_prefill_kernels_match_reference_gpu(variant):
    """bf16 queries over an fp8 cache, ragged lengths across block boundaries, at real head sizes."""
    seq_lens, query_lens = [1, 17, 300, 1024, 77, 513], [1, 17, 45, 128, 1, 64]
    q, cache, table, starts, lens, sinks, k_scale, v_scale = fp8_case(seq_lens, query_lens, 16, 8, 128, 16,
                                                                      torch.bfloat16, "cuda", seed=7)
    options = dict(variant, sinks=sinks if variant.get("sinks") else None)
    scale = 128 ** -0.5
    expected = paged_attention_ref(q, cache, table, starts.tolist(), seq_lens, scale, k_scale=k_scale,
                                   v_scale=v_scale, **options)
    out = paged_prefill_triton(q, cache, table, starts, lens, max(query_lens), scale, k_scale=k_scale,
                               v_scale=v_scale, **options)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    last = starts[1:] - 1
    expected = paged_attention_ref(q[last], cache, table, list(range(len(seq_lens) + 1)), seq_lens, scale,
                                   k_scale=k_scale, v_scale=v_scale, **options)
    out = paged_decode_triton(q[last], cache, table, lens, max(seq_lens), scale, k_scale=k_scale, v_scale=v_scale,
                              **options)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
