"""Engine (add / step / abort) and LLM (offline generate)."""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from runtime.config import EngineConfig
from runtime.kv_cache import (CacheLayout, KVCacheManager, cdiv, default_block_size, group_cache_specs,
                              plan_num_blocks)
from runtime.loader import init_dummy_weights, iterate_weights, load_hf_config, resolve_model_path
from runtime.parallel import SINGLE, ParallelContext, WorkerDied, Workers
from runtime.registry import explain_wrong_architecture, get_package, package_for_architectures
from runtime.request import (PLACEHOLDER_TOKEN_ID, CompletionOutput, FinishReason, Request, RequestOutput,
                             SamplingParams)
from runtime.runner import (ModelRunner, PendingStep, StepOutput, allocate_caches, graph_batch_sizes,
                            piecewise_token_buckets)
from runtime.scheduler import Scheduler
from runtime.spec_decode import SpeculativeConfig, ngram_propose
from runtime.structured import GrammarCache
from runtime.tiny import ensure_tiny
from runtime.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger("run-model")


def cpu_threads(world_size: int = 1) -> int:
    """Threads for the CPU path: RUN_MODEL_CPU_THREADS or OMP_NUM_THREADS, else this rank's share of the
    cores this process may run on, less one, which the host side (the engine loop between ops, a server's
    event loop and tokenizer) keeps. A thread pool wider than the free cores stalls at every op's barrier
    waiting for a descheduled thread."""
    for name in ("RUN_MODEL_CPU_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(name, "").isdigit():
            return max(1, int(os.environ[name]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // world_size - 1)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _eos_token_ids(path: Path, hf_config, tokenizer: Tokenizer | None) -> tuple[int, ...]:
    """generation_config.json's eos ids when present (chat models stop on several), else config.json's."""
    ids: Any = None
    generation_config = path / "generation_config.json"
    if generation_config.is_file():
        ids = json.loads(generation_config.read_text()).get("eos_token_id")
    if ids is None:
        ids = getattr(hf_config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return tuple(ids)


@dataclass(slots=True)
class _Group:
    """The n completions of one prompt."""
    request_id: str
    prompt: str | None
    children: list[Request]
    stream: bool
    arrival_time: float = 0.0                     # time.monotonic() when the prompt arrived
    first_token_time: float | None = None


@dataclass(slots=True)
class StepStats:
    """What the last step did, for a server's metrics: tokens, and the latencies (seconds) it completed."""
    num_prompt_tokens: int = 0                    # prompt tokens of the prompts that got their first token
    num_generation_tokens: int = 0
    time_to_first_token: list[float] = field(default_factory=list)   # per prompt, from its arrival
    inter_token_latency: list[float] = field(default_factory=list)   # per sequence, between its tokens
    e2e_latency: list[float] = field(default_factory=list)           # per prompt that finished
    num_drafts: int = 0                           # rows that verified drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)   # accepted drafts by position 0..k-1


class Engine:
    def __init__(self, config: EngineConfig, parallel: ParallelContext | None = None):
        """`parallel` is given on a tensor-parallel worker (rank > 0); rank 0 starts the workers itself."""
        self.config = config
        self.workers: Workers | None = None
        if parallel is None and config.tensor_parallel_size > 1:
            self.workers = Workers(config, config.tensor_parallel_size)
            parallel = self.workers.parallel
        try:
            self._init(config, replace(parallel or SINGLE, enable_expert_parallel=config.enable_expert_parallel))
            if self.workers is not None:
                self.workers.wait_ready()
        except BaseException as exc:
            # a failed collective is explained by the worker that died; our own error speaks for itself
            collective = isinstance(exc, RuntimeError) and not isinstance(exc, WorkerDied)
            dead = self.workers.find_dead(grace_s=1.0) if self.workers is not None and collective else None
            self.shutdown()
            if dead is not None:
                raise WorkerDied(f"{dead}; start-up failed with {type(exc).__name__}: {exc}") from exc
            raise

    def _init(self, config: EngineConfig, parallel: ParallelContext) -> None:
        self.parallel = parallel
        if config.model == "tiny":
            if config.arch is None:
                raise ValueError("--model tiny needs an architecture, e.g. `run-model ARCH --model tiny`")
            path = ensure_tiny(get_package(config.arch))
        else:
            path = resolve_model_path(config.model)
        self.model_path = path
        self.hf_config = load_hf_config(path)
        text_config = self.hf_config.get_text_config()       # the decoder; multimodal configs nest it
        self.package = get_package(config.arch) if config.arch else \
            package_for_architectures(getattr(self.hf_config, "architectures", None) or [])
        self.speculative = SpeculativeConfig.parse(config.speculative_config, self.package.drafter_methods)
        self.num_speculative_tokens = self.speculative.num_speculative_tokens if self.speculative else 0
        self.tokenizer = None if config.skip_tokenizer_init else Tokenizer(config.tokenizer or str(path))
        self.eos_token_ids = _eos_token_ids(path, text_config, self.tokenizer)
        self.max_model_len = config.resolve_max_model_len(text_config)
        self.vocab_size = text_config.vocab_size
        self.device, self.dtype = config.torch_device, config.torch_dtype
        if parallel.world_size > 1 and self.speculative is not None and \
                self.speculative.method in self.package.drafter_methods:
            raise ValueError(f"speculative method {self.speculative.method!r} (the model's own drafter) does not "
                             "run with tensor parallelism yet; use ngram or --tensor-parallel-size 1")
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(parallel.world_size))

        with explain_wrong_architecture(self.package, self.hf_config, path), _default_dtype(self.dtype), self.device:
            model = self.package.build(self.hf_config, config, parallel)
        model.to(self.device).eval()
        if config.load_format == "dummy":
            init_dummy_weights(model, config.seed)
        else:   # with several ranks, lazy slices: each rank reads only its shards of the files
            model.load_weights(iterate_weights(path, "cpu", lazy=parallel.world_size > 1))
        self.model = model
        self.drafter = self._build_drafter(path) if self.speculative is not None and \
            self.speculative.method in self.package.drafter_methods else None

        specs = model.cache_specs() + (self.drafter.cache_specs() if self.drafter is not None else [])
        if config.block_size is None:
            config = self.config = replace(config, block_size=default_block_size(specs))
        layout = group_cache_specs(specs, config.block_size)
        if config.kv_cache_dtype != "auto" and all(g.spec.dtype != config.kv_dtype() for g in layout.groups):
            logger.warning("--kv-cache-dtype %s: the %s package keeps its own cache dtypes (%s)", config.kv_cache_dtype,
                           self.package.name, ", ".join(sorted({str(g.spec.dtype)[6:] for g in layout.groups})))
        num_blocks = plan_num_blocks(layout.groups, config.block_size, self._kv_budget_bytes(layout),
                                     config.max_num_seqs, config.max_num_batched_tokens, forced=config.num_gpu_blocks)
        num_blocks = parallel.all_reduce_min(num_blocks)         # every rank keeps the same block tables
        self.kv = KVCacheManager(layout, config.block_size, num_blocks, config.max_num_seqs, self.max_model_len,
                                 config.enable_prefix_caching)
        self.kv.hash_lookahead = 1 if self.drafter is not None else 0
        caches = allocate_caches(layout, num_blocks, config.block_size, self.device)
        self.runner = ModelRunner(model, self.kv, caches, self.vocab_size, self.device,
                                  config.max_num_batched_tokens, use_cuda_graphs=not config.enforce_eager,
                                  num_speculative_tokens=self.num_speculative_tokens, drafter=self.drafter,
                                  piecewise_cuda_graphs=config.piecewise_cuda_graphs)
        if self.workers is not None:
            self.runner.liveness = self.workers.check_alive
        gate = self.package.reasoning_gate
        self.grammars = self.runner.grammars = GrammarCache(
            self.tokenizer.hf, self.vocab_size, list(self.eos_token_ids),
            (lambda prompt_ids: gate(self.tokenizer, prompt_ids)) if gate is not None else None,
        ) if self.tokenizer is not None else None
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   num_lookahead_tokens=self.runner.num_lookahead_tokens)
        self.groups: dict[str, _Group] = {}
        self.detokenizers: dict[Request, IncrementalDetokenizer] = {}
        self._group_of: dict[Request, _Group] = {}
        self._seeds = random.Random(config.seed)
        self._arrivals = itertools.count()
        self._last_token_time: dict[Request, float] = {}
        self._in_flight: PendingStep | None = None     # launched, tokens not yet read (async scheduling)
        self.last_step_stats = StepStats()
        self.pad_drafts = bool(self.runner.graphs)     # uniform spec steps replay graphs (_propose_drafts)
        self.spec_stats = StepStats()                  # speculative decoding totals (the draft fields)
        logger.info("model %s (%s) on %s/%s; %s", path, self.package.name, self.device, str(self.dtype)[6:],
                    self.cache_report())

    def _build_drafter(self, path: Path):
        """The package's drafter, on the engine's device and dtype, with its weights: from the draft model's
        checkpoint, or the names it claims in the target's."""
        spec = self.speculative
        with _default_dtype(self.dtype), self.device:
            drafter = self.package.build_drafter(self.model, self.hf_config, self.config, spec)
        drafter.to(self.device).eval()
        if self.config.load_format == "dummy":
            init_dummy_weights(drafter, self.config.seed + 1)
        else:
            drafter.load_weights(iterate_weights(resolve_model_path(spec.model) if spec.model else path, "cpu",
                                                 drafter.weight_prefixes))
        return drafter

    def _kv_budget_bytes(self, layout: CacheLayout) -> int:
        """What the caches may take: on the GPU, the memory utilization target less what the weights hold
        and what a step at the full token budget measurably peaks at (and the CUDA-graph pool)."""
        if self.device.type != "cuda":
            return int(self.config.cpu_kv_cache_gib * 2**30)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        peak, graph_pool = self._profile_step(layout)
        kept_free = (1.0 - self.config.gpu_memory_utilization) * total
        budget = int(free - kept_free - peak - graph_pool)
        gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
        self.memory_report = (f"free {gib(free)} of {gib(total)}, kept free {gib(kept_free)}, step peak "
                              f"{gib(peak)}, graph pool {gib(graph_pool)}: KV budget {gib(budget)}")
        if budget <= 0:
            raise ValueError(f"no memory left for the KV cache ({self.memory_report}); raise "
                             f"--gpu-memory-utilization or lower --max-num-batched-tokens / --max-num-seqs")
        return budget

    @torch.inference_mode()
    def _profile_step(self, layout: CacheLayout) -> tuple[int, int]:
        """(peak bytes of a dummy step at max_num_batched_tokens, with a logits row for up to max_num_seqs
        requests; bytes the graph pool of the largest captured batch takes). Runs on throwaway caches just
        big enough for the step, which are freed again."""
        config = self.config
        num_tokens = config.max_num_batched_tokens
        num_reqs = max(1, min(config.max_num_seqs, num_tokens // 2))
        prompt_len = min(num_tokens // num_reqs, self.max_model_len - 1)
        blocks = [num_reqs * (cdiv(prompt_len + 1 + self.num_speculative_tokens, config.block_size) + 1) + 1
                  for _ in layout.groups]
        base = torch.cuda.memory_allocated(self.device)
        kv = KVCacheManager(layout, config.block_size, blocks, config.max_num_seqs, self.max_model_len, False)
        caches = allocate_caches(layout, blocks, config.block_size, self.device)
        cache_bytes = torch.cuda.memory_allocated(self.device) - base
        runner = ModelRunner(self.model, kv, caches, self.vocab_size, self.device, num_tokens,
                             num_speculative_tokens=self.num_speculative_tokens, drafter=self.drafter)
        scheduler = Scheduler(kv, config.max_num_seqs, num_tokens, runner.num_lookahead_tokens)
        for i in range(num_reqs):
            scheduler.add(Request(f"profile-{i}", [i % self.vocab_size] * prompt_len, SamplingParams(max_tokens=1)))
        torch.cuda.reset_peak_memory_stats(self.device)
        runner.wait(runner.launch(scheduler.schedule()))
        peak = torch.cuda.max_memory_allocated(self.device) - base - cache_bytes
        graph_pool = 0
        if not config.enforce_eager:
            free_before = torch.cuda.mem_get_info(self.device)[0]
            query_lens = [1] + ([1 + self.num_speculative_tokens] if self.num_speculative_tokens else [])
            runner.capture_graphs([max(graph_batch_sizes(config.max_num_seqs))], query_lens)
            if config.piecewise_cuda_graphs:
                runner.capture_piecewise([max(piecewise_token_buckets(runner.max_tokens))])
            graph_pool = free_before - torch.cuda.mem_get_info(self.device)[0]
        del runner, caches, kv
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        return max(0, peak), max(0, graph_pool)

    def cache_report(self) -> str:
        parts = []
        for g, (group, pool) in enumerate(zip(self.kv.groups, self.kv.pools)):
            spec = group.spec
            kind = f"window {spec.window}" if spec.window else "full"
            if spec.tokens_per_entry > 1:
                kind += f", 1 entry per {spec.tokens_per_entry} tokens"
            per_token = len(group.layers) * spec.entry_bytes / spec.tokens_per_entry
            parts.append(f"group {g} ({len(group.layers)} layers, {kind}, {str(spec.dtype)[6:]}): "
                         f"{pool.num_blocks - 1} blocks = {(pool.num_blocks - 1) * self.config.block_size} tokens, "
                         f"{per_token:g} B/token")
        memory = f" ({self.memory_report})" if getattr(self, "memory_report", None) else ""
        return "KV cache " + "; ".join(parts) + memory

    # ---- requests -------------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    stream: bool = False, arrival_time: float | None = None) -> None:
        """Validate and queue a prompt. Raises ValueError (and changes nothing) if it can never be served.
        `arrival_time` (time.monotonic()) is when a server received it, the start of its latency metrics."""
        params = params or SamplingParams()
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_text = prompt if isinstance(prompt, str) else None
        if isinstance(prompt, str) and self.tokenizer is None:
            raise ValueError("this engine runs without a tokenizer (skip_tokenizer_init); send token ids")
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        self._check_params_fit_vocab(params)
        if params.structured_outputs is not None:
            if self.grammars is None:
                raise ValueError("structured outputs need a tokenizer; this engine runs without one")
            self.grammars.compile(params.structured_outputs)        # raises on an invalid schema or regex
        room = self.max_model_len - len(token_ids)
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if max_tokens > room or room <= 0:
            raise ValueError(f"the prompt has {len(token_ids)} tokens and max_tokens is {max_tokens}, "
                             f"but max_model_len is {self.max_model_len}; shorten the prompt or lower max_tokens "
                             f"(at most {max(room, 0)} here)")
        if problem := self.kv.check_fits(len(token_ids) + max_tokens, self.config.max_num_batched_tokens):
            raise ValueError(f"{problem}; lower max_tokens or give the cache more memory")
        if params.max_tokens is None:
            params = replace(params, max_tokens=max_tokens)
        children = []
        for i in range(params.n):
            seed = params.seed + i if params.seed is not None else self._seeds.getrandbits(63)
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            request = Request(child_id, token_ids, params, eos_token_ids=self.eos_token_ids, seed=seed,
                              arrival_index=next(self._arrivals))
            if self.tokenizer is not None and (stream or params.stop):
                self.detokenizers[request] = IncrementalDetokenizer(self.tokenizer, token_ids,
                                                                    params.skip_special_tokens)
            children.append(request)
        group = self.groups[request_id] = _Group(request_id, prompt_text, children, stream,
                                                 arrival_time if arrival_time is not None else time.monotonic())
        for request in children:
            self._group_of[request] = group
            self.scheduler.add(request)

    def _check_params_fit_vocab(self, params: SamplingParams) -> None:
        """Parameters that name tokens must name this model's tokens (else a step would fail)."""
        bad = [t for t in params.stop_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids {bad} are outside the vocabulary [0, {self.vocab_size})")
        if params.logprobs is not None and params.logprobs > self.vocab_size:
            raise ValueError(f"logprobs is {params.logprobs} but the vocabulary has {self.vocab_size} tokens")
        if params.prompt_logprobs is not None and params.prompt_logprobs > self.vocab_size:
            raise ValueError(f"prompt_logprobs is {params.prompt_logprobs} but the vocabulary has "
                             f"{self.vocab_size} tokens")

    def abort(self, request_id: str) -> None:
        group = self.groups.pop(request_id, None)
        if group is None:
            return
        for request in group.children:
            if not request.finished:
                self.scheduler.finish(request)
                request.finish_reason = FinishReason.ABORT
            self.detokenizers.pop(request, None)
            self._group_of.pop(request, None)
            self._last_token_time.pop(request, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # ---- the loop -------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Launch the next step plan; return outputs of finished prompts, and of streaming prompts that
        moved. With async scheduling the step launched here is read back by the next call, after it has
        launched its own, so the host work of one step overlaps the device work of the other. Steps that
        verify drafts, and steps whose sampling reads token values on the host (grammars), are read back
        at once: the next plan depends on what they accept."""
        plan = self.scheduler.schedule()
        self.last_step_stats = StepStats()
        launched = self._launch(plan) if plan.request_ids or plan.joining or plan.finished_ids \
            or plan.preempted_ids or any(plan.block_writes) else None
        previous, self._in_flight = self._in_flight, None
        outputs = self._read_back(previous) if previous is not None else []
        if launched is None or not plan.request_ids:
            return outputs
        overlap = self.config.async_scheduling and not launched.reads_host_tokens and not self.speculative
        if overlap:
            # after _read_back: the tokens this plan computed are all real now, and only those get hashed
            self.scheduler.finish_step(plan)
            self._add_placeholders(launched)
            self._in_flight = launched
            return outputs
        out = self._wait(launched)
        rejected = {rid: k + 1 - len(tokens) for rid, k, tokens in zip(out.request_ids, out.num_drafts, out.token_ids)}
        self.scheduler.finish_step(plan, rejected)
        self._add_placeholders(launched)
        outputs += self._consume(out)
        if self.speculative is not None:
            self._propose_drafts(out)
        return outputs

    def _launch(self, plan) -> PendingStep:
        """Launch a plan here, after handing it to every tensor-parallel worker. A dead worker ends the
        engine: its remaining workers are shut down and the error raised."""
        if self.workers is None:
            return self.runner.launch(plan)
        with self._failing_over():
            self.workers.send(plan)
            return self.runner.launch(plan)

    def _wait(self, launched: PendingStep) -> StepOutput:
        if self.workers is None:
            return self.runner.wait(launched)
        with self._failing_over():
            return self.runner.wait(launched)

    @contextlib.contextmanager
    def _failing_over(self) -> Iterator[None]:
        """A collective that fails because a worker died (or a worker found dead) shuts the engine down and
        raises WorkerDied, naming the worker."""
        try:
            yield
        except WorkerDied:
            self.shutdown()
            raise
        except RuntimeError as exc:
            dead = self.workers.find_dead(grace_s=1.0)
            if dead is None:
                raise
            self.shutdown()
            raise WorkerDied(f"{dead}; the step failed with {type(exc).__name__}: {exc}") from exc

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (if any); nothing is left running. Idempotent."""
        if self.workers is not None:
            self.workers.shutdown()

    def _add_placeholders(self, launched: PendingStep) -> None:
        """The tokens just sampled are owed to the next step before the host knows them."""
        for state in launched.states:
            request = self.scheduler.requests.get(state.request_id)
            if request is not None and not request.finished:
                request.token_ids.append(PLACEHOLDER_TOKEN_ID)

    def _read_back(self, launched: PendingStep) -> list[RequestOutput]:
        return self._consume(self._wait(launched))

    def _consume(self, out: StepOutput) -> list[RequestOutput]:
        """Put a step's tokens in place of its placeholders and check stops, token by token (a step that
        verified drafts emits several). A request that finished (or was aborted) after the launch is
        skipped: its tokens are void. Its blocks were freed at once; the device may still write its last KV
        there, but any later reuse of those blocks is queued behind that write on the same stream."""
        now = time.monotonic()
        touched: dict[str, _Group] = {}
        stats = self.last_step_stats
        self._add_prompt_logprobs(out)
        for request_id, tokens, num_drafts, logprobs in zip(out.request_ids, out.token_ids, out.num_drafts,
                                                            out.logprobs):
            request = self.scheduler.requests.get(request_id)
            if request is None or request.finished:
                continue
            if num_drafts:
                self._count_drafts(num_drafts, len(tokens) - 1)
            for i, token in enumerate(tokens):
                if i == 0:
                    request.token_ids[-1] = token
                else:
                    request.token_ids.append(token)
                stats.num_generation_tokens += 1
                if logprobs is not None:
                    request.logprobs.append(logprobs[i])
                self._check_stop(request, token)
                if request.finished:
                    break
            if request.finished:
                self.detokenizers.pop(request, None)
            group = self._group_of[request]
            touched[group.request_id] = group
            self._record_token_time(group, request, now)
        return self._outputs(touched.values(), now)

    def _add_prompt_logprobs(self, out: StepOutput) -> None:
        """Append the prompt logprobs a step computed; after a preemption the prompt is computed again, and
        the positions a request already has are skipped."""
        for request_id, (first, entries) in (out.prompt_logprobs or {}).items():
            request = self.scheduler.requests.get(request_id)
            if request is None or request.finished or request.prompt_logprobs is None:
                continue
            have = len(request.prompt_logprobs)
            if first <= have:
                request.prompt_logprobs.extend(entries[have - first:])

    def _count_drafts(self, num_drafts: int, num_accepted: int) -> None:
        for stats in (self.last_step_stats, self.spec_stats):          # this step's, and the running totals
            stats.num_drafts += 1
            stats.num_draft_tokens += num_drafts
            stats.num_accepted_tokens += num_accepted
            if len(stats.accepted_per_position) < self.num_speculative_tokens:
                stats.accepted_per_position = [0] * self.num_speculative_tokens
            for position in range(num_accepted):
                stats.accepted_per_position[position] += 1

    def _propose_drafts(self, out: StepOutput) -> None:
        """Drafts for the next step (the package drafter's, or ngram's), for every running request whose
        next token is a decode. Penalty requests take drafts (each verification row counts the drafts before
        it), and so do grammar requests (the runner masks each verification row as the grammar stands after
        the drafts before it).

        With CUDA graphs (`pad_drafts`), once any request has drafts the others are padded to their full k
        with their last token repeated, so the step stays uniform (1 + k rows each) and replays a graph
        instead of running eagerly. Padding is lossless: verification treats any draft token like a
        deterministic drafter's, accepting it only where the target would have produced it. The spec metrics
        then count the padding among the drafts: it was verified like them."""
        spec = self.speculative
        model_drafts = dict(zip(out.request_ids, out.drafts or []))
        proposed = []
        for request in self.scheduler.running:
            params = request.params
            room = min(params.max_tokens - request.num_output_tokens, self.max_model_len - request.num_tokens) - 1
            if room < 1 or request.num_tokens - request.num_computed_tokens != 1:
                continue
            k = min(spec.num_speculative_tokens, room)
            if self.drafter is not None:
                request.draft_token_ids = model_drafts.get(request.request_id, [])[:k]
            else:
                request.draft_token_ids = ngram_propose(request.token_ids, k, spec.prompt_lookup_min,
                                                        spec.prompt_lookup_max)
            proposed.append((request, k))
        if self.pad_drafts and any(request.draft_token_ids for request, _ in proposed):
            for request, k in proposed:
                drafts = request.draft_token_ids
                drafts += [drafts[-1] if drafts else request.token_ids[-1]] * (k - len(drafts))

    def _outputs(self, touched: Iterable[_Group], now: float) -> list[RequestOutput]:
        """Outputs of the groups that moved: finished ones (forgotten here), and streaming ones."""
        outputs = []
        for group in touched:
            done = all(r.finished for r in group.children)
            if done or group.stream:
                outputs.append(self._output(group, done))
            if done:
                del self.groups[group.request_id]
                self.last_step_stats.e2e_latency.append(now - group.arrival_time)
                for request in group.children:
                    del self._group_of[request]
                    self._last_token_time.pop(request, None)
        return outputs

    def _record_token_time(self, group: _Group, request: Request, now: float) -> None:
        stats = self.last_step_stats
        last = self._last_token_time.get(request)
        if last is not None:
            stats.inter_token_latency.append(now - last)
        elif group.first_token_time is None:
            group.first_token_time = now
            stats.time_to_first_token.append(now - group.arrival_time)
            stats.num_prompt_tokens += request.num_prompt_tokens
        self._last_token_time[request] = now

    def _check_stop(self, request: Request, token: int) -> None:
        params = request.params
        detokenizer = self.detokenizers.get(request)
        if detokenizer is not None:
            previous = len(request.text)
            request.text += detokenizer.step(request.token_ids)
        reason = stop_reason = None
        may_stop = request.num_output_tokens >= params.min_tokens
        if may_stop and not params.ignore_eos and token in request.eos_token_ids:
            reason = FinishReason.STOP
        elif may_stop and token in params.stop_token_ids:
            reason, stop_reason = FinishReason.STOP, token
        elif may_stop and params.stop and detokenizer is not None:
            stop_reason = self._cut_at_stop_string(request, previous)
            reason = FinishReason.STOP if stop_reason is not None else None
        if reason is None and (request.num_output_tokens >= params.max_tokens
                               or request.num_tokens >= self.max_model_len):
            reason = FinishReason.LENGTH
        if reason is None:
            return
        request.finish_reason, request.stop_reason = reason, stop_reason
        self.scheduler.finish(request)
        if detokenizer is None:
            if self.tokenizer is not None:
                request.text = self.tokenizer.decode(request.output_token_ids, params.skip_special_tokens)
        elif stop_reason is None or isinstance(stop_reason, int):
            request.text += detokenizer.step(request.token_ids, final=True)

    @staticmethod
    def _cut_at_stop_string(request: Request, previous: int) -> str | None:
        """Find a stop string that the newest text completes (it may span several tokens); cut the text there."""
        longest = max(len(s) for s in request.params.stop)
        search_from = max(0, previous - longest + 1)
        hits = [(request.text.find(s, search_from), s) for s in request.params.stop]
        hits = [(at, s) for at, s in hits if at >= 0]
        if not hits:
            return None
        at, stop = min(hits)
        request.text = request.text[:at + len(stop)] if request.params.include_stop_str_in_output else request.text[:at]
        return stop

    def _output(self, group: _Group, finished: bool) -> RequestOutput:
        first = group.children[0]
        outputs = [CompletionOutput(index=i, text=r.text, token_ids=r.output_token_ids,
                                    finish_reason=r.finish_reason.value if r.finish_reason else None,
                                    stop_reason=r.stop_reason,
                                    logprobs=list(r.logprobs) if r.logprobs is not None else None)
                   for i, r in enumerate(group.children)]
        return RequestOutput(group.request_id, group.prompt, first.prompt_token_ids, outputs, finished,
                             num_cached_tokens=first.num_cached_tokens,
                             prompt_logprobs=list(first.prompt_logprobs) if first.prompt_logprobs is not None
                             else None)


class LLM:
    """Offline generation: `LLM(model, **engine_options).generate(prompts, sampling_params)`."""

    def __init__(self, model: str = "tiny", config: EngineConfig | None = None, **engine_options: Any):
        if config is None:
            unknown = set(engine_options) - set(EngineConfig.field_names())
            if unknown:
                raise ValueError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
            config = EngineConfig(model=model, **engine_options)
        self.engine = Engine(config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: str | list[int] | Sequence[str | list[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(str(next(self._ids)))
                self.engine.add_request(ids[-1], prompt, p)
        except ValueError:
            for request_id in ids:
                self.engine.abort(request_id)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, conversations: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | None = None, use_tqdm: bool = True,
             **template_kwargs: Any) -> list[RequestOutput]:
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        options = {"add_generation_prompt": True, **template_kwargs}
        prompts = [self.engine.package.chat_prompt(self.tokenizer, c, options) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        from tqdm import tqdm
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm) as bar:
            while len(results) < len(ids):
                for output in self.engine.step():
                    if output.finished:
                        results[output.request_id] = output
                        bar.update(1)
        return [results[i] for i in ids]
