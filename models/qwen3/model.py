"""Qwen3 (dense) and Qwen3-MoE: GQA with per-head QK RMSNorm, NeoX RoPE, SwiGLU or softmax-top-k MoE."""
from __future__ import annotations

import re
from typing import Callable, Iterable

import torch
from torch import nn

from runtime.config import EngineConfig
from runtime.forward import ForwardContext
from runtime.kv_cache import CacheSpec
from runtime.loader import check_loaded, copy_weight, kv_scale_target, unexpected_weight
from runtime.ops import RMSNorm, RotaryEmbedding, fused_moe, rope_inv_freq, softmax_topk
from runtime.ops.linear import Linear
from runtime.ops.qkv import qkv_rope_attention
from runtime.parallel import SINGLE, ParallelContext, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding, \
    load_shard, materialize


class Qwen3Attention(nn.Module):
    """With tensor parallelism a rank keeps its share of the query heads and the KV heads they read (one
    replicated head when there are fewer KV heads than ranks); o_proj sums the shards."""

    def __init__(self, config, layer_index: int, rotary: RotaryEmbedding, window: int | None,
                 parallel: ParallelContext):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = parallel.split(config.num_attention_heads, "the number of attention heads")
        self.first_kv_head, self.num_kv_heads = parallel.kv_heads(config.num_key_value_heads,
                                                                  config.num_attention_heads)
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.window = window
        bias = getattr(config, "attention_bias", False)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv_proj = Linear(config.hidden_size, q_size + 2 * kv_size, bias=bias)
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size, bias, parallel)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary = rotary
        # per-tensor scales of an fp8 KV cache (1.0 unless the checkpoint ships k_scale / v_scale)
        self.register_buffer("k_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones(1, dtype=torch.float32), persistent=False)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of norm(x + residual); returns it with the new residual (the norm fused into the QKV
        projection where it can be)."""
        qkv, residual = self.qkv_proj.forward_normed(x, residual, norm)
        cache, block_table, slot_mapping = ctx.layer_cache(self.layer_index)
        # QK-norm, RoPE, the K/V cache write and attention (one launch in a decode step on a GPU)
        out = qkv_rope_attention(qkv, positions, self.rotary, cache, block_table, slot_mapping, ctx, self.num_heads,
                                 self.num_kv_heads, self.head_dim, self.scale, self.q_norm.weight,
                                 self.k_norm.weight, self.q_norm.eps, window=self.window, k_scale=self.k_scale,
                                 v_scale=self.v_scale)
        return self.o_proj(out.flatten(1)), residual


class Qwen3MLP(nn.Module):
    """gate_up column-parallel, down row-parallel: one all-reduce per MLP."""

    def __init__(self, hidden_size: int, intermediate_size: int, parallel: ParallelContext):
        super().__init__()
        local = parallel.split(intermediate_size, "intermediate_size")
        self.gate_up_proj = Linear(hidden_size, 2 * local, bias=False)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, False, parallel)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """MLP of norm(x + residual) and the new residual; the norm and silu(gate) * up are read in by the
        projections where they can be."""
        gate_up, residual = self.gate_up_proj.forward_normed(x, residual, norm)
        return self.down_proj(gate_up, silu_mul_input=True), residual


class Qwen3MoE(nn.Module):
    """Routing over all experts on every rank (the router is replicated), then either expert parallelism (a
    rank holds experts [first_expert, first_expert + local) whole and skips the pairs routed elsewhere) or
    each expert's intermediate rows split over ranks; an all-reduce combines the partial sums either way."""

    def __init__(self, config, parallel: ParallelContext):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob
        self.parallel = parallel
        inter, hidden, experts = config.moe_intermediate_size, config.hidden_size, config.num_experts
        if parallel.enable_expert_parallel:
            self.first_expert, experts = parallel.shard_range(experts, "the number of experts")[0], \
                parallel.split(experts, "the number of experts")
        else:
            self.first_expert, inter = 0, parallel.split(inter, "moe_intermediate_size")
        self.gate = nn.Linear(hidden, config.num_experts, bias=False)
        self.w13 = nn.Parameter(torch.empty(experts, 2 * inter, hidden))   # gate rows, then up rows
        self.w2 = nn.Parameter(torch.empty(experts, hidden, inter))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = softmax_topk(self.gate(x), self.top_k, self.renormalize)
        if self.parallel.enable_expert_parallel and self.parallel.world_size > 1:
            ids = ids - self.first_expert
            ids = ids.masked_fill((ids < 0) | (ids >= self.w13.shape[0]), -1)     # another rank's expert
        return self.parallel.all_reduce(fused_moe(x, self.w13, self.w2, weights, ids,
                                                  skip_negative_ids=self.parallel.enable_expert_parallel))


def _is_moe_layer(config, layer: int) -> bool:
    return (getattr(config, "num_experts", 0) > 0 and layer not in getattr(config, "mlp_only_layers", [])
            and (layer + 1) % getattr(config, "decoder_sparse_step", 1) == 0)


def _layer_window(config, layer: int) -> int | None:
    """transformers: dense Qwen3 marks sliding layers in layer_types; Qwen3-MoE slides every layer."""
    if not getattr(config, "use_sliding_window", False):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[layer] != "sliding_attention":
        return None
    return config.sliding_window


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config, layer: int, rotary: RotaryEmbedding, parallel: ParallelContext):
        super().__init__()
        self.self_attn = Qwen3Attention(config, layer, rotary, _layer_window(config, layer), parallel)
        self.mlp = Qwen3MoE(config, parallel) if _is_moe_layer(config, layer) else \
            Qwen3MLP(config.hidden_size, config.intermediate_size, parallel)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = self.self_attn(positions, x, residual, self.input_layernorm, ctx)
        if isinstance(self.mlp, Qwen3MLP):
            return self.mlp(x, residual, self.post_attention_layernorm)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Qwen3Model(nn.Module):
    def __init__(self, config, max_positions: int, parallel: ParallelContext):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, parallel)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        inv_freq, scale = rope_inv_freq(config, head_dim)
        rotary = RotaryEmbedding(inv_freq, max_positions, scale, style="neox")
        self.layers = nn.ModuleList(Qwen3DecoderLayer(config, i, rotary, parallel)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, ctx)
        return self.norm(x, residual)[0]


class Qwen3ForCausalLM(nn.Module):
    def __init__(self, config, max_positions: int, cache_dtype: Callable[[int | None], torch.dtype],
                 parallel: ParallelContext = SINGLE):
        super().__init__()
        self.config = config
        self.cache_dtype = cache_dtype
        self.parallel = parallel
        self.model = Qwen3Model(config, max_positions, parallel)
        self.tie_word_embeddings = getattr(config, "tie_word_embeddings", False)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, parallel)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states).float()

    def cache_specs(self) -> list[CacheSpec]:
        return [CacheSpec(entry_shape=(2, layer.self_attn.num_kv_heads, layer.self_attn.head_dim),
                          dtype=self.cache_dtype(layer.self_attn.window), window=layer.self_attn.window)
                for layer in self.model.layers]

    # ---- weights --------------------------------------------------------------------------------------

    _FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    _EXPERT = re.compile(r"(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
    _FUSED_EXPERTS = {"experts.gate_up_proj": "w13", "experts.down_proj": "w2"}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """HF names -> fused parameters. Every on-disk tensor must land somewhere, every parameter be filled."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue                                   # tied checkpoints may or may not carry it
            if scale := kv_scale_target(name):               # an fp8 KV cache's per-tensor scale
                getattr(self.get_submodule(scale[0]), scale[1]).copy_(tensor.reshape(1))
                continue
            name, tensor = self._shard(name, tensor)
            if tensor is None:
                continue                                   # an expert another rank holds
            targets = self._load_one(params, name, tensor)
            if not targets:
                raise unexpected_weight(name)
            loaded.update(targets)
        check_loaded(self._expected_shards(), loaded)

    def _expected_shards(self) -> set[str]:
        """What a complete checkpoint fills: every parameter, fused ones shard by shard."""
        expected = set()
        for name, param in self.named_parameters():
            base, kind = name.rsplit(".", 1)
            if base.endswith("qkv_proj"):
                expected.update(f"{name}.{i}" for i in range(3))
            elif base.endswith("gate_up_proj"):
                expected.update(f"{name}.{i}" for i in range(2))
            elif kind == "w13":
                expected.update(f"{name}[{e}].{i}" for e in range(param.shape[0]) for i in range(2))
            elif kind == "w2":
                expected.update(f"{name}[{e}]" for e in range(param.shape[0]))
            else:
                expected.add(name)
        return expected

    def _shard(self, name: str, tensor) -> tuple[str, torch.Tensor | None]:
        """This rank's part of a checkpoint tensor (read from disk only now), under the name it loads as: the
        rows or columns of its heads, its intermediate slice or its experts (renumbered from 0). Tensors every
        rank holds whole come back whole; another rank's expert comes back None."""
        parallel = self.parallel
        *prefix, module, kind = name.split(".")
        if parallel.world_size == 1 or module in ("embed_tokens", "lm_head"):
            if module == "embed_tokens":
                return name, self.model.embed_tokens.load(tensor)
            return name, self.lm_head.load(tensor) if module == "lm_head" else materialize(tensor)
        if expert := self._EXPERT.fullmatch(name):
            mlp = self.get_submodule(expert.group(1))
            e, proj = int(expert.group(2)), expert.group(3)
            if parallel.enable_expert_parallel:
                local = e - mlp.first_expert
                if not 0 <= local < mlp.w13.shape[0]:
                    return name, None
                return f"{expert.group(1)}.experts.{local}.{proj}.weight", materialize(tensor)
            inter = mlp.w2.shape[2]
            dim = 1 if proj == "down_proj" else 0
            return name, load_shard(tensor, dim, parallel.rank * inter, inter)
        if module == "experts" and kind in ("gate_up_proj", "down_proj"):      # experts stacked on disk
            mlp = self.get_submodule(".".join(prefix))
            if parallel.enable_expert_parallel:
                return name, load_shard(tensor, 0, mlp.first_expert, mlp.w13.shape[0])
            inter = mlp.w2.shape[2]
            if kind == "down_proj":
                return name, load_shard(tensor, 2, parallel.rank * inter, inter)
            half = inter * parallel.world_size                             # gate rows, then up rows
            return name, torch.cat([load_shard(tensor, 1, start + parallel.rank * inter, inter)
                                    for start in (0, half)], dim=1)
        if module in ("q_proj", "k_proj", "v_proj", "o_proj"):
            attn = self.get_submodule(".".join(prefix[:-1] + ["self_attn"]))
            d = attn.head_dim
            if module == "o_proj":
                return name, materialize(tensor) if kind == "bias" else \
                    load_shard(tensor, 1, parallel.rank * attn.num_heads * d, attn.num_heads * d)
            first, count = (parallel.rank * attn.num_heads, attn.num_heads) if module == "q_proj" else \
                (attn.first_kv_head, attn.num_kv_heads)
            return name, load_shard(tensor, 0, first * d, count * d)
        if module in ("gate_proj", "up_proj", "down_proj") and prefix[-1] == "mlp":
            inter = self.get_submodule(".".join(prefix)).down_proj.in_features
            return name, load_shard(tensor, 1 if module == "down_proj" else 0, parallel.rank * inter, inter)
        return name, materialize(tensor)

    def _load_one(self, params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor) -> list[str]:
        """Copy one checkpoint tensor into its (slice of a) parameter; returns the shard keys it filled."""
        if name in params:
            copy_weight(params[name], name, tensor)
            return [name]
        if expert := self._EXPERT.fullmatch(name):
            prefix, e, proj = expert.group(1), int(expert.group(2)), expert.group(3)
            if f"{prefix}.w13" not in params:
                return []
            if proj == "down_proj":
                copy_weight(params[f"{prefix}.w2"][e], name, tensor)
                return [f"{prefix}.w2[{e}]"]
            w13 = params[f"{prefix}.w13"]
            half = w13.shape[1] // 2
            shard = 0 if proj == "gate_proj" else 1
            copy_weight(w13[e, shard * half:(shard + 1) * half], name, tensor)
            return [f"{prefix}.w13[{e}].{shard}"]
        for disk, ours in self._FUSED_EXPERTS.items():       # experts already stacked on disk
            if name.endswith(f".mlp.{disk}") and (key := name.replace(disk, ours)) in params:
                copy_weight(params[key], name, tensor)
                shards = [".0", ".1"] if ours == "w13" else [""]
                return [f"{key}[{e}]{s}" for e in range(tensor.shape[0]) for s in shards]
        *prefix, module, kind = name.split(".")
        if module in self._FUSED:
            fused, shard = self._FUSED[module]
            key = ".".join([*prefix, fused, kind])
            if key not in params:
                return []
            parent = self.get_submodule(".".join(prefix))
            sizes = parent.split if fused == "qkv_proj" else [parent.gate_up_proj.out_features // 2] * 2
            offset = sum(sizes[:shard])
            copy_weight(params[key][offset:offset + sizes[shard]], name, tensor)
            return [f"{key}.{shard}"]
        return []


def build_model(hf_config, engine_config: EngineConfig, parallel: ParallelContext = SINGLE) -> Qwen3ForCausalLM:
    max_positions = max(hf_config.max_position_embeddings, engine_config.max_model_len or 0)
    return Qwen3ForCausalLM(hf_config, max_positions, engine_config.kv_dtype, parallel)


def tiny_init(model: nn.Module) -> None:
    """Make a random transformers Qwen3 exercise every path: norm weights (QK-norm included) away from one,
    so a skipped or misapplied norm weight shows. With the tiny config's initializer_range 0.1 the greedy
    text is varied, and the fp32 rounding noise of transformers itself (vs fp64) stays near 1e-5, well
    under the 1e-4 parity tolerance; larger weights push that noise floor past the tolerance."""
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=generator))
