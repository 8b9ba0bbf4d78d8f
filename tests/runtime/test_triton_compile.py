"""Triton kernels of the runtime compiled for Hopper (sm_90) on a machine without a GPU (see tests/triton_compile.py):
every variant below must compile, in one process of its own."""
from __future__ import annotations

import pytest

from tests.triton_compile import Case, compile_for_hopper

pytest.importorskip("triton")

SAMPLING_TYPES = {
    "logits_ptr": "*fp32", "temperature_ptr": "*fp32", "top_p_ptr": "*fp32", "min_p_ptr": "*fp32",
    "excluded_prob_out": "*fp32", "part_max_ptr": "*fp32", "part_arg_ptr": "*i32", "part_z_ptr": "*fp32",
    "part_count_ptr": "*i32", "part_mass_ptr": "*fp32", "part_race_ptr": "*fp32", "part_winner_ptr": "*i32",
    "part_excluded_ptr": "*fp32", "cand_val_ptr": "*fp32", "cand_id_ptr": "*i32", "greedy_below": "fp32",
    "random_out": "*i64", "greedy_out": "*i64", "out_ptr": "*i64",
}
LEVELS = dict(NUM_LEVELS=32, LEVEL_SHIFT=16)
MXFP4_GEMV_TYPES = {
    "x_ptr": "*bf16", "h_ptr": "*bf16", "words_ptr": "*i32", "scales_ptr": "*u8", "bias_ptr": "*fp32",
    "out_ptr": "*bf16", "weights_ptr": "*bf16", "ids_ptr": "*i64", "alpha": "fp32", "limit": "fp32",
    "up_offset": "fp32",
}
GATE_UP, DOWN = "_mxfp4_gemv_gate_up_kernel", "_mxfp4_gemv_down_kernel"

# (case id) -> (case, a string its PTX must contain, a string it must not)
CASES = {
    "sampling-chunk-max": (Case("runtime.ops.sampling", "_chunk_max_kernel", dict(CHUNK=4096, BLOCK=1024),
                                SAMPLING_TYPES), None, None),
    "sampling-chunk-levels": (Case("runtime.ops.sampling", "_chunk_levels_kernel",
                                   dict(CHUNKS_P2=64, CHUNK=4096, LEVEL_BLOCK=128, LEVEL_STEPS=6, **LEVELS),
                                   SAMPLING_TYPES), None, None),
    "sampling-chunk-gather": (Case("runtime.ops.sampling", "_chunk_gather_kernel",
                                   dict(CHUNKS_P2=64, CHUNK=4096, BLOCK=1024, CAP=1024, **LEVELS), SAMPLING_TYPES),
                              None, None),
    "sampling-draw": (Case("runtime.ops.sampling", "_sample_rows_kernel",
                           dict(CHUNKS_P2=64, BLOCK=1024, CAP=1024, **LEVELS), SAMPLING_TYPES), None, None),
    "sampling-greedy": (Case("runtime.ops.sampling", "_greedy_kernel", dict(CHUNKS_P2=256), SAMPLING_TYPES),
                        None, None),
}
# the PTX decode never runs in the interpreter: compiling it is the CPU-side check that ptxas takes it
for ptx_decode in (True, False):
    marks = ("shl.b32 a, ", None) if ptx_decode else (None, "shl.b32 a, ")
    for name, kernel, constexprs in (
            ("gate-up-bias-limit", GATE_UP, dict(HAS_BIAS=True, HAS_LIMIT=True, INTERLEAVED=True, BLOCK_N=8,
                                                 BLOCK_G=8, PREFETCH=True)),
            ("gate-up-plain", GATE_UP, dict(HAS_BIAS=False, HAS_LIMIT=True, INTERLEAVED=False, BLOCK_N=16,
                                            BLOCK_G=8, PREFETCH=False)),
            ("down", DOWN, dict(HAS_BIAS=True, BLOCK_N=8, BLOCK_G=32, PREFETCH=True))):
        CASES[f"mxfp4-{name}-{'ptx' if ptx_decode else 'triton'}-decode"] = (
            Case("runtime.ops.mxfp4", kernel, dict(constexprs, PTX_DECODE=ptx_decode), MXFP4_GEMV_TYPES), *marks)
ROUTING_TYPES = {"logits_ptr": "*bf16", "scale_ptr": "*fp32", "bias_ptr": "*fp32", "fixed_ids_ptr": "*i64",
                 "weights_ptr": "*bf16", "ids_ptr": "*i64", "renorm_eps": "fp32", "scaling": "fp32"}
for name, constexprs in (("softmax", dict(SCORE=0, RENORMALIZE=True, HAS_BIAS=False, FIXED_IDS=False, ROUND=False)),
                         ("softmax-after-topk", dict(SCORE=1, RENORMALIZE=False, HAS_BIAS=False, FIXED_IDS=False,
                                                     ROUND=False)),
                         ("sqrtsoftplus-bias", dict(SCORE=3, RENORMALIZE=True, HAS_BIAS=True, FIXED_IDS=False, ROUND=True)),
                         ("sqrtsoftplus-table", dict(SCORE=3, RENORMALIZE=True, HAS_BIAS=False, FIXED_IDS=True,
                                                     ROUND=True))):
    CASES[f"route-topk-{name}"] = (
        Case("runtime.ops.moe", "_route_topk_kernel", dict(constexprs, TOP_K=6, HAS_SCALE=False, BLOCK_E=256,
                                                           BLOCK_TOP_K=8), ROUTING_TYPES), None, None)

FP8_TYPES = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp32", "out_ptr": "*bf16", "part_ptr": "*fp32",
             "count_ptr": "*i32"}
FP8_N_MAJOR = dict(LAYOUT_K=False, W=2, CVT_DECODE=False, INTERPRET_DECODE=False, SHARED_SCALE=False, X_PACKED=0)
for split in (1, 4):
    CASES[f"fp8-gemv-split{split}"] = (
        Case("runtime.ops.fp8", "_fp8_gemv_kernel", dict(BLOCK_OUT=128, BLOCK_IN=128, BLOCK_M=1, BLOCK_N=16,
                                                        BLOCK_K=512, SPLIT_K=split, **FP8_N_MAJOR), FP8_TYPES),
        "atom" if split > 1 else None, None)
for rows in (2, 4):
    CASES[f"fp8-gemv-{rows}-rows"] = (Case("runtime.ops.fp8", "_fp8_gemv_kernel", dict(
        BLOCK_OUT=128, BLOCK_IN=128, BLOCK_M=rows, BLOCK_N=8, BLOCK_K=256, SPLIT_K=2, **FP8_N_MAJOR), FP8_TYPES),
        None, None)
for rows, split, cvt in ((1, 1, True), (1, 4, True), (4, 2, True), (2, 1, False)):
    CASES[f"fp8-gemv-k-major-{'cvt' if cvt else 'int'}-{rows}-rows-split{split}"] = (
        Case("runtime.ops.fp8", "_fp8_gemv_kernel", dict(
            BLOCK_OUT=128, BLOCK_IN=128, BLOCK_M=rows, BLOCK_N=8, BLOCK_K=1024, SPLIT_K=split, LAYOUT_K=True, W=2,
            CVT_DECODE=cvt, INTERPRET_DECODE=False, SHARED_SCALE=True, X_PACKED=1), FP8_TYPES),
        "cvt.rn.f16x2.e4m3x2" if cvt else None, None if cvt else "cvt.rn.f16x2.e4m3x2")
for name, x_type in (("bf16", "*bf16"), ("fp32", "*fp32")):
    CASES[f"fp8-act-quant-{name}"] = (Case("runtime.ops.fp8", "_fp8_act_quant_kernel", dict(
        BLOCK_IN=128, BLOCK_M=4, BLOCKS=8), dict(x_ptr=x_type, q_ptr="*fp8e4nv", s_ptr="*fp32")), None, None)
CASES["fp8-dequantize"] = (Case("runtime.ops.fp8", "_fp8_dequantize_kernel", dict(
    BLOCK_OUT=128, BLOCK_IN=128, BLOCK_R=32, BLOCK_C=256), dict(FP8_TYPES, w_ptr="*fp8e4nv")), None, None)

DECODE_TYPES = {"q_ptr": "*bf16", "cache_ptr": "*bf16", "table_ptr": "*i32", "seq_lens_ptr": "*i32",
                "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32",
                "scale": "fp32", "softcap": "fp32"}
DECODE = dict(GROUP=4, BLOCK_G=16, HEAD_DIM=128, BLOCK_D=128, PAGE=16, HAS_WINDOW=False, HAS_SOFTCAP=False)
CASES["decode-attention-bf16"] = (Case("runtime.ops.attention", "_decode_kernel", dict(
    DECODE, BLOCK_N=64, HAS_KV_SCALE=False, FP16_DOT=False), DECODE_TYPES), None, None)
for fp16 in (False, True):     # fp8 entries widened to fp16: one hardware conversion per pair
    CASES[f"decode-attention-fp8{'-fp16-dot' if fp16 else ''}"] = (Case("runtime.ops.attention", "_decode_kernel", dict(
        DECODE, BLOCK_N=128, HAS_KV_SCALE=True, FP16_DOT=fp16), dict(DECODE_TYPES, cache_ptr="*fp8e4nv")),
        "cvt.rn.f16x2.e4m3x2" if fp16 else None, None)
# the tensor-core FP8 GEMV (its inline asm never runs in the interpreter): both pair decodes, split-K
for warps, split, prmt in ((4, 1, True), (8, 4, False)):
    CASES[f"fp8-gemv-mma-w{warps}-split{split}{'-prmt' if prmt else ''}"] = (
        Case("runtime.ops.fp8", "_fp8_gemv_mma_kernel", dict(
            BLOCK_OUT=128, BLOCK_IN=128, WARPS=warps, SPLIT_K=split, EMULATE=False, PRMT=prmt),
            dict(FP8_TYPES, x_ptr="*i32")), "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32", None)

@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    results = compile_for_hopper([case for case, _, _ in CASES.values()])
    return dict(zip(CASES, results))


@pytest.mark.parametrize("case_id", CASES)
def test_kernel_compiles_for_hopper(case_id, compiled):
    case, must_have, must_not_have = CASES[case_id]
    result = compiled[case_id]
    assert result["error"] is None, result["error"]
    assert f".entry {case.kernel}" in result["ptx"]
    if must_have:
        assert must_have in result["ptx"]
    if must_not_have:
        assert must_not_have not in result["ptx"]

# the explicit-layout (Gluon) MXFP4 GEMVs: the fused word-dot PTX, the split down GEMV's arrival counter, and no
# barrier inside the K loop (the only bar.sync are the split's, after it)
MXFP4_GL_TYPES = dict(MXFP4_GEMV_TYPES, count_ptr="*i32", part_ptr="*fp32")
for name, kernel, constexprs, warps in (
        ("gate-up-bf16", "_gl_gate_up_kernel", dict(HAS_BIAS=True, HAS_LIMIT=True, INTERLEAVED=True, BLOCK_N=16, GV=32,
                                                    X_PACKED=1), 4),
        ("gate-up-fp32-halves", "_gl_gate_up_kernel", dict(HAS_BIAS=False, HAS_LIMIT=True, INTERLEAVED=False,
                                                          BLOCK_N=8, GV=16, X_PACKED=0), 4),
        ("down-split", "_gl_down_kernel", dict(HAS_BIAS=True, BLOCK_N=16, GV=32, X_PACKED=1, SPLIT=4), 4),
        ("down-one-warp", "_gl_down_kernel", dict(HAS_BIAS=False, BLOCK_N=4, GV=32, X_PACKED=1, SPLIT=1), 1)):
    CASES[f"mxfp4-gluon-{name}"] = (
        Case("runtime.ops.mxfp4", kernel, dict(constexprs, NUM_WARPS=warps), MXFP4_GL_TYPES, {"num_warps": warps}),
        "mul.lo.u32 p, t, 4160", None)


def test_gluon_mxfp4_split_down_synchronizes_only_after_its_loop(compiled):
    ptx = compiled["mxfp4-gluon-down-split"]["ptx"]
    assert "atom.global.gpu.acq_rel.add" in ptx
    last_weight_load = ptx.rindex("evict_first")                   # the K loop's last word load
    assert "bar.sync" in ptx and "bar.sync" not in ptx[:last_weight_load]
    assert "bar.sync" not in compiled["mxfp4-gluon-down-one-warp"]["ptx"]


# The fp8 decode attention read as int32 words into fp16 dots, compiled as a launch specializes it (pointers and
# strides multiples of 16): K/V words load 16 bytes at a time into registers (prefetched by hand, no cp.async), the
# bytes widen in hardware pairs, V is transposed by ldmatrix, q and p stay 16-bit operands, and no shared-memory
# byte loads are left (the old path had 128 a step).
DECODE_DIVISIBLE = ("q_ptr", "cache_ptr", "table_ptr", "seq_lens_ptr", "part_acc_ptr", "part_ml_ptr", "k_scale_ptr",
                    "v_scale_ptr", "q_stride_t", "q_stride_h", "block_stride", "token_stride", "kv_stride",
                    "head_stride")
FP8_WORDS_DECODE = []
for dim, block_n, softcap in ((128, 64, False), (128, 128, False), (96, 32, True), (64, 64, False)):
    case_id = f"decode-attention-fp8-words-dim{dim}-keys{block_n}{'-softcap' if softcap else ''}"
    CASES[case_id] = (Case("runtime.ops.attention", "_decode_kernel", dict(
        DECODE, HEAD_DIM=dim, BLOCK_D=128 if dim > 64 else 64, BLOCK_N=block_n, HAS_WINDOW=softcap,
        HAS_SOFTCAP=softcap, HAS_KV_SCALE=True, FP16_DOT=True, ASM=True),
        dict(DECODE_TYPES, cache_ptr="*fp8e4nv"), options=dict(num_warps=4, num_stages=1),
        divisible_by_16=DECODE_DIVISIBLE),
        "cvt.rn.f16x2.e4m3x2", "ld.shared.b8")
    FP8_WORDS_DECODE.append(case_id)
CASES["decode-attention-fp8-words-ahead2"] = (Case("runtime.ops.attention", "_decode_kernel", dict(
    DECODE, BLOCK_N=32, HAS_KV_SCALE=True, FP16_DOT=True, ASM=True, AHEAD=2), dict(DECODE_TYPES,
    cache_ptr="*fp8e4nv"), options=dict(num_warps=2, num_stages=1), divisible_by_16=DECODE_DIVISIBLE),
    "cvt.rn.f16x2.e4m3x2", "cp.async")


@pytest.mark.parametrize("case_id", FP8_WORDS_DECODE)
def test_fp8_decode_attention_widens_words_in_registers(case_id, compiled):
    ptx = compiled[case_id]["ptx"]
    assert "ld.global.v4.b32" in ptx and "cp.async" not in ptx
    assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in ptx
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in ptx
    assert "ld.shared.b8" not in ptx and "ld.shared.u8" not in ptx


# The MXFP4 decode GEMVs on the tensor cores: 16-byte word and activation loads, 8 mma a K step (4 words of two rows),
# the scale applied by mul.bf16x2, and no barrier before the split's arrival (none at all without a split).
MXFP4_MMA_TYPES = dict(MXFP4_GL_TYPES, x_ptr="*i32", words_ptr="*i32")
# (as gpt-oss-20b launches them: a weight row is 90 blocks, so its strides are not multiples of 16; the asm's
# [32 W, 4] operands keep a row a lane, 4 words in its registers, only while the word loads stay 16-byte vectors)
MXFP4_MMA_DIVISIBLE = ("h_ptr", "words_ptr", "scales_ptr", "part_ptr", "K", "N", "stride_be", "stride_se")
MXFP4_MMA_DIVISIBLE_BY_KERNEL = {"_mxfp4_mma_gate_up_kernel": ("x_ptr", "stride_xw", "stride_hm"),
                                 "_mxfp4_mma_down_kernel": ("out_ptr", "stride_hw", "stride_om")}
MXFP4_MMA = {
    "mxfp4-mma-gate-up-split": ("_mxfp4_mma_gate_up_kernel", dict(HAS_BIAS=True, HAS_LIMIT=True, INTERLEAVED=True,
                                                                  WARPS=4, SPLIT_K=4), dict(h_ptr="*bf16")),
    "mxfp4-mma-gate-up-halves": ("_mxfp4_mma_gate_up_kernel", dict(HAS_BIAS=False, HAS_LIMIT=True, INTERLEAVED=False,
                                                                   WARPS=8, SPLIT_K=1), dict(h_ptr="*bf16")),
    "mxfp4-mma-down-split": ("_mxfp4_mma_down_kernel", dict(HAS_BIAS=True, WARPS=4, SPLIT_K=2),
                             dict(h_ptr="*i32", out_ptr="*bf16")),
}
for case_id, (kernel, constexprs, types) in MXFP4_MMA.items():
    CASES[case_id] = (Case("runtime.ops.mxfp4", kernel, dict(constexprs, EMULATE=False), dict(MXFP4_MMA_TYPES, **types),
                           {"num_warps": constexprs["WARPS"]},
                           divisible_by_16=MXFP4_MMA_DIVISIBLE + MXFP4_MMA_DIVISIBLE_BY_KERNEL[kernel]),
                      "mul.rn.bf16x2", None)


@pytest.mark.parametrize("case_id", list(MXFP4_MMA))
def test_mxfp4_mma_gemv_loads_words_and_runs_mma(case_id, compiled):
    ptx = compiled[case_id]["ptx"]
    assert compiled[case_id]["error"] is None, compiled[case_id]["error"]
    assert ptx.count("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == 8
    assert ptx.count("evict_first.L2::cache_hint.v4.b32") >= 4          # two rows' words, before and in the loop
    assert ptx.count("ld.global.v4.b32") >= 8                           # the activations, 4 x 16 bytes a step
    split = "split" in case_id
    assert ("bar.sync" in ptx) == split and ("atom.global.gpu.acq_rel.add" in ptx) == split
    if split:
        assert "bar.sync" not in ptx[:ptx.rindex("mma.sync")]


# the tensor-core FP8 GEMV whose last program of a gate column tile and its up tile applies the (clamped) SwiGLU:
# it counts arrivals even unsplit
for split in (1, 8):
    CASES[f"fp8-gemv-mma-silu-mul-split{split}"] = (Case("runtime.ops.fp8", "_fp8_gemv_mma_kernel", dict(
        BLOCK_OUT=128, BLOCK_IN=128, WARPS=4, SPLIT_K=split, EMULATE=False, PRMT=True, SILU_MUL=True,
        HAS_LIMIT=True), dict(FP8_TYPES, x_ptr="*i32", limit="fp32")), "atom.", None)


# the dense GEMV: every fusion, in one step (the whole weight block loaded at once) and in steps; its weight
# read as 16-byte vectors, no atomics
DENSE_GEMV_TYPES = {"x_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16", "res_ptr": "*bf16",
                    "norm_ptr": "*bf16", "sum_ptr": "*bf16", "eps": "fp32"}
DENSE_GEMV_DIVISIBLE = ("x_ptr", "w_ptr", "bias_ptr", "out_ptr", "res_ptr", "norm_ptr", "sum_ptr", "N",
                        "K", "stride_xm", "stride_wn", "stride_om")
DENSE_GEMV = {   # case id -> (constexprs, warps)
    "dense-gemv-plain-steps": (dict(BLOCK_N=8, BLOCK_K=512, ONE_STEP=False), 4),
    "dense-gemv-plain-one-step": (dict(BLOCK_N=1, BLOCK_K=4096, ONE_STEP=True), 4),
    "dense-gemv-norm-residual-one-step": (dict(NORM=True, HAS_RESIDUAL=True, WEIGHT_IN_FP32=True, BLOCK_N=4,
                                               BLOCK_K=1024, ONE_STEP=True), 4),
    "dense-gemv-norm-residual-steps": (dict(NORM=True, HAS_RESIDUAL=True, BLOCK_N=8, BLOCK_K=512,
                                            ONE_STEP=False), 4),
    "dense-gemv-silu-one-step": (dict(SILU_MUL=True, BLOCK_N=2, BLOCK_K=4096, ONE_STEP=True), 8),
    "dense-gemv-silu-bias-steps": (dict(SILU_MUL=True, HAS_BIAS=True, BLOCK_N=2, BLOCK_K=1024, ONE_STEP=False), 4),
}
for case_id, (constexprs, warps) in DENSE_GEMV.items():
    CASES[case_id] = (Case("runtime.ops.linear", "_gemv_kernel",
                           dict(dict(HAS_BIAS=False, SILU_MUL=False, NORM=False, HAS_RESIDUAL=False,
                                     WEIGHT_IN_FP32=False, BLOCK_M=1), **constexprs),
                           DENSE_GEMV_TYPES, {"num_warps": warps}, divisible_by_16=DENSE_GEMV_DIVISIBLE), None, None)


@pytest.mark.parametrize("case_id", list(DENSE_GEMV))
def test_dense_gemv_reads_the_weight_as_16_byte_vectors(case_id, compiled):
    assert compiled[case_id]["error"] is None, compiled[case_id]["error"]
    ptx = compiled[case_id]["ptx"]
    constexprs, warps = DENSE_GEMV[case_id]
    vectors = constexprs["BLOCK_N"] * constexprs["BLOCK_K"] // (8 * 32 * warps)    # 16-byte loads a tile a thread
    assert ptx.count("ld.global.L1::evict_first.L2::cache_hint.v4.b32") == vectors
    assert "atom.global" not in ptx


# the one-launch decode attention (the last split of a (request, KV head) reduces; arrival counters) and the
# fused QKV step (QK-norm, RoPE and the newest K/V written by the split that holds it), bf16 and fp8-word caches
ONE_LAUNCH_DECODE_TYPES = dict(DECODE_TYPES, sinks_ptr="*fp32", out_ptr="*bf16", count_ptr="*i32",
                               positions_ptr="*i64", cos_sin_ptr="*fp32", q_norm_ptr="*bf16", k_norm_ptr="*bf16",
                               slot_ptr="*i64", eps="fp32")
ONE_LAUNCH_DECODE = {
    "decode-attention-one-launch-bf16": (dict(DECODE, BLOCK_N=64, HAS_KV_SCALE=False, FP16_DOT=False, AHEAD=0,
                                              FUSED_REDUCE=True, RED_G=4, RED_S=16), {}, 4, 3),
    "decode-attention-one-launch-qkv-sinks-window": (dict(DECODE, GROUP=8, HEAD_DIM=64, BLOCK_D=64, BLOCK_N=64,
                                                          HAS_WINDOW=True, HAS_KV_SCALE=False, FP16_DOT=False,
                                                          AHEAD=0, FUSED_REDUCE=True, HAS_SINKS=True, RED_G=8,
                                                          RED_S=16, QKV=True), {}, 4, 3),
    "decode-attention-one-launch-qkv-norm-bf16": (dict(DECODE, GROUP=2, BLOCK_N=64, HAS_KV_SCALE=False,
                                                       FP16_DOT=False, AHEAD=0, FUSED_REDUCE=True, RED_G=2, RED_S=32,
                                                       QKV=True, QK_NORM=True), {}, 4, 3),
    "decode-attention-one-launch-qkv-fp8-words": (dict(DECODE, BLOCK_N=16, HAS_KV_SCALE=True, FP16_DOT=True,
                                                       ASM=True, AHEAD=1, FUSED_REDUCE=True, RED_G=4, RED_S=4,
                                                       QKV=True, QK_NORM=True, KV_FP8=True),
                                                  dict(cache_ptr="*fp8e4nv"), 1, 1),
}
for case_id, (constexprs, types, warps, stages) in ONE_LAUNCH_DECODE.items():
    CASES[case_id] = (Case("runtime.ops.attention", "_decode_kernel", constexprs,
                           dict(ONE_LAUNCH_DECODE_TYPES, **types), options=dict(num_warps=warps, num_stages=stages),
                           divisible_by_16=DECODE_DIVISIBLE), "atom.global.gpu.acq_rel.add", None)


# the routing top-k in one warp (256 experts): every max by shuffles, no shared memory or barrier
CASES["route-topk-sqrtsoftplus-bias-one-warp"] = (
    Case("runtime.ops.moe", "_route_topk_kernel", dict(SCORE=3, RENORMALIZE=True, HAS_BIAS=True, FIXED_IDS=False,
                                                       ROUND=True, TOP_K=6, HAS_SCALE=False, BLOCK_E=256,
                                                       BLOCK_TOP_K=8), ROUTING_TYPES, {"num_warps": 1}),
    "shfl.sync", "bar.sync")


# the MXFP4 tensor-core GEMVs as a programmatic dependent launch: the gate/up GEMV lets the down GEMV start, which
# loads its routing and first weights before it waits and its activations (the gate/up's output) only after
MXFP4_MMA_PDL = {
    "mxfp4-mma-gate-up-pdl": ("_mxfp4_mma_gate_up_kernel", dict(HAS_BIAS=True, HAS_LIMIT=True, INTERLEAVED=True,
                                                                WARPS=4, SPLIT_K=2, PDL=True), dict(h_ptr="*bf16")),
    "mxfp4-mma-down-pdl": ("_mxfp4_mma_down_kernel", dict(HAS_BIAS=True, WARPS=4, SPLIT_K=4, PDL=True),
                           dict(h_ptr="*i32", out_ptr="*bf16")),
}
for case_id, (kernel, constexprs, types) in MXFP4_MMA_PDL.items():
    CASES[case_id] = (Case("runtime.ops.mxfp4", kernel, dict(constexprs, EMULATE=False), dict(MXFP4_MMA_TYPES, **types),
                           {"num_warps": constexprs["WARPS"]},
                           divisible_by_16=MXFP4_MMA_DIVISIBLE + MXFP4_MMA_DIVISIBLE_BY_KERNEL[kernel]),
                      "griddepcontrol", None)


def test_mxfp4_mma_dependent_launch_reads_the_gate_up_output_only_after_waiting(compiled):
    gate_up = compiled["mxfp4-mma-gate-up-pdl"]["ptx"]
    assert gate_up.count("griddepcontrol.launch_dependents") == 1
    assert gate_up.index("griddepcontrol.launch_dependents") < gate_up.index("ld.global")   # before any load
    down = compiled["mxfp4-mma-down-pdl"]["ptx"]
    wait = down.index("griddepcontrol.wait")
    assert down.count("griddepcontrol.wait") == 1
    assert "evict_first.L2::cache_hint.v4.b32" in down[:wait]                 # the first step's weights
    assert "ld.global.v4.b32" not in down[:wait] and "atom." not in down[:wait] and "st.global" not in down[:wait]

# the tensor-core FP8 GEMV as a programmatic dependent launch: the wait precedes every activation load, store and
# atomic
FP8_PDL = {f"fp8-gemv-mma-pdl-split{split}{'-silu-mul' if silu else ''}": dict(
    BLOCK_OUT=128, BLOCK_IN=128, WARPS=warps, SPLIT_K=split, EMULATE=False, PRMT=True, SILU_MUL=silu, HAS_LIMIT=silu,
    PDL=True) for warps, split, silu in ((4, 8, False), (8, 1, False), (4, 4, True))}
for case_id, constexprs in FP8_PDL.items():
    CASES[case_id] = (Case("runtime.ops.fp8", "_fp8_gemv_mma_kernel", constexprs,
                           dict(FP8_TYPES, x_ptr="*i32", limit="fp32"), {"num_warps": constexprs["WARPS"]},
                           divisible_by_16=("x_ptr", "w_ptr", "s_ptr", "out_ptr", "part_ptr", "count_ptr", "N", "K",
                                            "stride_xm", "stride_wn", "words_per_split", "x_group_words")),
                      "griddepcontrol.wait", None)


@pytest.mark.parametrize("case_id", list(FP8_PDL))
def test_fp8_gemv_waits_for_the_previous_kernel_before_it_reads_activations(case_id, compiled):
    assert compiled[case_id]["error"] is None, compiled[case_id]["error"]
    ptx = compiled[case_id]["ptx"]
    wait = ptx.index("griddepcontrol.wait")
    assert ptx.index("griddepcontrol.launch_dependents") < wait
    assert ("atom." in ptx) == ("split1" not in case_id or "silu" in case_id)      # split or SwiGLU: arrivals
    for after in ("st.global", "atom.", "mma.sync"):
        assert after not in ptx or ptx.index(after) > wait
    # the loads before the wait are the weights' (evict_first, 16 bytes), none of the activations'
    assert "ld.global.L1::evict_first.L2::cache_hint.v4.b32" in ptx[:wait]
    assert "ld.global.v4.b32" not in ptx[:wait] and "ld.global.b32" not in ptx[:wait]
    assert "ld.global.v4.b32" in ptx[wait:]


# DeepSeek V4's kernels that an FP8 projection follows let its programmatic dependent launch start early
HC_PRE_TYPES = {"streams_ptr": "*bf16", "mix_ptr": "*fp32", "base_ptr": "*fp32", "scale_ptr": "*fp32",
                "post_ptr": "*fp32", "comb_ptr": "*fp32", "out_ptr": "*bf16", "norm_ptr": "*fp32", "norm_eps": "fp32",
                "hc_eps": "fp32", "out_eps": "fp32"}
CASES["dsv4-hc-pre-pdl"] = (Case("models.deepseek_v4.kernels", "_hc_pre_kernel", dict(
    N=4, HIDDEN=4096, BLOCK=256, SPAN=256, PARTIALS=True, M=64, CHUNKS=64, BLOCK_C=64, NORM=True, WEIGHT_IN_FP32=True,
    LANES=32, PDL=True), HC_PRE_TYPES, {"num_warps": 1}), "griddepcontrol.wait", None)
CASES["dsv4-norm-rope-pdl"] = (Case("models.deepseek_v4.kernels", "_norm_rope_kernel", dict(
    HEADS=1, BLOCK_H=1, HALF=256, BLOCK_HALF=256, ROPE_HALF=32, NORMALIZE=True, WEIGHTED=True, INVERSE=False,
    TO_SLOTS=True, ROUND=True, FP8=False, NOPE=512, QBLOCK=512, NUM_SCALES=1, SCALES_AT=512, ENTRY=512,
    LATENT_DIM=1024, BLOCK_LATENT=1024, PDL=True),
    {"x_ptr": "*bf16", "out_ptr": "*bf16", "inv_freq_ptr": "*fp32", "weight_ptr": "*fp32", "latent_ptr": "*bf16",
     "latent_out_ptr": "*bf16", "latent_weight_ptr": "*fp32", "eps": "fp32", "latent_eps": "fp32"}),
    "griddepcontrol.wait", None)
CASES["dsv4-hc-post-pdl"] = (Case("models.deepseek_v4.kernels", "_hc_post_kernel", dict(
    N=4, HIDDEN=4096, BLOCK=64, ROUND=True, ADD=True, MIX=True, M=24, BLOCK_M=64, BLOCK_FN=32, PDL=True),
    dict(HC_PRE_TYPES, new_ptr="*bf16", fn_ptr="*fp32", addend_ptr="*bf16", mix_ptr="*fp32")),
    "griddepcontrol.wait", None)


@pytest.mark.parametrize("case_id", ["dsv4-hc-pre-pdl", "dsv4-norm-rope-pdl",
                                     "dsv4-hc-post-pdl"])
def test_dsv4_dependent_launches_wait_before_any_memory_access(case_id, compiled):
    assert compiled[case_id]["error"] is None, compiled[case_id]["error"]
    ptx = compiled[case_id]["ptx"]
    wait = ptx.index("griddepcontrol.wait")
    assert ptx.index("griddepcontrol.launch_dependents") < wait
    assert "ld.global" not in ptx[:wait] and "st.global" not in ptx[:wait]
HC_HEAD_TYPES = {"streams_ptr": "*bf16", "fn_ptr": "*fp32", "part_ptr": "*fp32", "base_ptr": "*fp32",
                 "scale_ptr": "*fp32", "out_ptr": "*bf16", "norm_eps": "fp32", "hc_eps": "fp32"}
CASES["dsv4-hc-head-mix"] = (Case("models.deepseek_v4.kernels", "_hc_head_mix_kernel", dict(
    N=4, HIDDEN=4096, BLOCK=256, CHUNKS=16, WIDTH=8), HC_HEAD_TYPES, {"num_warps": 4}), None, None)
CASES["dsv4-hc-head-collapse"] = (Case("models.deepseek_v4.kernels", "_hc_head_collapse_kernel", dict(
    N=4, HIDDEN=4096, BLOCK=256, CHUNKS=16, BLOCK_C=16, WIDTH=8), HC_HEAD_TYPES, {"num_warps": 4}), None, None)
