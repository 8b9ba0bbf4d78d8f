"""Reading a DeepSeek V4 config: layer kinds, compression ratios and routing kinds, from transformers' keys
(`layer_types`, `compress_rates`, `mlp_layer_types`) or the released ones (`compress_ratios`, `num_hash_layers`)."""
from __future__ import annotations

from dataclasses import dataclass

SLIDING = "sliding_attention"
CSA = "compressed_sparse_attention"          # ratio 4 with overlapping windows, searched by the indexer
HCA = "heavily_compressed_attention"         # ratio 128, every complete entry attended
_RELEASED_RATIOS = {0: SLIDING, 4: CSA, 128: HCA}
_DEFAULT_RATES = {CSA: 4, HCA: 128}


@dataclass(frozen=True, slots=True)
class AttentionKind:
    name: str
    ratio: int                               # token positions per compressed entry; 0 = window only

    @property
    def compressed(self) -> bool:
        return self.name != SLIDING

    @property
    def sparse(self) -> bool:
        """CSA: overlapping windows and an indexer that picks the entries each query reads."""
        return self.name == CSA


def attention_kinds(config) -> list[AttentionKind]:
    """One per decoder layer. A layer is CSA or HCA by its type, never by its ratio (compress_rates may remap)."""
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types is None:
        ratios = list(config.compress_ratios)[:n]
        if any(r not in _RELEASED_RATIOS for r in ratios):
            raise ValueError(f"compress_ratios may hold only 0, 4 and 128, got {ratios}")
        types = [_RELEASED_RATIOS[r] for r in ratios]
    if len(types) != n:
        raise ValueError(f"the config names {len(types)} layer types for {n} layers")
    rates = {**_DEFAULT_RATES, **(getattr(config, "compress_rates", None) or {})}
    kinds = []
    for t in types:
        if t not in (SLIDING, CSA, HCA):
            raise ValueError(f"unknown DeepSeek V4 layer type {t!r}")
        kinds.append(AttentionKind(t, 0 if t == SLIDING else int(rates[t])))
    return kinds


def hash_routed(config, layer: int) -> bool:
    """The first layers route by a fixed token -> experts table instead of by score."""
    kinds = getattr(config, "mlp_layer_types", None)
    if kinds is not None:
        return kinds[layer] == "hash_moe"
    return layer < getattr(config, "num_hash_layers", 0)


def num_experts(config) -> int:
    return getattr(config, "n_routed_experts", None) or config.num_local_experts


def expert_format(config) -> str:
    """"fp4" (MXFP4 experts, the instruct releases) or "float" (FP8 experts of the Base releases are
    dequantized at load, as are unquantized ones)."""
    quantization = getattr(config, "quantization_config", None) or {}
    if not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    dtype = getattr(config, "expert_dtype", None) or quantization.get("expert_dtype")
    return "fp4" if dtype == "fp4" else "float"
