"""Start-up report, /v1/models, /metrics, and a clean stop on SIGTERM with requests in flight."""
from __future__ import annotations

import http.client
import json
import re
import signal
import threading
import time

import pytest

from tests.server.server_process import MAX_MODEL_LEN, MODEL, start_server


def test_startup_reports_model_cache_and_url(server, tiny_qwen3):
    log = server.log()
    assert str(tiny_qwen3) in log
    assert "KV cache group 0 (4 layers, full, float32):" in log
    assert re.search(rf"KV cache \d+\.\d\d GiB \(\d+ tokens\); maximum concurrency for {MAX_MODEL_LEN} tokens per "
                     r"request: \d+\.\d\dx", log)
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


def _raw_stream(port: int, max_tokens: int, events: list, started: threading.Event) -> None:
    """A streaming completion over plain HTTP; appends every event's payload (a dict, or "[DONE]")."""
    body = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        reply = connection.getresponse()
        for line in reply:
            if line.startswith(b"data: "):
                payload = line[6:].strip().decode()
                events.append(payload if payload == "[DONE]" else json.loads(payload))
                started.set()
    except OSError as exc:
        events.append(exc)
    finally:
        started.set()
        connection.close()


def test_sigterm_with_16_streams_ends_each_with_a_finish_reason_or_an_error_and_exits_0(doomed_server):
    streams = [([], threading.Event()) for _ in range(16)]
    threads = [threading.Thread(target=_raw_stream, args=(doomed_server.port, 8 if i % 4 == 0 else MAX_MODEL_LEN - 8,
                                                           events, started))
               for i, (events, started) in enumerate(streams)]
    for thread in threads:
        thread.start()
    for _, started in streams:
        started.wait(timeout=60)
    stopping = time.monotonic()
    assert doomed_server.stop(signal.SIGTERM, timeout=60) == 0
    assert time.monotonic() - stopping < 1 + 5 + 5          # --shutdown-timeout, error events, uvicorn's own
    for thread in threads:
        thread.join(timeout=60)
    errors = 0
    for events, _ in streams:
        assert events[-1] == "[DONE]", events[-3:]
        last = events[-2]
        if "error" in last:
            assert last["error"]["code"] is None and "shutting down" in last["error"]["message"]
            errors += 1
        else:
            assert last["choices"][0]["finish_reason"] == "length"
    assert 0 < errors < 16                                  # the short ones finished, the long ones were ended
    log = doomed_server.log()
    assert "Traceback" not in log and "Finished server process" in log
