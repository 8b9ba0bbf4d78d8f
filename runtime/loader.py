"""Where weights come from: a local directory, a Hugging Face hub id, or random values (dummy)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn


def resolve_model_path(model: str) -> Path:
    """A local checkpoint directory, or a hub id downloaded (config, tokenizer, safetensors) to the HF cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {path} has no config.json")
        return path
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ValueError(f"model directory {model!r} does not exist (and it is not a Hugging Face hub id)")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                             "*.jinja", "tokenizer*"]))
    except Exception as exc:   # offline, unknown repo, gated repo: all surface as one actionable message
        raise ValueError(f"could not fetch {model!r} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
                         f"pass a local directory with --model") from exc


def load_hf_config(path: Path):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot read the model config in {path}: {exc}") from exc


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / name for name in names]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {path}; use --load-format dummy for random weights")
    return files


def iterate_weights(path: Path, device: torch.device | str = "cpu", prefixes: tuple[str, ...] | None = None,
                    lazy: bool = False) -> Iterator[tuple[str, Any]]:
    """Stream (name, tensor) from every shard, one tensor at a time, with a progress bar over shards;
    with `prefixes`, only the names that start with one of them (the others are never read). With `lazy`,
    safetensors slices instead of tensors: nothing is read until the consumer indexes one (a tensor-parallel
    rank reads its shard only; runtime.parallel.load_shard and materialize take either)."""
    from safetensors import safe_open
    from tqdm import tqdm
    files = safetensors_files(path)
    quiet = len(files) == 1 or os.environ.get("RUN_MODEL_QUIET") == "1"
    for file in tqdm(files, desc="loading shards", unit="shard", disable=quiet):
        with safe_open(str(file), framework="pt", device=str(device)) as shard:
            for name in shard.keys():
                if prefixes is None or name.startswith(prefixes):
                    yield name, shard.get_slice(name) if lazy else shard.get_tensor(name)


def init_dummy_weights(model: nn.Module, seed: int = 0, low: float = -1e-3, high: float = 1e-3) -> None:
    """Random weights at the real shapes (for benchmarks): small uniform values keep activations finite (an
    FP8 weight draws in [-1, 1]; its scale grid, an fp32 parameter, the small values). Packed MXFP4 tensors
    draw random codes (`*blocks`) and power-of-two scales 2^-9..2^-4 (`*scales`, E8M0: never the NaN byte).
    A module whose other non-float parameters need valid values (an index table) defines
    `init_dummy_(generator)`, called after its parameters are drawn. Each parameter draws from its own seed, so
    a parameter every tensor-parallel rank holds whole is the same on all."""
    generators: dict[torch.device, torch.Generator] = {}

    def generator(device: torch.device, index: int) -> torch.Generator:
        if device not in generators:
            generators[device] = torch.Generator(device=device)
        return generators[device].manual_seed(seed * 100003 + index)

    with torch.no_grad():
        for index, (name, param) in enumerate(model.named_parameters()):
            g = generator(param.device, index)
            if param.is_floating_point():
                if param.element_size() == 1:       # FP8: values in [-1, 1], their block scales set the size
                    param.copy_(torch.empty(param.shape, device=param.device).uniform_(-1.0, 1.0, generator=g))
                else:
                    param.uniform_(low, high, generator=g)
            elif param.dtype == torch.uint8 and name.endswith("blocks"):
                param.random_(0, 256, generator=g)
            elif param.dtype == torch.uint8 and name.endswith("scales"):
                param.random_(127 - 9, 127 - 3, generator=g)
        for index, module in enumerate(model.modules()):
            if hasattr(module, "init_dummy_"):
                module.init_dummy_(generator(next(module.parameters()).device, 1_000_000 + index))


def kv_scale_target(name: str) -> tuple[str, str] | None:
    """(attention module path, "k_scale" | "v_scale") of a per-tensor FP8 KV-cache scale, under either name
    checkpoints ship it by: `<attn>.k_scale` or `<attn>.k_proj.k_scale` (and v alike); None for other names."""
    *prefix, last = name.split(".")
    if last not in ("k_scale", "v_scale"):
        return None
    if prefix and prefix[-1] in ("k_proj", "v_proj", "attn"):
        prefix = prefix[:-1]
    return ".".join(prefix), last


def check_loaded(expected: set[str], loaded: set[str]) -> None:
    """Raise if a parameter (or a shard of a fused one) received no checkpoint tensor."""
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s): {shown}")


def unexpected_weight(name: str) -> ValueError:
    return ValueError(f"checkpoint has an unexpected tensor {name!r}; is this the right architecture?")


def copy_weight(param: torch.Tensor, name: str, tensor: torch.Tensor) -> None:
    """Copy with a shape check whose message names the tensor."""
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                         f"the model expects {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(tensor)
