"""Compile Triton kernels for Hopper (sm_90) on a machine without a GPU. The interpreter, which the CPU tests
run kernels in, accepts code the GPU compiler rejects (a loop-carried variable that changes type, a
misaligned vector load the compiler assumes is aligned); compiling catches that before a device run does.
Nothing is launched.

The compile runs in a process of its own, with TRITON_INTERPRET unset and a fresh Triton cache: in a test
session other modules set TRITON_INTERPRET before Triton is imported, which turns triton.language's own jit
helpers (tl.sum, ...) into interpreter functions that the compiler cannot inline."""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    """One kernel at one set of constexprs. Arguments not named in `types` are "*i64" when their name ends in
    _ptr, else "i32"; a constexpr given as a string "tl.NAME" is that attribute of triton.language."""
    module: str                              # dotted module path, e.g. "runtime.ops.sampling"
    kernel: str
    constexprs: dict
    types: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)     # compile options, e.g. {"num_warps": 8}
    divisible_by_16: tuple = ()              # arguments the launch sees as multiples of 16 (Triton's JIT specializes
                                             # every such pointer and integer; that decides vector widths and
                                             # whether loads become cp.async)


def compile_for_hopper(cases: list[Case]) -> list[dict]:
    """Per case {"error": None or the compiler's message, "ptx": the PTX text}, compiled in a fresh process."""
    with tempfile.TemporaryDirectory() as cache:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = cache
        done = subprocess.run([sys.executable, __file__], input=json.dumps([asdict(c) for c in cases]),
                              capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the compile process failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)


def _compile_all(cases: list[dict]) -> list[dict]:
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    results = []
    for case in cases:
        fn = getattr(importlib.import_module(case["module"]), case["kernel"])
        constexprs = {name: getattr(tl, value[3:]) if isinstance(value, str) and value.startswith("tl.") else value
                      for name, value in case["constexprs"].items()}
        for param in fn.params:                          # a constexpr left out takes its default, as at a launch
            if param.is_constexpr and param.name not in constexprs and param.default is not inspect.Parameter.empty:
                constexprs[param.name] = param.default
        signature = {name: case["types"].get(name, "*i64" if name.endswith("_ptr") else "i32")
                     for name in fn.arg_names if name not in constexprs}
        source = ASTSource
        if getattr(fn, "is_gluon", lambda: False)():         # a Gluon kernel (explicit layouts)
            from triton.experimental.gluon._runtime import GluonASTSource as source
        try:
            attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
                     for name in case.get("divisible_by_16") or ()}
            compiled = triton.compile(source(fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                      target=GPUTarget("cuda", 90, 32), options=case.get("options") or {})
            results.append({"error": None, "ptx": compiled.asm["ptx"]})
        except Exception as exc:                         # reported per case, so every case gets its verdict
            results.append({"error": f"{type(exc).__name__}: {exc}"[-3000:], "ptx": ""})
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    json.dump(_compile_all(json.load(sys.stdin)), sys.stdout)
