"""gpt-oss (20b, 120b): sliding/full attention with sinks, YaRN, MXFP4 experts, the harmony chat format."""
from pathlib import Path

from runtime.package import ModelPackage

from .harmony import SPECIAL_TOKENS, parse_output, reasoning_gate, reasoning_parser, render_chat, tool_call_grammar
from .model import build_model
from .tiny import tiny_init, tiny_save

# The released config at tiny sizes (spec section 4.1). MXFP4-compatible dims; a window of 8 so that prompts of
# up to 200 tokens cross it many times, in prefill chunks and in decode; YaRN exactly as released.
_TINY = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
    "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 128,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "num_local_experts": 8, "num_experts_per_tok": 4, "experts_per_token": 4,
    "sliding_window": 8,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    "attention_bias": True, "hidden_act": "silu", "swiglu_limit": 7.0, "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                        "beta_slow": 1.0, "original_max_position_embeddings": 4096, "truncate": False},
    "initial_context_length": 4096, "max_position_embeddings": 4096, "tie_word_embeddings": False,
    "initializer_range": 0.02,
    # ids into SPECIAL_TOKENS: <|endoftext|> pads, <|startoftext|> begins, <|return|> ends
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}

PACKAGE = ModelPackage(
    name="gpt_oss",
    hf_architectures=("GptOssForCausalLM",),
    build=build_model,
    default_model="openai/gpt-oss-20b",
    tiny_config=_TINY,
    chat_template=(Path(__file__).parent / "chat_template.jinja").read_text(),
    special_tokens=SPECIAL_TOKENS,
    tiny_init=tiny_init,
    tiny_save=tiny_save,
    render_chat=render_chat,
    reasoning_parser=reasoning_parser,
    tool_parser=parse_output,
    tool_call_grammar=tool_call_grammar,
    reasoning_gate=reasoning_gate,
    aliases=("gpt-oss",),
)
