"""Adding an architecture = copying a package: the copy is discovered and serves, with no runtime change."""
from __future__ import annotations

import shutil
import sys
import uuid
from pathlib import Path

import pytest

import models
from runtime import LLM, SamplingParams
from runtime.registry import discover
from tools.parity import random_prompts

MODELS_DIR = Path(models.__file__).parent


@pytest.fixture
def copied_package():
    name = f"_copy_{uuid.uuid4().hex[:8]}"            # models/_copy_* is git-ignored
    target = MODELS_DIR / name
    shutil.copytree(MODELS_DIR / "qwen3", target, ignore=shutil.ignore_patterns("__pycache__"))
    init = target / "__init__.py"
    source = init.read_text()
    assert 'name="qwen3"' in source
    init.write_text(source.replace('name="qwen3"', f'name="{name}"')
                    .replace('("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")', '("CopiedForCausalLM",)'))
    try:
        yield name
    finally:
        shutil.rmtree(target)
        for module in [m for m in sys.modules if m.startswith(f"models.{name}")]:
            del sys.modules[module]


def test_copied_package_is_discovered_and_generates(copied_package, tiny_qwen3):
    packages = discover()
    assert copied_package in packages
    assert packages[copied_package].hf_architectures == ("CopiedForCausalLM",)
    prompt = random_prompts(1024, (15,), seed=13)[0]
    params = SamplingParams(temperature=0.0, max_tokens=10)
    copy = LLM(str(tiny_qwen3), arch=copied_package, device="cpu", dtype="float32")
    original = LLM(str(tiny_qwen3), arch="qwen3", device="cpu", dtype="float32")
    assert copy.engine.package.name == copied_package
    assert type(copy.engine.model).__module__ == f"models.{copied_package}.model"
    assert copy.generate([prompt], params, use_tqdm=False)[0].token_ids == \
        original.generate([prompt], params, use_tqdm=False)[0].token_ids
