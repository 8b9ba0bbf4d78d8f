"""Reading and writing DeepSeek V4's paged caches by token position: the torch references (the CPU path).

Every cache of a layer is a runtime cache group: the 128-token K=V window, the compressed entries (one per
`ratio` positions), the indexer keys, and each compressor's per-token state (a small window group). A layer
reads any of them through its request's block table; entry e of a ratio-r group covers positions
[e * r, e * r + r)."""
from __future__ import annotations

import torch

from runtime.forward import ForwardContext


def token_requests(ctx: ForwardContext, num_tokens: int) -> torch.Tensor:
    """[num_tokens] int64 on the step's device: the batch row of each token, from the device's query starts
    (no host read, so a CUDA graph can capture it)."""
    starts = ctx.query_start_loc[1:ctx.num_reqs + 1]
    tokens = torch.arange(num_tokens, dtype=starts.dtype, device=starts.device)
    return torch.searchsorted(starts, tokens, right=True).clamp_(max=max(ctx.num_reqs - 1, 0))


def write_entries(cache: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> None:
    """Store values [n, *entry] at flat entry slots [n]; slot -1 writes nothing."""
    flat = cache.view(-1, *cache.shape[2:])
    keep = slots >= 0
    flat[slots[keep]] = values[keep].to(cache.dtype)


def gather_entries(cache: torch.Tensor, block_table: torch.Tensor, requests: torch.Tensor,
                   entries: torch.Tensor, block_size: int, ratio: int = 1) -> torch.Tensor:
    """cache [blocks, block_size / ratio, *entry]; requests and entries of the same shape [...] (entry
    indices >= 0) -> [..., *entry]."""
    per_block = block_size // ratio
    blocks = block_table[requests, entries // per_block].long()
    flat = cache.view(-1, *cache.shape[2:])
    return flat[blocks * per_block + entries % per_block]


def request_entries(cache: torch.Tensor, block_table: torch.Tensor, request: int, first: int, end: int,
                    block_size: int, ratio: int = 1) -> torch.Tensor:
    """The entries [first, end) of one request, in order: [end - first, *entry]."""
    per_block = block_size // ratio
    if end <= first:
        return cache.new_zeros((0, *cache.shape[2:]))
    b0, b1 = first // per_block, -(-end // per_block)
    rows = cache[block_table[request, b0:b1].long()].flatten(0, 1)
    return rows[first - b0 * per_block:end - b0 * per_block]
