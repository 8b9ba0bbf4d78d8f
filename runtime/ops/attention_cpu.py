"""Paged attention on the CPU through torch's fused scaled_dot_product_attention, request by request over
the request's gathered blocks (its keys sliced to the window's reach). paged_attention_ref stays the oracle;
sinks and softcapping, which SDPA has no form for, go to it."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_attention_sdpa(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                         query_start_loc: list[int], seq_lens: list[int], scale: float,
                         window: int | None = None) -> torch.Tensor:
    """As paged_attention_ref (no sinks, no softcap): q [num_tokens, heads, head_dim] holds each request's
    newest tokens; returns [num_tokens, heads, head_dim] in q's dtype."""
    block_size = cache.shape[1]
    num_heads, kv_heads = q.shape[1], cache.shape[3]
    out = torch.empty_like(q)
    for b, seq_len in enumerate(seq_lens):
        start, end = int(query_start_loc[b]), int(query_start_loc[b + 1])
        if end == start:
            continue
        seq_len, query_len = int(seq_len), end - start
        # the earliest key any of these queries sees: a query at p sees j <= p, and j > p - window
        first = 0 if window is None else max(0, seq_len - query_len - window + 1)
        first_block, num_blocks = first // block_size, -(-seq_len // block_size)
        kv = cache[block_table[b, first_block:num_blocks].long()].flatten(0, 1)    # [keys, 2, kv_heads, head_dim]
        kv = kv[first - first_block * block_size:seq_len - first_block * block_size].to(q.dtype)
        # 4-d [1, heads, len, head_dim]: torch's CPU SDPA takes its fused path for these (3-d is slower)
        k, v = kv[:, 0].transpose(0, 1)[None], kv[:, 1].transpose(0, 1)[None]     # [1, kv_heads, keys, head_dim]
        mask, causal = None, False
        if query_len == seq_len and window is None:
            causal = True
        elif query_len > 1 or window is not None:
            q_pos = torch.arange(seq_len - query_len, seq_len)[:, None]
            k_pos = torch.arange(first, seq_len)[None, :]
            mask = k_pos <= q_pos                                                    # [query_len, keys]
            if window is not None:
                mask &= k_pos > q_pos - window
        attended = F.scaled_dot_product_attention(q[start:end].transpose(0, 1)[None], k, v, attn_mask=mask,
                                                  is_causal=causal, scale=scale,
                                                  enable_gqa=num_heads != kv_heads)   # [1, heads, query_len, hd]
        out[start:end] = attended[0].transpose(0, 1)
    return out
