"""Gemma 4 (E2B, E4B, 26B-A4B, 31B): the text decoder of the multimodal checkpoints Google publishes, or a
text-only Gemma4ForCausalLM checkpoint."""
from pathlib import Path

from runtime.package import ModelPackage

from .chat import SPECIAL_TOKENS, parse_output, parse_reasoning, reasoning_gate, tool_call_grammar
from .drafter import build_drafter
from .model import build_model
from .tiny import tiny_init, tiny_save

_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
         "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0}}
_S, _F = "sliding_attention", "full_attention"
# A window of 8 against prompts of up to 200 tokens; head dims 32 (sliding) and 64 (global) stand for 256/512.
_COMMON = {
    "vocab_size": 512, "vocab_size_per_layer_input": 512, "hidden_size": 64, "num_attention_heads": 4,
    "head_dim": 32, "global_head_dim": 64, "sliding_window": 8, "max_position_embeddings": 512,
    "final_logit_softcapping": 30.0, "rope_parameters": _ROPE, "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "initializer_range": 0.15,
    "pad_token_id": 0, "eos_token_id": [1, SPECIAL_TOKENS.index("<turn|>")], "bos_token_id": 2,
}
# E2B-like: 4:1 sliding:global, per-layer embeddings, the last 4 layers read the K/V of layers 4 (global) and
# 5 (sliding), with double-wide MLPs. (Google's "first-1 / first-2" shortcut would pick 5 and 4 here: wrong.)
_TEXT_E = {**_COMMON, "model_type": "gemma4_text", "intermediate_size": 128, "num_hidden_layers": 10,
           "num_key_value_heads": 1, "layer_types": [_S, _S, _S, _S, _F] * 2, "num_kv_shared_layers": 4,
           "use_double_wide_mlp": True, "hidden_size_per_layer_input": 16}
# 26B-A4B-like: K=V global layer with fewer KV heads, a dense MLP beside 8 experts (top 2), no PLE.
_TEXT_MOE = {**_COMMON, "intermediate_size": 96, "num_hidden_layers": 6, "num_key_value_heads": 2,
             "num_global_key_value_heads": 1, "attention_k_eq_v": True, "layer_types": [_S] * 5 + [_F],
             "num_kv_shared_layers": 0, "hidden_size_per_layer_input": 0, "enable_moe_block": True,
             "num_experts": 8, "top_k_experts": 2, "moe_intermediate_size": 32}
# 31B-like: dense, K=V global layers, no PLE.
_TEXT_DENSE = {**_COMMON, "model_type": "gemma4_text", "intermediate_size": 128, "num_hidden_layers": 6,
               "num_key_value_heads": 2, "num_global_key_value_heads": 1, "attention_k_eq_v": True,
               "layer_types": [_S, _S, _F, _S, _S, _F], "num_kv_shared_layers": 0, "hidden_size_per_layer_input": 0}
# A one-layer vision tower, so the multimodal archives carry tower weights for the loader to skip. The image /
# audio placeholder ids keep their released values, outside the tiny vocabulary: transformers embeds a
# placeholder without its image as padding, which a text-only engine has no reason to copy.
_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
           "num_key_value_heads": 2, "head_dim": 16, "position_embedding_size": 64}
_TINY = {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4", "text_config": _TEXT_E,
         "vision_config": _VISION, "initializer_range": 0.15, "tie_word_embeddings": True}

PACKAGE = ModelPackage(
    name="gemma4",
    hf_architectures=("Gemma4ForConditionalGeneration", "Gemma4ForCausalLM"),
    build=build_model,
    default_model="google/gemma-4-E4B-it",
    tiny_config=_TINY,
    chat_template=(Path(__file__).parent / "chat_template.jinja").read_text(),
    special_tokens=SPECIAL_TOKENS,
    tiny_init=tiny_init,
    tiny_save=tiny_save,
    tiny_variants={
        # the text-only layout (None drops the multimodal keys)
        "moe": {"architectures": ["Gemma4ForCausalLM"], "model_type": "gemma4_text", "text_config": None,
                "vision_config": None, **_TEXT_MOE},
        "dense": {"text_config": _TEXT_DENSE},
    },
    reasoning_parser=parse_reasoning,
    tool_parser=parse_output,
    tool_call_grammar=tool_call_grammar,
    reasoning_gate=reasoning_gate,
    aliases=("gemma-4",),
    drafter_methods=("draft_model",),            # the assistant checkpoints (spec section 6)
    build_drafter=build_drafter,
)
