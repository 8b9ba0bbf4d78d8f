"""The CPU attention path (torch SDPA over each request's gathered blocks) against the reference, on ragged
batches: prefill from scratch, chunks after cached tokens, decode rows, GQA, sliding windows."""
from __future__ import annotations

import pytest
import torch

from runtime.ops.attention import paged_attention_ref
from runtime.ops.attention_cpu import paged_attention_sdpa


@pytest.mark.parametrize("window", [None, 5, 64])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2)])
def test_sdpa_path_matches_the_reference_on_ragged_batches(window, heads, kv_heads):
    g = torch.Generator().manual_seed(heads * 100 + (window or 0))
    block_size, head_dim, num_blocks = 4, 16, 64
    cache = torch.randn(num_blocks, block_size, 2, kv_heads, head_dim, generator=g)
    # (query_len, seq_len): prefill from scratch, a chunk after cached tokens, decode rows, a 1-token prompt
    shapes = [(9, 9), (6, 23), (1, 40), (1, 3), (1, 1), (12, 30)]
    block_table = torch.randperm(num_blocks, generator=g)[:len(shapes) * 10].view(len(shapes), 10).int()
    query_start_loc = [0]
    for query_len, _ in shapes:
        query_start_loc.append(query_start_loc[-1] + query_len)
    seq_lens = [seq_len for _, seq_len in shapes]
    q = torch.randn(query_start_loc[-1], heads, head_dim, generator=g)
    ours = paged_attention_sdpa(q, cache, block_table, query_start_loc, seq_lens, 0.25, window)
    expected = paged_attention_ref(q, cache, block_table, query_start_loc, seq_lens, 0.25, window)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
