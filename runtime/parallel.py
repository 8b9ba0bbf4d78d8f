"""Tensor and expert parallelism: the ParallelContext a package shards its layers with, the collectives and
sharded layers it uses, and the worker processes.

With `tensor_parallel_size` N, the engine is rank 0 and starts N-1 workers (spawn), one per device. Every
rank builds the same engine (model shard, caches, runner) and runs the runner on the same step plans: the
engine sends each plan, pickled once, down one pipe per worker before it launches the step itself. The
model's collectives run over torch.distributed (NCCL on CUDA, gloo on the CPU). Sampling is replicated: the
logits are all-gathered, so every rank holds the same bytes, and the sampler's noise is a hash of (request
seed, position, token), so every rank samples the same tokens and keeps the same request state without
another message.

Failure handling: a worker whose pipe or process is gone makes the engine raise at its next step (and while
it waits for a step on the GPU, where a collective with a dead peer would otherwise spin forever); a worker
whose engine is gone (pipe closed, parent process gone) exits. Shutdown asks the workers to leave, then
kills whatever has not after a few seconds."""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time
import weakref
from dataclasses import dataclass, replace
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from runtime.ops.linear import Linear, linear

logger = logging.getLogger("run-model")

COLLECTIVE_TIMEOUT = timedelta(minutes=10)     # a first step may compile kernels for minutes on one rank
SHUTDOWN_GRACE_S = 5.0                          # how long workers get to leave before they are killed


@dataclass(slots=True)
class ParallelContext:
    """Which shard of the model this process holds. The default is the single-process model."""
    rank: int = 0
    world_size: int = 1
    enable_expert_parallel: bool = False
    group: Any = None                       # the torch.distributed process group of the model's collectives

    # ---- sharding -------------------------------------------------------------------------------------

    def split(self, size: int, what: str) -> int:
        """This rank's share of `size` equal parts (heads, rows, experts); raises if they do not divide."""
        if size % self.world_size:
            raise ValueError(f"{what} ({size}) is not divisible by tensor_parallel_size {self.world_size}; "
                             f"pick a tensor parallel size that divides it")
        return size // self.world_size

    def shard_range(self, size: int, what: str) -> tuple[int, int]:
        """[start, end) of this rank's share of `size` equal parts."""
        local = self.split(size, what)
        return self.rank * local, (self.rank + 1) * local

    def kv_heads(self, num_kv_heads: int, num_heads: int) -> tuple[int, int]:
        """(first KV head, KV heads) this rank keeps: an equal share, or, with fewer KV heads than ranks, the
        one head its query heads read (replicated on the ranks that share it)."""
        self.split(num_heads, "the number of attention heads")
        if num_kv_heads >= self.world_size:
            local = self.split(num_kv_heads, "the number of key/value heads")
            return self.rank * local, local
        if self.world_size % num_kv_heads:
            raise ValueError(f"{num_kv_heads} key/value heads cannot be replicated evenly over "
                             f"tensor_parallel_size {self.world_size}")
        return self.rank * num_kv_heads // self.world_size, 1

    # ---- collectives (no-ops on one rank) -------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns x."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's x along `dim`, in rank order."""
        if self.world_size == 1:
            return x
        gathered = torch.empty((self.world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_single(gathered, x.contiguous(), group=self.group)               # [ranks * rows, ...]
        if dim % x.dim() == 0:
            return gathered
        return torch.cat(gathered.chunk(self.world_size), dim=dim)

    def reduce_scatter(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Sum over ranks and keep this rank's equal share along `dim`."""
        if self.world_size == 1:
            return x
        chunks = x.movedim(dim, 0).contiguous()
        out = torch.empty((chunks.shape[0] // self.world_size, *chunks.shape[1:]), dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, chunks, group=self.group)
        return out.movedim(0, dim)

    def all_reduce_min(self, values: list[int]) -> list[int]:
        """Element-wise minimum of a list of ints over ranks (e.g. cache blocks every rank can hold)."""
        if self.world_size == 1:
            return values
        device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        tensor = torch.tensor(values, dtype=torch.int64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.group)
        return tensor.tolist()


SINGLE = ParallelContext()
# torch renamed it (the old name warns from 2.13 on)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def load_shard(tensor: Any, dim: int, start: int, length: int) -> torch.Tensor:
    """tensor[..., start:start + length, ...] along `dim`, zero-padded past the end (a vocabulary that does
    not divide evenly). Takes a tensor or a lazy checkpoint slice (safetensors `get_slice`), so that only
    the shard is read from disk."""
    shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tuple(tensor.get_shape())
    dim = dim % len(shape)
    end = min(start + length, shape[dim])
    index = tuple([slice(None)] * dim + [slice(start, end)])
    part = tensor[index]
    if end - start < length:
        pad_shape = list(part.shape)
        pad_shape[dim] = length - (end - start)
        part = torch.cat([part, torch.zeros(pad_shape, dtype=part.dtype)], dim=dim)
    return part


def materialize(tensor: Any) -> torch.Tensor:
    """The whole tensor, from a tensor or a lazy checkpoint slice."""
    return tensor if isinstance(tensor, torch.Tensor) else tensor[:]


# ---- sharded layers -----------------------------------------------------------------------------------


class ColumnParallelLinear(Linear):
    """y[:, shard] = x @ W[shard].T: the output features split over ranks, no communication. Holds
    `out_features / world_size` rows; its input is replicated, its output sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool, parallel: ParallelContext):
        super().__init__(in_features, parallel.split(out_features, "a projection's output size"), bias=bias)


class RowParallelLinear(Linear):
    """y = sum over ranks of x[:, shard] @ W[:, shard].T (+ b once): the input features split over ranks,
    one all-reduce. Its input is sharded, its output replicated."""

    def __init__(self, in_features: int, out_features: int, bias: bool, parallel: ParallelContext):
        super().__init__(parallel.split(in_features, "a projection's input size"), out_features, bias=bias)
        self.parallel = parallel

    def forward(self, x: torch.Tensor, silu_mul_input: bool = False) -> torch.Tensor:
        if self.parallel.world_size == 1:
            return linear(x, self.weight, self.bias, silu_mul_input)
        out = self.parallel.all_reduce(linear(x, self.weight, None, silu_mul_input))
        return out if self.bias is None else out + self.bias


class _VocabShard(nn.Module):
    """Rows [start, start + shard_size) of a [vocab, hidden] table; the vocabulary is padded to a multiple of
    the world size (padded rows are zero)."""

    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelContext):
        super().__init__()
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // parallel.world_size)
        self.start = parallel.rank * self.shard_size
        self.parallel = parallel
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size))

    def load(self, tensor: Any) -> torch.Tensor:
        """This rank's rows of a checkpoint's [vocab, hidden] table."""
        return load_shard(tensor, 0, self.start, self.shard_size)


class VocabParallelEmbedding(_VocabShard):
    """The embedding table split by vocabulary rows: each rank looks up the ids in its range, zeros the
    rest, and an all-reduce adds the shards."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.shard_size)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.parallel.all_reduce(x.masked_fill(outside[:, None], 0.0))


class ParallelLMHead(_VocabShard):
    """The output projection split by vocabulary rows: local logits, all-gathered (every rank then holds the
    whole [rows, vocab] row, bit for bit the same, which replicated sampling relies on)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden_states, self.weight)
        if self.parallel.world_size == 1:
            return logits
        return self.parallel.all_gather(logits, dim=-1)[..., :self.vocab_size]


# ---- processes ----------------------------------------------------------------------------------------


def _device_for(rank: int, device: str) -> str:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return f"cuda:{rank}" if device.startswith("cuda") else device


def _init_process_group(rank: int, world_size: int, store_port: int, device: str) -> ParallelContext:
    store = dist.TCPStore("127.0.0.1", store_port, world_size, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    return _join(rank, world_size, store, device)


def _join(rank: int, world_size: int, store, device: str) -> ParallelContext:
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT,
                            **({"device_id": torch.device(device)} if backend == "nccl" else {}))
    return ParallelContext(rank, world_size, group=dist.group.WORLD)


def _exit_with_parent(parent_pid: int) -> None:
    """A worker outlives its engine by at most a second, even if it is stuck in a collective."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def worker_main(rank: int, world_size: int, config, store_port: int, plans: Connection, parent_pid: int) -> None:
    """A worker: build this rank's engine, then launch every step plan the engine sends, until it sends
    None or goes away. Each step is waited on at once: its tokens are in the request state before the next
    plan arrives, which gives the same inputs as the engine's overlapped schedule."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)        # Ctrl-C is the engine's to handle
    _exit_with_parent(parent_pid)
    from runtime.engine import Engine                   # after spawn: the engine module imports this one
    device = _device_for(rank, config.device)
    plans.send(("joining", None))
    parallel = _init_process_group(rank, world_size, store_port, device)
    try:
        engine = Engine(replace(config, device=device), parallel=parallel)
        plans.send(("ready", None))
        runner = engine.runner
        while True:
            try:
                message = plans.recv_bytes()
            except (EOFError, OSError):
                return
            plan = pickle.loads(message)
            if plan is None:
                return
            runner.wait(runner.launch(plan))
    except BaseException as exc:                         # tell the engine why, then go
        try:
            plans.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class WorkerDied(RuntimeError):
    pass


class Workers:
    """Rank 0's handle on ranks 1..N-1: starts them, sends them step plans, notices when one dies, and
    shuts them down (also at interpreter exit, or when the engine is garbage-collected)."""

    def __init__(self, config, world_size: int):
        self.world_size = world_size
        device = _device_for(0, config.device)
        if device.startswith("cuda") and torch.cuda.device_count() < world_size:
            raise ValueError(f"tensor_parallel_size {world_size} needs {world_size} GPUs; "
                             f"{torch.cuda.device_count()} are visible")
        store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, timeout=COLLECTIVE_TIMEOUT,
                              wait_for_workers=False)
        context = multiprocessing.get_context("spawn")
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.pipes: list[Connection] = []
        for rank in range(1, world_size):
            ours, theirs = context.Pipe()
            process = context.Process(target=worker_main, name=f"run-model-worker-{rank}", daemon=True,
                                      args=(rank, world_size, config, store.port, theirs, os.getpid()))
            process.start()
            theirs.close()
            self.processes.append(process)
            self.pipes.append(ours)
        self._finalizer = weakref.finalize(self, _shutdown, self.processes, self.pipes, device)
        self.device = device
        try:
            self.wait_ready()                  # every worker is up (a crash at import surfaces here, not as a hang)
        except BaseException:
            self._finalizer()
            raise
        self.parallel = _join(0, world_size, store, device)
        self._store = store
        self._closing = threading.Event()
        if device.startswith("cuda"):
            threading.Thread(target=_abort_collectives_when_one_dies, args=(self.processes, self._closing),
                             daemon=True, name="worker-watch").start()

    def wait_ready(self) -> None:
        """Block until every worker has sent its next start-up message ("joining" the process group, then
        "ready" with its engine built), or raise if one died or failed."""
        for rank, pipe in enumerate(self.pipes, start=1):
            self._receive(rank, pipe)

    def _receive(self, rank: int, pipe: Connection) -> None:
        process = self.processes[rank - 1]
        while not pipe.poll(0.1):
            if not process.is_alive():
                raise WorkerDied(f"tensor-parallel worker {rank} died (exit code {process.exitcode})")
        try:
            kind, detail = pipe.recv()
        except (EOFError, OSError):
            raise WorkerDied(f"tensor-parallel worker {rank} died (exit code {process.exitcode})") from None
        if kind == "error":
            raise WorkerDied(f"tensor-parallel worker {rank} failed: {detail}")

    def check_alive(self) -> None:
        """Raise if a worker has exited (or reported an error)."""
        for rank, (process, pipe) in enumerate(zip(self.processes, self.pipes), start=1):
            if not process.is_alive():
                raise WorkerDied(f"tensor-parallel worker {rank} died (exit code {process.exitcode})")
            if pipe.poll():
                self._receive(rank, pipe)

    def find_dead(self, grace_s: float) -> str | None:
        """Which worker has died (with the error it reported, if it did), waiting up to `grace_s` for its exit
        to show; None if all live."""
        deadline = time.monotonic() + grace_s
        while True:
            for rank, (process, pipe) in enumerate(zip(self.processes, self.pipes), start=1):
                if not process.is_alive():
                    reason = f"exit code {process.exitcode}"
                    try:
                        if pipe.poll():
                            kind, detail = pipe.recv()
                            reason = detail if kind == "error" else reason
                    except (EOFError, OSError):
                        pass
                    return f"tensor-parallel worker {rank} died ({reason})"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def send(self, plan) -> None:
        """Hand every worker the plan this rank is about to launch."""
        self.check_alive()
        message = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)
        for rank, pipe in enumerate(self.pipes, start=1):
            try:
                pipe.send_bytes(message)
            except OSError:
                raise WorkerDied(f"tensor-parallel worker {rank} is gone (its pipe closed)") from None

    def shutdown(self) -> None:
        self._closing.set()
        self._finalizer()


def _abort_collectives() -> None:
    try:
        dist.distributed_c10d._abort_process_group()
    except Exception as exc:                             # best effort: the engine is failing already
        logger.warning("could not abort the NCCL communicators: %s", exc)


def _abort_collectives_when_one_dies(processes: list, closing: threading.Event) -> None:
    """On the GPU a collective whose peer died spins forever, and so does any host sync behind it (the
    step's wait polls worker liveness, but a model may sync elsewhere). When a worker exits while the
    engine is not closing, give the engine a moment to notice by itself, then abort the communicators:
    the stuck call returns, and the engine raises WorkerDied."""
    multiprocessing.connection.wait([p.sentinel for p in processes])
    if closing.wait(2.0):
        return
    logger.error("a tensor-parallel worker died; aborting the NCCL communicators")
    _abort_collectives()


def _shutdown(processes: list, pipes: list[Connection], device: str) -> None:
    """Ask every worker to leave, give them a few seconds, kill those still there, and reap them all; then
    leave the process group (also at interpreter exit, where NCCL warns about a group left behind)."""
    stop = pickle.dumps(None)
    for pipe in pipes:
        try:
            pipe.send_bytes(stop)
        except OSError:
            pass
    deadline = time.monotonic() + SHUTDOWN_GRACE_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join(1.0)
    for pipe in pipes:
        pipe.close()
    if not dist.is_initialized():
        return
    if device.startswith("cuda") and any(p.exitcode != 0 for p in processes):
        _abort_collectives()              # a collective with a dead peer never ends: tearing it down would wait
    else:
        dist.destroy_process_group()
