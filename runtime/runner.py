"""ModelRunner: owns the model, its cache tensors and every request's state; turns a StepPlan into input
tensors, runs the forward, samples (or verifies drafts) and runs the package's drafter.

Inputs (and the sampling parameters) are built with numpy in one host staging buffer (pinned on CUDA) and copied
once per step, non-blocking, into one device buffer whose views the step reads (see InputBuffers). Block tables
live on the device and change by the plan's staged writes; a captured graph applies them, gathers the step's
table rows and fills placeholder tokens itself, so that a replayed step issues one upload, the replay and one
download of its tokens (graphs of a few rows also end with the greedy argmax). Uniform batches on CUDA (every
request 1 token, or 1 + k when verifying k drafts) replay a CUDA graph captured for the next larger batch size;
the rows past the real batch are padding that writes nothing. With piecewise graphs on, every other batch up to
the token budget (prefill chunks, mixed steps) replays graphs captured per token-count bucket for everything but
attention, which runs eagerly between the pieces on the live step's metadata (see `capture_piecewise`). A drafter
that is `capturable` (runtime.spec_decode.Drafter) replays a graph of its own after each uniform batch's, over
the same padded rows (see `_capture_drafter`).

A step is launched without waiting for it (`launch`), and waited on later (`wait`), so that the host can
prepare the next step while the device runs this one. Tokens the host has not read yet appear in the next
batch as placeholders, filled on the device from the previous launch's sampled tokens. Host buffers come in
two slots, used by alternate steps: a step's buffers are written again only after it was waited on."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from runtime.forward import ForwardContext
from runtime.kv_cache import CacheLayout, KVCacheManager, cdiv
from runtime.request import PLACEHOLDER_TOKEN_ID, Logprob, SamplingParams
from runtime.sampler import SamplingBatch, SamplerOutput, TokenCounts, greedy_tokens, sample
from runtime.scheduler import StepPlan
from runtime.spec_decode import DraftInputs
from runtime.structured import GrammarCache, Matcher, build_bitmask


@dataclass(slots=True, eq=False)
class RequestState:
    """What the runner keeps of one request, from the step plan that joined it until the one that drops it:
    its token history (the last entry may be a placeholder while the step that samples it is in flight),
    its row in the block tables and its sampling state."""
    request_id: str
    row: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    seed: int
    eos_token_ids: tuple[int, ...]
    matcher: Matcher | None = None         # structured outputs: the grammar state after the known tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass(slots=True)
class StepOutput:
    request_ids: list[str]                  # the rows that sampled, in order
    token_ids: list[list[int]]              # per row: accepted drafts, then the target's own next token
    num_drafts: list[int]                   # per row: drafts it verified
    logprobs: list[list[dict[int, float]] | None]   # per row: one entry per emitted token, or None
    drafts: list[list[int]] | None = None   # per row: a model drafter's proposals for the next step
    # per request that asked for them: (position of the first prompt token covered, one entry per token)
    prompt_logprobs: dict[str, tuple[int, list[dict[int, Logprob]]]] | None = None


@dataclass(slots=True, eq=False)
class PendingStep:
    """A launched step whose sampled tokens are on their way to the host (a non-blocking copy)."""
    states: list[RequestState]           # the requests that sample, in row order
    num_drafts: list[int]                # per sampling request: drafts verified this step
    token_ids: torch.Tensor | None       # [sample rows] host copy (pinned on CUDA), valid once `ready` fired
    accepted: torch.Tensor | None        # [sample rows] bool host copy: the row's draft was accepted
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None   # host copies: sampled, top, top ids
    ready: torch.cuda.Event | None       # recorded after the copies; None on CPU, where nothing is deferred
    reads_host_tokens: bool              # its requests need host token values to sample again (a grammar
                                         # whose matcher must see the token before the next mask)
    placeholder_at: list[int] | None = None   # per sampling request: index of its placeholder in the history
    drafts: torch.Tensor | None = None   # [sampling requests, k] host copy of a model drafter's proposals
    prompt_logprobs: PromptLogprobRows | None = None
    waited: bool = False

    @property
    def speculative(self) -> bool:
        return any(self.num_drafts)


@dataclass(slots=True)
class PromptLogprobRows:
    """The prompt logprobs a step computed: per request (id, position of the first prompt token covered,
    tokens covered, top n), and host copies of the token's logprob and rank and the top n, row by row."""
    requests: list[tuple[str, int, int, int]]
    host: tuple[torch.Tensor, ...]       # logprob [rows], rank [rows], top logprobs [rows, n], top ids [rows, n]

    def entries(self) -> dict[str, tuple[int, list[dict[int, Logprob]]]]:
        token_lp, rank, top_lp, top_ids, targets = (t.tolist() for t in self.host)
        out, at = {}, 0
        for request_id, first, count, n in self.requests:
            entries = []
            for row in range(at, at + count):
                entry = {targets[row]: Logprob(token_lp[row], rank[row])}
                for r, (token, lp) in enumerate(zip(top_ids[row][:n], top_lp[row][:n]), start=1):
                    entry.setdefault(token, Logprob(lp, r))
                entries.append(entry)
            out[request_id] = (first, entries)
            at += count
        return out


PROMPT_LOGPROB_ROWS = 512            # logits rows computed at once for prompt logprobs (bounds the memory)
# Graphs of up to this many rows (query length 1) end with the greedy tokens of every row, captured: the
# argmax costs less there than its two launches outside the graph; past it, a batch that samples at random
# would pay for a full read of its logits it does not use.
GREEDY_IN_GRAPH_ROWS = 16


def allocate_caches(layout: CacheLayout, num_blocks: list[int], block_size: int,
                    device: torch.device) -> list[torch.Tensor]:
    """One tensor per group [layers_in_group, blocks, entries_per_block, *entry_shape]; per layer a view."""
    group_tensors = []
    for group, blocks in zip(layout.groups, num_blocks):
        spec = group.spec
        shape = (len(group.layers), blocks, block_size // spec.tokens_per_entry, *spec.entry_shape)
        group_tensors.append(torch.zeros(shape, dtype=spec.dtype, device=device))
    return [group_tensors[g][slot] for g, slot in zip(layout.layer_group, layout.layer_slot)]


def piecewise_token_buckets(max_tokens: int) -> list[int]:
    """Token counts piecewise graphs are captured for: powers of two from 16, and the token budget."""
    sizes = [16 << i for i in range(16) if 16 << i < max_tokens]
    return sizes + [max_tokens]


@dataclass(slots=True, eq=False)
class PiecewiseGraph:
    """One token-count bucket: the forward as graphs[0], attention[0], graphs[1], ..., graphs[-1]. Each
    attention entry is (attend, out): attend(live ctx, out rows) fills the fixed buffer the next piece reads."""
    graphs: list[torch.cuda.CUDAGraph]
    attention: list[tuple[Callable, torch.Tensor]]
    hidden: torch.Tensor                     # [bucket, hidden] the last piece's output


@dataclass(slots=True, eq=False)
class DraftGraph:
    """A drafter's propose captured for one target graph: it reads the target graph's hidden output and the
    runner's fixed draft buffers (next_ids, last_rows, sampling_rows, last_writable) of every padded row."""
    graph: torch.cuda.CUDAGraph
    drafts: torch.Tensor                     # [padded rows, k] int64


class _PieceRecorder:
    """Captures a forward as a chain of graphs, ending one at each attention call (ctx.graph_break)."""

    def __init__(self, pool, out_buffers: dict[tuple, torch.Tensor]):
        self.pool = pool
        # (row shape, dtype) -> [largest bucket, *row shape]: layers run one after another, so one buffer per
        # shape serves every layer and bucket. Allocated outside any capture (the largest bucket comes first).
        self.out_buffers = out_buffers
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.attention: list[tuple[Callable, torch.Tensor]] = []

    def begin(self) -> None:
        self.graphs.append(torch.cuda.CUDAGraph())
        self.graphs[-1].capture_begin(pool=self.pool)

    def end(self) -> None:
        self.graphs[-1].capture_end()
        self.pool = self.graphs[-1].pool()

    def graph_break(self, q: torch.Tensor, attend: Callable) -> torch.Tensor:
        self.end()
        key = (tuple(q.shape[1:]), q.dtype)
        if key not in self.out_buffers:
            self.out_buffers[key] = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        out = self.out_buffers[key][:q.shape[0]]
        self.attention.append((attend, out))
        self.begin()
        return out


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 256, 16)) + list(range(256, 1025, 64))
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


_NUMPY = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32}


class InputBuffers:
    """Every input of a step packed into one int64 staging buffer (one per host slot, pinned on CUDA) and
    copied with one non-blocking copy (`upload`) into one device buffer, `flat`, whose views the step reads.

    `flat` starts with the sampled-token region: a step that samples writes its tokens there (in logits row
    order), where the next step's placeholders find them. The staged region follows. A step lays it out with
    `begin`, the fields a CUDA graph reads, at offsets that depend only on the padded token and row counts
    and the in-graph write capacity (a graph replay finds them where it was captured), then `take`s the rest
    (logits rows, drafts, sampling parameters) packed behind them. The host side has NUM_SLOTS copies, one
    per step in flight: a step's upload may still be reading its slot while the next step is prepared in the
    other. The CPU path runs the same code: its `flat` is another host tensor."""

    NUM_SLOTS = 2

    def __init__(self, max_tokens: int, max_reqs: int, num_groups: int, max_blocks: int, device: torch.device,
                 drafter: bool = False, max_drafts: int = 0):
        pin = device.type == "cuda"
        self.on_cuda = pin
        self.num_groups, self.drafter = num_groups, drafter
        tokens, reqs, writes = max_tokens, max_reqs + 1, max_reqs * max_blocks
        # the largest fixed part, then the taken fields: input ids, logits rows, drafts, their segments,
        # overflow block-table writes and about 12 words of sampling parameters per logits row
        capacity = self._fixed_words(tokens, reqs, [2 * reqs] * num_groups) + \
            (16 + 2 * max_drafts) * tokens + 2 * reqs + num_groups * (writes + writes // 2 + 2) + 1024
        self.sampled_rows = max_tokens                       # the sampled-token region at the front of `flat`
        self.flat = torch.zeros(self.sampled_rows + capacity, dtype=torch.int64, device=device)
        self.sampled = self.flat[:self.sampled_rows]
        self.staged_slots = [torch.zeros(capacity, dtype=torch.int64, pin_memory=pin) for _ in range(self.NUM_SLOTS)]
        self.staged_views = [t.numpy() for t in self.staged_slots]
        self.capacity = capacity
        # the graphs' input ids: the staged ids, or for a placeholder the sampled token, gathered from `flat`
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        # the block tables of every request, by row, one extra entry that padded writes land in; the step's
        # rows gathered from them (fixed addresses)
        self.scratch_write = max_reqs * max_blocks
        self.tables_flat = [torch.zeros(max_reqs * max_blocks + 1, dtype=torch.int32, device=device)
                            for _ in range(num_groups)]
        self.tables = [t[:-1].view(max_reqs, max_blocks) for t in self.tables_flat]
        self.step_tables = [torch.zeros(max_reqs, max_blocks, dtype=torch.int32, device=device)
                            for _ in range(num_groups)]
        self._fixed_cache: dict[tuple, tuple[dict, dict, int]] = {}
        self.use_slot(0)

    def _fixed_fields(self, num_tokens: int, num_reqs: int, write_caps: list[int]) -> list[tuple]:
        i32, i64 = torch.int32, torch.int64
        fields = [("gather", num_tokens, i64), ("positions", num_tokens, i64)]
        fields += [(f"slots{g}", num_tokens, i64) for g in range(self.num_groups)]
        fields += [("rows", num_reqs, i64), ("query_start_loc", num_reqs + 1, i32), ("seq_lens", num_reqs, i32),
                   ("num_computed", num_reqs, i32)]
        for g, cap in enumerate(write_caps):
            fields += [(f"write_at{g}", cap, i64), (f"write_block{g}", cap, i32)]
        if self.drafter:
            fields += [("next_ids", num_tokens, i64), ("last_rows", num_reqs, i64), ("sampling_rows", num_reqs, i64),
                       ("last_writable", num_reqs, i64)]
        return fields

    def _fixed_words(self, num_tokens: int, num_reqs: int, write_caps: list[int]) -> int:
        return sum(_words(n, dtype) for _, n, dtype in self._fixed_fields(num_tokens, num_reqs, write_caps))

    def use_slot(self, slot: int) -> None:
        self.slot = slot
        self.staged, self.staged_np = self.staged_slots[slot], self.staged_views[slot]
        self.host: dict[str, np.ndarray] = {}
        self.device = _DeviceViews(self.flat, {})
        self.used = 0

    def begin(self, num_tokens: int, num_reqs: int, write_caps: list[int]) -> None:
        """Lay out the fixed part of a step: the same offsets for the same (tokens, rows, write capacities)."""
        key = (self.slot, num_tokens, num_reqs, tuple(write_caps))
        cached = self._fixed_cache.get(key)
        if cached is None:
            self.host, self.device, self.used = {}, _DeviceViews(self.flat, {}), 0
            for name, n, dtype in self._fixed_fields(num_tokens, num_reqs, write_caps):
                self.take(name, n, dtype)
            if len(self._fixed_cache) > 512:                  # eager shapes vary: keep the cache bounded
                self._fixed_cache.clear()
            cached = self._fixed_cache[key] = (self.host, self.device, self.used)
        host, fixed, self.used = cached
        self.host, self.device = dict(host), _DeviceViews(self.flat, {}, fixed)
        self.device.update(fixed)                             # the fixed part's views made so far

    def take(self, name: str, n: int, dtype: torch.dtype = torch.int64) -> np.ndarray | None:
        """The next `n` staged entries of `dtype` as field `name`: returns the host view (None if the staging
        buffer is full); `device[name]` is its device view, valid after `upload`."""
        at, words = self.used, _words(n, dtype)
        if at + words > self.capacity:
            return None
        self.used = at + words
        host = self.staged_np[at:at + words].view(_NUMPY[dtype])[:n]
        self.host[name] = host
        self.device.specs[name] = (self.sampled_rows + at, words, n, dtype)
        return host

    def flat_index(self, name: str) -> int:
        """Where field `name` starts in `flat`."""
        return self.device.spec(name)[0]

    def stage(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """A device tensor of `values`, staged for the step's upload (a copy of its own if the buffer is full)."""
        name = f"staged{len(self.host)}"                      # one name per field (empty ones included)
        host = self.take(name, len(values), dtype)
        if host is None:
            tensor = torch.tensor(values, dtype=dtype)
            return tensor.pin_memory().to(self.flat.device, non_blocking=True) if self.on_cuda else tensor
        host[:] = values
        return self.device[name]

    def upload(self) -> None:
        """The step's one host -> device copy: everything staged so far."""
        start = self.sampled_rows
        self.flat[start:start + self.used].copy_(self.staged[:self.used], non_blocking=True)


class _DeviceViews(dict):
    """Device views of staged fields by name, each made when first read (a view costs microseconds of host
    time, and most steps read few of the fields they stage); `fixed` holds those of the step's fixed part."""

    def __init__(self, flat: torch.Tensor, specs: dict[str, tuple], fixed: _DeviceViews | None = None):
        super().__init__()
        self.flat, self.specs, self.fixed = flat, specs, fixed

    def spec(self, name: str) -> tuple[int, int, int, torch.dtype]:
        """(start in flat, int64 words, entries, dtype) of a field."""
        return self.specs[name] if name in self.specs else self.fixed.spec(name)

    def __missing__(self, name: str) -> torch.Tensor:
        if name in self.specs:
            start, words, n, dtype = self.specs[name]
            view = self.flat[start:start + words].view(dtype)[:n]
        elif self.fixed is not None:
            view = self.fixed[name]
        else:
            raise KeyError(name)
        self[name] = view
        return view


def _words(n: int, dtype: torch.dtype) -> int:
    """int64 words that n entries of dtype take."""
    return -(-n * dtype.itemsize // 8)


@dataclass(slots=True)
class _HostStep:
    """What `_fill_host` worked out about a step, for the launch."""
    num_reqs: int                        # rows, graph padding included
    num_tokens: int                      # tokens, graph padding included
    num_new: np.ndarray                  # [real rows]
    seq_lens: np.ndarray                 # [real rows]
    sampling: list[RequestState]         # requests that sample, in row order
    num_drafts: list[int]                # per sampling request
    num_logits: int                      # logits rows: 1 + drafts per sampling request
    num_placeholders: int
    num_writes: list[int]                # staged block-table writes per group
    sampling_rows: list[int]             # per sampling request: its row in the plan
    overflow: list[bool]                 # per group: writes staged in a tail, applied outside any graph
    batch: SamplingBatch | None = None   # the sampling rows' parameters (staged with the inputs)
    count_inputs: tuple[torch.Tensor, ...] | None = None   # penalties: (rows, extra rows, extra tokens)


class ModelRunner:
    """Consumes step plans only. Per request it keeps a RequestState and, per cache group, a copy of the
    request's block-table row (host, for slot mappings) and a persistent device table that staged writes
    update in place; each step gathers its rows from it."""

    def __init__(self, model: nn.Module, kv: KVCacheManager, caches: list[torch.Tensor], vocab_size: int,
                 device: torch.device, max_num_batched_tokens: int = 8192, use_cuda_graphs: bool = False,
                 num_speculative_tokens: int = 0, drafter=None, piecewise_cuda_graphs: bool = False):
        self.model = model
        self.caches = caches
        self.vocab_size = vocab_size
        self.device = device
        self.layer_group = kv.layout.layer_group
        self.block_size = kv.block_size
        self.ratios = [g.spec.tokens_per_entry for g in kv.groups]
        self.num_groups = len(kv.groups)
        max_reqs = kv.max_num_seqs
        self.max_reqs = max_reqs
        self.max_blocks = kv.max_blocks_per_seq
        self.max_tokens = max(max_num_batched_tokens, max_reqs)
        self.tables = [np.zeros((max_reqs, self.max_blocks), dtype=np.int32) for _ in range(self.num_groups)]
        self.buffers = InputBuffers(self.max_tokens, max_reqs, self.num_groups, self.max_blocks, device,
                                    drafter=drafter is not None, max_drafts=num_speculative_tokens)
        self.prep_in_graph: set[tuple[int, int]] = set()   # graph keys whose graph runs `_prep_on_device`
        self.greedy_in_graph: set[tuple[int, int]] = set()  # graph keys whose graph writes the rows' argmax
        self.states: dict[str, RequestState] = {}
        self.num_speculative_tokens = num_speculative_tokens
        self.drafter = drafter
        self.grammars: GrammarCache | None = None    # set by the engine: compiles structured outputs' grammars
        self.wants_prompt_logprobs: set[str] = set()  # requests (in `states`) that asked for prompt logprobs
        self.token_counts = TokenCounts(max_reqs, vocab_size, device)     # what penalties read, per row
        self._count_rows: torch.Tensor | None = None   # [logits rows] the step's request rows, with penalties
        # a model drafter writes its own cache k positions past the step's last token: they are allocated
        self.num_lookahead_tokens = num_speculative_tokens if drafter is not None else 0
        # (padded rows, query length per row) -> (graph, hidden, logits)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.draft_graphs: dict[tuple[int, int], DraftGraph] = {}   # same keys, for a capturable drafter
        self.piecewise: dict[int, PiecewiseGraph] = {}             # token bucket -> its pieces
        self.piecewise_out: dict[tuple, torch.Tensor] = {}          # attention outputs the pieces read
        on_cuda = device.type == "cuda"
        # per host slot: where the step's sampled tokens land, the event that says they have, and its step
        self.sampled_host = [torch.zeros(self.max_tokens, dtype=torch.int64, pin_memory=on_cuda)
                             for _ in range(InputBuffers.NUM_SLOTS)]
        self.step_ready = [torch.cuda.Event() if on_cuda else None for _ in range(InputBuffers.NUM_SLOTS)]
        self.slot_step: list[PendingStep | None] = [None] * InputBuffers.NUM_SLOTS
        self.slot = 0
        # each sampling request's row in the last launch's sampled tokens (the front of the input buffer on
        # the device): the source of the next step's placeholders
        self.last_sample_row: dict[str, int] = {}
        # with tensor-parallel workers: raises if one has died; polled while waiting for a step on the GPU,
        # where a collective with a dead peer would never finish
        self.liveness = None
        if use_cuda_graphs and on_cuda:
            query_lens = [1] + ([1 + num_speculative_tokens] if num_speculative_tokens else [])
            self.capture_graphs(graph_batch_sizes(max_reqs), query_lens)
        if use_cuda_graphs and on_cuda and piecewise_cuda_graphs:
            self.capture_piecewise(piecewise_token_buckets(self.max_tokens))

    # ---- the plan's bookkeeping -----------------------------------------------------------------------

    def apply_plan(self, plan: StepPlan) -> list[tuple[np.ndarray, np.ndarray]]:
        """Drop the states of requests that left, add those that join, replay the block-table writes on the
        host copy; returns the writes per group for the device twin: (flat index into the table, block id)."""
        for request_id in (*plan.finished_ids, *plan.preempted_ids):
            self.states.pop(request_id, None)
            self.wants_prompt_logprobs.discard(request_id)
        for joining in plan.joining:
            if PLACEHOLDER_TOKEN_ID in joining.token_ids:
                raise RuntimeError(f"request {joining.request_id} joins with a token the host has not read")
            state = self.states[joining.request_id] = RequestState(
                joining.request_id, joining.row, list(joining.token_ids), joining.num_prompt_tokens,
                joining.params, joining.seed, joining.eos_token_ids)
            if joining.params.has_penalties:
                self.token_counts.reset(joining.row, joining.token_ids, joining.num_prompt_tokens)
            if joining.params.prompt_logprobs is not None:
                self.wants_prompt_logprobs.add(joining.request_id)
            if joining.params.structured_outputs is not None:
                state.matcher = self.grammars.matcher(joining.params.structured_outputs, state.output_token_ids,
                                                      state.token_ids[:state.num_prompt_tokens])
        writes = []
        for g in range(self.num_groups):
            at, blocks = [], []
            for row, start, ids in (plan.block_writes[g] if g < len(plan.block_writes) else ()):
                self.tables[g][row, start:start + len(ids)] = ids
                at.extend(range(row * self.max_blocks + start, row * self.max_blocks + start + len(ids)))
                blocks.extend(ids)
            writes.append((np.array(at, dtype=np.int64), np.array(blocks, dtype=np.int32)))
        return writes

    # ---- inputs ---------------------------------------------------------------------------------------

    def _fill_host(self, plan: StepPlan, writes: list[tuple[np.ndarray, np.ndarray]], pad_to: int, query_len: int,
                   pad_tokens_to: int = 0) -> _HostStep:
        """Stage the step's inputs (see InputBuffers). Rows past the plan (graph padding) read the null block,
        write nothing (slot -1) and see `query_len` keys. A placeholder token's input id is gathered from the
        last launch's sampled tokens. A graph step stages up to 2 block-table writes per row where the graph
        applies them (padded with writes to a scratch entry), and any more in a tail applied before the replay."""
        b = self.buffers
        states = [self.states[rid] for rid in plan.request_ids]
        num_reqs = len(states)
        num_new = np.array(plan.num_new_tokens, dtype=np.int64)                       # [num_reqs]
        computed = np.array(plan.num_computed, dtype=np.int64)
        num_tokens = int(num_new.sum())
        padded_reqs = max(num_reqs, pad_to)
        padded_tokens = max(num_tokens + (padded_reqs - num_reqs) * query_len, pad_tokens_to)
        num_writes = [len(at) for at, _ in writes]
        caps = [2 * padded_reqs] * self.num_groups if pad_to else num_writes
        b.begin(padded_tokens, padded_reqs, caps)
        h = b.host
        query_start_loc = h["query_start_loc"]
        query_start_loc[0] = 0
        np.cumsum(num_new, out=query_start_loc[1:num_reqs + 1])
        token_ids: list[int] = []
        for state, start, n, drafts in zip(states, plan.num_computed, plan.num_new_tokens, plan.draft_token_ids):
            token_ids.extend(state.token_ids[start:start + n - len(drafts)])
            token_ids.extend(drafts)
        input_ids = b.take("input_ids", padded_tokens)
        input_ids[:num_tokens] = token_ids
        input_ids[num_tokens:] = 0
        h["gather"][:] = np.arange(b.flat_index("input_ids"), b.flat_index("input_ids") + padded_tokens)
        num_placeholders = self._list_placeholders(plan, query_start_loc, num_tokens)
        # position of each token = computed[req] + its offset inside the request's chunk
        positions = h["positions"]
        positions[:num_tokens] = np.arange(num_tokens) + np.repeat(computed - query_start_loc[:num_reqs], num_new)
        seq_lens = computed + num_new
        h["seq_lens"][:num_reqs] = seq_lens
        h["num_computed"][:num_reqs] = computed
        rows = np.array([s.row for s in states], dtype=np.int64)
        h["rows"][:num_reqs] = rows
        token_rows = np.repeat(rows, num_new)
        for g, (table, ratio) in enumerate(zip(self.tables, self.ratios)):
            real = positions[:num_tokens]
            blocks = table[token_rows, real // self.block_size].astype(np.int64)
            slots = h[f"slots{g}"]
            slots[:num_tokens] = blocks * (self.block_size // ratio) + (real % self.block_size) // ratio
            if ratio > 1:                             # only the token that closes an entry writes it
                slots[:num_tokens][(real + 1) % ratio != 0] = -1
            slots[num_tokens:] = -1                   # padding of every kind writes nothing
        overflow = self._stage_writes(writes, caps)
        if pad_to > num_reqs:                         # graph padding: `query_len` tokens per padded row
            pad = slice(num_reqs, pad_to)
            pad_tokens = slice(num_tokens, num_tokens + (pad_to - num_reqs) * query_len)
            positions[pad_tokens] = np.tile(np.arange(query_len), pad_to - num_reqs)
            h["seq_lens"][pad] = query_len
            h["num_computed"][pad] = 0
            h["rows"][pad] = 0
            query_start_loc[num_reqs:pad_to + 1] = num_tokens + query_len * np.arange(pad_to - num_reqs + 1)
            positions[pad_tokens.stop:] = 0
        else:                                         # a piecewise bucket: tokens of no request
            positions[num_tokens:] = 0
        # logits rows: each sampling request's last token and its drafts; draft_ids = the token each verifies
        sampling, num_drafts, logits_rows, draft_ids, sampling_rows = [], [], [], [], []
        ends = query_start_loc[1:num_reqs + 1]
        for i, (state, sample, drafts, end) in enumerate(zip(states, plan.samples, plan.draft_token_ids,
                                                             ends.tolist())):
            if not sample:
                continue
            k = len(drafts)
            sampling.append(state)
            sampling_rows.append(i)
            num_drafts.append(k)
            logits_rows.extend(range(end - 1 - k, end))
            draft_ids.extend(drafts)
            draft_ids.append(-1)
        b.take("logits_indices", len(logits_rows))[:] = logits_rows
        b.take("draft_ids", len(draft_ids))[:] = draft_ids
        if self.drafter is not None or any(num_drafts):
            self._stage_segments(num_drafts)
        if self.drafter is not None:
            self._fill_drafter_host(plan, states, query_start_loc, num_tokens, padded_tokens, sampling_rows, pad_to)
        return _HostStep(padded_reqs, padded_tokens, num_new, seq_lens, sampling, num_drafts, len(logits_rows),
                         num_placeholders, num_writes, sampling_rows, overflow)

    def _stage_writes(self, writes: list[tuple[np.ndarray, np.ndarray]], caps: list[int]) -> list[bool]:
        """Stage each group's block-table writes in its fixed region (padded with scratch writes), or, past
        its capacity, in a tail of their own; returns per group whether it has a tail."""
        b, h = self.buffers, self.buffers.host
        overflow = []
        for g, ((at, blocks), cap) in enumerate(zip(writes, caps)):
            at_field, block_field = h[f"write_at{g}"], h[f"write_block{g}"]
            at_field[:], block_field[:] = b.scratch_write, 0
            if len(at) <= cap:
                at_field[:len(at)], block_field[:len(at)] = at, blocks
            else:
                b.take(f"tail_at{g}", len(at))[:] = at
                b.take(f"tail_block{g}", len(at), torch.int32)[:] = blocks
            overflow.append(len(at) > cap)
        return overflow

    def _stage_segments(self, num_drafts: list[int]) -> None:
        """Per sampling request its first logits row (`segment_start`); per logits row its request
        (`segment`) and its offset among the request's rows (`offset_in_segment`)."""
        b = self.buffers
        rows_per_request = np.array(num_drafts, dtype=np.int64) + 1
        segment_start = b.take("segment_start", len(num_drafts))
        segment_start[:1] = 0
        np.cumsum(rows_per_request[:-1], out=segment_start[1:])
        num_logits = int(rows_per_request.sum())
        b.take("segment", num_logits)[:] = np.repeat(np.arange(len(num_drafts)), rows_per_request)
        b.take("offset_in_segment", num_logits)[:] = np.arange(num_logits) - np.repeat(segment_start,
                                                                                        rows_per_request)

    def _fill_drafter_host(self, plan: StepPlan, states: list[RequestState], query_start_loc: np.ndarray,
                           num_tokens: int, padded_tokens: int, sampling_rows: list[int], pad_to: int) -> None:
        """A drafter's inputs known on the host: each row's next token (the following input in the
        request's chunk, or the next prompt token after a chunk that does not sample; -1 where the target's
        own token goes, filled on the device), and the last position each sampling request may write.
        Graph padding rows follow the sampling requests: each drafts from its first token (position 0, next
        token 0) over its own table row, and may write nothing (last writable position -1)."""
        h = self.buffers.host
        next_ids = h["next_ids"]
        if num_tokens:
            next_ids[:num_tokens - 1] = h["input_ids"][1:num_tokens]
        next_ids[num_tokens:] = 0
        for state, start, n, end, sample in zip(states, plan.num_computed, plan.num_new_tokens,
                                                query_start_loc[1:len(states) + 1].tolist(), plan.samples):
            next_ids[end - 1] = -1 if sample else state.token_ids[start + n]
        last_writable = [plan.num_computed[i] + plan.num_new_tokens[i] - 1 + self.num_lookahead_tokens
                         for i in sampling_rows]
        h["last_writable"][:len(last_writable)] = last_writable
        h["sampling_rows"][:len(sampling_rows)] = sampling_rows
        num_reqs = len(states)
        if pad_to > num_reqs:
            padding = slice(len(sampling_rows), len(sampling_rows) + pad_to - num_reqs)
            h["last_rows"][padding] = query_start_loc[num_reqs:pad_to]          # the padding rows' first tokens
            h["sampling_rows"][padding] = np.arange(num_reqs, pad_to)
            h["last_writable"][padding] = -1

    def _list_placeholders(self, plan: StepPlan, query_start_loc: np.ndarray, num_tokens: int) -> int:
        """Point the gather of each placeholder token at its row in the last launch's sampled tokens;
        returns how many there are."""
        h = self.buffers.host
        dst = np.flatnonzero(h["input_ids"][:num_tokens] == PLACEHOLDER_TOKEN_ID)
        if not len(dst):
            return 0
        owners = np.searchsorted(query_start_loc[1:len(plan.request_ids) + 1], dst, side="right")
        try:
            src = [self.last_sample_row[plan.request_ids[i]] for i in owners.tolist()]
        except KeyError as missing:
            raise RuntimeError(f"request {missing.args[0]} has a placeholder token that the last launched step "
                               f"did not sample") from None
        h["gather"][dst] = src                       # the sampled-token region starts `flat`
        return len(dst)

    def prepare_inputs(self, plan: StepPlan, pad_to: int = 0, query_len: int = 1,
                       pad_tokens_to: int = 0) -> tuple[torch.Tensor, ForwardContext, _HostStep]:
        """(input_ids, ctx, host facts) for one step; `pad_to` rows of `query_len` tokens for a graph, or
        `pad_tokens_to` tokens in all (past the rows' own) for a piecewise bucket. Stages every input and
        the sampling parameters, uploads them in one copy, and (unless the step's graph does it) applies the
        block-table writes, gathers the step's table rows and fills in placeholder tokens."""
        writes = self.apply_plan(plan)
        step = self._fill_host(plan, writes, pad_to, query_len, pad_tokens_to)
        step.batch = self._sampling_batch(step) if step.sampling else None      # stages its parameters
        b = self.buffers
        b.upload()
        d = b.device
        for g in range(self.num_groups):
            if step.overflow[g]:
                b.tables_flat[g].index_copy_(0, d[f"tail_at{g}"], d[f"tail_block{g}"])
        num_reqs, num_tokens = step.num_reqs, step.num_tokens
        if (pad_to, query_len) not in self.prep_in_graph:
            self._prep_on_device(num_reqs, num_tokens)
        if step.count_inputs is not None:             # penalties: their counts, once the rows are on the device
            penalties = step.batch.penalties
            step.batch.penalties = (*penalties[:3], *self.token_counts.gather(*step.count_inputs))
        graphed = pad_to > 0
        width = self.max_blocks if graphed or not len(step.seq_lens) else \
            min(self.max_blocks, cdiv(int(step.seq_lens.max()) + self.num_lookahead_tokens, self.block_size))
        ctx = ForwardContext(
            positions=d["positions"],
            query_start_loc=d["query_start_loc"],
            seq_lens=d["seq_lens"],
            num_computed=d["num_computed"],
            logits_indices=d["logits_indices"],
            block_tables=[table[:num_reqs, :width] for table in b.step_tables],
            slot_mappings=[d[f"slots{g}"] for g in range(self.num_groups)],
            caches=self.caches,
            layer_group=self.layer_group,
            block_size=self.block_size,
            max_query_len=int(step.num_new.max()) if len(step.num_new) else query_len,
            # a graph serves every batch it is replayed for: kernels must size for the worst case
            max_seq_len=self.max_blocks * self.block_size if graphed or not len(step.seq_lens)
            else int(step.seq_lens.max()),
            query_start_loc_host=b.host["query_start_loc"],
            seq_lens_host=b.host["seq_lens"],
        )
        return b.input_ids[:num_tokens], ctx, step

    def _prep_on_device(self, num_reqs: int, num_tokens: int) -> None:
        """The device half of a step's inputs, from the uploaded fields: the staged block-table writes land
        in the persistent tables, the step's rows are gathered from them, and the input ids are gathered
        from the staged ids or, for placeholders, the last launch's sampled tokens. A CUDA graph captures
        this (a fixed number of writes, padded with scratch writes), so a replay issues none of it."""
        b = self.buffers
        d = b.device
        rows = d["rows"]
        for g in range(self.num_groups):
            if d[f"write_at{g}"].numel():
                b.tables_flat[g].index_copy_(0, d[f"write_at{g}"], d[f"write_block{g}"])
            torch.index_select(b.tables[g], 0, rows, out=b.step_tables[g][:num_reqs])
        torch.index_select(b.flat, 0, d["gather"], out=b.input_ids[:num_tokens])

    # ---- CUDA graphs ----------------------------------------------------------------------------------

    def _graph_key(self, plan: StepPlan) -> tuple[int, int] | None:
        """Uniform batches replay a graph: every row samples after exactly q tokens (1, or 1 + k drafts)."""
        if not self.graphs or not plan.request_ids or not all(plan.samples):
            return None
        query_len = plan.num_new_tokens[0]
        if any(n != query_len or len(d) != query_len - 1
               for n, d in zip(plan.num_new_tokens, plan.draft_token_ids)):
            return None
        return next(((size, q) for size, q in self.graphs if q == query_len and size >= len(plan)), None)

    @torch.inference_mode()
    def capture_graphs(self, sizes: list[int], query_lens: list[int]) -> None:
        """Capture forward + logits of every row for uniform batches of each size and query length,
        largest first, sharing one memory pool. The hidden states stay in the graph's output buffer: a
        drafter reads them from there."""
        pool = None
        for query_len in query_lens:
            for size in sorted(sizes, reverse=True):
                if size * query_len > self.max_tokens:
                    continue
                input_ids, ctx, step = self.prepare_inputs(StepPlan(), pad_to=size, query_len=query_len)
                greedy = query_len == 1 and size <= GREEDY_IN_GRAPH_ROWS
                for _ in range(2):                                # warm up: compile kernels, settle allocator
                    self._prep_on_device(step.num_reqs, step.num_tokens)
                    logits = self.model.compute_logits(self.model(input_ids, ctx.positions, ctx))
                    if greedy:
                        greedy_tokens(logits[:, :self.vocab_size], out=self.buffers.sampled[:size])
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    # the inputs' device half first: a replay then needs one upload before it, nothing else
                    self._prep_on_device(step.num_reqs, step.num_tokens)
                    hidden = self.model(input_ids, ctx.positions, ctx)
                    logits = self.model.compute_logits(hidden)
                    if greedy:                                    # where the sampler would put them
                        greedy_tokens(logits[:, :self.vocab_size], out=self.buffers.sampled[:size])
                pool = graph.pool()
                self.graphs[(size, query_len)] = (graph, hidden, logits)
                self.prep_in_graph.add((size, query_len))
                if greedy:
                    self.greedy_in_graph.add((size, query_len))
                if getattr(self.drafter, "capturable", False):
                    pool = self._capture_drafter((size, query_len), input_ids, ctx, step, hidden, pool)
        self.graphs = dict(sorted(self.graphs.items()))

    def _capture_drafter(self, key: tuple[int, int], input_ids: torch.Tensor, ctx: ForwardContext,
                         step: _HostStep, hidden: torch.Tensor, pool: tuple | None) -> tuple:
        """Capture the drafter's propose over every padded row of the target graph `key` (all padding at
        capture: nothing is written), reading the target graph's `hidden` and the fixed draft buffers that
        `_draft_inputs` fills before each replay. Returns the memory pool."""
        inputs = self._draft_inputs(step, input_ids, ctx, hidden, None, step.num_reqs)
        for _ in range(2):                                        # warm up: compile kernels, settle allocator
            self.drafter.propose(inputs)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            drafts = self.drafter.propose(inputs)                 # [padded rows, k]
        self.draft_graphs[key] = DraftGraph(graph, drafts)
        return graph.pool()

    def _piecewise_bucket(self, plan: StepPlan) -> int | None:
        if not self.piecewise or not plan.request_ids:
            return None
        return next((n for n in self.piecewise if n >= plan.num_tokens), None)

    @torch.inference_mode()
    def capture_piecewise(self, buckets: list[int]) -> None:
        """Capture the forward of each token bucket (largest first, one memory pool) as pieces between
        attention calls. The model's attention goes through `runtime.ops.paged_attention`, which hands
        itself to `ctx.graph_break` while capturing; everything else in the forward may read only per-token
        inputs (input ids, positions, slot mappings), whose buffers keep their addresses. Attention reads
        the live step's tensors when replayed, so it serves any mix of prefill chunks and decodes."""
        stream = torch.cuda.Stream()
        pool = None
        for bucket in sorted(buckets, reverse=True):
            input_ids, ctx, _ = self.prepare_inputs(StepPlan(), pad_tokens_to=bucket)
            ctx.graph_break = lambda q, attend: torch.zeros_like(q)   # no rows: attention has nothing to do
            for _ in range(2):                                    # warm up: compile kernels, settle allocator
                self.model(input_ids, ctx.positions, ctx)
            torch.cuda.synchronize()
            recorder = _PieceRecorder(pool, self.piecewise_out)
            ctx.graph_break = recorder.graph_break
            with torch.cuda.stream(stream):
                recorder.begin()
                hidden = self.model(input_ids, ctx.positions, ctx)
                recorder.end()
            torch.cuda.synchronize()
            pool = recorder.pool
            if len(recorder.attention) != len(self.caches):
                self.piecewise.clear()
                raise ValueError(f"piecewise CUDA graphs: the forward made {len(recorder.attention)} attention "
                                 f"calls through runtime.ops.paged_attention for {len(self.caches)} cache layers; "
                                 "this model cannot be split at attention (run without --piecewise-cuda-graphs)")
            self.piecewise[bucket] = PiecewiseGraph(recorder.graphs, recorder.attention, hidden)
        self.piecewise = dict(sorted(self.piecewise.items()))

    def _replay_piecewise(self, bucket: int, ctx: ForwardContext, num_tokens: int) -> torch.Tensor:
        """The bucket's pieces with attention in between, over the step's `num_tokens` real tokens."""
        pieces = self.piecewise[bucket]
        for graph, (attend, out) in zip(pieces.graphs, pieces.attention):
            graph.replay()
            attend(ctx, out[:num_tokens])
        pieces.graphs[-1].replay()
        return pieces.hidden[:num_tokens]

    # ---- the step -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> PendingStep:
        """Queue the plan's forward and sampling (verification, where it carries drafts) on the device and
        return without waiting. Every launched step must be `wait`ed on before the launch after next: that
        one reuses its buffers."""
        self._next_slot()
        key = self._graph_key(plan)
        bucket = self._piecewise_bucket(plan) if key is None else None
        size, query_len = key if key is not None else (0, 1)
        input_ids, ctx, step = self.prepare_inputs(plan, pad_to=size, query_len=query_len,
                                                   pad_tokens_to=bucket or 0)
        sampling = step.batch                 # staged with the inputs, before the forward is queued
        prompt_logprobs = None
        if key is not None:
            graph, _, graph_logits = self.graphs[key]
            graph.replay()
            logits = graph_logits[:len(plan) * query_len]            # every row samples: in row order
        else:
            if not plan.request_ids:
                return self._pending(step, None, None, sampling)
            if bucket is not None:
                num_tokens = int(ctx.query_start_loc_host[-1])
                input_ids = input_ids[:num_tokens]
                ctx.positions = ctx.positions[:num_tokens]
                ctx.slot_mappings = [slots[:num_tokens] for slots in ctx.slot_mappings]
                hidden = self._replay_piecewise(bucket, ctx, num_tokens)         # [num_tokens, hidden]
            else:
                hidden = self.model(input_ids, ctx.positions, ctx)                # [num_tokens, hidden]
            prompt_logprobs = self._prompt_logprobs(plan, hidden)
            if not step.sampling:
                if self.drafter is not None:                  # it still keeps its cache of these positions
                    self._propose(step, input_ids, ctx, hidden, None)
                return self._pending(step, None, None, sampling, prompt_logprobs=prompt_logprobs)
            logits = self.model.compute_logits(hidden[ctx.logits_indices])       # [num_logits, vocab]
        # the grammar masks are filled on the host while the device runs the forward queued above
        if sampling is not None:
            sampling.grammar = self._grammar_bitmask(plan, step)
        draft_ids = self.buffers.device["draft_ids"] if any(step.num_drafts) else None
        # the tokens land at the front of the input buffer, where the next step's placeholders read them
        sampled = self.buffers.sampled[:step.num_logits]
        out = sample(logits[:, :self.vocab_size], sampling, draft_ids, out=sampled,
                     greedy=sampled if key in self.greedy_in_graph else None)
        if sampling.penalties is not None:
            emitted = None
            if out.accepted is not None:
                num_accepted, segment, offsets = self._accepted_per_request(step, out)
                emitted = offsets <= num_accepted.index_select(0, segment)
            self.token_counts.add(self._count_rows, out.token_ids, emitted)
        drafts = None
        if self.drafter is not None:
            target_hidden = self.graphs[key][1][:step.num_tokens] if key is not None else hidden
            drafts = self._propose(step, input_ids, ctx, target_hidden, out, key)
        return self._pending(step, out, draft_ids, sampling, drafts, prompt_logprobs)

    def _prompt_logprobs(self, plan: StepPlan, hidden: torch.Tensor) -> PromptLogprobRows | None:
        """Prompt logprobs of the rows this step computed, for the requests that asked for them: the hidden
        state at position p gives the logprob of prompt token p + 1 (a replayed graph never holds such rows:
        every row there is a request's last known token). Chunks of PROMPT_LOGPROB_ROWS rows at a time."""
        if not self.wants_prompt_logprobs:
            return None
        requests, rows, targets = [], [], []
        starts = self.buffers.host["query_start_loc"]
        for i, (request_id, start, n) in enumerate(zip(plan.request_ids, plan.num_computed, plan.num_new_tokens)):
            if request_id not in self.wants_prompt_logprobs:
                continue
            state = self.states[request_id]
            end = min(start + n, state.num_prompt_tokens - 1)    # positions start..end-1 predict a prompt token
            if end <= start:
                continue
            first_row = int(starts[i])
            rows.extend(range(first_row, first_row + end - start))
            targets.extend(state.token_ids[start + 1:end + 1])
            requests.append((request_id, start + 1, end - start, state.params.prompt_logprobs))
        if not requests:
            return None
        top_n = max(n for *_, n in requests)
        as_device = lambda values: torch.tensor(values, dtype=torch.int64).to(self.device)  # noqa: E731
        rows_on_device, targets_on_device = as_device(rows), as_device(targets)
        parts = []
        for at in range(0, len(rows), PROMPT_LOGPROB_ROWS):
            piece = slice(at, at + PROMPT_LOGPROB_ROWS)
            logits = self.model.compute_logits(hidden.index_select(0, rows_on_device[piece]))   # [rows, vocab]
            logprobs = torch.log_softmax(logits[:, :self.vocab_size].float(), dim=-1)          # [rows, vocab]
            token_lp = logprobs.gather(1, targets_on_device[piece, None]).squeeze(1)           # [rows]
            rank = (logprobs > token_lp[:, None]).sum(dim=-1) + 1                              # [rows]
            top_lp, top_ids = torch.topk(logprobs, top_n, dim=-1)                              # [rows, top_n]
            parts.append((token_lp, rank, top_lp, top_ids))
        host = tuple(self._to_host(torch.cat(column)) for column in zip(*parts))
        return PromptLogprobRows(requests, (*host, torch.tensor(targets)))

    def _propose(self, step: _HostStep, input_ids: torch.Tensor, ctx: ForwardContext,
                 target_hidden: torch.Tensor, out: SamplerOutput | None,
                 key: tuple[int, int] | None = None) -> torch.Tensor:
        """Run the package's drafter after verification: [sampling requests, k] draft tokens, on the
        device. After the target graph `key`, the drafter's graph for it replays, if it has one."""
        draft_graph = self.draft_graphs.get(key)
        num_rows = step.num_reqs if draft_graph is not None else len(step.sampling)
        inputs = self._draft_inputs(step, input_ids, ctx, target_hidden, out, num_rows)
        if draft_graph is None:
            return self.drafter.propose(inputs)
        draft_graph.graph.replay()
        return draft_graph.drafts[:len(step.sampling)]

    def _draft_inputs(self, step: _HostStep, input_ids: torch.Tensor, ctx: ForwardContext,
                      target_hidden: torch.Tensor, out: SamplerOutput | None, num_rows: int) -> DraftInputs:
        """The drafter's inputs for `num_rows` rows: the sampling requests, then (for a graph) its padding
        rows. Next tokens, last rows, table rows and last writable positions are views of fixed device
        buffers, uploaded with the step's inputs and completed here outside any graph (a drafter graph reads
        them); at each request's last accepted row the token the target just produced becomes the next token."""
        d = self.buffers.device
        num_sampling = len(step.sampling)
        next_ids = d["next_ids"][:len(input_ids)]
        starts = d["segment_start"]
        if out is not None and out.accepted is not None:
            num_accepted, _, _ = self._accepted_per_request(step, out)
            last_logit_rows = starts + num_accepted
        else:
            last_logit_rows = starts
        # the padding rows' entries come from the host, the requests' from the logits rows
        last_rows = d["last_rows"][:num_rows]
        torch.index_select(ctx.logits_indices, 0, last_logit_rows, out=last_rows[:num_sampling])
        if out is not None:
            next_ids.index_copy_(0, last_rows[:num_sampling], out.token_ids.index_select(0, last_logit_rows))
        sampling_rows = d["sampling_rows"][:num_rows]
        last_writable = d["last_writable"][:num_rows]
        return DraftInputs(target_hidden, next_ids, ctx.positions, ctx, last_rows, self.num_speculative_tokens,
                           lambda positions: self._draft_context(ctx, sampling_rows, positions, last_writable))

    def _accepted_per_request(self, step: _HostStep, out: SamplerOutput) -> tuple[torch.Tensor, ...]:
        """Drafts accepted per sampling request (the first row of its segment that did not accept; bonus
        rows never do), and per logits row its request and its offset in the request's rows."""
        d = self.buffers.device
        num_sampling = len(step.sampling)
        segment, offsets = d["segment"], d["offset_in_segment"]
        stops = torch.where(out.accepted, self.num_speculative_tokens + 1, offsets)
        num_accepted = torch.full((num_sampling,), self.num_speculative_tokens + 1, dtype=torch.int64,
                                  device=self.device).scatter_reduce(0, segment, stops, reduce="amin")
        return num_accepted, segment, offsets

    def _draft_context(self, ctx: ForwardContext, sampling_rows: torch.Tensor, positions: torch.Tensor,
                       last_writable: torch.Tensor) -> ForwardContext:
        """One token per sampling request at `positions`, over the same block tables; a position past what
        the scheduler allocated writes nothing."""
        num_reqs = positions.shape[0]
        tables = [table.index_select(0, sampling_rows) for table in ctx.block_tables]
        slot_mappings = []
        for table, ratio in zip(tables, self.ratios):
            column = positions // self.block_size
            block = table.gather(1, column[:, None].clamp(max=table.shape[1] - 1))[:, 0]
            slots = block.long() * (self.block_size // ratio) + (positions % self.block_size) // ratio
            writes = (positions <= last_writable) & (column < table.shape[1])
            if ratio > 1:
                writes &= (positions + 1) % ratio == 0
            slot_mappings.append(torch.where(writes, slots, -1))
        seq_lens = (positions + 1).to(torch.int32)
        query_start_loc = torch.arange(num_reqs + 1, dtype=torch.int32, device=self.device)
        on_cpu = self.device.type == "cpu"
        return ForwardContext(
            positions=positions, query_start_loc=query_start_loc, seq_lens=seq_lens,
            num_computed=positions.to(torch.int32), logits_indices=query_start_loc[:-1].long(),
            block_tables=tables, slot_mappings=slot_mappings, caches=self.caches, layer_group=self.layer_group,
            block_size=self.block_size, max_query_len=1,
            max_seq_len=tables[0].shape[1] * self.block_size if tables else 1,
            query_start_loc_host=np.arange(num_reqs + 1, dtype=np.int32),
            # the reference ops read host lengths (no cost on the CPU); the kernels read seq_lens
            seq_lens_host=seq_lens.numpy() if on_cpu else np.full(num_reqs, ctx.max_seq_len, dtype=np.int32))

    def _sampling_batch(self, step: _HostStep) -> SamplingBatch:
        """One sampling row per logits row: a request with k drafts samples tokens step, step+1, .., step+k.
        Its parameters are staged with the step's inputs; penalties' counts are gathered after the upload
        (`step.count_inputs`)."""
        rows = [s for s, k in zip(step.sampling, step.num_drafts) for _ in range(k + 1)]
        offsets = [i for k in step.num_drafts for i in range(k + 1)]
        penalties = any(s.params.has_penalties for s in step.sampling)
        if penalties:
            step.count_inputs = self._stage_count_rows(rows, offsets)
            self._count_rows = step.count_inputs[0]
        return SamplingBatch.from_requests(rows, self.vocab_size, self.device,
                                           offsets if any(step.num_drafts) else None, stage=self.buffers.stage,
                                           counts_later=penalties)

    def _stage_count_rows(self, rows: list[RequestState], offsets: list[int]) -> tuple[torch.Tensor, ...]:
        """What the penalties' counts of each logits row are gathered with (from the device copy): its
        request's row, and (extra row, extra token) pairs: a verification row at offset i also counts the i
        drafts before it (they are its output if it is reached)."""
        draft_ids = self.buffers.host["draft_ids"]
        extra_rows, extra_tokens = [], []
        for j, offset in enumerate(offsets):
            extra_rows += [j] * offset
            extra_tokens += draft_ids[j - offset:j].tolist()
        stage = self.buffers.stage
        return (stage([s.row for s in rows], torch.int64), stage(extra_rows, torch.int64),
                stage(extra_tokens, torch.int64))

    def _grammar_bitmask(self, plan: StepPlan, step: _HostStep) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Structured outputs' token masks for the step's logits rows (see structured.build_bitmask)."""
        if all(state.matcher is None for state in step.sampling):
            return None
        drafts = [d for d, sample in zip(plan.draft_token_ids, plan.samples) if sample]
        return build_bitmask([(state.matcher, d) for state, d in zip(step.sampling, drafts)], self.vocab_size,
                             self.device)

    def _next_slot(self) -> None:
        self.slot = (self.slot + 1) % InputBuffers.NUM_SLOTS
        previous = self.slot_step[self.slot]
        if previous is not None and not previous.waited:
            # Only after a failed engine step, which dropped it: let its copies land before its buffers are
            # reused, and make sure nothing reads its tokens from them afterwards.
            if previous.ready is not None:
                previous.ready.synchronize()
            previous.waited = True
            previous.states, previous.token_ids, previous.logprobs = [], None, None
            previous.prompt_logprobs = None
        self.buffers.use_slot(self.slot)

    def _pending(self, step: _HostStep, out: SamplerOutput | None, draft_ids: torch.Tensor | None,
                 sampling: SamplingBatch | None, drafts: torch.Tensor | None = None,
                 prompt_logprobs: PromptLogprobRows | None = None) -> PendingStep:
        """Start the copies of the sampled tokens (and logprobs) to the host, and mark when they land. The
        tokens of a step without drafts are owed to the next step before the host reads them: they enter
        each request's history as placeholders, filled on the device."""
        token_ids = accepted = logprobs = None
        if out is not None:
            token_ids = self._to_host(out.token_ids, self.sampled_host[self.slot][:step.num_logits])
            if out is not None and out.accepted is not None:
                accepted = self._to_host(out.accepted)
            if out.top_logprobs is not None:
                logprobs = tuple(self._to_host(t) for t in (out.sampled_logprobs, out.top_logprobs, out.top_ids))
        ready = self.step_ready[self.slot]
        if ready is not None:
            ready.record()
        speculative = any(step.num_drafts)
        self.last_sample_row = {} if speculative or out is None else \
            {s.request_id: row for row, s in enumerate(step.sampling)}
        placeholder_at = None
        if not speculative:
            placeholder_at = [len(state.token_ids) for state in step.sampling]
            for state in step.sampling:
                state.token_ids.append(PLACEHOLDER_TOKEN_ID)
        pending = PendingStep(step.sampling, step.num_drafts, token_ids, accepted, logprobs, ready,
                              reads_host_tokens=sampling is not None and sampling.grammar is not None,
                              placeholder_at=placeholder_at,
                              drafts=self._to_host(drafts) if drafts is not None else None,
                              prompt_logprobs=prompt_logprobs)
        self.slot_step[self.slot] = pending
        return pending

    def _to_host(self, tensor: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """A non-blocking device -> pinned host copy (on CPU: into `into`, else the tensor itself)."""
        if self.device.type != "cuda":
            return into.copy_(tensor) if into is not None else tensor
        if into is None:
            into = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return into.copy_(tensor, non_blocking=True)

    def wait(self, step: PendingStep) -> StepOutput:
        """Block until the step's tokens are on the host (the one host sync per step) and put them into
        each request's history: in place of its placeholder, or after verification the accepted drafts
        and the target's next token."""
        if step.ready is not None:
            self._synchronize(step.ready)
        step.waited = True
        prompt_logprobs = step.prompt_logprobs.entries() if step.prompt_logprobs is not None else None
        if step.token_ids is None:
            return StepOutput([], [], [], [], prompt_logprobs=prompt_logprobs)
        flat = step.token_ids.tolist()
        accepted = step.accepted.tolist() if step.accepted is not None else None
        per_row: list[list[int]] = []
        first_rows = []                         # each request's first sampling row (drafts expand requests)
        at = 0
        for i, (state, k) in enumerate(zip(step.states, step.num_drafts)):
            if accepted is None:
                tokens = [flat[at]]
                state.token_ids[step.placeholder_at[i]] = tokens[0]
            else:
                num_accepted = next((j for j in range(k) if not accepted[at + j]), k)
                tokens = flat[at:at + num_accepted + 1]
                state.token_ids.extend(tokens)
            if state.matcher is not None:
                for token in tokens:
                    state.matcher.accept(token)
            per_row.append(tokens)
            first_rows.append(at)
            at += k + 1
        logprobs = self._logprobs(step.logprobs, step.states, per_row, first_rows)
        drafts = step.drafts.tolist() if step.drafts is not None else None
        return StepOutput([s.request_id for s in step.states], per_row, list(step.num_drafts), logprobs, drafts,
                          prompt_logprobs)

    def _synchronize(self, event: torch.cuda.Event) -> None:
        if self.liveness is None:
            event.synchronize()
            return
        while not event.query():
            self.liveness()
            time.sleep(20e-6)

    @staticmethod
    def _logprobs(host: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, states: list,
                  token_ids: list[list[int]], first_rows: list[int]) -> list[list[dict[int, float]] | None]:
        """Per request, one {token: logprob} per emitted token (the sampled one, then the top n), or None."""
        logprobs: list[list[dict[int, float]] | None] = [None] * len(token_ids)
        if host is None:
            return logprobs
        sampled_lp, top_lp, top_ids = (t.tolist() for t in host)
        for i, (state, tokens, first) in enumerate(zip(states, token_ids, first_rows)):
            n = state.params.logprobs
            if n is None:
                continue
            entries = []
            for row, token in enumerate(tokens, start=first):
                entry = {token: sampled_lp[row]}
                entry.update({t: lp for t, lp in zip(top_ids[row][:n], top_lp[row][:n]) if t not in entry})
                entries.append(entry)
            logprobs[i] = entries
        return logprobs
