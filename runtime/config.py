"""EngineConfig: every engine option in one dataclass. The CLI maps its flags onto these fields."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# --kv-cache-dtype: "auto" keeps K/V at the model dtype; "fp8" (alias "fp8_e4m3") stores e4m3 with a
# per-tensor scale per layer (1.0 unless the checkpoint ships k_scale / v_scale); "bfloat16" a bf16 cache
# under any model dtype
KV_CACHE_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "fp8": torch.float8_e4m3fn,
                   "fp8_e4m3": torch.float8_e4m3fn}
KV_CACHE_SKIP_LAYERS = ("sliding_window",)


@dataclass(slots=True)
class EngineConfig:
    model: str = "tiny"                      # local dir | HF hub id | "tiny" (built-in random checkpoint)
    arch: str | None = None                  # package name; None = from the checkpoint's "architectures"
    tokenizer: str | None = None             # defaults to the model dir
    skip_tokenizer_init: bool = False        # no tokenizer: prompts are token ids, outputs carry no text
    device: str = "auto"                     # "auto" = cuda when available, else cpu
    dtype: str = "auto"                      # "auto" = bfloat16 on cuda, float32 on cpu
    load_format: str = "auto"                # "auto" (safetensors) | "dummy" (random weights, real shapes)
    block_size: int | None = None           # None = the smallest multiple of 16 every cache group's compression divides
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None         # None = the checkpoint's max_position_embeddings
    enable_prefix_caching: bool = True
    num_gpu_blocks: int | None = None        # force the cache size (blocks per full-attention group)
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gib: float = 1.0            # cache budget on the CPU path
    enforce_eager: bool = False
    # prefill and mixed batches replay graphs of everything but attention, per token-count bucket
    piecewise_cuda_graphs: bool = False
    async_scheduling: bool = True            # prepare step N+1 on the host while the device runs step N
    seed: int = 0
    # vLLM's speculative_config: {"method": "ngram", "num_speculative_tokens": k, ...} (dict or its JSON)
    speculative_config: dict | str | None = None
    tensor_parallel_size: int = 1            # ranks (processes, one device each) that shard the model
    enable_expert_parallel: bool = False     # MoE experts split over those ranks instead of each expert's rows
    kv_cache_dtype: str = "auto"             # "auto" (the model dtype) | "bfloat16" | "fp8" | "fp8_e4m3"
    # layer kinds that keep the model dtype under an fp8 cache: () or ("sliding_window",)
    kv_cache_dtype_skip_layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.block_size is not None and self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {self.dtype!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks < 2:
            raise ValueError(f"num_gpu_blocks must be at least 2, got {self.num_gpu_blocks}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {self.max_model_len} (omit it for the "
                             "model's own maximum)")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {self.kv_cache_dtype!r}")
        if isinstance(self.kv_cache_dtype_skip_layers, str):
            self.kv_cache_dtype_skip_layers = tuple(s for s in self.kv_cache_dtype_skip_layers.split(",") if s)
        unknown = set(self.kv_cache_dtype_skip_layers) - set(KV_CACHE_SKIP_LAYERS)
        if unknown:
            raise ValueError(f"kv_cache_dtype_skip_layers accepts {', '.join(KV_CACHE_SKIP_LAYERS)}; got "
                             f"{', '.join(sorted(unknown))}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}, but this torch ({torch.__version__}) has no CUDA device; "
                             "use --device cpu, or install a CUDA build of torch")

    def resolve_max_model_len(self, hf_config) -> int:
        """max_model_len, or the checkpoint's maximum when unset; never past the positions the model knows."""
        limit = _max_positions(hf_config)
        if self.max_model_len is None:
            return limit
        if self.max_model_len > limit:
            raise ValueError(f"max_model_len {self.max_model_len} is more than the {limit} positions the model "
                             "was trained for (max_position_embeddings); lower --max-model-len")
        return self.max_model_len

    def kv_dtype(self, window: int | None = None) -> torch.dtype:
        """The dtype of a layer's K/V cache entries (its CacheSpec dtype): the model dtype, or the one
        --kv-cache-dtype names, except for sliding-window layers (`window` set) that the skip list keeps."""
        dtype = KV_CACHE_DTYPES[self.kv_cache_dtype]
        if dtype is None or (window is not None and "sliding_window" in self.kv_cache_dtype_skip_layers):
            return self.torch_dtype
        return dtype

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return _DTYPES[self.dtype]


def _max_positions(hf_config) -> int:
    """max_position_embeddings, stretched by a YaRN or dynamic rope scaling factor where the config has one."""
    positions = hf_config.max_position_embeddings
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    factor = scaling.get("factor") if scaling.get("rope_type", scaling.get("type")) in ("yarn", "dynamic") else None
    if factor:
        original = scaling.get("original_max_position_embeddings", positions)
        positions = max(positions, int(original * factor))
    return positions
