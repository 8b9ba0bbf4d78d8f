"""DeepSeek V4 (Flash / Pro): mHC residual streams around hybrid-compressed attention and a hash/score-routed
MoE. Module and parameter names follow the released checkpoint (`layers.N.attn.wq_a`, `ffn.gate.tid2eid`, ...)."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from runtime.config import EngineConfig
from runtime.forward import ForwardContext
from runtime.kv_cache import CacheSpec
from runtime.ops import RMSNorm
from runtime.parallel import SINGLE, ParallelContext, ParallelLMHead, VocabParallelEmbedding

from . import kernels
from .attention import DeepseekV4Attention
from .cache_ops import Fp8Entry, fill_random_caches, token_requests
from .config import AttentionKind, attention_kinds, hash_routed
from .linear import DENSE, Linears, linears_for
from .mhc import HyperConnection, HyperHead
from .moe import MoE
from .rope import TrailingRope
from .weights import load_checkpoint


class DeepseekV4Layer(nn.Module):
    def __init__(self, config, kind: AttentionKind, rope: TrailingRope, hashed: bool,
                 parallel: ParallelContext = SINGLE, linears: Linears = DENSE):
        super().__init__()
        self.attn = DeepseekV4Attention(config, kind, rope, parallel, linears)
        self.ffn = MoE(config, hashed, parallel, linears)
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, weight_in_fp32=True)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, weight_in_fp32=True)
        self.hc_attn = HyperConnection(config)
        self.hc_ffn = HyperConnection(config)

    def forward(self, streams: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor,
                requests: torch.Tensor, ctx: ForwardContext, mix: torch.Tensor | None = None,
                following: HyperConnection | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (streams, mix): `mix` as HyperConnection.post gives it for the `following` layer's first
        connection (None: that layer projects its streams itself); `mix` in is this layer's."""
        post, comb, x = self.hc_attn.pre(streams, self.attn_norm, mix)
        x = self.attn(x, positions, requests, ctx)
        streams, mix = HyperConnection.post(x, streams, post, comb, self.hc_ffn)
        post, comb, x = self.hc_ffn.pre(streams, self.ffn_norm, mix)
        if self.ffn.parallel.world_size == 1:           # the experts' and the shared expert's sum in hc_post
            routed, shared = self.ffn.parts(x, input_ids)
            return HyperConnection.post(routed, streams, post, comb, following, addend=shared)
        x = self.ffn(x, input_ids)
        return HyperConnection.post(x, streams, post, comb, following)


FP8_BLOCK = 64                               # e4m3 dims per scale in a K=V entry


class DeepseekV4ForCausalLM(nn.Module):
    """`kv_dtype(window)` names each cache's dtype (EngineConfig.kv_dtype): FP8 stores the K=V entries and the
    indexer keys as cache_ops.Fp8Entry bytes; anything else keeps them in the model dtype `cache_dtype`.
    `linears` builds the checkpoint's FP8 linears (kept FP8, or dense: dequantized at load)."""

    def __init__(self, config, cache_dtype: torch.dtype, parallel: ParallelContext = SINGLE,
                 kv_dtype: Callable[[int | None], torch.dtype] | None = None, linears: Linears = DENSE):
        super().__init__()
        self.config = config
        self.linears = linears
        self.cache_dtype = cache_dtype
        self.kv_dtype = kv_dtype or (lambda window: cache_dtype)
        self.parallel = parallel
        ropes = {kind: TrailingRope(config, kind, config.qk_rope_head_dim) for kind in ("main", "compress")}
        self.kinds = attention_kinds(config)
        self.embed = VocabParallelEmbedding(config.vocab_size, config.hidden_size, parallel)
        self.layers = nn.ModuleList(
            DeepseekV4Layer(config, kind, ropes["compress" if kind.compressed else "main"], hash_routed(config, i),
                            parallel, linears)
            for i, kind in enumerate(self.kinds))
        self.hc_head = HyperHead(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, weight_in_fp32=True)
        self.head = ParallelLMHead(config.vocab_size, config.hidden_size, parallel)
        self._specs = self._assign_cache_layers()

    def _assign_cache_layers(self) -> list[CacheSpec]:
        """Give every cache a layer index; return their specs in that order."""
        specs: list[CacheSpec] = []

        def add(spec: CacheSpec) -> int:
            specs.append(spec)
            return len(specs) - 1

        window = self.config.sliding_window
        for layer in self.layers:
            attn = layer.attn
            attn.window_format = self.entry_format(attn.head_dim, window)
            attn.window_layer = add(self.entry_spec(attn.window_format, attn.head_dim, window=window))
            compressors = [attn.compressor] + ([attn.indexer.compressor] if attn.indexer is not None else [])
            for compressor in filter(None, compressors):
                width = compressor.width
                # per token: its projected value and gate logit (+ window bias), fp32, for as many positions
                # as an entry reads; then the entries themselves, one per `ratio` positions
                compressor.state_layer = add(CacheSpec((2, width), torch.float32, window=compressor.window))
                compressor.entry_format = self.entry_format(compressor.head_dim, None,
                                                            key=compressor is not attn.compressor)
                compressor.entry_layer = add(self.entry_spec(compressor.entry_format, compressor.head_dim,
                                                             tokens_per_entry=compressor.ratio))
        return specs

    def entry_format(self, dim: int, window: int | None, key: bool = False) -> Fp8Entry | None:
        """The FP8 layout of a cache's entries, or None for the model dtype. K=V entries: e4m3 with a scale
        per 64 dims, the RoPE dims in bf16; indexer keys (`key`): every dim in e4m3 under one scale."""
        if self.kv_dtype(window) != torch.float8_e4m3fn:
            return None
        return Fp8Entry(dim, 0, dim) if key else Fp8Entry(dim, self.config.qk_rope_head_dim, FP8_BLOCK)

    def entry_spec(self, fmt: Fp8Entry | None, dim: int, **kind) -> CacheSpec:
        if fmt is None:
            return CacheSpec((dim,), self.cache_dtype, **kind)
        return CacheSpec((fmt.num_bytes,), torch.float8_e4m3fn, **kind)

    def cache_specs(self) -> list[CacheSpec]:
        return list(self._specs)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """-> the residual streams after the last layer, flattened [num_tokens, hc_mult * hidden]: what the MTP
        drafter reads. The head collapses them only for the rows that need logits (compute_logits)."""
        if input_ids.is_cuda and torch.cuda.is_current_stream_capturing() and not kernels.use_kernels(input_ids):
            raise RuntimeError("DeepSeek V4's torch reference ops read the batch layout on the host and cannot "
                               "be captured in a CUDA graph: unset RUN_MODEL_TORCH_OPS or run with --enforce-eager")
        requests = token_requests(ctx, input_ids.shape[0])
        x = self.embed(input_ids)
        streams = x.unsqueeze(1).expand(-1, self.config.hc_mult, -1).contiguous()   # [num_tokens, hc_mult, hidden]
        mix = None
        for i, layer in enumerate(self.layers):
            following = self.layers[i + 1].hc_attn if i + 1 < len(self.layers) else None
            streams, mix = layer(streams, input_ids, positions, requests, ctx, mix, following)
        return streams.flatten(1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        streams = hidden_states.view(hidden_states.shape[0], self.config.hc_mult, -1)
        return self.head(self.norm(self.hc_head(streams))).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_checkpoint(self, weights)

    def fill_caches(self, caches: list[torch.Tensor]) -> None:
        """Benchmarks that skip the prefill (tools/bench.py context): random entries in every cache of the
        model's layers, stored as its writes store them (cache_ops.fill_random_caches)."""
        fill_random_caches(self, caches)


def build_model(hf_config, engine_config: EngineConfig, parallel: ParallelContext = SINGLE) -> DeepseekV4ForCausalLM:
    return DeepseekV4ForCausalLM(hf_config, engine_config.torch_dtype, parallel, engine_config.kv_dtype,
                                 linears_for(hf_config, engine_config.torch_device))
