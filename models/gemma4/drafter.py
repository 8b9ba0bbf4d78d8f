"""The Gemma 4 "assistant" checkpoints: a small stack of KV-sharing decoder layers that drafts tokens for
speculative decoding (spec section 6).

It keeps no cache. Each draft reads [the target's scaled embedding of the last token | the target's final hidden
state of the row before it], projects it to its own width, runs its layers at one fixed position (the position
after the last accepted token) attending into the target's cache: sliding layers into the last non-shared
sliding layer of the target, global layers into the last non-shared global one. Its final state, projected
back to the target's width, feeds the next draft together with the embedding of the token it drafted."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from runtime.config import EngineConfig
from runtime.kv_cache import CacheSpec
from runtime.loader import check_loaded, load_hf_config, resolve_model_path
from runtime.spec_decode import DraftInputs, SpeculativeConfig

from .model import Gemma4DecoderLayer, Gemma4ForCausalLM, Gemma4Model, _checkpoint_buffers, _norm, expected_shards, \
    load_fused


def kv_store_layers(layer_types: list[str], num_kv_shared_layers: int) -> dict[str, int]:
    """Per attention type, the target layer whose K/V an assistant reads: the last one that computes its own."""
    first_shared = len(layer_types) - num_kv_shared_layers
    return {kind: max(i for i in range(first_shared) if layer_types[i] == kind)
            for kind in set(layer_types[:first_shared])}


class Gemma4MaskedEmbedding(nn.Module):
    """The sparse greedy head of assistants with ordered embeddings: the top centroids of the state each own a
    fixed slice of the vocabulary, and only those tokens are scored."""

    def __init__(self, config, hidden_size: int, vocab_size: int):
        super().__init__()
        self.top_k = config.centroid_intermediate_top_k
        self.num_centroids = config.num_centroids
        self.centroids = nn.Linear(hidden_size, self.num_centroids, bias=False)
        self.register_buffer("token_ordering", torch.zeros(vocab_size, dtype=torch.long))

    def greedy(self, h: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
        """h [num_reqs, hidden] -> [num_reqs] the best token among the chosen centroids' tokens."""
        top = torch.topk(self.centroids(h), self.top_k, dim=-1).indices                   # [num_reqs, top_k]
        candidates = self.token_ordering.view(self.num_centroids, -1)[top].flatten(1)      # [num_reqs, top_k * per]
        scores = torch.einsum("rh,rch->rc", h, lm_head[candidates])
        return candidates.gather(1, scores.argmax(dim=-1, keepdim=True)).squeeze(1)


class Gemma4Assistant(nn.Module):
    weight_prefixes = None                       # the assistant checkpoint is all ours

    def __init__(self, target: Gemma4ForCausalLM, config, max_positions: int, cache_dtype: torch.dtype):
        super().__init__()
        text = config.get_text_config()
        target_text = target.config
        self._target = (target,)                 # a tuple: not a submodule, its weights are the target's
        self.cache_dtype = cache_dtype
        stores = kv_store_layers(target_text.layer_types, target_text.num_kv_shared_layers)
        num_target_layers = len(target.model.layers)
        rotary = {kind: Gemma4Model._rotary(text, kind, max_positions) for kind in sorted(set(text.layer_types))}
        self.layers = nn.ModuleList()
        for i, kind in enumerate(text.layer_types):
            layer = Gemma4DecoderLayer(text, i, rotary[kind], producer=stores[kind])
            layer.self_attn.layer_index = num_target_layers + i        # its slot in the step's context
            if layer.self_attn.window is not None:
                # transformers' assistant mask (a bidirectional window, flipped onto the past) lets the draft
                # position see W + 1 target entries, one more than a sliding query of the target would: the
                # target's sliding groups must keep that one too
                layer.self_attn.window += 1
                target.window_slack = 1
            self.layers.append(layer)
        hidden, backbone = text.hidden_size, config.backbone_hidden_size
        self.embed_tokens = nn.Embedding(text.vocab_size, hidden)      # the tied head; inputs embed with the target's
        self.norm = _norm(hidden, text.rms_norm_eps)
        self.pre_projection = nn.Linear(2 * backbone, hidden, bias=False)
        self.post_projection = nn.Linear(hidden, backbone, bias=False)
        self.masked_embedding = Gemma4MaskedEmbedding(config, hidden, text.vocab_size) \
            if config.use_ordered_embeddings else None

    @property
    def target(self) -> Gemma4ForCausalLM:
        return self._target[0]

    def cache_specs(self) -> list[CacheSpec]:
        """Every layer reads a target layer's entries and allocates nothing."""
        return [CacheSpec(entry_shape=(2, layer.self_attn.num_kv_heads, layer.self_attn.head_dim),
                          dtype=self.cache_dtype, window=layer.self_attn.window, shared_with=layer.self_attn.producer)
                for layer in self.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = {**dict(self.named_parameters()), **_checkpoint_buffers(self)}
        buffers = {"masked_embedding.token_ordering"} if self.masked_embedding is not None else set()
        loaded = set()
        for name, tensor in weights:
            if name.startswith("model."):
                name = name[len("model."):]
            if name == "lm_head.weight":
                continue                                            # tied to embed_tokens
            if name in buffers:
                self.masked_embedding.token_ordering.copy_(tensor)
                loaded.add(name)
                continue
            loaded.add(load_fused(self, params, name, tensor))
        check_loaded(expected_shards(self, params) | buffers, loaded)

    def draft_one(self, token_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                  ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft per request: (greedy token [num_reqs], next state [num_reqs, backbone hidden])."""
        target_model = self.target.model
        embedded = target_model.embed_tokens(token_ids) * target_model.embed_scale
        x = self.pre_projection(torch.cat([embedded, hidden], dim=-1))              # [num_reqs, hidden]
        for layer in self.layers:
            x = layer(positions, x, None, ctx)
        h = self.norm(x)
        if self.masked_embedding is not None:
            tokens = self.masked_embedding.greedy(h, self.embed_tokens.weight)
        else:
            tokens = (h @ self.embed_tokens.weight.t()).argmax(dim=-1)
        return tokens, self.post_projection(h)

    def propose(self, inputs: DraftInputs) -> torch.Tensor:
        """[num_reqs, num_drafts]: every draft at the position after the last accepted token, over the target
        cache up to and including that token."""
        rows = inputs.last_rows
        tokens, hidden = inputs.next_token_ids[rows], inputs.target_hidden[rows]
        last_positions = inputs.positions[rows]
        ctx = inputs.decode_context(last_positions)
        drafts = []
        for _ in range(inputs.num_drafts):
            tokens, hidden = self.draft_one(tokens, hidden, last_positions + 1, ctx)
            drafts.append(tokens)
        return torch.stack(drafts, dim=1)


def build_drafter(target: Gemma4ForCausalLM, hf_config, engine_config: EngineConfig,
                  spec: SpeculativeConfig) -> Gemma4Assistant:
    """speculative_config {"method": "draft_model", "model": ASSISTANT_DIR, "num_speculative_tokens": k}."""
    if spec.model is None:
        raise ValueError('gemma4 drafts with its assistant checkpoint: give speculative_config a "model" '
                         '(e.g. google/gemma-4-E4B-it-assistant or a local directory)')
    config = load_hf_config(resolve_model_path(spec.model))
    if getattr(config, "backbone_hidden_size", None) != target.config.hidden_size:
        raise ValueError(f"the assistant in {spec.model} was trained for a target of width "
                         f"{getattr(config, 'backbone_hidden_size', None)}, this target is "
                         f"{target.config.hidden_size} wide")
    text = config.get_text_config()
    max_positions = max(text.max_position_embeddings, target.config.max_position_embeddings,
                        engine_config.max_model_len or 0)
    return Gemma4Assistant(target, config, max_positions, engine_config.torch_dtype)
