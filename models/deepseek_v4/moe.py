"""DeepSeek V4 MoE: sqrt(softplus) scores, experts chosen by score + a selection-only bias (or, in the first
layers, by a fixed token -> experts table), weights renormalized and scaled; clamped SwiGLU experts (MXFP4 as
released, or float) plus one shared expert of the same width."""
from __future__ import annotations

import torch
from torch import nn

from runtime.ops import fused_moe, score_topk, silu_mul
from runtime.ops.linear import linear
from runtime.ops.mxfp4 import MX_BLOCK, GatedActivation, Mxfp4Linear, mxfp4_moe
from runtime.parallel import SINGLE, ParallelContext

from .config import expert_format, num_experts
from .linear import DENSE, Fp8Rows, Linears
from .streams import side_stream


class Gate(nn.Module):
    def __init__(self, config, hashed: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts(config), config.hidden_size))
        if hashed:
            self.tid2eid = nn.Parameter(torch.zeros(config.vocab_size, config.num_experts_per_tok, dtype=torch.long),
                                        requires_grad=False)
        else:
            self.bias = nn.Parameter(torch.zeros(num_experts(config), dtype=torch.float32))
        self.hashed = hashed
        self.top_k, self.scaling = config.num_experts_per_tok, config.routed_scaling_factor
        self.scoring = config.scoring_func

    def init_dummy_(self, generator: torch.Generator) -> None:
        """Dummy weights: each token's table row is k distinct random experts (as a released table has)."""
        if self.hashed:
            draws = torch.rand(self.tid2eid.shape[0], self.weight.shape[0], generator=generator,
                               device=self.tid2eid.device)
            self.tid2eid.copy_(draws.topk(self.top_k, dim=-1).indices)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = linear(x, self.weight)                                             # [num_tokens, experts]
        if self.hashed:
            return score_topk(logits, self.top_k, self.scoring, fixed_ids=self.tid2eid[input_ids], scaling=self.scaling)
        return score_topk(logits, self.top_k, self.scoring, selection_bias=self.bias, scaling=self.scaling)


def _packed(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, dtype=torch.uint8), requires_grad=False)


class Experts(nn.Module):
    """All routed experts stacked: w13 [E, 2 * inter, hidden] (gate rows, then up rows), w2 [E, hidden, inter];
    MXFP4 blocks / scales for the fp4 format, float otherwise. With tensor parallelism a rank holds experts
    [first_expert, first_expert + E) whole (expert parallel; pairs routed elsewhere are skipped) or every
    expert's share of the intermediate rows."""

    def __init__(self, config, parallel: ParallelContext = SINGLE):
        super().__init__()
        e, hidden, inter = num_experts(config), config.hidden_size, config.moe_intermediate_size
        self.parallel, self.first_expert = parallel, 0
        if parallel.enable_expert_parallel:
            self.first_expert = parallel.shard_range(e, "the number of experts")[0]
            e = parallel.split(e, "the number of experts")
        else:
            inter = parallel.split(inter, "moe_intermediate_size")
        self.limit = config.swiglu_limit
        self.packed = expert_format(config) == "fp4"
        if self.packed:
            if hidden % MX_BLOCK or inter % MX_BLOCK:
                raise ValueError(f"MXFP4 experts need hidden_size ({hidden}) and moe_intermediate_size ({inter}) "
                                 f"to be multiples of {MX_BLOCK}")
            self.w13_blocks = _packed(e, 2 * inter, hidden // MX_BLOCK, MX_BLOCK // 2)
            self.w13_scales = _packed(e, 2 * inter, hidden // MX_BLOCK)
            self.w2_blocks = _packed(e, hidden, inter // MX_BLOCK, MX_BLOCK // 2)
            self.w2_scales = _packed(e, hidden, inter // MX_BLOCK)
            self.activation = GatedActivation(limit=self.limit)
        else:
            self.w13 = nn.Parameter(torch.zeros(e, 2 * inter, hidden))
            self.w2 = nn.Parameter(torch.zeros(e, hidden, inter))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        skip = self.parallel.enable_expert_parallel
        if skip and self.parallel.world_size > 1:
            ids = ids - self.first_expert
            ids = ids.masked_fill((ids < 0) | (ids >= self.num_local_experts), -1)     # another rank's expert
        if self.packed:
            return mxfp4_moe(x, Mxfp4Linear(self.w13_blocks, self.w13_scales), Mxfp4Linear(self.w2_blocks, self.w2_scales),
                             weights.to(x.dtype), ids, self.activation, skip_negative_ids=skip)
        return fused_moe(x, self.w13, self.w2, weights.to(x.dtype), ids, swiglu_limit=self.limit,
                         skip_negative_ids=skip)

    @property
    def num_local_experts(self) -> int:
        return (self.w13_blocks if self.packed else self.w13).shape[0]

    @property
    def num_local_inter(self) -> int:
        return (self.w13_blocks if self.packed else self.w13).shape[1] // 2


class SharedExpert(nn.Module):
    """Split by intermediate rows over tensor-parallel ranks (the MoE's all-reduce sums it)."""

    def __init__(self, config, parallel: ParallelContext = SINGLE, linears: Linears = DENSE):
        super().__init__()
        hidden, inter = config.hidden_size, parallel.split(config.moe_intermediate_size, "moe_intermediate_size")
        # gate (w1) and up (w3): one FP8 weight (one GEMV launch) where both are FP8
        self.w13 = linears.stacked(hidden, {"w1": inter, "w3": inter})
        if self.w13 is not None:
            self.w1, self.w3 = Fp8Rows(self.w13, "w1"), Fp8Rows(self.w13, "w3")
        else:
            self.w1 = linears(hidden, inter)
            self.w3 = linears(hidden, inter)
        self.w2 = linears(inter, hidden)      # down
        self.limit = config.swiglu_limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:        # the clamped SwiGLU inside the gate / up GEMV's launch where it fits
            return self.w2(self.w13.silu_mul(x, self.limit))
        return self.w2(silu_mul(self.w1(x), self.w3(x), self.limit))        # the clamped SwiGLU, one launch


class MoE(nn.Module):
    def __init__(self, config, hashed: bool, parallel: ParallelContext = SINGLE, linears: Linears = DENSE):
        super().__init__()
        self.parallel = parallel
        self.gate = Gate(config, hashed)                  # replicated: every rank routes like one rank
        self.experts = Experts(config, parallel)
        self.shared_experts = SharedExpert(config, parallel, linears)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        routed, shared = self.parts(x, input_ids)
        return self.parallel.all_reduce(routed + shared)

    def parts(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(routed experts' output, shared expert's output), not yet summed: one rank's, whose sum `forward`
        all-reduces; on one rank a caller may add them inside its next kernel instead. On a GPU the shared
        expert runs on the side stream (`streams.side_stream`) while the gate, the routing and the routed
        experts run on the current one: the two chains read only x (referenced by the caller until this
        returns), and the current stream waits for the side stream before this returns."""
        side = side_stream(x)
        if side is None:
            weights, ids = self.gate(x, input_ids)
            return self.experts(x, weights, ids), self.shared_experts(x)
        current = torch.cuda.current_stream(x.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            shared = self.shared_experts(x)
        weights, ids = self.gate(x, input_ids)
        routed = self.experts(x, weights, ids)
        current.wait_stream(side)
        return routed, shared
