"""Tiny random checkpoints in the real on-disk format: transformers builds and saves the model (so the names
are the real ones), `tokenizers` trains a small byte-level BPE, and the package supplies the chat template."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from runtime.package import ModelPackage

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A paged cache stores keys and values in fixed-size blocks; a block table maps positions to blocks.",
    "Continuous batching lets new requests join while others are still decoding.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2026 3.14159",
    "Unicode: café, naïve, Straße, 東京, 😀, Привет, مرحبا",
    "def generate(prompt, max_tokens=16):\n    return model(prompt)\n",
    "Once upon a time, in a land far away, there lived a small language model that wanted to be fast.",
]


def tiny_dir(package: ModelPackage, cache_root: str | os.PathLike | None = None) -> Path:
    """Where `--model tiny` lives for a package; the name changes whenever its tiny config does."""
    root = Path(cache_root or os.environ.get("RUN_MODEL_CACHE", Path.home() / ".cache" / "run-model"))
    digest = hashlib.sha256(json.dumps(
        [package.tiny_config, package.chat_template, package.special_tokens], sort_keys=True).encode()).hexdigest()
    return root / "tiny" / f"{package.name}-{digest[:12]}"


def ensure_tiny(package: ModelPackage, cache_root: str | os.PathLike | None = None) -> Path:
    path = tiny_dir(package, cache_root)
    if not (path / "config.json").is_file():
        make_tiny(package, path)
    return path


def _synthetic_text(num_lines: int = 400, seed: int = 0) -> list[str]:
    """Pseudo-words from a fixed seed: enough distinct pairs for the BPE trainer to fill a small vocabulary."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "ing", "er", "qu", "x"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(3000)]
    return [" ".join(rng.choices(words, k=12)) + rng.choice([".", ",", "!", "?", ""]) for _ in range(num_lines)]


def _train_tokenizer(vocab_size: int, special_tokens: tuple[str, ...]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_CORPUS + _synthetic_text(), trainer=trainer)
    return tokenizer


def make_tiny(package: ModelPackage, out_dir: str | os.PathLike, config_overrides: dict[str, Any] | None = None,
              seed: int = 0) -> Path:
    """Write config.json, model.safetensors and a tokenizer for a tiny random model of `package`.
    An override of None removes the key (a variant can drop a nested sub-config)."""
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    out = Path(out_dir)
    # a deep copy: some configs edit the nested dicts they are given (e.g. rope_scaling)
    config_dict = copy.deepcopy({k: v for k, v in {**package.tiny_config, **(config_overrides or {})}.items()
                                 if v is not None})
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if package.tiny_init is not None:
        with torch.no_grad():
            package.tiny_init(model)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    if package.tiny_save is not None:
        package.tiny_save(model, tmp)
    else:
        model.save_pretrained(tmp)

    specials = package.special_tokens
    text_config = config.get_text_config()                  # the decoder; multimodal configs nest it
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_train_tokenizer(text_config.vocab_size, specials))
    eos = text_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    bos = text_config.bos_token_id
    named = {"eos_token": specials[eos] if eos is not None and eos < len(specials) else None,
             "bos_token": specials[bos] if bos is not None and bos < len(specials) else None,
             "pad_token": specials[0] if specials else None}
    tokenizer.add_special_tokens({k: v for k, v in named.items() if v})
    if package.chat_template:
        tokenizer.chat_template = package.chat_template
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out
