#!/usr/bin/env python
"""Benchmarks. Subcommands:

    sched       one scheduler step + input preparation for N running decode requests, CPU, no model
    kv          the model built on the meta device: each cache group's bytes per token, and the cache of one
                request at --tokens positions (CPU, no weights)
    latency     batch 1, 128-token prompt, 256 new tokens: TTFT, TPOT, decode tok/s, vs the roofline
    context     decode step time per --batch size with --contexts tokens already in each cache (their prefill
                is skipped: the model is stubbed out while the blocks are allocated, so 1M tokens take seconds;
                the caches hold the model's random fill (`fill_caches`), or zeros with --zero-caches)
    throughput  256 requests, prompt and output lengths uniform in [100, 1024], seed 0, ignore_eos
                (nano-vllm's / vLLM's protocol): output tok/s
    sampling    the sampler alone on 256 rows x 152k vocabulary: greedy, the torch reference, the Triton kernel
    cpu         the CPU path against transformers' generate in the same process (same config, dummy weights):
                batch-1 decode after a 400-token prompt, and 8 mixed prompts at once vs one by one
    structured  N concurrent requests under a JSON-schema grammar vs the same requests unconstrained, on
                the CPU by default (a tiny random model unless --model): output tok/s of each and the ratio
Both GPU workloads also run through transformers in the same process (--hf), and print the roofline:
the bytes one decode step must read (weights touched + KV) over the copy bandwidth measured in the run.
latency, throughput and profile run greedy and then the sampling workload (temperature 0.8, top-p 0.95,
top-k 50), reported as the sampling_* fields (--sampling greedy|sampling|both).

    python tools/bench.py latency --model Qwen/Qwen3-8B --arch qwen3 --load-format dummy --hf
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from runtime.kv_cache import CacheSpec, KVCacheManager, group_cache_specs  # noqa: E402
from runtime.request import Request, SamplingParams  # noqa: E402
from runtime.runner import ModelRunner  # noqa: E402
from runtime.scheduler import Scheduler  # noqa: E402
from tools import bench_serve  # noqa: E402


def decode_fixture(num_requests: int, prompt_len: int, block_size: int = 16, num_layers: int = 28):
    """A scheduler + runner with `num_requests` requests already past prefill, decoding."""
    specs = [CacheSpec((2, 8, 128), torch.bfloat16)] * num_layers
    layout = group_cache_specs(specs, block_size)
    max_model_len = prompt_len + 4096
    blocks_per_request = -(-max_model_len // block_size)
    kv = KVCacheManager(layout, block_size, [num_requests * blocks_per_request + 1], num_requests, max_model_len,
                        enable_prefix_caching=True)
    scheduler = Scheduler(kv, max_num_seqs=num_requests, max_num_batched_tokens=8192)
    runner = ModelRunner(model=None, kv=kv, caches=[], vocab_size=151936, device=torch.device("cpu"))
    params = SamplingParams(temperature=0.0, max_tokens=4096)
    for i in range(num_requests):
        # distinct prompts: no prefix sharing, every request owns its blocks
        scheduler.add(Request(str(i), [(i * 7919 + j) % 150000 for j in range(prompt_len)], params))
    while scheduler.waiting or any(r.num_output_tokens == 0 for r in scheduler.running):
        batch = scheduler.schedule()
        runner.prepare_inputs(batch)
        scheduler.finish_step(batch)
        sample_fake_tokens(scheduler, runner, batch, 1)
    return scheduler, runner


def sample_fake_tokens(scheduler: Scheduler, runner: ModelRunner, batch, token: int) -> None:
    """Stand in for sampling: append `token` where a request's whole sequence is computed (host and runner)."""
    for request_id in batch.request_ids:
        request = scheduler.requests[request_id]
        if request.num_computed_tokens == request.num_tokens:
            request.token_ids.append(token)
            runner.states[request_id].token_ids.append(token)


def bench_sched(args: argparse.Namespace) -> None:
    scheduler, runner = decode_fixture(args.num_requests, args.prompt_len)
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        batch = scheduler.schedule()
        runner.prepare_inputs(batch)
        elapsed = time.perf_counter() - start
        scheduler.finish_step(batch)
        sample_fake_tokens(scheduler, runner, batch, step % 1000)
        if step >= args.warmup:
            times.append(elapsed)
        assert len(batch) == args.num_requests and batch.num_tokens == args.num_requests
    times.sort()
    print(f"schedule + prepare_inputs, {args.num_requests} decode requests (prompt {args.prompt_len}), "
          f"{args.steps} steps: median {statistics.median(times) * 1e3:.3f} ms, "
          f"p90 {times[int(0.9 * len(times))] * 1e3:.3f} ms, min {times[0] * 1e3:.3f} ms")


# ---- GPU workloads ----------------------------------------------------------------------------------------

def bench_kv(args: argparse.Namespace) -> dict:
    """Bytes per token of every cache group of a model at its real shapes (built on the meta device).
    A window group holds a fixed number of positions per request; the others grow with the context."""
    from runtime.config import EngineConfig
    from runtime.loader import load_hf_config
    from runtime.registry import get_package, package_for_architectures
    hf_config = load_hf_config(Path(args.model))
    package = get_package(args.arch) if args.arch else \
        package_for_architectures(getattr(hf_config, "architectures", None) or [])
    with torch.device("meta"):
        model = package.build(hf_config, EngineConfig(device="cpu", dtype=args.dtype,
                                                      kv_cache_dtype=args.kv_cache_dtype,
                                                      kv_cache_dtype_skip_layers=args.kv_cache_dtype_skip_layers))
    layout = group_cache_specs(model.cache_specs(), args.block_size)
    model_dtype = EngineConfig(device="cpu", dtype=args.dtype).torch_dtype
    growing = fixed = fixed_state = 0.0
    print(f"{'group':>5} {'layers':>6} {'entry':>14} {'dtype':>13} {'per entry':>9} {'kind':>22} {'B/token':>9} "
          f"{'at ' + str(args.tokens):>14}")
    for g, group in enumerate(layout.groups):
        spec = group.spec
        per_token = len(group.layers) * spec.entry_bytes / spec.tokens_per_entry
        positions = args.tokens if spec.window is None else min(spec.window, args.tokens)
        total = len(group.layers) * spec.entry_bytes * -(-positions // spec.tokens_per_entry)
        kind = f"window {spec.window}" if spec.window else "grows"
        kind += f", 1 per {spec.tokens_per_entry}" if spec.tokens_per_entry > 1 else ""
        print(f"{g:>5} {len(group.layers):>6} {str(spec.entry_shape):>14} {str(spec.dtype)[6:]:>13} "
              f"{spec.entry_bytes:>9} {kind:>22} {per_token if spec.window is None else 0:>9.1f} {total:>14,}")
        growing += per_token if spec.window is None else 0
        if spec.window is not None:
            # windows kept at another precision than the KV (recurrent state, e.g. compressor buffers)
            is_kv = spec.dtype in (model_dtype, torch.float8_e4m3fn)
            fixed_state += 0 if is_kv else total
            fixed += total if is_kv else 0
    kv_bytes = growing * args.tokens + fixed
    print(f"long-context slope: {growing:,.0f} B/token")
    print(f"one request at {args.tokens:,} positions: {kv_bytes / 2**30:.4f} GiB of KV ({fixed / 2**20:.2f} MiB "
          f"of it windows), plus {fixed_state / 2**20:.2f} MiB of state at other precisions "
          f"= {(kv_bytes + fixed_state) / 2**30:.4f} GiB")
    return {"bytes_per_token": growing, "kv_bytes_at_tokens": kv_bytes, "state_bytes": fixed_state}


def copy_bandwidth(device: torch.device, num_bytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (the roofline's memory ceiling)."""
    src = torch.empty(num_bytes // 2, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 20 * num_bytes / (start.elapsed_time(end) / 1e3)


def decode_step_bytes(model: torch.nn.Module, hf_config, batch: int, context_len: int, kv_bytes_per_token: int,
                      expert_shards: int = 1) -> int:
    """Bytes one decode step must read: every weight it touches (an embedding table only through its rows,
    unless tied to the LM head; a stacked expert tensor only for the experts the batch can reach) + the KV.
    With expert parallelism over `expert_shards` ranks a rank stacks experts / expert_shards of them."""
    experts = getattr(hf_config, "num_experts", None) or getattr(hf_config, "num_local_experts", None)
    top_k = getattr(hf_config, "num_experts_per_tok", 1)
    touched_fraction = 1.0
    if experts:       # expected distinct experts hit by batch*top_k uniform picks
        touched_fraction = 1.0 - (1.0 - top_k / experts) ** batch
    total = 0
    seen = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        size = param.numel() * param.element_size()
        if "embed_tokens" in name and not getattr(hf_config, "tie_word_embeddings", False):
            size = batch * param.shape[-1] * param.element_size()
        elif experts and param.dim() >= 3 and param.shape[0] * expert_shards == experts:   # stacked experts
            size = int(size * touched_fraction)
        total += size
    return total + batch * context_len * kv_bytes_per_token


SAMPLING_WORKLOAD = dict(temperature=0.8, top_p=0.95, top_k=50)


def _modes(args: argparse.Namespace) -> list[str]:
    return ["greedy", "sampling"] if args.sampling == "both" else [args.sampling]


def _params(mode: str, **fields) -> "SamplingParams":
    """The greedy workload, or the sampling one; its seed fixed so that runs repeat."""
    if mode == "greedy":
        return SamplingParams(temperature=0.0, **fields)
    return SamplingParams(**SAMPLING_WORKLOAD, seed=0, **fields)


def _prefixed(mode: str, result: dict) -> dict:
    return result if mode == "greedy" else {f"sampling_{k}": v for k, v in result.items()}


def _kv_bytes_per_token(engine) -> int:
    return sum(len(g.layers) * g.spec.entry_bytes // g.spec.tokens_per_entry for g in engine.kv.groups)


def _engine_options(args: argparse.Namespace) -> dict:
    return dict(arch=args.arch, load_format=args.load_format, dtype=args.dtype, max_model_len=args.max_model_len,
                skip_tokenizer_init=True,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                enforce_eager=args.enforce_eager, gpu_memory_utilization=args.gpu_memory_utilization,
                kv_cache_dtype=args.kv_cache_dtype,
                tensor_parallel_size=args.tensor_parallel_size, enable_expert_parallel=args.enable_expert_parallel)


def _timed_steps(engine, requests: list[tuple[list[int], "SamplingParams"]]) -> tuple[list[float], float]:
    """Run requests to completion; per-step wall times (each step ends in a host sync) and the total."""
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", prompt, params)
    times = []
    start = time.perf_counter()
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return times, time.perf_counter() - start


def hf_generate_seconds(hf_model, prompts: list[list[int]], max_new_tokens: int, mode: str) -> float:
    """transformers generate over a left-padded batch, greedy, no early stop; seconds for the whole call."""
    pad = 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device="cuda")
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device="cuda")
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    if mode in ("static", "compile"):
        kwargs["cache_implementation"] = "static"
    if mode == "default":                                     # no compilation: a short warm-up will do
        hf_model.generate(ids, attention_mask=mask, **dict(kwargs, max_new_tokens=8, min_new_tokens=8))
    else:                                                     # warm up with the timed shapes (compiles)
        hf_model.generate(ids, attention_mask=mask, **kwargs)
    torch.cuda.synchronize()
    start = time.perf_counter()
    hf_model.generate(ids, attention_mask=mask, **kwargs)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_latency(args: argparse.Namespace) -> dict:
    from runtime import LLM
    llm = LLM(args.model, **_engine_options(args))
    engine = llm.engine
    rng = random.Random(0)

    def fresh_prompt() -> list[int]:                # a new prompt per run: no prefix-cache hit skews TTFT
        return [rng.randrange(1000, engine.vocab_size - 1000) for _ in range(args.prompt_len)]
    bandwidth = copy_bandwidth(engine.device)
    step_bytes = decode_step_bytes(engine.model, engine.hf_config, 1, args.prompt_len + args.output_len // 2,
                                   _kv_bytes_per_token(engine),
                                   args.tensor_parallel_size if args.enable_expert_parallel else 1)
    result = dict(workload="latency", model=args.model, bandwidth_tb_s=bandwidth / 1e12, step_gb=step_bytes / 1e9,
                  roofline_tok_s=bandwidth / step_bytes)
    for mode in _modes(args):
        params = _params(mode, max_tokens=args.output_len, ignore_eos=True)
        first_only = _params(mode, max_tokens=1, ignore_eos=True)
        for warm_up in (params, first_only):                 # both request shapes: nothing compiles when timed
            _timed_steps(engine, [(fresh_prompt(), warm_up)])
        # TTFT: a request that stops after its first token; with async scheduling the first step only
        # launches, so a step's duration is not a token's latency. TPOT: the rest of a full run, per token.
        _, ttft = _timed_steps(engine, [(fresh_prompt(), first_only)])
        _, total = _timed_steps(engine, [(fresh_prompt(), params)])
        tpot = (total - ttft) / (args.output_len - 1)
        result.update(_prefixed(mode, dict(ttft_ms=ttft * 1e3, tpot_ms=tpot * 1e3, decode_tok_s=1.0 / tpot,
                                           fraction_of_roofline=(step_bytes / bandwidth) / tpot)))
    if args.hf:
        del llm, engine
        torch.cuda.empty_cache()
        hf_model = _hf_model_for(args)
        seconds = hf_generate_seconds(hf_model, [fresh_prompt()], args.output_len, args.hf_mode)
        result.update(hf_mode=args.hf_mode, hf_tok_s=args.output_len / seconds)
    return result


def bench_spec(args: argparse.Namespace) -> dict:
    """Batch-1 greedy decode with k drafts per step replayed from a plain run of the same prompt: every
    draft right (the ceiling of speculation) and every draft wrong (the cost of verifying k + 1 tokens),
    against plain decode."""
    from runtime import LLM, SamplingParams
    llm = LLM(args.model, **_engine_options(args))
    engine = llm.engine
    rng = random.Random(0)
    prompt = [rng.randrange(1000, engine.vocab_size - 1000) for _ in range(args.prompt_len)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    reference = llm.generate([prompt], params, use_tqdm=False)[0].token_ids           # also the warm-up
    plain_seconds = _timed_steps(engine, [(prompt, params)])[1]
    result = dict(workload="spec", model=args.model, k=args.k, plain_tok_s=args.output_len / plain_seconds)
    # a batch where only some requests find ngram drafts: half repeat a short period, half are random
    mixed = [[rng.randrange(1000, engine.vocab_size - 1000) for _ in range(args.prompt_len)]
             if i % 2 else [1000 + i, 2000 + i, 3000 + i] * (args.prompt_len // 3) for i in range(args.batch)]
    mixed_requests = [(p, params) for p in mixed]
    _timed_steps(engine, mixed_requests)                                              # warm-up
    result[f"plain_batch{args.batch}_tok_s"] = args.batch * args.output_len / _timed_steps(engine, mixed_requests)[1]
    vocab = engine.vocab_size
    del llm, engine
    torch.cuda.empty_cache()
    llm = LLM(args.model, speculative_config={"method": args.method, "num_speculative_tokens": args.k},
              **_engine_options(args))
    engine = llm.engine
    graph_steps = []
    graph_key = engine.runner._graph_key
    engine.runner._graph_key = lambda plan: graph_steps.append(graph_key(plan)) or graph_steps[-1]

    def replay(right: bool):
        def propose(out) -> None:
            for request in engine.scheduler.running:
                done = request.num_output_tokens
                k = min(args.k, args.output_len - done - 1)
                if k >= 1 and request.num_tokens - request.num_computed_tokens == 1:
                    drafts = reference[done:done + k]
                    request.draft_token_ids = drafts if right else [(t + 1) % vocab for t in drafts]
        return propose

    for name, right in (("all_accepted", True), ("none_accepted", False)):
        engine._propose_drafts = replay(right)
        outputs = llm.generate([prompt], params, use_tqdm=False)                      # warm-up
        assert outputs[0].token_ids == reference, f"{name}: speculative output differs from plain decode"
        before = engine.spec_stats.num_accepted_tokens
        graph_steps.clear()
        seconds = _timed_steps(engine, [(prompt, params)])[1]
        result[f"{name}_tok_s"] = args.output_len / seconds
        result[f"{name}_accepted"] = engine.spec_stats.num_accepted_tokens - before
        result[f"{name}_graph_steps"] = f"{sum(k is not None for k in graph_steps)}/{len(graph_steps)}"
    del engine._propose_drafts                                  # back to the drafter's own proposals
    for pad in (False, True):
        engine.pad_drafts = pad
        _timed_steps(engine, mixed_requests)                                          # warm-up
        graph_steps.clear()
        seconds = _timed_steps(engine, mixed_requests)[1]
        name = f"{args.method}_batch{args.batch}_{'padded' if pad else 'ragged'}"
        result[f"{name}_tok_s"] = args.batch * args.output_len / seconds
        result[f"{name}_graph_steps"] = f"{sum(k is not None for k in graph_steps)}/{len(graph_steps)}"
    return result


class _SkippedForward:
    """Stands in for the model during a prefill whose result does not matter: allocates nothing, computes
    nothing, returns zeros of the hidden width; logits still come from the model's head."""

    def __init__(self, model: torch.nn.Module, width: int, dtype: torch.dtype):
        self.model, self.width, self.dtype = model, width, dtype

    def __call__(self, input_ids, positions, ctx):
        return torch.zeros(input_ids.shape[0], self.width, dtype=self.dtype, device=input_ids.device)

    def compute_logits(self, hidden):
        return self.model.compute_logits(hidden)


def bench_context(args: argparse.Namespace) -> dict:
    """Decode step time at each context length in --contexts, for each batch size in --batch (CUDA graphs):
    the prompts' prefill is skipped (`_SkippedForward`), the decode steps read caches of the full length."""
    from runtime import LLM, SamplingParams
    started = time.perf_counter()
    llm = LLM(args.model, **_engine_options(args))
    engine = llm.engine
    print(f"engine ready in {time.perf_counter() - started:.0f} s: {engine.cache_report()}", flush=True)
    runner = engine.runner
    if not runner.graphs:
        raise SystemExit("bench.py context times CUDA-graph decode steps: drop --enforce-eager")
    model = runner.model
    width = next(iter(runner.graphs.values()))[1].shape[1]
    rng = random.Random(0)
    # the skipped prefill writes nothing: a model that can fill its caches with random entries in their own
    # formats does so once (every block, whichever request gets it), else the steps read zeros
    fill = None if args.zero_caches else getattr(model, "fill_caches", None)
    if fill is not None:
        started = time.perf_counter()
        fill(runner.caches)
        torch.cuda.synchronize()
        print(f"caches filled with random entries in {time.perf_counter() - started:.1f} s", flush=True)
    result = dict(workload="context", model=args.model, steps=args.steps, kv_cache_dtype=args.kv_cache_dtype,
                  kv_report=engine.cache_report(), caches="random" if fill is not None else "zeros")
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 8, ignore_eos=True)
    for batch in args.batch:
        for context in args.contexts:
            for i in range(batch):
                prompt = [rng.randrange(1000, engine.vocab_size - 1000) for _ in range(context)]
                engine.add_request(f"context-{context}-{batch}-{i}", prompt, params)
            runner.model = _SkippedForward(model, width, engine.dtype)
            while any(r.num_output_tokens < 2 for r in engine.scheduler.running) or engine.scheduler.waiting:
                engine.step()
            runner.model = model
            for _ in range(3):
                engine.step()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            torch.cuda.synchronize()
            step_ms = (time.perf_counter() - start) / args.steps * 1e3
            prefix = "" if batch == 1 else f"batch{batch}_"
            result[f"{prefix}step_ms_{context}"] = step_ms
            result[f"{prefix}tok_s_{context}"] = batch / step_ms * 1e3
            print(f"batch {batch}, context {context:,}: {step_ms:.2f} ms a step", flush=True)
            for i in range(batch):
                engine.abort(f"context-{context}-{batch}-{i}")
            while engine.has_unfinished():
                engine.step()
    return result


def _hf_model_for(args: argparse.Namespace):
    from runtime.loader import load_hf_config, resolve_model_path
    from transformers import AutoModelForCausalLM
    config = load_hf_config(resolve_model_path(args.model))
    with torch.device("cuda"):
        hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    if args.hf_mode == "compile":
        hf_model.forward = torch.compile(hf_model.forward, mode="reduce-overhead")
    return hf_model


def throughput_workload(vocab_size: int, num_requests: int, low: int, high: int, seed: int = 0):
    rng = random.Random(seed)
    prompts, output_lens = [], []
    for _ in range(num_requests):
        prompts.append([rng.randrange(1000, vocab_size - 1000) for _ in range(rng.randint(low, high))])
        output_lens.append(rng.randint(low, high))
    return prompts, output_lens


def bench_throughput(args: argparse.Namespace) -> dict:
    from runtime import LLM
    llm = LLM(args.model, **_engine_options(args))
    engine = llm.engine
    prompts, output_lens = throughput_workload(engine.vocab_size, args.num_requests, args.min_len, args.max_len)
    output_tokens = sum(output_lens)
    result = dict(workload="throughput", model=args.model, requests=len(prompts), output_tokens=output_tokens)
    for mode in _modes(args):
        requests = [(p, _params(mode, max_tokens=n, ignore_eos=True)) for p, n in zip(prompts, output_lens)]
        _timed_steps(engine, requests[:8])                                         # warm-up
        preempted = engine.scheduler.stats.num_preemptions
        _, total = _timed_steps(engine, requests)
        result.update(_prefixed(mode, dict(
            seconds=total, output_tok_s=output_tokens / total,
            total_tok_s=(output_tokens + sum(map(len, prompts))) / total,
            preemptions=engine.scheduler.stats.num_preemptions - preempted)))
    if args.hf:
        del llm, engine
        torch.cuda.empty_cache()
        hf_model = _hf_model_for(args)
        subset = slice(0, args.hf_requests)
        seconds = hf_generate_seconds(hf_model, prompts[subset], max(output_lens[subset]), args.hf_mode)
        result.update(hf_mode=args.hf_mode, hf_requests=args.hf_requests,
                      hf_output_tok_s=sum(output_lens[subset]) / seconds)
    return result


def bench_profile(args: argparse.Namespace) -> dict:
    """Steady decode at a fixed batch: the step's wall time without a profiler, then the same steps under
    torch.profiler for how long the device is busy per step and the kernels that take the time. The idle
    share is 1 - busy / the unprofiled step: the profiler's own host cost (it records every op) would
    otherwise count as idle device time."""
    from torch.profiler import ProfilerActivity, profile

    from runtime import LLM
    llm = LLM(args.model, **_engine_options(args))
    engine = llm.engine
    rng = random.Random(0)
    result = dict(workload="profile", model=args.model, batch=args.batch)
    for mode in _modes(args):
        params = _params(mode, max_tokens=2 * args.steps + 64, ignore_eos=True)
        for i in range(args.batch):
            engine.add_request(f"{mode}{i}", [rng.randrange(1000, engine.vocab_size - 1000)
                                              for _ in range(args.prompt_len)], params)
        while any(r.num_output_tokens < 8 for r in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()                                                      # prefill, then settle into decode
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / args.steps
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            torch.cuda.synchronize()
            profiled_wall = (time.perf_counter() - start) / args.steps
        while engine.has_unfinished():
            engine.step()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_per_step = _busy_seconds(kernels) / args.steps
        print(f"--- {mode}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top))
        if args.trace:
            prof.export_chrome_trace(args.trace.replace(".json", f".{mode}.json"))
        result.update(_prefixed(mode, dict(step_ms=wall * 1e3, profiled_step_ms=profiled_wall * 1e3,
                                           gpu_busy_ms=busy_per_step * 1e3,
                                           gpu_idle_fraction=1.0 - busy_per_step / wall,
                                           kernels_per_step=len(kernels) / args.steps)))
    return result


def _busy_seconds(kernels: list) -> float:
    """The union of the kernels' time intervals."""
    intervals = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, current_start, current_end = 0.0, None, None
    for begin, end in intervals:
        if current_end is None or begin > current_end:
            if current_end is not None:
                busy += current_end - current_start
            current_start, current_end = begin, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        busy += current_end - current_start
    return busy / 1e6                                                          # us -> s


def bench_sampling(args: argparse.Namespace) -> dict:
    """The sampler alone: `rows` x `vocab` fp32 logits (normal, std --scale), median device time of greedy
    argmax, the torch reference and the Triton kernel per filter setting; the kernel's tokens must equal
    the reference's (same hashed noise)."""
    from runtime.ops.sampling import sample_rows_ref, sample_rows_triton
    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(args.rows, args.vocab, device="cuda", generator=generator) * args.scale
    rows = args.rows

    def full(value, dtype):
        return torch.full((rows,), value, dtype=dtype, device="cuda")

    settings = {"t0.8 k50 p0.95": (50, 0.95, 0.0), "t0.8": (0, 1.0, 0.0), "t0.8 k50": (50, 1.0, 0.0),
                "t0.8 p0.95": (0, 0.95, 0.0), "t0.8 min_p0.1": (0, 1.0, 0.1)}
    result = dict(workload="sampling", rows=rows, vocab=args.vocab, scale=args.scale,
                  greedy_ms=_device_ms(lambda: logits.argmax(dim=-1)))
    seeds, steps = torch.arange(rows, device="cuda"), full(7, torch.int64)
    for name, (k, p, min_p) in settings.items():
        inputs = (logits, full(0.8, torch.float32), full(k, torch.int64) if k else None,
                  full(p, torch.float32) if p < 1 else None, full(min_p, torch.float32) if min_p else None,
                  seeds, steps)
        reference = sample_rows_ref(*inputs)
        kernel = sample_rows_triton(*inputs)
        result[f"{name}: torch_ms"] = _device_ms(lambda: sample_rows_ref(*inputs))
        result[f"{name}: triton_ms"] = _device_ms(lambda: sample_rows_triton(*inputs))
        result[f"{name}: same_tokens"] = int((kernel.random == reference.random).sum())
    return result


def bench_cpu(args: argparse.Namespace) -> dict:
    """Greedy, no early stop, same config and dtype for both, both models built up front. Batch-1 decode:
    seconds per token after the first (ours: the engine's steps; transformers: time stamps between its
    tokens), best of --repeats alternating runs. Mixed: 8 prompts in one generate call against
    transformers one by one (its default dynamic cache and SDPA attention)."""
    from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

    from runtime import LLM
    from runtime.loader import load_hf_config, resolve_model_path
    if args.threads:
        os.environ["RUN_MODEL_CPU_THREADS"] = str(args.threads)
    llm = LLM(args.model, arch=args.arch, device="cpu", dtype=args.dtype, load_format="dummy",
              skip_tokenizer_init=True, max_model_len=args.context_len + args.output_len + 64)
    engine, vocab = llm.engine, llm.engine.vocab_size
    config = load_hf_config(resolve_model_path(args.model))
    hf_model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).eval()
    rng = random.Random(0)
    low, high = min(1000, vocab // 4), max(vocab - 1000, vocab * 3 // 4)
    prompt = [rng.randrange(low, high) for _ in range(args.context_len)]
    mixed_lens = [rng.randint(16, args.context_len) for _ in range(args.num_prompts)]
    mixed = [[rng.randrange(low, high) for _ in range(n)] for n in mixed_lens]
    params = _params("greedy", max_tokens=args.output_len, ignore_eos=True)

    class Stamps(StoppingCriteria):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def theirs(prompt_ids: list[int], new_tokens: int) -> list[float]:
        """Time stamps of each new token."""
        ids, stamps = torch.tensor([prompt_ids]), Stamps()
        with torch.inference_mode():
            hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                              stopping_criteria=StoppingCriteriaList([stamps]))
        return stamps.times

    llm.generate([prompt[:32]], params, use_tqdm=False)                        # warm-ups
    theirs(prompt[:32], 4)
    ours_per_token, theirs_per_token = [], []
    for _ in range(args.repeats):
        step_times = _timed_steps(engine, [(prompt, params)])[0]
        ours_per_token.append(sum(step_times[1:]) / (args.output_len - 1))    # step 0: prefill + token 1
        stamps = theirs(prompt, args.output_len)
        theirs_per_token.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    start = time.perf_counter()
    llm.generate(mixed, params, use_tqdm=False)
    mixed_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for p in mixed:
        theirs(p, args.output_len)
    hf_mixed_seconds = time.perf_counter() - start
    return dict(workload="cpu", model=args.model, dtype=args.dtype, threads=torch.get_num_threads(),
                context_len=args.context_len, output_len=args.output_len,
                decode_tok_s=1 / min(ours_per_token), hf_decode_tok_s=1 / min(theirs_per_token),
                decode_speedup=min(theirs_per_token) / min(ours_per_token), mixed_prompt_lens=mixed_lens,
                mixed_seconds=mixed_seconds, hf_mixed_seconds=hf_mixed_seconds,
                mixed_speedup=hf_mixed_seconds / mixed_seconds,
                per_token_ms=[round(t * 1e3, 1) for t in ours_per_token],
                hf_per_token_ms=[round(t * 1e3, 1) for t in theirs_per_token])


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def _device_ms(fn, repeats: int = 20) -> float:
    """Median milliseconds of `fn` on the device (CUDA events), after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _gpu_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint dir or hub id; with dummy weights a dir holding "
                        "only config.json will do (tools/configs/ has the real shapes)")
    parser.add_argument("--arch", default=None)
    parser.add_argument("--load-format", default="dummy", choices=["auto", "dummy"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="shard over this many GPUs (the roofline is then one rank's bytes per step)")
    parser.add_argument("--enable-expert-parallel", action="store_true")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16", "fp8", "fp8_e4m3"])
    parser.add_argument("--hf", action="store_true", help="also run transformers on the same workload")
    parser.add_argument("--hf-mode", default="static", choices=["default", "static", "compile"])
    parser.add_argument("--json", help="append the result as one JSON line to this file")
    parser.add_argument("--sampling", default="both", choices=["greedy", "sampling", "both"],
                        help="greedy, the sampling workload (temperature 0.8, top-p 0.95, top-k 50), or both")


# Long enough that every constrained request runs to --output-len, as the unconstrained ones do (ignore_eos).
LONG_JSON = {"type": "object", "properties": {"items": {"type": "array", "minItems": 200, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                     "n": {"type": "integer", "minimum": 0, "maximum": 999},
                                     "kind": {"enum": ["cat", "dog", "fox"]}},
    "required": ["name", "n", "kind"]}}}, "required": ["items"]}


def bench_structured(args: argparse.Namespace) -> dict:
    """Output tok/s of N concurrent requests with and without a grammar (best of --repeats each)."""
    import tempfile
    from runtime import LLM
    from runtime.structured import StructuredOutputsParams
    from tools.parity import make_tiny_checkpoint
    torch.set_num_threads(args.threads)
    model = args.model or str(make_tiny_checkpoint(args.arch, Path(tempfile.mkdtemp()) / args.arch))
    llm = LLM(model, device=args.device, dtype=args.dtype, max_model_len=args.prompt_len + args.output_len + 8,
              load_format=args.load_format, tokenizer=args.tokenizer,
              max_num_seqs=max(args.num_requests, 1))
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 500) for _ in range(args.prompt_len)] for _ in range(args.num_requests)]
    grammar = StructuredOutputsParams(json=LONG_JSON)
    workloads = {"free": [SamplingParams(temperature=1.0, seed=i, max_tokens=args.output_len, ignore_eos=True)
                          for i in range(args.num_requests)],
                 "grammar": [SamplingParams(temperature=1.0, seed=i, max_tokens=args.output_len,
                                            structured_outputs=grammar) for i in range(args.num_requests)]}
    result = {"command": "python tools/bench.py " + " ".join(args.argv), "date": time.strftime("%Y-%m-%d"),
              "device": args.device, "threads": args.threads, "requests": args.num_requests}
    llm.generate(prompts[:2], workloads["grammar"][:2], use_tqdm=False)            # compile, warm up
    for repeat in range(args.repeats):
        for name, params in workloads.items():
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            result[f"{name}_tok_s"] = max(result.get(f"{name}_tok_s", 0.0), round(tokens / elapsed, 1))
            result[f"{name}_tokens"] = tokens
    result["ratio"] = round(result["grammar_tok_s"] / result["free_tok_s"], 3)
    for name in workloads:           # every request decodes --output-len tokens together: one step per token
        result[f"{name}_step_ms"] = round(1000 * args.num_requests / result[f"{name}_tok_s"], 3)
    result.update(_mask_cost(llm, grammar, args.num_requests))
    return result


def _mask_cost(llm, grammar, rows: int) -> dict:
    """The grammar's parts of one decode step of `rows` constrained rows, apart: the host fill of the token
    bitmasks (and their copy queued), and on the device the copy plus the masking of [rows, vocab] fp32
    logits (mean of 200; CUDA events on a GPU)."""
    from runtime.structured import apply_bitmask, build_bitmask
    engine = llm.engine
    device, vocab = engine.device, engine.vocab_size
    matchers = [engine.grammars.matcher(grammar, []) for _ in range(rows)]
    for matcher in matchers:                         # a few tokens in, past the grammar's first literal
        for token in llm.tokenizer.encode('{"items": [', add_special_tokens=False):
            matcher.accept(token)
    on_cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    logits = torch.randn(rows, vocab, device=device)
    masks = build_bitmask([(m, []) for m in matchers], vocab, device)
    for _ in range(10):
        apply_bitmask(logits, masks)
    sync()
    start = time.perf_counter()
    for _ in range(50):
        build_bitmask([(m, []) for m in matchers], vocab, device)
    fill_ms = (time.perf_counter() - start) / 50 * 1000
    host = masks[0].cpu().pin_memory() if on_cuda else masks[0].clone()
    sync()
    start = time.perf_counter()
    if on_cuda:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
    for _ in range(200):
        masks[0].copy_(host, non_blocking=True)
        apply_bitmask(logits, masks)
    if on_cuda:
        end.record()
    sync()
    device_ms = begin.elapsed_time(end) / 200 if on_cuda else (time.perf_counter() - start) / 200 * 1000
    return {"mask_host_fill_ms": round(fill_ms, 4), "mask_device_ms": round(device_ms, 4),
            "gpu": torch.cuda.get_device_name() if on_cuda else None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sched = sub.add_parser("sched", help="scheduler step + input preparation, CPU, no model")
    sched.add_argument("--num-requests", type=int, default=256)
    sched.add_argument("--prompt-len", type=int, default=512)
    sched.add_argument("--steps", type=int, default=500)
    sched.add_argument("--warmup", type=int, default=50)
    kv = sub.add_parser("kv", help="cache bytes per token of each group at real shapes (meta device, CPU)")
    kv.add_argument("--model", required=True, help="a directory with config.json (tools/configs/...)")
    kv.add_argument("--arch", default=None)
    kv.add_argument("--dtype", default="bfloat16")
    kv.add_argument("--block-size", type=int, default=256)
    kv.add_argument("--tokens", type=int, default=1 << 20)
    kv.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16", "fp8", "fp8_e4m3"])
    kv.add_argument("--kv-cache-dtype-skip-layers", default="", choices=["", "sliding_window"])
    latency = sub.add_parser("latency", help="batch-1 decode vs transformers and the roofline (GPU)")
    _gpu_args(latency)
    latency.add_argument("--prompt-len", type=int, default=128)
    latency.add_argument("--output-len", type=int, default=256)
    throughput = sub.add_parser("throughput", help="offline throughput protocol vs transformers (GPU)")
    _gpu_args(throughput)
    throughput.add_argument("--num-requests", type=int, default=256)
    throughput.add_argument("--min-len", type=int, default=100)
    throughput.add_argument("--max-len", type=int, default=1024)
    throughput.add_argument("--hf-requests", type=int, default=32, help="transformers runs this many (one batch)")
    spec = sub.add_parser("spec", help="batch-1 decode with k replayed drafts, all right / all wrong (GPU)")
    _gpu_args(spec)
    spec.add_argument("--prompt-len", type=int, default=128)
    spec.add_argument("--output-len", type=int, default=256)
    spec.add_argument("-k", type=int, default=4)
    spec.add_argument("--method", default="ngram", help="the drafter that runs (its drafts are replaced by the "
                      "replayed ones): ngram, or a package's own, e.g. mtp (then its cost is in the figures)")
    context = sub.add_parser("context", help="decode step time at long contexts per batch size, prefill skipped (GPU)")
    _gpu_args(context)
    context.add_argument("--contexts", type=int, nargs="+", default=[4096, 131072, 1048576])
    context.add_argument("--batch", type=int, nargs="+", default=[1])
    context.add_argument("--steps", type=int, default=50)
    context.add_argument("--zero-caches", action="store_true",
                         help="leave the caches as allocated (zeros) instead of the model's random fill")
    spec.add_argument("--batch", type=int, default=8, help="requests in the mixed ngram rows")
    prof = sub.add_parser("profile", help="steady decode at a fixed batch under torch.profiler (GPU)")
    _gpu_args(prof)
    prof.add_argument("--batch", type=int, default=64)
    prof.add_argument("--prompt-len", type=int, default=256)
    prof.add_argument("--steps", type=int, default=30)
    prof.add_argument("--top", type=int, default=20)
    prof.add_argument("--trace", help="write a chrome trace here")
    sampling = sub.add_parser("sampling", help="the sampler alone, 256 x 152k: greedy, torch, Triton (GPU)")
    sampling.add_argument("--rows", type=int, default=256)
    sampling.add_argument("--vocab", type=int, default=151936)
    sampling.add_argument("--scale", type=float, default=2.5, help="std of the random logits")
    sampling.add_argument("--json", help="append the result as one JSON line to this file")
    cpu = sub.add_parser("cpu", help="the CPU path vs transformers' generate, same process (CPU)")
    cpu.add_argument("--model", default=str(Path(__file__).resolve().parent / "configs" / "qwen3-0.6b"))
    cpu.add_argument("--arch", default=None)
    cpu.add_argument("--dtype", default="float32")
    cpu.add_argument("--context-len", type=int, default=400)
    cpu.add_argument("--output-len", type=int, default=32)
    cpu.add_argument("--num-prompts", type=int, default=8)
    cpu.add_argument("--repeats", type=int, default=2, help="alternating batch-1 runs of each; the best counts")
    cpu.add_argument("--threads", type=int, default=0, help="torch threads for both (0 = the engine's choice, "
                     "runtime.engine.cpu_threads)")
    cpu.add_argument("--json", help="append the result as one JSON line to this file")
    structured = sub.add_parser("structured", help="concurrent grammar-constrained vs free requests (CPU)")
    structured.add_argument("--model", default=None, help="a checkpoint; default: a tiny random --arch model")
    structured.add_argument("--arch", default="qwen3")
    structured.add_argument("--device", default="cpu")
    structured.add_argument("--dtype", default="float32")
    structured.add_argument("--threads", type=int, default=2)
    structured.add_argument("--num-requests", type=int, default=16)
    structured.add_argument("--prompt-len", type=int, default=32)
    structured.add_argument("--output-len", type=int, default=128)
    structured.add_argument("--repeats", type=int, default=2)
    structured.add_argument("--load-format", default="auto", help="dummy: random weights (a config-only --model)")
    structured.add_argument("--tokenizer", default=None, help="a tokenizer for a config-only --model")
    bench_serve.add_arguments(sub.add_parser("serve", help="an OpenAI server under concurrent streaming clients"))
    return parser


def run_gpu_workload(args: argparse.Namespace) -> dict:
    """One GPU workload (latency | spec | throughput | profile) -> its result record."""
    workloads = {"latency": bench_latency, "spec": bench_spec, "throughput": bench_throughput,
                 "profile": bench_profile, "sampling": bench_sampling,
                 "context": bench_context}
    result = workloads[args.command](args)
    result.update(gpu=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"),
                  command="python tools/bench.py " + " ".join(args.argv))
    return result


def main() -> int:
    args = build_parser().parse_args()
    args.argv = sys.argv[1:]
    if args.command == "serve":
        return bench_serve.run(args) or 0
    if args.command == "sched":
        bench_sched(args)
        return 0
    if args.command == "kv":
        bench_kv(args)
        return 0
    if args.command == "cpu":
        result = bench_cpu(args)
        result.update(cpu=_cpu_name(), date=time.strftime("%Y-%m-%d"), command="python tools/bench.py " + " ".join(args.argv))
        print(json.dumps(result))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(result) + "\n")
    if args.command == "structured":
        print(json.dumps(bench_structured(args)))
        return 0
    if not torch.cuda.is_available():
        print(f"error: `bench.py {args.command}` measures a GPU, and this torch ({torch.__version__}) has no CUDA "
              "device; `bench.py sched` and `bench.py serve` run on the CPU", file=sys.stderr)
        return 2
    result = run_gpu_workload(args)
    print(json.dumps(result))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
