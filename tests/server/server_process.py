"""A real `run-model qwen3 --serve` process on 127.0.0.1, and small helpers to talk HTTP to it without the
openai client (for malformed bodies) and to read its /metrics."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest


MODEL = "tiny-qwen3"
MAX_MODEL_LEN = 512
STARTUP_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class HttpReply:
    status: int
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, api_key: str = "unused", timeout: float = 120) -> openai.OpenAI:
        return openai.OpenAI(api_key=api_key, base_url=f"{self.base_url}/v1", max_retries=0, timeout=timeout)

    def async_client(self, api_key: str = "unused") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(api_key=api_key, base_url=f"{self.base_url}/v1", max_retries=0, timeout=120)

    def request(self, method: str, path: str, body: bytes | str | dict | None = None,
                headers: dict[str, str] | None = None) -> HttpReply:
        if isinstance(body, dict):
            body = json.dumps(body)
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            connection.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
            reply = connection.getresponse()
            return HttpReply(reply.status, reply.read())
        finally:
            connection.close()

    def metrics(self) -> dict[str, float]:
        """Prometheus samples by their full name with labels, e.g. 'vllm:num_requests_running{model_name="x"}'."""
        reply = self.request("GET", "/metrics")
        assert reply.status == 200
        samples = {}
        for line in reply.body.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples

    def wait_healthy(self) -> None:
        """Poll /health until the server answers 200; fail at once if the process exits."""
        for _ in range(STARTUP_TIMEOUT_S * 10):
            try:
                if self.request("GET", "/health").status == 200:
                    return
            except OSError:
                pass
            try:
                code = self.process.wait(timeout=0.1)        # the pause between polls; returns if it died
            except subprocess.TimeoutExpired:
                continue
            pytest.fail(f"the server exited with {code} before it was healthy:\n{self.log()}")
        pytest.fail(f"the server was not healthy after {STARTUP_TIMEOUT_S} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def start_server(model_path: Path, log_path: Path, *flags: str, arch: str | None = "qwen3") -> ServerProcess:
    """`run-model ARCH --model PATH --serve ...`, or with arch=None `run-model serve PATH ...` (the
    architecture from config.json)."""
    port = free_port()
    launch = [arch, "--model", str(model_path), "--serve"] if arch else ["serve", str(model_path)]
    command = [sys.executable, "-m", "runtime.cli", *launch, "--port", str(port), "--served-model-name", MODEL,
               "--max-model-len", str(MAX_MODEL_LEN), *flags]
    # One intra-op thread: on a small shared CI box, torch's spinning OpenMP workers and the HTTP thread
    # otherwise fight over the cores and every step gets many times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=Path(__file__).resolve().parents[2])
    server = ServerProcess(process, port, log_path)
    server.wait_healthy()
    return server


def error_of(reply: HttpReply) -> dict:
    """The OpenAI error object of a reply, checked for shape."""
    body = reply.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    return error
