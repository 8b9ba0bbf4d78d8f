"""Many clients at once: continuous batching behind the HTTP front, and clients that leave mid-stream."""
from __future__ import annotations

import asyncio
import time

import openai
import pytest

from runtime import SamplingParams
from tests.server.server_process import MODEL, ServerProcess
from tools.parity import random_prompts

NUM_CLIENTS = 64
QUITTERS = range(0, NUM_CLIENTS, 4)          # a quarter of the clients disconnect mid-stream
MAX_TOKENS = 12
QUITTER_MAX_TOKENS = 400                     # long enough to be still generating when they leave


async def stream_one(client, prompt: list[int], quit_after_chunks: int | None) -> str | None:
    """The text a streaming client receives, or None if it disconnects after `quit_after_chunks` chunks."""
    stream = await client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, stream=True, extra_body={"ignore_eos": True},
        max_tokens=MAX_TOKENS if quit_after_chunks is None else QUITTER_MAX_TOKENS)
    text, chunks = "", 0
    async for chunk in stream:
        text += chunk.choices[0].text
        chunks += 1
        if quit_after_chunks is not None and chunks == quit_after_chunks:
            await stream.close()             # drops the connection, as a client that goes away
            return None
    return text


async def run_clients(server: ServerProcess, prompts: list[list[int]]) -> list[str | None]:
    client = server.async_client()
    try:
        return await asyncio.gather(*(stream_one(client, prompt, 2 if i in QUITTERS else None)
                                      for i, prompt in enumerate(prompts)))
    finally:
        await client.close()


def wait_until_idle(server: ServerProcess, timeout_s: float = 60) -> dict[str, float]:
    """Poll /metrics until no request runs or waits and no KV block is held (aborts land asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = server.metrics()
        busy = [name for name, value in metrics.items() if value != 0 and name.startswith(
            ("vllm:num_requests_running", "vllm:num_requests_waiting", "run_model:kv_cache_used_blocks"))]
        if not busy or time.monotonic() > deadline:
            return metrics
        server.request("GET", "/health")     # a round trip to the server is the pause between polls


def abort_count(metrics: dict[str, float]) -> float:
    return metrics[f'vllm:request_success_total{{finished_reason="abort",model_name="{MODEL}"}}']


def test_64_streams_with_a_quarter_disconnecting(server, offline):
    prompts = random_prompts(1024, tuple(5 + (7 * i) % 60 for i in range(NUM_CLIENTS)), seed=21)
    stayers = [i for i in range(NUM_CLIENTS) if i not in QUITTERS]
    expected = offline.generate([prompts[i] for i in stayers],
                                SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    aborted_before = abort_count(server.metrics())

    received = asyncio.run(run_clients(server, prompts))

    assert [received[i] for i in stayers] == [e.text for e in expected]
    assert all(received[i] is None for i in QUITTERS)
    metrics = wait_until_idle(server)
    assert metrics[f'vllm:num_requests_running{{model_name="{MODEL}"}}'] == 0
    assert metrics[f'vllm:num_requests_waiting{{model_name="{MODEL}"}}'] == 0
    assert metrics[f'run_model:kv_cache_used_blocks{{cache_group="0",model_name="{MODEL}"}}'] == 0
    assert abort_count(metrics) - aborted_before == len(QUITTERS)


def test_disconnected_non_streaming_request_is_aborted(server):
    """A client that gives up on a long non-streaming request must not leave it generating."""
    aborted_before = abort_count(server.metrics())
    client = server.client(timeout=0.5)
    with pytest.raises(openai.APITimeoutError):       # the client gives up and closes its connection
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=480, temperature=0,
                                  extra_body={"ignore_eos": True})
    metrics = wait_until_idle(server)
    assert metrics[f'run_model:kv_cache_used_blocks{{cache_group="0",model_name="{MODEL}"}}'] == 0
    assert abort_count(metrics) - aborted_before == 1
