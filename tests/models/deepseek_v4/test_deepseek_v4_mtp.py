"""The MTP layer against a re-derivation from transformers' own modules: its decoder block (made window-only
and score-routed), hyper-head and norms, with e/h projections as DeepSeek's reference composes them; through
our paged window cache in one step and in two chunks. And the tiny checkpoint's mtp.0.* tensors load."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.deepseek_v4.model import DeepseekV4ForCausalLM
from models.deepseek_v4.mtp import DeepseekV4MTP
from models.deepseek_v4.tiny import mtp_modules, mtp_native_tensors
from runtime.forward import ForwardContext
from runtime.loader import iterate_weights, load_hf_config
from runtime.registry import get_package
from runtime.spec_decode import DraftInputs

BLOCK = 8


def _context(cache: torch.Tensor, start: int, end: int) -> ForwardContext:
    """One request computing positions [start, end) with the window cache as layer 0 (blocks 1, 2, ...)."""
    positions = torch.arange(start, end)
    table = torch.arange(1, cache.shape[0], dtype=torch.int32)[None, :]          # [1, max_blocks]
    slots = table[0, positions // BLOCK].long() * BLOCK + positions % BLOCK
    return ForwardContext(
        positions=positions, query_start_loc=torch.tensor([0, end - start], dtype=torch.int32),
        seq_lens=torch.tensor([end], dtype=torch.int32), num_computed=torch.tensor([start], dtype=torch.int32),
        logits_indices=torch.arange(end - start), block_tables=[table], slot_mappings=[slots], caches=[cache],
        layer_group=[0], block_size=BLOCK, max_query_len=end - start, max_seq_len=end,
        query_start_loc_host=np.array([0, end - start], dtype=np.int32), seq_lens_host=np.array([end], dtype=np.int32))


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoConfig
    tiny = dict(get_package("deepseek_v4").tiny_config)
    config = AutoConfig.for_model(tiny.pop("model_type"), **tiny)               # float experts, no quantization
    torch.manual_seed(0)
    target = DeepseekV4ForCausalLM(config, torch.float32)
    with torch.no_grad():
        target.embed.weight.normal_()
        target.head.weight.normal_(std=0.3)
    modules = mtp_modules(config)
    mtp = DeepseekV4MTP(target, first_cache_layer=0)
    mtp.load_weights(mtp_native_tensors(modules, config, quantize=False).items())
    return config, target, modules, mtp


@torch.inference_mode()
def _reference_logits(config, target, modules, streams, next_ids, with_streams: bool = False):
    """Dense, cacheless: e_proj(enorm(embed(next))) on every stream + h_proj(hnorm(streams)), transformers'
    decoder block with a causal 8-token window mask, its hyper-head, the norm, the shared head."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding
    num_tokens, window = len(next_ids), config.sliding_window
    x = modules["e_proj"](modules["enorm"](target.embed(next_ids)))[:, None] + \
        modules["h_proj"](modules["hnorm"](streams.view(num_tokens, config.hc_mult, -1)))
    positions = torch.arange(num_tokens)[None]
    cos_sin = DeepseekV4RotaryEmbedding(config)(x, positions, layer_type="main")
    q, k = torch.arange(num_tokens)[:, None], torch.arange(num_tokens)[None, :]
    mask = torch.zeros(num_tokens, num_tokens).masked_fill(~((k <= q) & (k > q - window)), float("-inf"))
    out = modules["block"](x[None], position_embeddings={"main": cos_sin}, position_ids=positions,
                           attention_mask=mask[None, None], input_ids=next_ids[None], past_key_values=None)
    logits = target.head(modules["norm"](modules["hc_head"](out)))[0]
    return (logits, out[0]) if with_streams else logits


@torch.inference_mode()
@pytest.mark.parametrize("chunks", [(40,), (25, 15), (3, 1, 1, 35)])
def test_mtp_logits_match_the_reference_in_any_chunking(setup, chunks):
    config, target, modules, mtp = setup
    generator = torch.Generator().manual_seed(1)
    num_tokens = sum(chunks)
    streams = torch.randn(num_tokens, config.hc_mult * config.hidden_size, generator=generator)
    next_ids = torch.randint(0, config.vocab_size, (num_tokens,), generator=generator)
    expected = _reference_logits(config, target, modules, streams, next_ids)
    cache = torch.zeros(num_tokens // BLOCK + 2, BLOCK, config.head_dim)
    ours, start = [], 0
    for length in chunks:
        ctx = _context(cache, start, start + length)
        rows = slice(start, start + length)
        ours.append(mtp.compute_logits(mtp(streams[rows], next_ids[rows], ctx.positions, ctx)))
        start += length
    assert (torch.cat(ours) - expected).abs().max().item() < 1e-4


def test_the_tiny_checkpoint_carries_a_complete_mtp_layer(tiny_deepseek_v4):
    config = load_hf_config(tiny_deepseek_v4)
    target = DeepseekV4ForCausalLM(config, torch.float32)
    mtp = DeepseekV4MTP(target, first_cache_layer=0)
    mtp.load_weights(iterate_weights(tiny_deepseek_v4))                          # raises on anything missing
    assert mtp.layers[0].ffn.experts.packed and mtp.cache_specs()[0].window == config.sliding_window
    assert not any(name.startswith("embed") or name.startswith("head") for name, _ in mtp.named_parameters())


def _decode_context(cache: torch.Tensor, positions: torch.Tensor) -> ForwardContext:
    assert len(positions) == 1
    position = int(positions[0])
    return _context(cache, position, position + 1)


@torch.inference_mode()
def test_propose_drafts_greedily_feeding_its_own_streams_back(setup):
    """Draft j + 1 is the reference's argmax after appending draft j and the streams that predicted it."""
    config, target, modules, mtp = setup
    generator = torch.Generator().manual_seed(4)
    num_tokens, k = 30, 3
    streams = torch.randn(num_tokens, config.hc_mult * config.hidden_size, generator=generator)
    next_ids = torch.randint(0, config.vocab_size, (num_tokens,), generator=generator)
    cache = torch.zeros(num_tokens // BLOCK + 3, BLOCK, config.head_dim)
    ctx = _context(cache, 0, num_tokens)
    inputs = DraftInputs(target_hidden=streams, next_token_ids=next_ids, positions=ctx.positions, ctx=ctx,
                         last_rows=torch.tensor([num_tokens - 1]), num_drafts=k,
                         decode_context=lambda positions: _decode_context(cache, positions))
    drafts = mtp.propose(inputs)[0].tolist()
    expected = []
    for _ in range(k):
        logits, out = _reference_logits(config, target, modules, streams, next_ids, with_streams=True)
        expected.append(int(logits[-1].argmax()))
        streams = torch.cat([streams, out[-1:].flatten(1)])
        next_ids = torch.cat([next_ids, torch.tensor(expected[-1:])])
    assert drafts == expected
