"""The multi-token-prediction (MTP) layer: from the main model's residual streams at token t and the embedding
of token t + 1 it predicts token t + 2, so it can draft for speculative decoding.

    e = enorm(embed(next_id));  streams = e_proj(e) (to every stream) + h_proj(hnorm(target streams))
    streams = one decoder block (window-only attention with the main RoPE, score-routed MoE)
    logits = head(norm(hc_head(streams)))          embed and head are the main model's

Its checkpoint tensors are `mtp.0.*` (the block's under the same names as a layer's, plus e_proj, h_proj,
enorm, hnorm, norm, hc_head_*). A draft of several tokens feeds the block's output streams back in."""
from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from runtime.forward import ForwardContext
from runtime.kv_cache import CacheSpec
from runtime.ops import RMSNorm
from runtime.ops.sampling import greedy_tokens
from runtime.spec_decode import DraftInputs

from .cache_ops import token_requests
from .config import SLIDING, AttentionKind
from .mhc import HyperHead
from .model import DeepseekV4ForCausalLM, DeepseekV4Layer
from .rope import TrailingRope
from .weights import load_checkpoint

_BLOCK_PART = re.compile(r"^(attn|ffn|attn_norm|ffn_norm|hc_attn_|hc_ffn_)")


def _mtp_name(native: str) -> str | None:
    """mtp.0.X -> the drafter's parameter: the block's under layers.0; None for everything else."""
    if not native.startswith("mtp.0."):
        return None
    name = native[len("mtp.0."):]
    if name.startswith(("emb.", "head.")):
        return None                    # some exports repeat the shared embedding / head here
    return f"layers.0.{name}" if _BLOCK_PART.match(name) else name


class DeepseekV4MTP(nn.Module):
    """Also the package's drafter (runtime.spec_decode.Drafter): `propose` drafts k tokens greedily. It is
    capturable: propose reads only its inputs' tensors and takes its shapes from them, so the runner replays
    it from a CUDA graph after the target's."""

    weight_prefixes = ("mtp.",)
    capturable = True

    def __init__(self, target: DeepseekV4ForCausalLM, first_cache_layer: int):
        super().__init__()
        config = target.config
        self.config = config
        self._target = (target,)           # shares its embedding and head; a tuple keeps them out of our params
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = RMSNorm(hidden, eps, weight_in_fp32=True)
        self.hnorm = RMSNorm(hidden, eps, weight_in_fp32=True)
        self.e_proj = target.linears(hidden, hidden)
        self.h_proj = target.linears(hidden, hidden)
        rope = TrailingRope(config, "main", config.qk_rope_head_dim)
        self.layers = nn.ModuleList([DeepseekV4Layer(config, AttentionKind(SLIDING, 0), rope, hashed=False,
                                                     linears=target.linears)])
        self.hc_head = HyperHead(config)
        self.norm = RMSNorm(hidden, eps, weight_in_fp32=True)
        attn = self.layers[0].attn
        attn.window_layer = first_cache_layer
        attn.window_format = target.entry_format(attn.head_dim, attn.window)
        self._spec = target.entry_spec(attn.window_format, attn.head_dim, window=attn.window)

    def cache_specs(self) -> list[CacheSpec]:
        """Its own 128-token K=V window (no compressor), in the target's window format."""
        return [self._spec]

    def forward(self, target_streams: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        """target_streams [num_tokens, hc_mult * hidden] (the main model's forward output, or this layer's
        previous draft step), next_ids [num_tokens] -> streams [num_tokens, hc_mult * hidden]."""
        n = self.config.hc_mult
        # rows past a request's last accepted one may hold -1 (no token yet): their output is never used,
        # and the cache entries they write are rewritten by the next step
        embedded = self.enorm(self._target[0].embed(next_ids.clamp(min=0)))       # [num_tokens, hidden]
        previous = self.hnorm(target_streams.view(target_streams.shape[0], n, -1))  # [num_tokens, n, hidden]
        streams = self.e_proj(embedded).unsqueeze(1) + self.h_proj(previous)
        requests = token_requests(ctx, next_ids.shape[0])
        return self.layers[0](streams, next_ids.clamp(min=0), positions, requests, ctx)[0].flatten(1)

    def compute_logits(self, streams: torch.Tensor) -> torch.Tensor:
        collapsed = self.hc_head(streams.view(streams.shape[0], self.config.hc_mult, -1))
        return self._target[0].head(self.norm(collapsed)).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The checkpoint's mtp.0.* tensors (others are skipped)."""
        load_checkpoint(self, weights, rename=_mtp_name)

    @torch.inference_mode()
    def propose(self, inputs: DraftInputs) -> torch.Tensor:
        """[num_reqs, k] greedy drafts. The first step runs every row of the target's step (so this layer's
        window cache holds every position), the others one token per request, each feeding the previous
        step's output streams and draft back in."""
        streams = self(inputs.target_hidden, inputs.next_token_ids, inputs.positions, inputs.ctx)
        if not len(inputs.last_rows):          # a step that samples nothing: only the cache was wanted
            return torch.zeros(0, inputs.num_drafts, dtype=torch.long, device=streams.device)
        streams = streams.index_select(0, inputs.last_rows)                      # [num_reqs, hc_mult * hidden]
        positions = inputs.positions.index_select(0, inputs.last_rows)
        drafts = [greedy_tokens(self.compute_logits(streams))]
        for _ in range(1, inputs.num_drafts):
            positions = positions + 1
            streams = self(streams, drafts[-1], positions, inputs.decode_context(positions))
            drafts.append(greedy_tokens(self.compute_logits(streams)))
        return torch.stack(drafts, dim=1)


def build_drafter(target: DeepseekV4ForCausalLM, hf_config, engine_config, spec_config) -> DeepseekV4MTP:
    """The ModelPackage hook for speculative_config {"method": "mtp"}: the release's MTP layer, its cache
    layers after the target's."""
    if getattr(hf_config, "num_nextn_predict_layers", 1) < 1:
        raise ValueError("this checkpoint has no MTP layer (num_nextn_predict_layers is 0); use method ngram")
    return DeepseekV4MTP(target, first_cache_layer=len(target.cache_specs()))
