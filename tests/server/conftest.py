"""Fixtures: the shared server process (tiny Qwen3) and the offline engine on the same checkpoint, the oracle
the server must reproduce."""
from __future__ import annotations

import contextlib

import pytest
import torch

from runtime import LLM
from tests.server.server_process import MAX_MODEL_LEN, start_server

TOOLS_MAX_MODEL_LEN = 2048


@pytest.fixture(scope="session")
def server(tiny_qwen3, tmp_path_factory):
    """The shared server (no API key), started as `run-model serve PATH`. Tests must leave it healthy and
    idle."""
    handle = start_server(tiny_qwen3, tmp_path_factory.mktemp("server") / "server.log", arch=None)
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def tools_server(tiny_qwen3, tmp_path_factory):
    """A second server with room for tool definitions, which the tiny tokenizer spells in many tokens."""
    handle = start_server(tiny_qwen3, tmp_path_factory.mktemp("tools-server") / "server.log", "--max-model-len",
                          str(TOOLS_MAX_MODEL_LEN), arch=None)
    yield handle
    handle.stop()


class OfflineEngine:
    """LLM.generate / LLM.chat on one intra-op thread, as the server runs (see start_server): on a busy
    2-core box two spinning threads make each step many times slower."""

    def __init__(self, llm: LLM):
        self.llm, self.tokenizer = llm, llm.tokenizer

    def generate(self, prompts, params):
        with _one_thread():
            return self.llm.generate(prompts, params, use_tqdm=False)

    def chat(self, messages, params, **template_kwargs):
        with _one_thread():
            return self.llm.chat(messages, params, use_tqdm=False, **template_kwargs)


@contextlib.contextmanager
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def offline(tiny_qwen3) -> OfflineEngine:
    """The offline engine on the same checkpoint and context length: what the server must reproduce."""
    return OfflineEngine(LLM(str(tiny_qwen3), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN))


@pytest.fixture(scope="session")
def client(server):
    return server.client()
