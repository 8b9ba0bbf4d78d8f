"""Mixture-of-experts: softmax-top-k routing and the expert computation, as torch references (the CPU path and
the oracle) and their Triton twins (routing, expert alignment, two grouped GEMMs)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from runtime.ops.activation import GATED_ACTIVATIONS

try:
    import triton
    import triton.language as tl

    from runtime.ops.activation import gated_activation
except ImportError:                                  # the torch reference still works without Triton
    triton = None


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and triton is not None and os.environ.get("RUN_MODEL_TORCH_OPS") != "1"


def softmax_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                 expert_scale: torch.Tensor | None = None,
                 softmax_after_topk: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts in fp32, keep the top k, optionally renormalize them to sum to one, and
    optionally multiply each by its expert's learned scale (`expert_scale` [experts]).
    With `softmax_after_topk` the top k are taken from the logits and the softmax runs over those k only
    (the same weights as renormalizing, rounded differently).
    Returns (weights [num_tokens, k] in the logits' dtype, expert ids [num_tokens, k] int64)."""
    if _use_triton(router_logits):
        return softmax_topk_triton(router_logits, top_k, renormalize, expert_scale, softmax_after_topk)
    return softmax_topk_ref(router_logits, top_k, renormalize, expert_scale, softmax_after_topk)


def softmax_topk_ref(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                     expert_scale: torch.Tensor | None = None,
                     softmax_after_topk: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    if softmax_after_topk:
        top_logits, ids = torch.topk(router_logits.float(), top_k, dim=-1)
        weights = torch.softmax(top_logits, dim=-1)
    else:
        weights, ids = torch.topk(torch.softmax(router_logits.float(), dim=-1), top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if expert_scale is not None:
        weights = weights * expert_scale.float()[ids]
    return weights.to(router_logits.dtype), ids


_SCORE_FUNCTIONS = {
    "softmax": lambda logits: torch.softmax(logits, dim=-1),
    "sigmoid": torch.sigmoid,
    "sqrtsoftplus": lambda logits: torch.nn.functional.softplus(logits).sqrt(),
}


def score_topk(router_logits: torch.Tensor, top_k: int, scoring: str, selection_bias: torch.Tensor | None = None,
               fixed_ids: torch.Tensor | None = None, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing by per-expert scores (`scoring`: softmax, sigmoid or sqrtsoftplus of the logits, in their dtype).
    The experts are the top k of `scores + selection_bias` (the bias only chooses, it never weights), or
    `fixed_ids` [num_tokens, k] when a table decides them. Weights are the chosen scores renormalized to sum
    to one, times `scaling`. Returns (weights [num_tokens, k], ids [num_tokens, k] int64). One Triton launch
    on a GPU, torch elsewhere."""
    if scoring not in _SCORE_FUNCTIONS:
        raise ValueError(f"unknown routing score {scoring!r}; expected one of {', '.join(_SCORE_FUNCTIONS)}")
    if _use_triton(router_logits):
        return score_topk_triton(router_logits, top_k, scoring, selection_bias, fixed_ids, scaling)
    return score_topk_ref(router_logits, top_k, scoring, selection_bias, fixed_ids, scaling)


def score_topk_ref(router_logits: torch.Tensor, top_k: int, scoring: str,
                   selection_bias: torch.Tensor | None = None, fixed_ids: torch.Tensor | None = None,
                   scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    scores = _SCORE_FUNCTIONS[scoring](router_logits)                              # [num_tokens, experts]
    if fixed_ids is not None:
        ids = fixed_ids.long()
    else:
        choice = scores if selection_bias is None else scores + selection_bias
        ids = torch.topk(choice, top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, swiglu_limit: float | None = None, activation: str = "silu",
              skip_negative_ids: bool = False) -> torch.Tensor:
    """x [num_tokens, hidden]; w13 [experts, 2 * inter, hidden] (gate rows, then up rows);
    w2 [experts, hidden, inter]. Returns sum_k weight_k * down(act(gate(x)) * up(x)) per token, act being
    silu or ("gelu_tanh") gelu with the tanh approximation; with `swiglu_limit` (silu only), gate is clamped
    above and up both ways at the limit first.
    The Triton kernels on a GPU (no host sync, CUDA-graph safe), the torch reference elsewhere
    (or everywhere with RUN_MODEL_TORCH_OPS=1). With `skip_negative_ids`, pairs whose id is negative (an
    expert another rank holds, under expert parallelism) contribute nothing."""
    if _use_triton(x):
        return fused_moe_triton(x, w13, w2, topk_weights, topk_ids, activation=activation, swiglu_limit=swiglu_limit,
                                skip_negative_ids=skip_negative_ids)
    return fused_moe_ref(x, w13, w2, topk_weights, topk_ids, swiglu_limit, activation)


def _clamped_silu_and_mul(gate_up: torch.Tensor, limit: float) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, swiglu_limit: float | None = None, activation: str = "silu") -> torch.Tensor:
    """Torch reference of `fused_moe`: a loop over the experts that receive tokens (reads the counts on the
    host, so it is not for CUDA graphs)."""
    gated = _gated_activation(activation)
    if swiglu_limit is not None and activation != "silu":
        raise ValueError(f"swiglu_limit clamps a SiLU gate; it does not apply to activation {activation!r}")
    out = torch.zeros_like(x)
    num_experts = w13.shape[0]
    flat_ids = topk_ids.flatten()
    flat_ids = torch.where(flat_ids < 0, num_experts, flat_ids)      # negative ids sort last, never computed
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts + 1)[:num_experts].tolist()
    tokens = order // topk_ids.shape[1]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = order[start:start + count]
        tok = tokens[start:start + count]
        gate_up = x[tok] @ w13[expert].t()                                         # [count, 2 * inter]
        act = gated(gate_up) if swiglu_limit is None else _clamped_silu_and_mul(gate_up, swiglu_limit)
        h = act @ w2[expert].t()                                                    # [count, hidden]
        out.index_add_(0, tok, h * topk_weights.flatten()[rows, None])
        start += count
    return out


def _gated_activation(activation: str):
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(f"unknown expert activation {activation!r}; expected one of {sorted(GATED_ACTIVATIONS)}")
    return GATED_ACTIVATIONS[activation]


# ---- expert alignment -------------------------------------------------------------------------------
# The grouped GEMMs need the (token, slot) pairs sorted by expert, each expert's run padded to a multiple of
# block_m rows, so that every row block belongs to one expert. How many blocks that takes depends on the
# routing; the grid must not (a CUDA graph replays one grid, and reading the count would be a host sync).
# The bound sum_e cdiv(count_e, block_m) <= cdiv(pairs, block_m) + min(experts, pairs) sizes everything;
# blocks past the last expert's run are marked -1 and exit at once.


@dataclass(slots=True)
class ExpertAlignment:
    sorted_pair_ids: torch.Tensor   # [num_blocks * block_m] int32: pair = token * top_k + slot; num_pairs = padding
    block_expert: torch.Tensor      # [num_blocks] int32 expert of each row block; -1 past the last run
    block_m: int


def max_aligned_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    return -(-num_pairs // block_m) + min(num_experts, num_pairs)


def align_by_expert_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertAlignment:
    """Torch reference of the alignment (pairs of one expert keep their order; pairs with a negative id,
    routed to another rank's expert, are left out)."""
    num_pairs = topk_ids.numel()
    flat = topk_ids.flatten()
    flat = torch.where(flat < 0, num_experts, flat)                 # left-out pairs sort last
    num_blocks = max_aligned_blocks(num_pairs, num_experts, block_m)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat))[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)[:int(counts.sum())]
    sorted_experts = flat[order]
    rank = torch.arange(order.numel(), device=flat.device) - (torch.cumsum(counts, 0) - counts)[sorted_experts]
    sorted_pair_ids = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=flat.device)
    sorted_pair_ids[padded_end[sorted_experts] - padded[sorted_experts] + rank] = order.to(torch.int32)
    block_start = torch.arange(num_blocks, device=flat.device) * block_m
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return ExpertAlignment(sorted_pair_ids, block_expert, block_m)


def align_by_expert_triton(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertAlignment:
    """The same layout as `align_by_expert_ref`, except that the pairs of one expert may come in any order
    (they take their rows by atomic increments). Three launches: zero the counters, count, place."""
    flat = topk_ids.flatten()
    num_pairs = flat.numel()
    num_blocks = max_aligned_blocks(num_pairs, num_experts, block_m)
    counters = torch.zeros(2, num_experts, dtype=torch.int32, device=flat.device)   # [pairs per expert, rows taken]
    sorted_pair_ids = torch.empty(num_blocks * block_m, dtype=torch.int32, device=flat.device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=flat.device)
    block_p, block_b = 256, 32
    pair_programs = triton.cdiv(num_pairs, block_p)
    _moe_count_kernel[(pair_programs,)](flat, counters, num_pairs, BLOCK_P=block_p, num_warps=4)
    _moe_place_kernel[(pair_programs + triton.cdiv(num_blocks, block_b),)](
        flat, counters, sorted_pair_ids, block_expert, num_pairs, num_experts, num_blocks, pair_programs,
        BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_B=block_b, BLOCK_E=triton.next_power_of_2(num_experts),
        num_warps=4)
    return ExpertAlignment(sorted_pair_ids, block_expert, block_m)


# ---- Triton kernels ---------------------------------------------------------------------------------
# Routing: one program per token, scores in fp32 (softmax, sigmoid, sqrt(softplus)), then k rounds of argmax over
# the scores, optionally plus a selection-only bias (ties go to the lower expert id), or a table's experts;
# or (softmax after top-k) k rounds of argmax over the logits, then a softmax over the k chosen.
# Alignment: count pairs per expert (atomics); then every program lays out the padded runs from the counts
# (a cumsum over experts) and either moves pairs to their expert's next free row or marks the rows of some
# blocks that no pair fills, and the blocks' experts. Rows within a run are in no particular order; each row
# of a GEMM is computed independently of the others, so the result does not depend on it.
# GEMM 1 gathers token rows, computes gate and up in fp32 and applies act(gate) * up in its epilogue;
# GEMM 2 multiplies by the routing weight and writes each pair's row; the k rows of a token are summed
# right after. The epilogues round where the reference rounds (each matmul result, act, the products), so
# the kernels differ from it only in the fp32 accumulation order of the matmuls and of the final sum.

if triton is not None:
    @triton.jit
    def _route_topk_kernel(logits_ptr, scale_ptr, bias_ptr, fixed_ids_ptr, weights_ptr, ids_ptr, num_experts,
                           stride_logits, renorm_eps, scaling,
                           TOP_K: tl.constexpr, SCORE: tl.constexpr, RENORMALIZE: tl.constexpr,
                           HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, FIXED_IDS: tl.constexpr,
                           ROUND: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_TOP_K: tl.constexpr):
        """SCORE: 0 softmax over all experts, 1 the logits themselves with a softmax over the k chosen (softmax
        after top-k), 2 sigmoid, 3 sqrt(softplus). ROUND rounds each step to the weights' dtype where a torch
        expression in that dtype would (the scores, their sum, the quotient, the scaled weight)."""
        token = tl.program_id(0).to(tl.int64)
        dtype = weights_ptr.dtype.element_ty
        experts = tl.arange(0, BLOCK_E)
        valid = experts < num_experts
        logits = tl.load(logits_ptr + token * stride_logits + experts, mask=valid, other=0.0).to(tl.float32)
        if SCORE == 0:
            masked = tl.where(valid, logits, float("-inf"))
            exp = tl.exp(masked - tl.max(masked, axis=0))
            scores = exp / tl.sum(exp, axis=0)
        elif SCORE == 1:
            scores = logits
        elif SCORE == 2:
            scores = 1.0 / (1.0 + tl.exp(-logits))
        else:                      # torch's softplus: log1p(exp(x)), linear above 20; log1p by Kahan's trick
            exp = tl.exp(tl.minimum(logits, 20.0))
            one_plus = 1.0 + exp
            log1p = tl.where(one_plus == 1.0, exp, tl.log(one_plus) * (exp / (one_plus - 1.0)))
            softplus = tl.where(logits > 20.0, logits, log1p)
            if ROUND:
                softplus = softplus.to(dtype).to(tl.float32)
            scores = tl.sqrt(softplus)
        if ROUND:
            scores = scores.to(dtype).to(tl.float32)
        scores = tl.where(valid, scores, float("-inf"))             # padding lanes are never picked
        slots = tl.arange(0, BLOCK_TOP_K)
        if FIXED_IDS:                                                # a table chose the experts
            top_ids = tl.load(fixed_ids_ptr + token * TOP_K + slots, mask=slots < TOP_K, other=0).to(tl.int32)
            chosen = (experts[None, :] == top_ids[:, None]) & (slots < TOP_K)[:, None]
            top_weights = tl.sum(tl.where(chosen, scores[None, :], 0.0), axis=1)
        else:
            choice = scores + tl.load(bias_ptr + experts, mask=valid, other=0.0).to(tl.float32) if HAS_BIAS \
                else scores
            # one max a slot over int64 keys that order by choice, then by lower expert id: the choice's fp32 bits
            # made monotone as a signed integer (+0.0 first, so -0.0 ties with 0.0), above BLOCK_E - 1 - expert
            bits = (choice + 0.0).to(tl.int32, bitcast=True)
            keys = ((bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) << 32) | (BLOCK_E - 1 - experts).to(tl.int64)
            top_ids = tl.zeros([BLOCK_TOP_K], dtype=tl.int32)
            for slot in tl.static_range(TOP_K):
                best = tl.max(keys, axis=0)
                top_ids = tl.where(slots == slot, (BLOCK_E - 1 - (best & (BLOCK_E - 1))).to(tl.int32), top_ids)
                keys = tl.where(keys == best, -9223372036854775807, keys)
            chosen = (experts[None, :] == top_ids[:, None]) & (slots < TOP_K)[:, None]
            top_weights = tl.sum(tl.where(chosen, scores[None, :], 0.0), axis=1)       # one gather for all k
        if SCORE == 1:
            top_logits = tl.where(slots < TOP_K, top_weights, float("-inf"))
            top_exp = tl.exp(top_logits - tl.max(top_logits, axis=0))            # 0 past TOP_K
            top_weights = top_exp / tl.sum(top_exp, axis=0)
        if RENORMALIZE:                                              # slots past TOP_K hold 0
            total = tl.sum(top_weights, axis=0)
            if ROUND:
                total = total.to(dtype).to(tl.float32)
                total = (total + renorm_eps).to(dtype).to(tl.float32)
                top_weights = (top_weights / total).to(dtype).to(tl.float32)
            else:
                top_weights = top_weights / (total + renorm_eps)
        if HAS_SCALE:
            top_weights *= tl.load(scale_ptr + top_ids, mask=slots < TOP_K, other=0.0).to(tl.float32)
        top_weights = top_weights * scaling
        tl.store(weights_ptr + token * TOP_K + slots, top_weights.to(dtype), mask=slots < TOP_K)
        tl.store(ids_ptr + token * TOP_K + slots, top_ids.to(tl.int64), mask=slots < TOP_K)

    @triton.jit
    def _moe_count_kernel(topk_ids_ptr, counters_ptr, num_pairs, BLOCK_P: tl.constexpr):
        pairs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        ids = tl.load(topk_ids_ptr + pairs, mask=pairs < num_pairs, other=-1)
        tl.atomic_add(counters_ptr + ids, 1, mask=ids >= 0, sem="relaxed")     # negative: another rank's expert

    @triton.jit
    def _moe_place_kernel(topk_ids_ptr, counters_ptr, sorted_pair_ids_ptr, block_expert_ptr,
                          num_pairs, num_experts, num_blocks, pair_programs,
                          BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr,
                          BLOCK_E: tl.constexpr):
        """Programs below `pair_programs` move BLOCK_P pairs each to their expert's next free row; the others
        record the expert of BLOCK_B row blocks and mark their rows no pair fills. The two write disjoint rows."""
        experts = tl.arange(0, BLOCK_E)
        counts = tl.load(counters_ptr + experts, mask=experts < num_experts, other=0)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        run_end = tl.cumsum(padded, axis=0)                          # [BLOCK_E] end row of each expert's run
        run_start = run_end - padded
        pid = tl.program_id(0)
        if pid < pair_programs:
            pairs = pid * BLOCK_P + tl.arange(0, BLOCK_P)
            ids = tl.load(topk_ids_ptr + pairs, mask=pairs < num_pairs, other=-1).to(tl.int32)
            mask = ids >= 0
            rank = tl.atomic_add(counters_ptr + num_experts + ids, 1, mask=mask, sem="relaxed")
            start = tl.sum(tl.where(ids[:, None] == experts[None, :], run_start[None, :], 0), axis=1)
            tl.store(sorted_pair_ids_ptr + start + rank, pairs, mask=mask)
        else:
            blocks = (pid - pair_programs) * BLOCK_B + tl.arange(0, BLOCK_B)
            block_mask = blocks < num_blocks
            first_row = blocks * BLOCK_M
            expert = tl.sum((run_end[None, :] <= first_row[:, None]).to(tl.int32), axis=1)   # run holding it
            tl.store(block_expert_ptr + blocks, tl.where(expert < num_experts, expert, -1), mask=block_mask)
            filled_end = tl.sum(tl.where(expert[:, None] == experts[None, :], (run_start + counts)[None, :], 0),
                                axis=1)
            rows = first_row[:, None] + tl.arange(0, BLOCK_M)[None, :]                       # [BLOCK_B, BLOCK_M]
            unfilled = (expert[:, None] >= num_experts) | (rows >= filled_end[:, None])
            tl.store(sorted_pair_ids_ptr + rows, tl.full([BLOCK_B, BLOCK_M], 0, tl.int32) + num_pairs,
                     mask=unfilled & block_mask[:, None])

    @triton.jit
    def _dot(a, w, FP32: tl.constexpr):
        """a [M, K] x w [N, K] -> [M, N] fp32 (fp32 operands exactly, not as tf32)."""
        if FP32:
            return tl.dot(a, tl.trans(w), input_precision="ieee")
        return tl.dot(a, tl.trans(w))

    @triton.jit
    def _moe_gate_up_kernel(x_ptr, w13_ptr, h_ptr, sorted_pair_ids_ptr, block_expert_ptr,
                            num_pairs, top_k, K, N,
                            stride_xm, stride_we, stride_wn, stride_hm, limit,
                            FP32: tl.constexpr, GELU_TANH: tl.constexpr, HAS_LIMIT: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """h[sorted row, n] = act(x[token] @ W13[e, n].T) * (x[token] @ W13[e, N + n].T), n in this program's
        BLOCK_N columns of the intermediate; act is silu or gelu-tanh. With HAS_LIMIT the gate is clamped
        above and the up projection both ways at `limit` first."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        expert = tl.load(block_expert_ptr + pid_m)
        if expert < 0:
            return
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_pair_ids_ptr + rows)
        row_mask = pair < num_pairs
        token = (pair // top_k).to(tl.int64)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < N
        w_gate = w13_ptr + expert.to(tl.int64) * stride_we + n[:, None] * stride_wn
        w_up = w_gate + N * stride_wn
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k_start in range(0, K, BLOCK_K):
            k = k_start + tl.arange(0, BLOCK_K)
            k_mask = k[None, :] < K
            a = tl.load(x_ptr + token[:, None] * stride_xm + k[None, :], mask=row_mask[:, None] & k_mask, other=0.0)
            acc_gate += _dot(a, tl.load(w_gate + k[None, :], mask=n_mask[:, None] & k_mask, other=0.0), FP32)
            acc_up += _dot(a, tl.load(w_up + k[None, :], mask=n_mask[:, None] & k_mask, other=0.0), FP32)
        dtype = h_ptr.dtype.element_ty
        gate = acc_gate.to(dtype).to(tl.float32)
        up = acc_up.to(dtype).to(tl.float32)
        if HAS_LIMIT:
            gate = tl.minimum(gate, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
        act = gated_activation(gate, GELU_TANH).to(dtype).to(tl.float32)
        h = act * up
        tl.store(h_ptr + rows[:, None].to(tl.int64) * stride_hm + n[None, :], h.to(dtype),
                 mask=row_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _moe_down_kernel(h_ptr, w2_ptr, out_ptr, weights_ptr, sorted_pair_ids_ptr, block_expert_ptr,
                         num_pairs, K, N,
                         stride_hm, stride_we, stride_wn, stride_om,
                         FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[pair, n] = weight[pair] * (h[sorted row] @ W2[e, n].T), written to the pair's own row."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        expert = tl.load(block_expert_ptr + pid_m)
        if expert < 0:
            return
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_pair_ids_ptr + rows)
        row_mask = pair < num_pairs
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < N
        w_rows = w2_ptr + expert.to(tl.int64) * stride_we + n[:, None] * stride_wn
        h_rows = h_ptr + rows[:, None].to(tl.int64) * stride_hm
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k_start in range(0, K, BLOCK_K):
            k = k_start + tl.arange(0, BLOCK_K)
            k_mask = k[None, :] < K
            a = tl.load(h_rows + k[None, :], mask=row_mask[:, None] & k_mask, other=0.0)
            acc += _dot(a, tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask, other=0.0), FP32)
        dtype = out_ptr.dtype.element_ty
        routing_weight = tl.load(weights_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)
        out = acc.to(dtype).to(tl.float32) * routing_weight[:, None]
        tl.store(out_ptr + pair[:, None].to(tl.int64) * stride_om + n[None, :], out.to(dtype),
                 mask=row_mask[:, None] & n_mask[None, :])


def softmax_topk_triton(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                        expert_scale: torch.Tensor | None = None,
                        softmax_after_topk: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The same function as `softmax_topk_ref`, in one launch. Ties go to the lower expert id (torch.topk
    does not promise an order among equal probabilities)."""
    return _route_topk(router_logits, top_k, 1 if softmax_after_topk else 0, renormalize, expert_scale=expert_scale)


def score_topk_triton(router_logits: torch.Tensor, top_k: int, scoring: str,
                      selection_bias: torch.Tensor | None = None, fixed_ids: torch.Tensor | None = None,
                      scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The same function as `score_topk_ref`, in one launch, rounding where it rounds. The k experts come in
    order of falling choice (the reference's order is unspecified); ties go to the lower expert id."""
    score = {"softmax": 0, "sigmoid": 2, "sqrtsoftplus": 3}[scoring]
    return _route_topk(router_logits, top_k, score, True, selection_bias=selection_bias, fixed_ids=fixed_ids,
                       scaling=scaling, rounded=True)


def _route_topk(router_logits: torch.Tensor, top_k: int, score: int, renormalize: bool,
                expert_scale: torch.Tensor | None = None, selection_bias: torch.Tensor | None = None,
                fixed_ids: torch.Tensor | None = None, scaling: float = 1.0,
                rounded: bool = False, num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One program a token. Up to 256 experts one warp (every max a warp's shuffles, no shared memory), up to
    1,024 four."""
    if triton is None:
        raise RuntimeError("the Triton routing kernel needs the triton package")
    num_tokens, num_experts = router_logits.shape
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}] (the number of experts), got {top_k}")
    if fixed_ids is not None and tuple(fixed_ids.shape) != (num_tokens, top_k):
        raise ValueError(f"fixed_ids must be [{num_tokens}, {top_k}], got {list(fixed_ids.shape)}")
    logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    weights = torch.empty(num_tokens, top_k, dtype=router_logits.dtype, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=router_logits.device)
    block_e = triton.next_power_of_2(num_experts)
    if num_tokens:
        unread = logits                                                         # a pointer for absent operands
        _route_topk_kernel[(num_tokens,)](
            logits, unread if expert_scale is None else expert_scale.contiguous(),
            unread if selection_bias is None else selection_bias.contiguous(),
            unread if fixed_ids is None else fixed_ids.contiguous(), weights, ids, num_experts, logits.stride(0),
            1e-20 if rounded else 0.0, scaling,
            TOP_K=top_k, SCORE=score, RENORMALIZE=renormalize, HAS_SCALE=expert_scale is not None,
            HAS_BIAS=selection_bias is not None, FIXED_IDS=fixed_ids is not None, ROUND=rounded,
            BLOCK_E=block_e, BLOCK_TOP_K=triton.next_power_of_2(top_k),
            num_warps=num_warps or max(1, min(4, block_e // 256)))
    return weights, ids


@dataclass(frozen=True, slots=True)
class MoeTiles:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    @staticmethod
    def for_batch(num_pairs: int, num_experts: int) -> "MoeTiles":
        """A function of shapes only, so a captured graph and eager agree. Decode batches hit each expert
        with a few rows (small block_m, weights streamed once); prefill with many. Picked on an H100 at
        128-expert, top-8, hidden-2048, inter-768 shapes: decode (up to 16 rows per expert) was insensitive to the tiles at 2.7-2.9 TB/s;
        at 128 rows per expert 128x128 tiles ran 10% faster than 64x128, at 512 rows 15% faster."""
        rows_per_expert = num_pairs / num_experts
        if rows_per_expert < 32:
            return MoeTiles(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)
        if rows_per_expert < 128:
            return MoeTiles(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4)
        return MoeTiles(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)


def fused_moe_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, tiles: MoeTiles | None = None, activation: str = "silu",
                     swiglu_limit: float | None = None, skip_negative_ids: bool = False) -> torch.Tensor:
    """The same function as `fused_moe_ref`, without a host sync: align, GEMM 1 + gated activation, GEMM 2 with
    the routing weights, sum over k. bf16 on the GPU; the interpreter (TRITON_INTERPRET=1) runs fp32/fp16."""
    if triton is None:
        raise RuntimeError("fused_moe_triton needs the triton package")
    _gated_activation(activation)
    if swiglu_limit is not None and activation != "silu":
        raise ValueError(f"swiglu_limit clamps a SiLU gate; it does not apply to activation {activation!r}")
    num_experts, two_inter, hidden = w13.shape
    inter = two_inter // 2
    if x.shape[-1] != hidden or w2.shape != (num_experts, hidden, inter) or two_inter % 2:
        raise ValueError(f"expert shapes do not chain: x {tuple(x.shape)}, w13 {tuple(w13.shape)} "
                         f"[experts, 2 * inter, hidden], w2 {tuple(w2.shape)} [experts, hidden, inter]")
    if not (x.dtype == w13.dtype == w2.dtype):
        raise ValueError(f"x ({x.dtype}) and the expert weights ({w13.dtype}, {w2.dtype}) must share a dtype")
    num_tokens, top_k = topk_ids.shape
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(x)
    x = x if x.stride(-1) == 1 else x.contiguous()
    w13 = w13 if w13.stride(-1) == 1 else w13.contiguous()
    w2 = w2 if w2.stride(-1) == 1 else w2.contiguous()
    tiles = tiles or MoeTiles.for_batch(num_pairs, num_experts)
    alignment = align_by_expert_triton(topk_ids, num_experts, tiles.block_m)
    num_blocks = alignment.block_expert.numel()
    fp32 = x.dtype == torch.float32
    launch = dict(FP32=fp32, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
                  num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    h = torch.empty(num_blocks * tiles.block_m, inter, dtype=x.dtype, device=x.device)   # [sorted rows, inter]
    _moe_gate_up_kernel[(num_blocks, triton.cdiv(inter, tiles.block_n))](
        x, w13, h, alignment.sorted_pair_ids, alignment.block_expert, num_pairs, top_k, hidden, inter,
        x.stride(0), w13.stride(0), w13.stride(1), h.stride(0), swiglu_limit or 0.0,
        GELU_TANH=activation == "gelu_tanh", HAS_LIMIT=swiglu_limit is not None, **launch)
    # [tokens * k, hidden]; rows of left-out pairs are never written, so they start at zero
    pair_out = (torch.zeros if skip_negative_ids else torch.empty)(num_pairs, hidden, dtype=x.dtype, device=x.device)
    _moe_down_kernel[(num_blocks, triton.cdiv(hidden, tiles.block_n))](
        h, w2, pair_out, topk_weights.contiguous().view(-1), alignment.sorted_pair_ids, alignment.block_expert,
        num_pairs, inter, hidden, h.stride(0), w2.stride(0), w2.stride(1), pair_out.stride(0), **launch)
    return pair_out.view(num_tokens, top_k, hidden).sum(dim=1)
