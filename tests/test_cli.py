"""The run-model command line, as a user types it."""
from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], capture_output=True, text=True, timeout=300)


def test_list_shows_the_packages():
    result = run_cli("--list")
    assert result.returncode == 0
    assert "qwen3" in result.stdout and "Qwen3MoeForCausalLM" in result.stdout


def test_tiny_model_generates_offline():
    result = run_cli("qwen3", "--model", "tiny", "--prompt", "Hello", "--max-tokens", "6", "--ignore-eos")
    assert result.returncode == 0, result.stderr
    assert "[length, 6 tokens]" in result.stdout
    assert "KV cache group 0" in result.stderr


def test_chat_flag_applies_the_template():
    result = run_cli("qwen3", "--model", "tiny", "--prompt", "Hi", "--chat", "--max-tokens", "3", "--ignore-eos")
    assert result.returncode == 0, result.stderr
    assert "[length, 3 tokens]" in result.stdout


def test_unknown_architecture_exits_with_a_message():
    result = run_cli("nosuchmodel", "--model", "tiny")
    assert result.returncode == 2
    assert "unknown architecture 'nosuchmodel'" in result.stderr


def test_bad_sampling_flag_exits_with_a_message():
    result = run_cli("qwen3", "--model", "tiny", "--top-p", "2")
    assert result.returncode == 2
    assert "top_p" in result.stderr
