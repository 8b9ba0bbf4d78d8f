"""gpt-oss: alternating sliding-window / full attention with learned sinks, YaRN RoPE, and a biased top-k MoE
whose MXFP4 experts apply a clamped, interleaved SwiGLU."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from runtime.config import EngineConfig
from runtime.forward import ForwardContext
from runtime.kv_cache import CacheSpec
from runtime.loader import check_loaded, copy_weight, kv_scale_target, unexpected_weight
from runtime.ops import RMSNorm, RotaryEmbedding, rope_inv_freq, softmax_topk
from runtime.ops.linear import Linear
from runtime.ops.qkv import qkv_rope_attention
from runtime.ops.mxfp4 import MX_BLOCK, GatedActivation, Mxfp4Linear, mxfp4_moe
from runtime.parallel import SINGLE, ParallelContext, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding, \
    load_shard, materialize


class GptOssAttention(nn.Module):
    """With tensor parallelism a rank keeps its share of the query heads (and their sinks) and the KV heads
    they read; o_proj sums the shards."""

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
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv_proj = Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias)
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                        config.attention_bias, parallel)
        self.sinks = nn.Parameter(torch.empty(self.num_heads))       # one logit per query head
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
        # RoPE, the K/V cache write and attention (one launch in a decode step on a GPU)
        out = qkv_rope_attention(qkv, positions, self.rotary, cache, block_table, slot_mapping, ctx, self.num_heads,
                                 self.num_kv_heads, self.head_dim, self.scale, window=self.window, sinks=self.sinks,
                                 k_scale=self.k_scale, v_scale=self.v_scale)
        return self.o_proj(out.flatten(1)), residual


def _packed(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, dtype=torch.uint8), requires_grad=False)


class GptOssExperts(nn.Module):
    """Experts kept as on disk: MXFP4 blocks and scales in nn.Linear orientation ([E, out, in / 32, ...]),
    gate and up rows interleaved; biases in fp32, as the kernels add them. With tensor parallelism a rank
    holds either experts [first_expert, first_expert + local) whole (expert parallel) or every expert's
    share of the intermediate rows (a whole number of 32-element blocks)."""

    def __init__(self, config, parallel: ParallelContext):
        super().__init__()
        experts, hidden, inter = config.num_local_experts, config.hidden_size, config.intermediate_size
        if hidden % MX_BLOCK or inter % MX_BLOCK:
            raise ValueError(f"MXFP4 experts need hidden_size ({hidden}) and intermediate_size ({inter}) "
                             f"to be multiples of {MX_BLOCK}")
        self.parallel = parallel
        self.first_expert = 0
        if parallel.enable_expert_parallel:
            self.first_expert = parallel.shard_range(experts, "the number of experts")[0]
            experts = parallel.split(experts, "the number of experts")
        elif parallel.world_size > 1:
            inter = parallel.split(inter, "intermediate_size")
            if inter % MX_BLOCK:
                raise ValueError(f"intermediate_size {config.intermediate_size} split over {parallel.world_size} "
                                 f"ranks is not a multiple of {MX_BLOCK} (the MXFP4 block); add "
                                 f"--enable-expert-parallel or pick another tensor parallel size")
        self.gate_up_proj_blocks = _packed(experts, 2 * inter, hidden // MX_BLOCK, MX_BLOCK // 2)
        self.gate_up_proj_scales = _packed(experts, 2 * inter, hidden // MX_BLOCK)
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(experts, 2 * inter, dtype=torch.float32))
        self.down_proj_blocks = _packed(experts, hidden, inter // MX_BLOCK, MX_BLOCK // 2)
        self.down_proj_scales = _packed(experts, hidden, inter // MX_BLOCK)
        self.down_proj_bias = nn.Parameter(torch.zeros(experts, hidden, dtype=torch.float32))
        self.activation = GatedActivation(alpha=getattr(config, "swiglu_alpha", 1.702),
                                          limit=config.swiglu_limit, up_offset=1.0, interleaved=True)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        w13 = Mxfp4Linear(self.gate_up_proj_blocks, self.gate_up_proj_scales, self.gate_up_proj_bias)
        w2 = Mxfp4Linear(self.down_proj_blocks, self.down_proj_scales, self.down_proj_bias)
        parallel = self.parallel
        if parallel.enable_expert_parallel and parallel.world_size > 1:
            topk_ids = topk_ids - self.first_expert
            topk_ids = topk_ids.masked_fill((topk_ids < 0) | (topk_ids >= self.down_proj_bias.shape[0]), -1)
        return parallel.all_reduce(mxfp4_moe(x, w13, w2, topk_weights, topk_ids, self.activation,
                                             skip_negative_ids=parallel.enable_expert_parallel))

    def load(self, kind: str, tensor) -> torch.Tensor:
        """This rank's part of one stacked expert tensor (`kind` e.g. gate_up_proj_blocks). Without expert
        parallelism the down projection's bias is added once, by rank 0, after the all-reduce."""
        parallel = self.parallel
        local = getattr(self, kind).shape
        if parallel.enable_expert_parallel:
            return load_shard(tensor, 0, self.first_expert, local[0])
        if kind.startswith("gate_up_proj"):                # interleaved gate/up rows: a contiguous run
            return load_shard(tensor, 1, parallel.rank * local[1], local[1])
        if kind == "down_proj_bias":
            return materialize(tensor) if parallel.rank == 0 else torch.zeros(local, dtype=getattr(self, kind).dtype)
        return load_shard(tensor, 2, parallel.rank * local[2], local[2])     # blocks / scales along K


class GptOssMoE(nn.Module):
    def __init__(self, config, parallel: ParallelContext):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router = Linear(config.hidden_size, config.num_local_experts, bias=True)   # replicated
        self.experts = GptOssExperts(config, parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # top-k on the raw logits, then a softmax over the k chosen ones only (one launch on a GPU)
        topk_weights, topk_ids = softmax_topk(self.router(x), self.top_k, renormalize=False, softmax_after_topk=True)
        return self.experts(x, topk_weights, topk_ids)


def _layer_window(config, layer: int) -> int | None:
    layer_types = getattr(config, "layer_types", None) or \
        ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(config.num_hidden_layers)]
    return config.sliding_window if layer_types[layer] == "sliding_attention" else None


class GptOssDecoderLayer(nn.Module):
    def __init__(self, config, layer: int, rotary: RotaryEmbedding, parallel: ParallelContext):
        super().__init__()
        self.self_attn = GptOssAttention(config, layer, rotary, _layer_window(config, layer), parallel)
        self.mlp = GptOssMoE(config, parallel)
        # gpt-oss multiplies the norm weight in fp32 before casting (Llama/Qwen cast first)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, weight_in_fp32=True)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, weight_in_fp32=True)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = self.self_attn(positions, x, residual, self.input_layernorm, ctx)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class GptOssModel(nn.Module):
    def __init__(self, config, max_positions: int, parallel: ParallelContext):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, parallel)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        inv_freq, scale = rope_inv_freq(config, head_dim)             # YaRN, truncate=False, from transformers
        rotary = RotaryEmbedding(inv_freq, max_positions, scale, style="neox")
        self.layers = nn.ModuleList(GptOssDecoderLayer(config, i, rotary, parallel)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, weight_in_fp32=True)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, ctx)
        return self.norm(x, residual)[0]


class GptOssForCausalLM(nn.Module):
    def __init__(self, config, max_positions: int, cache_dtype: Callable[[int | None], torch.dtype],
                 parallel: ParallelContext = SINGLE):
        super().__init__()
        self.config = config
        self.cache_dtype = cache_dtype
        self.parallel = parallel
        self.model = GptOssModel(config, max_positions, parallel)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, parallel)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states).float()

    def cache_specs(self) -> list[CacheSpec]:
        """Sliding layers form a window group (memory per request bounded by the window), full layers another."""
        return [CacheSpec(entry_shape=(2, layer.self_attn.num_kv_heads, layer.self_attn.head_dim),
                          dtype=self.cache_dtype(layer.self_attn.window), window=layer.self_attn.window)
                for layer in self.model.layers]

    # ---- weights --------------------------------------------------------------------------------------

    _QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """HF names; q/k/v fuse into qkv_proj, experts stay packed. Every tensor must land, every parameter fill."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if scale := kv_scale_target(name):               # an fp8 KV cache's per-tensor scale
                getattr(self.get_submodule(scale[0]), scale[1]).copy_(tensor.reshape(1))
                continue
            tensor = self._shard(name, tensor)
            _check_expert_tensor(name, tensor)
            if name in params:
                copy_weight(params[name], name, tensor)
                loaded.add(name)
                continue
            *prefix, module, kind = name.split(".")
            key = ".".join([*prefix, "qkv_proj", kind])
            if module not in self._QKV or key not in params:
                raise unexpected_weight(name)
            attention = self.get_submodule(".".join(prefix))
            shard = self._QKV[module]
            offset = sum(attention.split[:shard])
            copy_weight(params[key][offset:offset + attention.split[shard]], name, tensor)
            loaded.add(f"{key}.{shard}")
        check_loaded(self._expected_shards(params), loaded)

    def _shard(self, name: str, tensor) -> torch.Tensor:
        """This rank's part of a checkpoint tensor, read from disk only now (whole where every rank holds it)."""
        *prefix, module, kind = name.split(".")
        if module == "embed_tokens":
            return self.model.embed_tokens.load(tensor)
        if module == "lm_head":
            return self.lm_head.load(tensor)
        if self.parallel.world_size == 1:
            return materialize(tensor)
        if module == "experts" and kind.endswith(("_blocks", "_scales", "_bias")):
            return self.get_submodule(".".join([*prefix, module])).load(kind, tensor)
        if module in ("q_proj", "k_proj", "v_proj", "o_proj"):
            attention = self.get_submodule(".".join(prefix))
            d, rank = attention.head_dim, self.parallel.rank
            if module == "o_proj":
                return materialize(tensor) if kind == "bias" else \
                    load_shard(tensor, 1, rank * attention.num_heads * d, attention.num_heads * d)
            first, count = (rank * attention.num_heads, attention.num_heads) if module == "q_proj" else \
                (attention.first_kv_head, attention.num_kv_heads)
            return load_shard(tensor, 0, first * d, count * d)
        if module == "self_attn" and kind == "sinks":
            attention = self.get_submodule(".".join([*prefix, module]))
            return load_shard(tensor, 0, self.parallel.rank * attention.num_heads, attention.num_heads)
        return materialize(tensor)

    @staticmethod
    def _expected_shards(params: dict[str, nn.Parameter]) -> set[str]:
        expected = set()
        for name in params:
            if ".qkv_proj." in name:
                expected.update(f"{name}.{shard}" for shard in range(3))
            else:
                expected.add(name)
        return expected


def _check_expert_tensor(name: str, tensor: torch.Tensor) -> None:
    """Catch the two expert layouts this package cannot run, with a message that says what they are."""
    if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
        raise ValueError(f"checkpoint tensor {name!r} holds unquantized experts; this package runs the MXFP4 "
                         f"layout (*_blocks / *_scales) that the released gpt-oss checkpoints ship")
    if name.endswith(("_blocks", "_scales")) and tensor.dtype != torch.uint8:
        raise ValueError(f"checkpoint tensor {name!r} is {tensor.dtype}, not uint8 MXFP4: this is what "
                         f"transformers' save_pretrained writes after loading with dequantize=True; "
                         f"use the original checkpoint")


def build_model(hf_config, engine_config: EngineConfig, parallel: ParallelContext = SINGLE) -> GptOssForCausalLM:
    max_positions = max(hf_config.max_position_embeddings, engine_config.max_model_len or 0)
    return GptOssForCausalLM(hf_config, max_positions, engine_config.kv_dtype, parallel)
