"""Shared ops. Each is a plain-PyTorch reference (the CPU path and the oracle of its fast twin)."""
from runtime.ops.activation import gelu_tanh_and_mul, silu_and_mul, silu_mul
from runtime.ops.attention import paged_attention, paged_attention_ref, write_kv, write_kv_ref
from runtime.ops.moe import fused_moe, score_topk, softmax_topk
from runtime.ops.norm import RMSNorm, rms_norm
from runtime.ops.rope import RotaryEmbedding, apply_rope, rope_inv_freq

__all__ = ["silu_and_mul", "silu_mul", "gelu_tanh_and_mul", "paged_attention", "paged_attention_ref", "write_kv", "write_kv_ref", "fused_moe", "score_topk", "softmax_topk", "rms_norm", "RMSNorm",
           "RotaryEmbedding", "apply_rope", "rope_inv_freq"]
