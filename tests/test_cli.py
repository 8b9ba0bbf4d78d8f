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


def test_help_shows_the_defaults():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "(default: 256)" in result.stdout          # --max-num-seqs
    assert "(default: 8000)" in result.stdout         # --port


def test_the_architecture_comes_from_config_json_and_logprobs_print_per_token(tiny_qwen3):
    result = run_cli("--model", str(tiny_qwen3), "--prompt", "Hello", "--max-tokens", "3", "--ignore-eos",
                     "--logprobs", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[2] == "[length, 3 tokens]" and len(lines) == 6          # header, text, summary, 3 tokens


def test_a_busy_port_is_reported_before_the_model_loads(tiny_qwen3):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", str(tiny_qwen3), "--port", str(port))
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "KV cache" not in result.stderr            # refused before loading anything


def test_one_prompt_streams_and_ctrl_c_keeps_what_was_generated(tiny_qwen3):
    import signal
    # the child gets Ctrl-C's default disposition even where the suite runs with SIGINT ignored (a background job of
    # a non-interactive shell, nohup): a child inherits SIG_IGN, and Python then installs no KeyboardInterrupt
    process = subprocess.Popen([sys.executable, "-m", "runtime.cli", "--model", str(tiny_qwen3), "--prompt", "Hello",
                                "--max-tokens", "4000", "--max-model-len", "4096", "--ignore-eos"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert process.stdout.readline() == "--- prompt: 'Hello'\n"
        first = process.stdout.read(1)                # the first streamed character: generation is running
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
        rest, stderr = process.stdout.read(), process.stderr.read()     # read() keeps what read(1) buffered
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    text, summary = (first + rest).rstrip("\n").rsplit("\n", 1)
    reason, count = summary.strip("[]").split(", ")
    assert reason == "interrupted" and 0 < int(count.split()[0]) < 4000
    assert text and "interrupted" in stderr

