"""Paged attention: K/V live in a block-paged cache and are read through per-request block tables.

Cache layout of one layer: [num_blocks, block_size, 2, kv_heads, head_dim] (K and V of a token together).
Covers GQA, causal masking, an optional sliding window, learned sinks and logit softcapping."""
from __future__ import annotations

import torch


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store k, v [num_tokens, kv_heads, head_dim] at their slots; slot -1 writes nothing."""
    flat = cache.view(-1, *cache.shape[2:])                       # [num_blocks * block_size, 2, kv_heads, head_dim]
    keep = slot_mapping >= 0
    flat[slot_mapping[keep]] = torch.stack([k, v], dim=1)[keep].to(cache.dtype)


def paged_attention(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                    query_start_loc: list[int], seq_lens: list[int], scale: float,
                    window: int | None = None, sinks: torch.Tensor | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """Torch reference. q [num_tokens, heads, head_dim] holds each request's newest tokens (the last
    `query_len` positions of its `seq_len`); returns [num_tokens, heads, head_dim] in q's dtype.

    A query at position p sees keys j <= p, and with a window only j > p - window. A sink adds one
    virtual key per head with logit sinks[h] and no value."""
    block_size = cache.shape[1]
    num_heads, kv_heads = q.shape[1], cache.shape[3]
    out = torch.empty_like(q)
    for b, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[b], query_start_loc[b + 1]
        if end == start:
            continue
        num_blocks = -(-seq_len // block_size)
        kv = cache[block_table[b, :num_blocks].long()].flatten(0, 1)[:seq_len]   # [seq_len, 2, kv_heads, head_dim]
        k = kv[:, 0].float().repeat_interleave(num_heads // kv_heads, dim=1)    # [seq_len, heads, head_dim]
        v = kv[:, 1].float().repeat_interleave(num_heads // kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), k) * scale  # [heads, query_len, seq_len]
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        visible = k_pos <= q_pos
        if window is not None:
            visible &= k_pos > q_pos - window
        scores = scores.masked_fill(~visible, float("-inf"))
        if sinks is not None:
            sink = sinks.float()[:, None, None].expand(-1, end - start, 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out
