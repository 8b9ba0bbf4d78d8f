"""Mixture-of-experts: softmax-top-k routing and the expert computation (torch reference)."""
from __future__ import annotations

import torch

from runtime.ops.activation import silu_and_mul


def softmax_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts in fp32, keep the top k, optionally renormalize them to sum to one.
    Returns (weights [num_tokens, k] in the logits' dtype, expert ids [num_tokens, k])."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """x [num_tokens, hidden]; w13 [experts, 2 * inter, hidden] (gate rows, then up rows);
    w2 [experts, hidden, inter]. Returns sum_k weight_k * down(silu(gate(x)) * up(x)) per token."""
    out = torch.zeros_like(x)
    flat_ids = topk_ids.flatten()
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    tokens = order // topk_ids.shape[1]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = order[start:start + count]
        tok = tokens[start:start + count]
        h = silu_and_mul(x[tok] @ w13[expert].t()) @ w2[expert].t()              # [count, hidden]
        out.index_add_(0, tok, h * topk_weights.flatten()[rows, None])
        start += count
    return out
