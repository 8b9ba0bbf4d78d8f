"""Triton kernels compiled for Hopper (sm_90) on a machine without a GPU. The interpreter, which the CPU
tests run kernels in, accepts code the compiler rejects (a loop-carried variable that changes type, a
constexpr rebound in a loop); compiling the kernel catches that before a GPU run does. Nothing is launched.

A module is loaded afresh with TRITON_INTERPRET unset, so that its kernels are compilable JIT functions even
when other test modules of the session run them in the interpreter."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HOPPER = GPUTarget("cuda", 90, 32)


def compiled_module(relative_path: str):
    """A fresh copy of a module whose Triton kernels are JIT functions, not interpreted ones."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        name = "compile_check_" + relative_path.replace("/", "_").removesuffix(".py")
        spec = importlib.util.spec_from_file_location(name, ROOT / relative_path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module                  # dataclasses look their module up while they are built
        spec.loader.exec_module(module)
        return module
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def compile_for_hopper(kernel, types: dict[str, str], constexprs: dict[str, int], default: str = "i32"):
    """Compile `kernel` to PTX for sm_90; arguments not named in `types` or `constexprs` are `default`."""
    signature = {name: types.get(name, default) for name in kernel.arg_names if name not in constexprs}
    return triton.compile(ASTSource(kernel, signature=signature, constexprs=constexprs), target=HOPPER)


SAMPLING_TYPES = {
    "logits_ptr": "*fp32", "temperature_ptr": "*fp32", "top_k_ptr": "*i64", "top_p_ptr": "*fp32",
    "min_p_ptr": "*fp32", "seeds_ptr": "*i64", "steps_ptr": "*i64", "exclude_ptr": "*i64", "random_out": "*i64",
    "greedy_out": "*i64", "excluded_prob_out": "*fp32", "part_max_ptr": "*fp32", "part_arg_ptr": "*i32",
    "part_z_ptr": "*fp32", "part_count_ptr": "*i32", "part_mass_ptr": "*fp32", "part_race_ptr": "*fp32",
    "part_winner_ptr": "*i32", "part_excluded_ptr": "*fp32", "cand_val_ptr": "*fp32", "cand_id_ptr": "*i32",
    "greedy_below": "fp32",
}
LEVELS = dict(NUM_LEVELS=32, LEVEL_SHIFT=16)


@pytest.mark.parametrize("kernel, constexprs", [
    ("_chunk_max_kernel", dict(CHUNK=4096, BLOCK=1024)),
    ("_chunk_levels_kernel", dict(CHUNKS_P2=64, CHUNK=4096, LEVEL_BLOCK=128, LEVEL_STEPS=6, **LEVELS)),
    ("_chunk_gather_kernel", dict(CHUNKS_P2=64, CHUNK=4096, BLOCK=1024, CAP=1024, **LEVELS)),
    ("_sample_rows_kernel", dict(CHUNKS_P2=64, BLOCK=1024, CAP=1024, **LEVELS)),
])
def test_sampling_kernels_compile_for_hopper(kernel, constexprs):
    module = compiled_module("runtime/ops/sampling.py")
    compiled = compile_for_hopper(getattr(module, kernel), SAMPLING_TYPES, constexprs)
    assert ".entry " + kernel in compiled.asm["ptx"]


MXFP4_GEMV_TYPES = {
    "x_ptr": "*bf16", "h_ptr": "*bf16", "words_ptr": "*i32", "scales_ptr": "*u8", "bias_ptr": "*fp32",
    "out_ptr": "*bf16", "weights_ptr": "*bf16", "ids_ptr": "*i64", "alpha": "fp32", "limit": "fp32",
    "up_offset": "fp32",
}


@pytest.mark.parametrize("ptx_decode", [True, False])
@pytest.mark.parametrize("kernel, constexprs", [
    ("_mxfp4_gemv_gate_up_kernel", dict(HAS_BIAS=True, HAS_LIMIT=True, INTERLEAVED=True, BLOCK_N=8, BLOCK_G=8,
                                        PREFETCH=True)),
    ("_mxfp4_gemv_gate_up_kernel", dict(HAS_BIAS=False, HAS_LIMIT=True, INTERLEAVED=False, BLOCK_N=16, BLOCK_G=8,
                                        PREFETCH=False)),
    ("_mxfp4_gemv_down_kernel", dict(HAS_BIAS=True, BLOCK_N=8, BLOCK_G=32, PREFETCH=True)),
])
def test_mxfp4_gemv_kernels_compile_for_hopper(kernel, constexprs, ptx_decode, monkeypatch):
    """The PTX decode never runs in the interpreter: compiling it is the CPU-side check that ptxas takes it."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)      # read again while the kernel body is built
    module = compiled_module("runtime/ops/mxfp4.py")
    compiled = compile_for_hopper(getattr(module, kernel), MXFP4_GEMV_TYPES, dict(constexprs, PTX_DECODE=ptx_decode))
    assert ".entry " + kernel in compiled.asm["ptx"]
    assert ("shl.b32 a, " in compiled.asm["ptx"]) == ptx_decode


@pytest.mark.parametrize("softmax_after_topk", [True, False])
def test_softmax_topk_kernel_compiles_for_hopper(softmax_after_topk, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    module = compiled_module("runtime/ops/moe.py")
    compiled = compile_for_hopper(module._softmax_topk_kernel, {"logits_ptr": "*bf16", "scale_ptr": "*fp32",
                                                                 "weights_ptr": "*bf16", "ids_ptr": "*i64"},
                                  dict(TOP_K=4, RENORMALIZE=False, HAS_SCALE=False, BLOCK_E=32, BLOCK_TOP_K=4,
                                       SOFTMAX_AFTER_TOPK=softmax_after_topk))
    assert ".entry _softmax_topk_kernel" in compiled.asm["ptx"]
