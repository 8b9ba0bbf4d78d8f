"""Qwen3 dense and Qwen3-MoE."""
from pathlib import Path

from runtime.package import ModelPackage

from .chat import parse_output, parse_reasoning, reasoning_gate, tool_call_grammar
from .model import build_model, tiny_init

_TINY = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
    "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "hidden_act": "silu", "attention_bias": False, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "max_position_embeddings": 4096, "tie_word_embeddings": True,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0, "initializer_range": 0.1,
}

# A tiny Qwen3-MoE: same attention, every layer a softmax-top-k MoE with per-expert checkpoint tensors.
_TINY_MOE = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "tie_word_embeddings": False,
    "moe_intermediate_size": 64, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True,
    "decoder_sparse_step": 1, "mlp_only_layers": [],
}

PACKAGE = ModelPackage(
    name="qwen3",
    hf_architectures=("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
    build=build_model,
    default_model="Qwen/Qwen3-0.6B",
    tiny_config=_TINY,
    chat_template=(Path(__file__).parent / "chat_template.jinja").read_text(),
    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
    tiny_init=tiny_init,
    tiny_variants={"moe": _TINY_MOE},
    reasoning_parser=parse_reasoning,
    tool_parser=parse_output,
    tool_call_grammar=tool_call_grammar,
    reasoning_gate=reasoning_gate,
)

