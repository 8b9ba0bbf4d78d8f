"""ModelPackage: the one object a model package exports, and the protocol of the module it builds."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn

from runtime.forward import ForwardContext
from runtime.kv_cache import CacheSpec
from runtime.config import EngineConfig


class CausalLM(Protocol):
    """What the runtime calls on a model. See ARCHITECTURE.md section 4."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """[num_tokens] ids and positions -> [num_tokens, hidden] hidden states (writes the paged cache)."""

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[num_rows, hidden] -> [num_rows, vocab] fp32 logits."""

    def cache_specs(self) -> list[CacheSpec]:
        """One spec per cache-owning (or cache-sharing) layer, in the order the layers index ctx.caches."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Consume checkpoint tensors by on-disk name; raise ValueError on missing or unexpected ones."""


@dataclass(slots=True)
class ModelPackage:
    name: str                                                   # `run-model NAME`
    hf_architectures: tuple[str, ...]                           # config.json "architectures" it serves
    # (hf_config, engine_config, parallel: runtime.parallel.ParallelContext) -> CausalLM, holding this rank's
    # shard of every split layer; its load_weights may receive lazy slices (runtime.parallel.load_shard)
    build: Callable[..., nn.Module]
    default_model: str | None = None                           # used when --model is omitted
    tiny_config: dict[str, Any] = field(default_factory=dict)   # an HF config.json for tests and --model tiny
    chat_template: str | None = None                            # jinja, written into tiny tokenizers
    special_tokens: tuple[str, ...] = ()                        # tiny tokenizer specials; ids 0..n-1 in order
    tiny_init: Callable[[nn.Module], None] | None = None        # make a random HF model's weights "matter"
    tiny_variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> tiny_config overrides
    # writes a random transformers model in the package's real on-disk format when save_pretrained does
    # not (e.g. quantized experts): tiny_save(model, out_dir)
    tiny_save: Callable[[nn.Module, Any], None] | None = None
    # Chat surface. render_chat(tokenizer, messages, options) -> prompt ids, for formats a jinja template
    # cannot express (None = the tokenizer's chat template). reasoning_parser(tokenizer, output ids) ->
    # (reasoning_content or None, content); it must be prefix-monotonic so streams can send its deltas.
    render_chat: Callable[[Any, list[dict[str, Any]], dict[str, Any]], list[int]] | None = None
    reasoning_parser: Callable[[Any, list[int]], tuple[str | None, str]] | None = None
    # tool_parser(tokenizer, output ids, finished) -> runtime.tool_calls.ParsedOutput: reasoning, content and
    # tool calls of the output so far, each only as far as later tokens cannot change it
    tool_parser: Callable[[Any, list[int], bool], Any] | None = None
    # tool_call_grammar(tools, name or None for "required") -> EBNF of an answer made of calls in the
    # family's format: how tool_choice required / a named function is enforced
    tool_call_grammar: Callable[[list[dict[str, Any]], str | None, bool], str] | None = None
    # reasoning_gate(tokenizer, prompt ids) -> runtime.structured.ReasoningGate: where the output starts with
    # respect to reasoning, so that response_format constrains only the answer after it
    reasoning_gate: Callable[[Any, list[int]], Any] | None = None
    aliases: tuple[str, ...] = ()
    # Speculative decoding with the package's own drafter (runtime/spec_decode.py, Drafter):
    # build_drafter(target_model, hf_config, engine_config, speculative_config) -> Drafter, for the
    # speculative_config methods named in drafter_methods (e.g. "mtp", "draft_model").
    drafter_methods: tuple[str, ...] = ()
    build_drafter: Callable[..., Any] | None = None

    def chat_prompt(self, tokenizer, messages: list[dict[str, Any]], options: dict[str, Any]) -> list[int]:
        """Prompt ids of a chat: the package's renderer where it has one, else the tokenizer's template.
        `options` holds add_generation_prompt and any template keyword arguments."""
        if self.render_chat is not None:
            return self.render_chat(tokenizer, messages, options)
        return tokenizer.apply_chat_template(messages, **options)
