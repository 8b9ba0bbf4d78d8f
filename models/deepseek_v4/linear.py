"""The linear layers the release ships in FP8 (wq_a, wq_b, wkv, wo_a, wo_b, the indexer's wq_b, the shared
expert, the MTP projections): kept in FP8 with their block scales (runtime.ops.fp8.Fp8Linear) on a GPU, where
decode reads each weight byte once and more rows run the checkpoint's own W8A8 GEMM (activations quantized per
1 x 128) where that is faster, or dequantized at load into plain linears elsewhere (the CPU keeps the fp32
numerics the parity tests compare with transformers)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from runtime.ops.fp8 import Fp8Linear, fp8_linear
from runtime.parallel import ParallelContext, RowParallelLinear

# devices on which a checkpoint's FP8 linears stay FP8 (tests add "cpu" to run the FP8 module's reference path)
FP8_DEVICES = ("cuda",)


class GroupedLinear(nn.Linear):
    """A block-diagonal projection: x [n, groups * in] -> [n, groups * out], input slice g times rows
    [g * out, (g + 1) * out) of the [groups * out, in] weight."""

    def __init__(self, in_features: int, out_features: int, groups: int):
        super().__init__(in_features, out_features, bias=False)
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grouped = x.view(x.shape[0], self.groups, -1)                                 # [n, groups, in]
        weight = self.weight.view(self.groups, -1, self.in_features)                   # [groups, out, in]
        return torch.einsum("ngi,gri->ngr", grouped, weight).flatten(1)


def row_blocks(widths: dict[str, int]) -> dict[str, slice]:
    """Consecutive row blocks of the given widths, by name, in order."""
    blocks, start = {}, 0
    for name, width in widths.items():
        blocks[name] = slice(start, start + width)
        start += width
    return blocks


class Fp8Projection(Fp8Linear):
    """Several FP8 linears of one input as one weight, their rows stacked in the order of `widths` (checkpoint
    module name -> output rows): one GEMV launch at decode instead of one a linear. Each part keeps its own
    block-scale rows (every width is whole row blocks); the loader fills the parts, an `Fp8Rows` stands under
    each part's name."""

    def __init__(self, in_features: int, widths: dict[str, int], block: tuple[int, int]):
        super().__init__(in_features, sum(widths.values()), block)
        self.parts = row_blocks(widths)

    def columns(self, y: torch.Tensor, name: str) -> torch.Tensor:
        """Part `name`'s output columns, a view of y [n, out_features]."""
        return y[:, self.parts[name]]

    def silu_mul(self, x: torch.Tensor, limit: float | None = None) -> torch.Tensor:
        """silu_mul(gate, up, limit) of a projection of two parts, gate then up, of equal widths: applied by the
        GEMV's launch where it can (runtime.ops.fp8.fp8_linear's silu_mul_output)."""
        return fp8_linear(x, self.weight, self.scale, 1, self.counters, silu_mul_output=True, limit=limit)


class Rows:
    """A part of a stacked projection (anything with `weight` and `parts`) under the checkpoint's name: its weight
    rows, read when asked (not a module, so there is no second tensor for `.to()` to split off)."""

    def __init__(self, projection: nn.Module, name: str):
        self.projection, self.name = projection, name

    @property
    def weight(self) -> torch.Tensor:
        return self.projection.weight[self.projection.parts[self.name]]

    @property
    def out_features(self) -> int:
        rows = self.projection.parts[self.name]
        return rows.stop - rows.start


class Fp8Rows(Rows):
    """A part of an Fp8Projection: its weight rows and its block-scale rows."""

    @property
    def scale(self) -> torch.Tensor:
        rows, block_out = self.projection.parts[self.name], self.projection.block[0]
        return self.projection.scale[rows.start // block_out:rows.stop // block_out]


class RowParallelFp8Linear(Fp8Linear):
    """Fp8Linear over this rank's input features; the ranks' products are summed (one all-reduce)."""

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int], parallel: ParallelContext):
        super().__init__(parallel.split(in_features, "a projection's input size"), out_features, block)
        self.parallel = parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parallel.all_reduce(super().forward(x))


@dataclass(frozen=True)
class Linears:
    """Builds the FP8-format linears: FP8 with [out, in] blocks `fp8_block`, or dense (None). A layer whose
    (per-rank) shape does not tile into whole blocks is dense."""
    fp8_block: tuple[int, int] | None = None

    def _fp8(self, in_features: int, out_features: int, groups: int = 1) -> bool:
        return self.fp8_block is not None and out_features % (groups * self.fp8_block[0]) == 0 \
            and in_features % self.fp8_block[1] == 0

    def __call__(self, in_features: int, out_features: int, groups: int = 1) -> nn.Module:
        """[out_features, in_features]; with `groups`, block-diagonal over `groups` input slices."""
        if self._fp8(in_features, out_features, groups):
            return Fp8Linear(in_features, out_features, self.fp8_block, groups)
        if groups > 1:
            return GroupedLinear(in_features, out_features, groups)
        return nn.Linear(in_features, out_features, bias=False)

    def stacked(self, in_features: int, widths: dict[str, int]) -> Fp8Projection | None:
        """The linears [width, in_features] of one input as one Fp8Projection where each would be FP8, else None
        (the caller builds them separately)."""
        if all(self._fp8(in_features, width) for width in widths.values()):
            return Fp8Projection(in_features, widths, self.fp8_block)
        return None

    def row_parallel(self, in_features: int, out_features: int, parallel: ParallelContext) -> nn.Module:
        if self._fp8(parallel.split(in_features, "a projection's input size"), out_features):
            return RowParallelFp8Linear(in_features, out_features, self.fp8_block, parallel)
        return RowParallelLinear(in_features, out_features, False, parallel)


DENSE = Linears()


def fp8_weight_block(config) -> tuple[int, int] | None:
    """The config's FP8 [out, in] block (quantization_config.weight_block_size), None without one."""
    quantization = getattr(config, "quantization_config", None) or {}
    if not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    block = quantization.get("weight_block_size")
    return tuple(block) if block else None


def linears_for(config, device: torch.device) -> Linears:
    """FP8 linears on the devices of FP8_DEVICES when the checkpoint has FP8 blocks, else dense."""
    block = fp8_weight_block(config)
    return Linears(block if block is not None and device.type in FP8_DEVICES else None)
