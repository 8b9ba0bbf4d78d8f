"""Serving benchmark: `python tools/bench.py serve --url http://127.0.0.1:8000 --concurrency 1,8,32`.

Closed-loop clients, like `vllm bench serve --max-concurrency C --request-rate inf`: all requests are issued
at once and a semaphore keeps C in flight. With `--request-rate R`, requests arrive as a Poisson process of
R per second (exponential gaps, seeded by --seed), still at most C in flight, as `vllm bench serve`. Every request streams a completion of random token ids
(`--input-len`) for exactly `--output-len` tokens (greedy, ignore_eos). The metrics are vLLM's:

    TTFT   time from sending a request to its first streamed token
    TPOT   per request, (E2EL - TTFT) / (output tokens - 1): the first token is not counted
    ITL    time between consecutive streamed chunks, over every chunk of every request
    E2EL   time from sending a request to receiving its last token
    request throughput = completed requests / duration; output throughput = output tokens / duration

With `--offline`, the same prompts and parameters also go through `LLM.generate` in this process with
`max_num_seqs = C` (the same concurrency, no HTTP): the gap is what the serving front costs. On a shared
machine, `--repeat N` runs each level N times, alternating server and offline, and keeps the fastest run of
each: the one least disturbed by other work."""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

try:                                  # the openai client's HTTP library: httpx, or its successor httpx2
    import httpx2 as httpx
except ImportError:                   # pragma: no cover
    import httpx


@dataclass(slots=True)
class RequestResult:
    ok: bool
    ttft: float = 0.0                 # seconds
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


@dataclass(slots=True)
class Summary:
    concurrency: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float         # requests / s
    output_throughput: float          # tokens / s
    ttft_ms: dict[str, float]         # mean / median / p99
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2el_ms: dict[str, float]
    offline_duration_s: float | None = None
    offline_output_throughput: float | None = None

    @property
    def overhead(self) -> float | None:
        """How much longer the server took than LLM.generate on the same workload."""
        return None if self.offline_duration_s is None else self.duration_s / self.offline_duration_s - 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    parser.add_argument("--model", help="model name to send (default: the first of /v1/models)")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated levels of requests in flight")
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="requests per second, Poisson arrivals (default: inf, all at once)")
    parser.add_argument("--num-prompts", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=64, help="generated tokens per request")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--tokenizer", help="tokenizer dir for the prompts' vocabulary (default: the "
                        "model root /v1/models reports)")
    parser.add_argument("--offline", action="store_true",
                        help="also run LLM.generate on the model root with the same workload, for the overhead")
    parser.add_argument("--repeat", type=int, default=1, help="runs per level; the fastest of each side is kept")
    parser.add_argument("--json", type=Path, help="write the summaries here")


def run(args: argparse.Namespace) -> None:
    served = _served_model(args)
    model = args.model or served["id"]
    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = random_prompts(args.tokenizer or served["root"], args.num_prompts, args.input_len, args.seed)
    summaries = []
    for concurrency in levels:
        runs, offline_runs = [], []
        llm = offline_llm(served, concurrency) if args.offline else None
        for _ in range(args.repeat):
            asyncio.run(_one_request(args, model, prompts[0]))          # warm-up, not measured
            results, duration = asyncio.run(_run_level(args, model, prompts, concurrency))
            runs.append(summarize(concurrency, results, duration))
            print(f"concurrency {concurrency}: server {runs[-1].output_throughput:.1f} tok/s", end="")
            if args.offline:
                offline_runs.append(offline_generate(llm, prompts, args.output_len))
                print(f", offline {offline_runs[-1][1]:.1f} tok/s", end="")
            print()
        summary = min(runs, key=lambda s: s.duration_s)
        if offline_runs:
            summary.offline_duration_s, summary.offline_output_throughput = min(offline_runs)
        summaries.append(summary)
        print_summary(summary)
    print_table(summaries, args)
    if args.json:
        args.json.write_text(json.dumps([asdict(s) | {"overhead": s.overhead} for s in summaries], indent=2))


def _served_model(args: argparse.Namespace) -> dict:
    reply = httpx.get(f"{args.url}/v1/models", headers={"Authorization": f"Bearer {args.api_key}"}, timeout=30)
    reply.raise_for_status()
    return reply.json()["data"][0]


def random_prompts(tokenizer_path: str, num_prompts: int, input_len: int, seed: int) -> list[list[int]]:
    """Token ids drawn uniformly from the vocabulary without its special tokens, as vLLM's random dataset."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    vocabulary = np.array([i for i in range(len(tokenizer)) if i not in special])
    rng = np.random.default_rng(seed)
    return [rng.choice(vocabulary, size=input_len).tolist() for _ in range(num_prompts)]


def _payload(args: argparse.Namespace, model: str, prompt: list[int]) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": args.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


async def _run_level(args: argparse.Namespace, model: str, prompts: list[list[int]],
                     concurrency: int) -> tuple[list[RequestResult], float]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        gate = asyncio.Semaphore(concurrency)

        async def limited(prompt: list[int], arrival: float) -> RequestResult:
            await asyncio.sleep(arrival)
            async with gate:
                return await _stream_request(client, args, model, prompt)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(p, t) for p, t in zip(prompts, arrivals(args, len(prompts)))))
        return list(results), time.perf_counter() - start


def arrivals(args: argparse.Namespace, num_requests: int) -> list[float]:
    """Seconds after the start at which each request is sent: all at 0, or a Poisson process."""
    if args.request_rate == float("inf"):
        return [0.0] * num_requests
    if args.request_rate <= 0:
        raise SystemExit("--request-rate must be positive")
    gaps = np.random.default_rng(args.seed).exponential(1.0 / args.request_rate, size=num_requests)
    return np.cumsum(gaps).tolist()


async def _one_request(args: argparse.Namespace, model: str, prompt: list[int]) -> RequestResult:
    async with httpx.AsyncClient(timeout=None) as client:
        return await _stream_request(client, args, model, prompt)


async def _stream_request(client, args: argparse.Namespace, model: str, prompt: list[int]) -> RequestResult:
    result = RequestResult(ok=False)
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", f"{args.url}/v1/completions", json=_payload(args, model, prompt),
                                 headers={"Authorization": f"Bearer {args.api_key}"}) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.e2el = last - start
        result.ok = result.ttft > 0.0
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def _stats_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
    array = np.asarray(values) * 1000
    return {"mean": float(array.mean()), "median": float(np.median(array)), "p99": float(np.percentile(array, 99))}


def summarize(concurrency: int, results: list[RequestResult], duration: float) -> Summary:
    done = [r for r in results if r.ok]
    tpot = [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    output_tokens = sum(r.output_tokens for r in done)
    for failure in [r for r in results if not r.ok][:3]:
        print(f"failed request: {failure.error}")
    return Summary(concurrency, len(done), len(results) - len(done), duration, len(done) / duration,
                   output_tokens / duration, _stats_ms([r.ttft for r in done]), _stats_ms(tpot),
                   _stats_ms([t for r in done for t in r.itl]), _stats_ms([r.e2el for r in done]))


def offline_llm(served: dict, concurrency: int):
    """The served checkpoint in this process, running at most `concurrency` sequences at a time."""
    from runtime import LLM
    return LLM(served["root"], max_num_seqs=concurrency, max_model_len=served.get("max_model_len"))


def offline_generate(llm, prompts: list[list[int]], output_len: int) -> tuple[float, float]:
    """(duration, output tokens / s) of LLM.generate on the same prompts and parameters as the server's."""
    from runtime import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:1], params, use_tqdm=False)                  # warm-up, as for the server
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    duration = time.perf_counter() - start
    return duration, sum(len(o.token_ids) for o in outputs) / duration


def print_summary(s: Summary) -> None:
    print(f"\n---- concurrency {s.concurrency}: {s.completed} completed, {s.failed} failed in {s.duration_s:.2f} s")
    print(f"request throughput {s.request_throughput:.2f} req/s, output throughput {s.output_throughput:.1f} tok/s")
    for name, stats in [("TTFT", s.ttft_ms), ("TPOT", s.tpot_ms), ("ITL", s.itl_ms), ("E2EL", s.e2el_ms)]:
        print(f"{name:5s} ms  mean {stats['mean']:9.2f}  median {stats['median']:9.2f}  p99 {stats['p99']:9.2f}")
    if s.offline_duration_s is not None:
        print(f"offline LLM.generate: {s.offline_duration_s:.2f} s, {s.offline_output_throughput:.1f} tok/s; "
              f"server overhead {s.overhead * 100:+.1f}%")


def print_table(summaries: list[Summary], args: argparse.Namespace) -> None:
    """A markdown table for docs/PERFORMANCE.md."""
    rate = "all at once" if args.request_rate == float("inf") else f"Poisson arrivals at {args.request_rate:g} req/s"
    print(f"\ninput {args.input_len} tokens, output {args.output_len} tokens, {args.num_prompts} requests per level "
          f"({rate}), fastest of {args.repeat} run(s)\n")
    header = ("| concurrency | req/s | output tok/s | TTFT mean / median / p99 (ms) | TPOT mean / median / p99 (ms) "
              "| ITL mean / median / p99 (ms) | E2EL mean / median / p99 (ms) |")
    offline = any(s.offline_duration_s is not None for s in summaries)
    print(header + (" offline tok/s | server overhead |" if offline else ""))
    print("|---" * (7 + 2 * offline) + "|")
    triple = lambda d: f"{d['mean']:.1f} / {d['median']:.1f} / {d['p99']:.1f}"  # noqa: E731
    for s in summaries:
        row = (f"| {s.concurrency} | {s.request_throughput:.2f} | {s.output_throughput:.1f} | {triple(s.ttft_ms)} | "
               f"{triple(s.tpot_ms)} | {triple(s.itl_ms)} | {triple(s.e2el_ms)} |")
        if s.offline_duration_s is not None:
            row += f" {s.offline_output_throughput:.1f} | {s.overhead * 100:+.1f}% |"
        print(row)
