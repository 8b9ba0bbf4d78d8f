"""Gemma 4 text decoder (E2B/E4B, 26B-A4B, 31B): sliding layers (head_dim 256) beside global layers (head_dim
512, proportional RoPE, K=V on the larger sizes), QK-norm with attention scale 1, sandwich norms and a learned
layer scalar, tanh GeGLU, a dense MLP beside routed experts (26B-A4B), per-layer embeddings and KV sharing
(E2B/E4B), and a final logit softcap. Names follow transformers' modules, so weights load by their disk names."""
from __future__ import annotations

import logging
import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from runtime.config import EngineConfig
from runtime.forward import ForwardContext
from runtime.kv_cache import CacheSpec
from runtime.loader import check_loaded, copy_weight, unexpected_weight
from runtime.parallel import SINGLE, ParallelContext, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding, \
    load_shard, materialize
from runtime.ops import RMSNorm, RotaryEmbedding, fused_moe, gelu_tanh_and_mul, paged_attention, rms_norm, \
    rope_inv_freq, softmax_topk, write_kv

logger = logging.getLogger(__name__)

SLIDING, FULL = "sliding_attention", "full_attention"
# What Google publishes beside the text decoder in its multimodal checkpoints; this package runs text only.
TOWER_PREFIXES = ("model.vision_tower.", "model.embed_vision.", "model.audio_tower.", "model.embed_audio.")
MULTIMODAL_PREFIX = "model.language_model."
KV_WEIGHTS = ("k_proj", "v_proj", "k_norm", "v_norm")


def kv_producers(layer_types: list[str], num_kv_shared_layers: int) -> list[int | None]:
    """Per layer: the layer whose K/V it reads, or None if it computes its own. transformers' rule: the last
    `num_kv_shared_layers` layers read the last earlier layer of their own attention type."""
    first_shared = len(layer_types) - num_kv_shared_layers
    producers: list[int | None] = [None] * len(layer_types)
    for layer in range(first_shared, len(layer_types)):
        owners = [i for i in range(first_shared) if layer_types[i] == layer_types[layer]]
        if not owners:
            raise ValueError(f"layer {layer} ({layer_types[layer]}) shares K/V, but no earlier layer of that type "
                             f"computes any (num_kv_shared_layers={num_kv_shared_layers})")
        producers[layer] = owners[-1]
    return producers


class UnitRMSNorm(nn.Module):
    """RMSNorm without a learned scale (v_norm, the router's input norm)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.register_buffer("unit", torch.ones(size), persistent=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.unit, self.eps, weight_in_fp32=True)


def _norm(size: int, eps: float) -> RMSNorm:
    # Gemma 4 multiplies by the weight itself (not 1 + weight), in fp32 before the cast
    return RMSNorm(size, eps, weight_in_fp32=True)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class Gemma4Attention(nn.Module):
    """With tensor parallelism a rank keeps its share of the query heads and the KV heads they read (one
    replicated head when there are fewer KV heads than ranks); o_proj sums the shards."""

    def __init__(self, text, layer: int, rotary: RotaryEmbedding, producer: int | None,
                 parallel: ParallelContext = SINGLE):
        super().__init__()
        self.layer_index = layer
        self.producer = producer                    # None: computes and caches its own K/V
        sliding = text.layer_types[layer] == SLIDING
        layer_config = text.per_layer_config[layer]
        self.num_heads = parallel.split(text.num_attention_heads, "the number of attention heads")
        self.first_kv_head, self.num_kv_heads = parallel.kv_heads(layer_config.num_key_value_heads,
                                                                  text.num_attention_heads)
        self.head_dim = layer_config.head_dim
        self.window = text.sliding_window if sliding else None
        hidden, eps = text.hidden_size, text.rms_norm_eps
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_norm = _norm(self.head_dim, eps)
        if producer is None:
            # K=V layers have one projection: V is its output normed without a scale, K normed and rotated
            self.has_v_proj = not (text.attention_k_eq_v and not sliding)
            self.split = (q_size, kv_size, kv_size) if self.has_v_proj else (q_size, kv_size)
            self.qkv_proj = nn.Linear(hidden, sum(self.split), bias=False)       # q_proj | k_proj [| v_proj]
            self.k_norm = _norm(self.head_dim, eps)
            self.v_norm = UnitRMSNorm(self.head_dim, eps)
        else:
            self.q_proj = nn.Linear(hidden, q_size, bias=False)
        self.o_proj = RowParallelLinear(text.num_attention_heads * self.head_dim, hidden, False, parallel)
        self.rotary = rotary

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        cache, block_table, slot_mapping = ctx.layer_cache(self.layer_index)
        if self.producer is None:
            q, k, *v = self.qkv_proj(x).split(self.split, dim=-1)
            k = k.view(-1, self.num_kv_heads, self.head_dim)                    # [num_tokens, kv_heads, head_dim]
            v = v[0].view(-1, self.num_kv_heads, self.head_dim) if v else k
            q = self.q_norm(q.view(-1, self.num_heads, self.head_dim))                 # [num_tokens, heads, head_dim]
            q, k = self.rotary(positions, q, self.k_norm(k))
            write_kv(cache, k, self.v_norm(v), slot_mapping)
        else:                                       # the producer, earlier in this step, wrote these tokens
            q = self.q_norm(self.q_proj(x).view(-1, self.num_heads, self.head_dim))
            q, _ = self.rotary(positions, q, q[:, :1])
        out = paged_attention(q, cache, block_table, ctx, 1.0, window=self.window)   # QK-norm does the scaling
        return self.o_proj(out.flatten(1))


class Gemma4MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, parallel: ParallelContext = SINGLE):
        super().__init__()
        local = parallel.split(intermediate_size, "intermediate_size")
        self.gate_up_proj = nn.Linear(hidden_size, 2 * local, bias=False)                  # gate_proj | up_proj
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, False, parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh_and_mul(self.gate_up_proj(x)))


class Gemma4Router(nn.Module):
    """Softmax over all experts of a scaled, normed copy of the residual; top-k, renormalized, then each weight
    times its expert's learned scale."""

    def __init__(self, text):
        super().__init__()
        self.top_k = text.top_k_experts
        self.norm = UnitRMSNorm(text.hidden_size, text.rms_norm_eps)
        self.proj = nn.Linear(text.hidden_size, text.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(text.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(text.num_experts))
        self.input_scale = text.hidden_size ** -0.5

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.proj(self.norm(x) * self.scale * self.input_scale)                # [num_tokens, experts]
        return softmax_topk(logits, self.top_k, renormalize=True, expert_scale=self.per_expert_scale)


class Gemma4Experts(nn.Module):
    """With tensor parallelism: experts [first_expert, first_expert + local) whole (expert parallel) or every
    expert's share of the intermediate rows; an all-reduce sums the partial outputs."""

    def __init__(self, text, parallel: ParallelContext = SINGLE):
        super().__init__()
        experts, hidden, inter = text.num_experts, text.hidden_size, text.moe_intermediate_size
        self.parallel, self.first_expert = parallel, 0
        if parallel.enable_expert_parallel:
            self.first_expert = parallel.shard_range(experts, "the number of experts")[0]
            experts = parallel.split(experts, "the number of experts")
        else:
            inter = parallel.split(inter, "moe_intermediate_size")
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * inter, hidden))      # gate rows, then up rows
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, inter))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        expert_parallel = self.parallel.enable_expert_parallel
        if expert_parallel and self.parallel.world_size > 1:
            ids = ids - self.first_expert
            ids = ids.masked_fill((ids < 0) | (ids >= self.down_proj.shape[0]), -1)      # another rank's expert
        return self.parallel.all_reduce(fused_moe(x, self.gate_up_proj, self.down_proj, weights, ids,
                                                  activation="gelu_tanh", skip_negative_ids=expert_parallel))

    def load(self, kind: str, tensor) -> torch.Tensor:
        """This rank's part of a stacked expert tensor (gate_up_proj or down_proj)."""
        parallel, local = self.parallel, getattr(self, kind).shape
        if parallel.world_size == 1:
            return materialize(tensor)
        if parallel.enable_expert_parallel:
            return load_shard(tensor, 0, self.first_expert, local[0])
        if kind == "down_proj":
            return load_shard(tensor, 2, parallel.rank * local[2], local[2])
        inter = local[1] // 2
        return torch.cat([load_shard(tensor, 1, start + parallel.rank * inter, inter)      # gate rows, up rows
                          for start in (0, inter * parallel.world_size)], dim=1)


class Gemma4DecoderLayer(nn.Module):
    def __init__(self, text, layer: int, rotary: RotaryEmbedding, producer: int | None,
                 parallel: ParallelContext = SINGLE):
        super().__init__()
        hidden, eps = text.hidden_size, text.rms_norm_eps
        self.self_attn = Gemma4Attention(text, layer, rotary, producer, parallel)
        double_wide = text.use_double_wide_mlp and producer is not None
        self.mlp = Gemma4MLP(hidden, text.intermediate_size * (2 if double_wide else 1), parallel)
        self.input_layernorm = _norm(hidden, eps)
        self.post_attention_layernorm = _norm(hidden, eps)
        self.pre_feedforward_layernorm = _norm(hidden, eps)
        self.post_feedforward_layernorm = _norm(hidden, eps)
        # scales the whole residual stream at the end; a buffer, as in transformers, so that random (dummy)
        # weights leave it at one instead of shrinking the stream a thousandfold per layer
        self.register_buffer("layer_scalar", torch.ones(1))
        self.has_moe = bool(text.enable_moe_block)
        if self.has_moe:                                      # routed experts beside the dense MLP
            self.router = Gemma4Router(text)
            self.experts = Gemma4Experts(text, parallel)
            self.pre_feedforward_layernorm_2 = _norm(hidden, eps)
            self.post_feedforward_layernorm_1 = _norm(hidden, eps)
            self.post_feedforward_layernorm_2 = _norm(hidden, eps)
        self.has_per_layer_input = bool(text.hidden_size_per_layer_input)
        if self.has_per_layer_input:
            width = text.hidden_size_per_layer_input
            self.per_layer_input_gate = nn.Linear(hidden, width, bias=False)
            self.per_layer_projection = nn.Linear(width, hidden, bias=False)
            self.post_per_layer_input_norm = _norm(hidden, eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, per_layer_input: torch.Tensor | None,
                ctx: ForwardContext) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(positions, self.input_layernorm(x), ctx))
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.has_moe:                  # both branches read the same residual stream, each through its norm
            weights, ids = self.router(x)
            routed = self.experts(self.pre_feedforward_layernorm_2(x), weights, ids)
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(routed)
        x = x + self.post_feedforward_layernorm(h)
        if self.has_per_layer_input:
            gated = _gelu_tanh(self.per_layer_input_gate(x)) * per_layer_input
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(gated))
        return x * self.layer_scalar


class Gemma4Model(nn.Module):
    def __init__(self, text, max_positions: int, parallel: ParallelContext = SINGLE):
        super().__init__()
        hidden = text.hidden_size
        self.num_layers = text.num_hidden_layers
        self.embed_tokens = VocabParallelEmbedding(text.vocab_size, hidden, parallel)
        # transformers keeps sqrt(hidden) as a buffer in the model dtype: in bf16 the scale itself is rounded
        self.register_buffer("embed_scale", torch.tensor(hidden ** 0.5), persistent=False)
        rotary = {kind: self._rotary(text, kind, max_positions) for kind in sorted(set(text.layer_types))}
        producers = kv_producers(text.layer_types, text.num_kv_shared_layers)
        self.layers = nn.ModuleList(Gemma4DecoderLayer(text, i, rotary[text.layer_types[i]], producers[i], parallel)
                                    for i in range(self.num_layers))
        self.norm = _norm(hidden, text.rms_norm_eps)
        self.per_layer_width = text.hidden_size_per_layer_input
        if self.per_layer_width:
            width = self.per_layer_width
            self.embed_tokens_per_layer = nn.Embedding(text.vocab_size_per_layer_input, self.num_layers * width)
            self.register_buffer("per_layer_embed_scale", torch.tensor(width ** 0.5), persistent=False)
            self.per_layer_model_projection = nn.Linear(hidden, self.num_layers * width, bias=False)
            self.per_layer_projection_scale = hidden ** -0.5
            self.per_layer_projection_norm = _norm(width, text.rms_norm_eps)

    @staticmethod
    def _rotary(text, kind: str, max_positions: int) -> RotaryEmbedding:
        """Sliding layers: default RoPE over their head dim. Global layers: proportional RoPE, whose inv_freq
        is zero past the rotated fraction, so a full-width neox rotation leaves those dims unchanged."""
        head_dim = text.per_layer_config[kind].head_dim
        inv_freq, scale = rope_inv_freq(text, head_dim, layer_type=kind)
        return RotaryEmbedding(inv_freq, max_positions, scale, style="neox")

    def per_layer_inputs(self, input_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[num_tokens, layers, width]: a per-layer token embedding mixed with a projection of the embedding."""
        shape = (-1, self.num_layers, self.per_layer_width)
        table_rows = self.embed_tokens_per_layer.num_embeddings
        ids = torch.where(input_ids < table_rows, input_ids, 0)
        token_part = (self.embed_tokens_per_layer(ids) * self.per_layer_embed_scale).view(shape)
        context = self.per_layer_model_projection(x) * self.per_layer_projection_scale
        context = self.per_layer_projection_norm(context.view(shape))
        return (context + token_part) * 2.0 ** -0.5

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids) * self.embed_scale                            # [num_tokens, hidden]
        per_layer = self.per_layer_inputs(input_ids, x) if self.per_layer_width else None
        for i, layer in enumerate(self.layers):
            x = layer(positions, x, None if per_layer is None else per_layer[:, i], ctx)
        return self.norm(x)


class Gemma4ForCausalLM(nn.Module):
    def __init__(self, text, max_positions: int, cache_dtype: Callable[[int | None], torch.dtype],
                 parallel: ParallelContext = SINGLE):
        super().__init__()
        self.config = text
        self.cache_dtype = cache_dtype
        self.parallel = parallel
        self.model = Gemma4Model(text, max_positions, parallel)
        self.softcap = text.final_logit_softcapping
        self.tie_word_embeddings = text.tie_word_embeddings
        self.window_slack = 0             # extra positions sliding groups keep (an assistant reads one more)
        self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size, parallel)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden_states)
        if self.softcap:                                  # in the model dtype, as transformers does
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()

    def cache_specs(self) -> list[CacheSpec]:
        """Sliding layers form window groups, global ones full groups (each with its own head dim and KV heads);
        a KV-sharing layer reads its producer's entries and allocates nothing. A K=V layer still stores K and V:
        K is k_norm + RoPE of the projection, V the unscaled norm of it, so the two differ."""
        specs = []
        for layer in self.model.layers:
            attn = layer.self_attn
            window = attn.window + self.window_slack if attn.window is not None else None
            specs.append(CacheSpec(entry_shape=(2, attn.num_kv_heads, attn.head_dim),
                                   dtype=self.cache_dtype(attn.window),
                                   window=window, shared_with=attn.producer))
        return specs

    # ---- weights --------------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Text-only (`model.`) or multimodal (`model.language_model.`) names; q/k/v and gate/up fuse. The
        vision/audio towers and the K/V weights that KV-sharing layers never use (released archives keep them)
        are skipped, with a log line. Every other tensor must land, and every parameter be filled."""
        params = {**dict(self.named_parameters()), **_checkpoint_buffers(self)}
        loaded: set[str] = set()
        skipped_towers = skipped_kv = 0
        for name, tensor in weights:
            if name.startswith(TOWER_PREFIXES):
                skipped_towers += 1
                continue
            if name.startswith(MULTIMODAL_PREFIX):
                name = "model." + name[len(MULTIMODAL_PREFIX):]
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            if self._unused_kv_weight(name):
                skipped_kv += 1
                continue
            loaded.add(load_fused(self, params, name, self._shard(name, tensor)))
        check_loaded(expected_shards(self, params), loaded)
        if skipped_towers or skipped_kv:
            logger.info("skipped %d vision/audio tower tensors (this package runs the text decoder) and %d K/V "
                        "tensors of KV-sharing layers", skipped_towers, skipped_kv)

    def _shard(self, name: str, tensor) -> torch.Tensor:
        """This rank's part of a checkpoint tensor, read from disk only now (whole where every rank holds it)."""
        *prefix, module, kind = name.split(".")
        if module in ("embed_tokens", "lm_head") and kind == "weight":
            return self.model.embed_tokens.load(tensor) if module == "embed_tokens" else self.lm_head.load(tensor)
        if self.parallel.world_size == 1:
            return materialize(tensor)
        rank = self.parallel.rank
        if module == "experts":
            return self.get_submodule(".".join([*prefix, module])).load(kind, tensor)
        if module in ("q_proj", "k_proj", "v_proj", "o_proj") and prefix[-1] == "self_attn":
            attention = self.get_submodule(".".join(prefix))
            d = attention.head_dim
            if module == "o_proj":
                return load_shard(tensor, 1, rank * attention.num_heads * d, attention.num_heads * d)
            first, count = (rank * attention.num_heads, attention.num_heads) if module == "q_proj" else \
                (attention.first_kv_head, attention.num_kv_heads)
            return load_shard(tensor, 0, first * d, count * d)
        if module in ("gate_proj", "up_proj", "down_proj") and prefix[-1] == "mlp":
            inter = self.get_submodule(".".join(prefix)).down_proj.in_features
            return load_shard(tensor, 1 if module == "down_proj" else 0, rank * inter, inter)
        return materialize(tensor)

    def _unused_kv_weight(self, name: str) -> bool:
        parts = name.split(".")          # model.layers.N.self_attn.k_proj.weight
        if len(parts) < 6 or parts[:2] != ["model", "layers"] or parts[3] != "self_attn" or parts[4] not in KV_WEIGHTS:
            return False
        layer = int(parts[2])
        return layer < len(self.model.layers) and self.model.layers[layer].self_attn.producer is not None


def _checkpoint_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers the checkpoint carries (and a load must fill) beside the parameters."""
    return {name: buffer for name, buffer in module.named_buffers() if name.endswith("layer_scalar")}


# disk name -> (our fused parameter, shard index)
_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def load_fused(module: nn.Module, params: dict[str, torch.Tensor], name: str, tensor: torch.Tensor) -> str:
    """Copy one tensor into its parameter of `module` or its shard of a fused one; returns the key it filled."""
    if name in params:
        copy_weight(params[name], name, tensor)
        return name
    *prefix, part, kind = name.split(".")
    fused, shard = _FUSED.get(part, (None, 0))
    key = ".".join([*prefix, fused or part, kind])
    if fused is None or key not in params:
        raise unexpected_weight(name)
    sizes = module.get_submodule(".".join(prefix)).split if fused == "qkv_proj" else [params[key].shape[0] // 2] * 2
    if shard >= len(sizes):
        raise unexpected_weight(name)                 # a v_proj on a K=V layer
    offset = sum(sizes[:shard])
    copy_weight(params[key][offset:offset + sizes[shard]], name, tensor)
    return f"{key}.{shard}"


def expected_shards(module: nn.Module, params: dict[str, torch.Tensor]) -> set[str]:
    """What a complete checkpoint fills: every parameter, fused ones shard by shard."""
    expected = set()
    for name in params:
        if name.endswith(".qkv_proj.weight"):
            attention = module.get_submodule(name.rsplit(".", 2)[0])
            expected.update(f"{name}.{shard}" for shard in range(len(attention.split)))
        elif name.endswith(".gate_up_proj.weight"):
            expected.update(f"{name}.{shard}" for shard in range(2))
        else:
            expected.add(name)
    return expected


def build_model(hf_config, engine_config: EngineConfig, parallel: ParallelContext = SINGLE) -> Gemma4ForCausalLM:
    text = hf_config.get_text_config()
    max_positions = max(text.max_position_embeddings, engine_config.max_model_len or 0)
    return Gemma4ForCausalLM(text, max_positions, engine_config.kv_dtype, parallel)
