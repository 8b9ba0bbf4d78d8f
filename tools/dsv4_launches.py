#!/usr/bin/env python
"""Count the kernel launches of one DeepSeek V4 decode step on the CPU, without a GPU: the layer mix of a
config (default: the truncated Flash shape, tools/configs/deepseek-v4-flash-24l) at small widths, through the
engine (dummy weights, FP8 linears kept, batch 1), with the model's CUDA path taken but nothing launched:
the package's kernels, the runtime's routing, norms and activations, its bf16 GEMV, FP8 GEMV and MXFP4 expert
GEMVs, chosen as on a GPU. Each Triton launch is recorded by kernel name instead of run (its outputs keep
whatever the allocation held); each torch op that would launch a kernel on a GPU (not a view, not an
allocation) is recorded by op name. Prints launches per step, by component (`attn.indexer`, `ffn.gate`, ...)
and by kernel.

    python tools/dsv4_launches.py [--config tools/configs/deepseek-v4-flash-24l] [--context 300]

A count, not a timing: which of them are small and how long each takes comes from a GPU profile."""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# torch ops that launch nothing on a GPU: views, allocations, metadata
NO_KERNEL = {
    "view", "_unsafe_view", "expand", "slice", "select", "unsqueeze", "squeeze", "t", "transpose", "permute",
    "as_strided", "alias", "detach", "empty", "empty_strided", "empty_like", "split", "split_with_sizes",
    "unbind", "chunk", "lift_fresh", "view_as_real", "view_as_complex", "_reshape_alias", "unfold",
    "is_same_size", "_has_compatible_shallow_copy_type", "set_", "resize_", "sym_size", "sym_stride",
    "sym_numel", "sym_storage_offset", "dim", "size", "stride", "numel", "is_contiguous", "storage_offset",
}
# composite ops seen whole: a copy or nothing
MAYBE_COPY = {"to", "contiguous", "flatten", "reshape", "type_as"}
# small widths that keep the layer mix (kinds, ratios, hash layers) of the config
SMALL = dict(hidden_size=256, num_attention_heads=8, head_dim=128, qk_rope_head_dim=32, q_lora_rank=128,
             o_groups=8, o_lora_rank=64, index_n_heads=8, index_head_dim=64, index_topk=16, n_routed_experts=16,
             moe_intermediate_size=128, vocab_size=1024)


class Launches(TorchDispatchMode):
    """Records launches by (component, kernel) while `active`; `suspended` inside a unit counted whole."""

    def __init__(self):
        super().__init__()
        self.active = False
        self.suspended = 0
        self.where: list[str] = []
        self.counts: collections.Counter = collections.Counter()

    def record(self, kernel: str, times: int = 1) -> None:
        if self.active and not self.suspended:
            self.counts[(self.where[-1] if self.where else "model", kernel)] += times

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        if name in MAYBE_COPY:          # a kernel only when the result is new memory, not the input or a view
            source = args[0]
            if out is source or out.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
                return out
        if name not in NO_KERNEL:
            self.record(f"torch.{name}")
        return out


def _component(name: str) -> str:
    """`layers.7.attn.indexer.compressor.wkv` -> `attn.indexer.compressor`; top-level modules keep their name."""
    parts = name.split(".")
    if parts[0] == "layers":
        parts = parts[2:]
    return ".".join(parts) or "layer"


def _instrument(model: nn.Module, launches: Launches) -> None:
    for name, module in model.named_modules():
        if not name:
            continue

        def enter(mod, args, label=_component(name)):
            launches.where.append(label)

        def leave(mod, args, output):
            launches.where.pop()
        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)


def _patch_launches(launches: Launches) -> None:
    """Triton launches recorded instead of run; the CUDA paths taken on CPU tensors."""
    import triton.runtime.jit as jit

    from models.deepseek_v4 import kernels, moe
    from models.deepseek_v4 import linear as fp8_linears
    from runtime.ops import activation, fp8, linear, mxfp4, norm
    from runtime.ops import moe as runtime_moe

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            launches.record(self.fn.__name__)

    jit.JITFunction.run = run
    kernels.use_kernels = lambda x: True
    for module in (activation, norm, runtime_moe):
        module._use_triton = lambda x: True
    on_gpu = linear._use_gemv.__globals__["os"].environ.get("RUN_MODEL_TORCH_OPS") != "1"
    gemv = linear._use_gemv

    def use_gemv(x, weight, fused):            # as on a GPU: the test without `x.is_cuda`
        return on_gpu and gemv(_Cuda(x), weight, fused)

    linear._use_gemv = use_gemv

    def fp8_linear(x, weight, scale, groups=1, counters=None, silu_mul_output=False, limit=None):
        """The GEMV a row takes on a GPU; with silu_mul_output the activation inside its launch, as the
        tensor-core GEMV applies it at the release's widths (these small ones do not tile into its programs)."""
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        if x.shape[0] > fp8.FP8_GEMV_MAX_ROWS:
            raise ValueError("a decode step of one token has one row")
        out = fp8.fp8_gemv(x, weight, scale, groups, fp8.Fp8GemvTiles.for_shape(*weight.shape, x.shape[0]),
                           counters)
        if silu_mul_output:
            out = out[:, :out.shape[1] // 2]
        return out.view(*lead, out.shape[-1])

    fp8.fp8_linear = fp8_linear
    fp8_linears.fp8_linear = fp8_linear

    def routed_experts(x, w13, w2, topk_weights, topk_ids, activation, skip_negative_ids=False):
        if topk_ids.numel() > mxfp4.GEMV_MAX_PAIRS:
            raise ValueError("a decode step of one token routes to a few experts")
        return mxfp4.mxfp4_moe_gemv(x, w13, w2, topk_weights, topk_ids, activation)

    moe.mxfp4_moe = routed_experts


class _Cuda:
    """A tensor that says it is on a GPU (for dispatch tests that read only its metadata)."""

    def __init__(self, tensor: torch.Tensor):
        self._tensor = tensor

    is_cuda = True

    def __getattr__(self, name):
        return getattr(self._tensor, name)


def small_config(path: Path, out: Path) -> Path:
    config = json.loads((path / "config.json").read_text())
    config.update(SMALL)
    config["quantization_config"] = dict(config.get("quantization_config") or {}, weight_block_size=[32, 32])
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    return out


def count_decode_step(config_dir: Path, context: int) -> tuple[collections.Counter, int]:
    """-> (launches by (component, kernel) of the decode step at position `context`, number of layers)."""
    from models.deepseek_v4 import linear
    from runtime import LLM, SamplingParams

    launches = Launches()
    linear.FP8_DEVICES = ("cuda", "cpu")                                          # FP8 linears kept, as on a GPU
    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(str(small_config(config_dir, Path(tmp) / "model")), device="cpu", dtype="bfloat16",
                  load_format="dummy", skip_tokenizer_init=True, block_size=128, max_model_len=context + 128,
                  num_gpu_blocks=2 * (context + 128) // 128 + 8, enforce_eager=True)
        model = llm.engine.model
        calls = []

        def step(module, args):
            calls.append(args[0].shape[0])
            launches.counts.clear()
            launches.active = len(calls) > 1 and args[0].shape[0] == 1            # a decode step, after the prefill
            if launches.active:
                _patch_launches(launches)

        def done(module, args, output):
            launches.active = False

        _instrument(model, launches)
        model.register_forward_pre_hook(step)
        model.register_forward_hook(done)
        prompt = torch.randint(0, SMALL["vocab_size"], (context,)).tolist()
        with launches:
            llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False)
        counted = collections.Counter(launches.counts)
    return counted, len(model.layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).resolve().parent / "configs/deepseek-v4-flash-24l"))
    parser.add_argument("--context", type=int, default=300)
    args = parser.parse_args()
    counts, layers = count_decode_step(Path(args.config), args.context)
    total = sum(counts.values())
    print(f"decode step at position {args.context}, {layers} layers: {total} launches")
    by_component = collections.Counter()
    for (component, _), n in counts.items():
        by_component[component] += n
    print("\nby component:")
    for component, n in by_component.most_common():
        print(f"  {n:6d}  {component}")
    print("\nby component and kernel:")
    for (component, kernel), n in sorted(counts.items(), key=lambda item: (item[0][0], -item[1])):
        print(f"  {n:6d}  {component:32s} {kernel}")


if __name__ == "__main__":
    main()
