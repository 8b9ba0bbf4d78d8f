"""Start-up report, /v1/models, /metrics, and a clean stop on SIGTERM with requests in flight."""
from __future__ import annotations

import signal
import threading

import pytest

from tests.server.server_process import MAX_MODEL_LEN, MODEL, start_server


def test_startup_reports_model_cache_and_url(server, tiny_qwen3):
    log = server.log()
    assert str(tiny_qwen3) in log
    assert "KV cache group 0 (4 layers, full):" in log
    assert f"http://127.0.0.1:{server.port}/v1" in log


def test_models_lists_the_served_name(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].max_model_len == MAX_MODEL_LEN


def test_metrics_expose_queues_cache_and_latency_histograms(server, client):
    client.completions.create(model=MODEL, prompt="Hello there", max_tokens=3, temperature=0)
    metrics = server.metrics()
    label = f'{{model_name="{MODEL}"}}'
    group = f'{{cache_group="0",model_name="{MODEL}"}}'
    for name in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:prefix_cache_queries_total",
                 "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total"]:
        assert name + label in metrics, name
    for name in ["vllm:kv_cache_usage_perc", "run_model:kv_cache_used_blocks", "run_model:kv_cache_total_blocks"]:
        assert name + group in metrics, name
    assert metrics["run_model:kv_cache_total_blocks" + group] > 0
    for histogram in ["vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                      "vllm:e2e_request_latency_seconds"]:
        assert metrics[f"{histogram}_count{label}"] >= 1, histogram
    assert metrics["vllm:generation_tokens_total" + label] >= 3


@pytest.fixture
def doomed_server(tiny_qwen3, tmp_path):
    """A server of its own: the test stops it. In-flight requests get one second to finish."""
    handle = start_server(tiny_qwen3, tmp_path / "server.log", "--shutdown-timeout", "1")
    yield handle
    if handle.process.poll() is None:
        handle.stop(signal.SIGKILL)


def test_sigterm_finishes_short_requests_aborts_long_ones_and_exits_0(doomed_server):
    client = doomed_server.client()
    results: dict[str, object] = {}
    started = {name: threading.Event() for name in ("short", "long")}

    def stream(name: str, max_tokens: int) -> None:
        text, reason = "", None
        try:
            for chunk in client.completions.create(model=MODEL, prompt="Hello", max_tokens=max_tokens, temperature=0,
                                                   stream=True, extra_body={"ignore_eos": True}):
                started[name].set()
                text += chunk.choices[0].text
                reason = chunk.choices[0].finish_reason or reason
            results[name] = reason
        except Exception as exc:      # the connection closed under the stream
            results[name] = exc
        finally:
            started[name].set()

    threads = [threading.Thread(target=stream, args=("short", 40)),
               threading.Thread(target=stream, args=("long", MAX_MODEL_LEN - 8))]
    for thread in threads:
        thread.start()
    for event in started.values():
        event.wait(timeout=60)
    assert doomed_server.stop(signal.SIGTERM, timeout=60) == 0
    for thread in threads:
        thread.join(timeout=60)
    assert results["short"] == "length"           # finished within the grace period
    assert results["long"] != "length"            # cut off when it ran out
    assert "Finished server process" in doomed_server.log()
