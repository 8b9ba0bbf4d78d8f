"""DeepSeek V4 (Flash, Pro and their Base checkpoints): hybrid compressed attention, mHC, hash/score-routed MoE."""
from runtime.package import ModelPackage

from .chat import SPECIAL_TOKENS, parse_output, parse_reasoning, reasoning_gate, render_chat, tool_call_grammar
from .model import build_model
from .mtp import build_drafter
from .tiny import tiny_init, tiny_save

# Every layer kind (window only, HCA, CSA) and both routing kinds, at sizes the FP8 [16, 32] blocks and MXFP4
# tile; a window of 8 and an HCA ratio of 8 so that prompts of 200 tokens cross both many times; 32 indexer
# heads (fewer make ReLU ties common, and the top-k of a tie is arbitrary); index_topk 4 < the entries.
_TINY = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
    "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 5,
    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32, "qk_rope_head_dim": 8,
    "q_lora_rank": 32, "o_groups": 2, "o_lora_rank": 16,
    "layer_types": ["sliding_attention", "heavily_compressed_attention", "compressed_sparse_attention",
                    "heavily_compressed_attention", "compressed_sparse_attention"],
    "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    "sliding_window": 8, "index_n_heads": 32, "index_head_dim": 16, "index_topk": 4,
    "mlp_layer_types": ["hash_moe", "hash_moe", "moe", "moe", "moe"],
    "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
    "scoring_func": "sqrtsoftplus", "norm_topk_prob": True, "routed_scaling_factor": 1.5, "swiglu_limit": 10.0,
    "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "compress_rope_theta": 160000.0,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 32, "beta_fast": 32,
                     "beta_slow": 1},
    "max_position_embeddings": 1024, "num_nextn_predict_layers": 1,
    "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "tie_word_embeddings": False,
}

# The release's own schedule keys and ratios (4 and 128) with its 128-token window: prompts of 300+ tokens
# give several HCA entries and many CSA ones.
_TINY_RELEASED_RATIOS = {
    "layer_types": None, "compress_rates": None, "mlp_layer_types": None,
    "compress_ratios": [0, 128, 4, 128, 4, 0], "num_hash_layers": 2, "sliding_window": 128, "index_topk": 8,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 64, "beta_fast": 32,
                     "beta_slow": 1},
    "max_position_embeddings": 4096,
}

# The Base releases: routed experts in FP8 with block scales instead of MXFP4.
_TINY_BASE = {"expert_dtype": "fp8"}

PACKAGE = ModelPackage(
    name="deepseek_v4",
    hf_architectures=("DeepseekV4ForCausalLM",),
    build=build_model,
    default_model="deepseek-ai/DeepSeek-V4-Flash",
    tiny_config=_TINY,
    special_tokens=SPECIAL_TOKENS,
    tiny_init=tiny_init,
    tiny_save=tiny_save,
    drafter_methods=("mtp",),             # speculative_config {"method": "mtp"}: the release's MTP layer
    build_drafter=build_drafter,
    render_chat=render_chat,
    reasoning_parser=parse_reasoning,
    tool_parser=parse_output,
    tool_call_grammar=tool_call_grammar,
    reasoning_gate=reasoning_gate,
    tiny_variants={"released-ratios": _TINY_RELEASED_RATIOS, "base": _TINY_BASE},
    aliases=("deepseek-v4",),
)
