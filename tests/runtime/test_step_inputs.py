"""The runner's step inputs: staged in one buffer and uploaded with one copy per step; the block-table writes,
the step's table rows and the placeholder tokens are filled on the device by `_prep_on_device`, which every
captured CUDA graph runs first (and the greedy tokens of small batches last). On the CPU, stand-in graphs
that re-run that work over the tensors they closed over at capture (a CUDA graph reads the addresses it
captured) check that a replay finds every input where it was captured: tokens equal an eager run's."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from runtime import LLM, SamplingParams
from runtime.runner import GREEDY_IN_GRAPH_ROWS, InputBuffers
from runtime.sampler import greedy_tokens
from runtime.scheduler import StepPlan
from tools.parity import random_prompts

# block_size 4: a block-table write every 4 tokens; a 16-token budget, 4 rows and 32 blocks: chunked prefill,
# preemption, and prefix hits whose joining step is a uniform decode step carrying a whole prompt's writes
CACHE = dict(device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=16, max_num_seqs=4,
             num_gpu_blocks=32, enable_prefix_caching=True, async_scheduling=True)
PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
    SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=5, max_tokens=18, ignore_eos=True),
    SamplingParams(temperature=0.7, seed=9, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2,
                   max_tokens=16, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=22, ignore_eos=True, logprobs=2),
    SamplingParams(temperature=0.5, seed=3, min_tokens=6, max_tokens=14),
    SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
]


class StandInGraph:
    """Re-runs captured work on replay, over the tensors it closed over when it was built."""

    def __init__(self, work):
        self.work = work
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        self.work()


def install_stand_in_graphs(runner, sizes: list[int]) -> dict[int, StandInGraph]:
    """What `capture_graphs` does for query length 1, with a closure in place of each CUDA graph."""
    graphs = {}
    for size in sizes:
        input_ids, ctx, step = runner.prepare_inputs(StepPlan(), pad_to=size)
        # the CPU reference ops read host lengths: read them from the captured device buffers, as a graph does
        ctx = dataclasses.replace(ctx, query_start_loc_host=ctx.query_start_loc.numpy(),
                                  seq_lens_host=ctx.seq_lens.numpy())
        probe = runner.model(input_ids, ctx.positions, ctx)
        hidden, logits = torch.zeros_like(probe), torch.zeros_like(runner.model.compute_logits(probe))

        def work(input_ids=input_ids, ctx=ctx, step=step, hidden=hidden, logits=logits, size=size):
            runner._prep_on_device(step.num_reqs, step.num_tokens)
            hidden.copy_(runner.model(input_ids, ctx.positions, ctx))
            logits.copy_(runner.model.compute_logits(hidden))
            if size <= GREEDY_IN_GRAPH_ROWS:
                greedy_tokens(logits[:, :runner.vocab_size], out=runner.buffers.sampled[:size])

        graphs[size] = StandInGraph(work)
        runner.graphs[(size, 1)] = (graphs[size], hidden, logits)
        runner.prep_in_graph.add((size, 1))
        if size <= GREEDY_IN_GRAPH_ROWS:
            runner.greedy_in_graph.add((size, 1))
    runner.graphs = dict(sorted(runner.graphs.items()))
    return graphs


def prompts_with_prefix_hits(vocab_size: int) -> list[list[int]]:
    prompts = random_prompts(vocab_size, (3, 17, 41, 9, 30, 12), seed=31)
    prompts.append(list(prompts[2]))         # a prefix hit: its joining step writes the whole prompt's blocks
    return prompts


def generate(path, stand_ins: bool) -> tuple[list, dict]:
    llm = LLM(str(path), **CACHE)
    runner = llm.engine.runner
    seen = dict(graph_steps=0, overflow=0, placeholders=0)
    graphs = install_stand_in_graphs(runner, [1, 2, 4]) if stand_ins else {}
    prepare = runner.prepare_inputs

    def watched_prepare(plan, pad_to=0, query_len=1, pad_tokens_to=0):
        prepared = prepare(plan, pad_to, query_len, pad_tokens_to)
        if pad_to:
            seen["graph_steps"] += 1
            seen["overflow"] += any(prepared[2].overflow)
            seen["placeholders"] += prepared[2].num_placeholders > 0
        return prepared

    runner.prepare_inputs = watched_prepare
    outputs = llm.generate(prompts_with_prefix_hits(llm.engine.vocab_size), PARAMS, use_tqdm=False)
    seen["replays"] = sum(g.replays for g in graphs.values())
    seen["preemptions"] = llm.engine.scheduler.stats.num_preemptions
    return outputs, seen


@pytest.fixture(scope="module")
def runs(tiny_qwen3):
    return {stand_ins: generate(tiny_qwen3, stand_ins) for stand_ins in (False, True)}


def test_replayed_steps_read_their_inputs_where_they_were_captured(runs):
    (eager, _), (graphed, seen) = runs[False], runs[True]
    for ours, expected in zip(graphed, eager):
        assert ours.outputs[0].token_ids == expected.outputs[0].token_ids, ours.request_id
        for entry, expected_entry in zip(ours.outputs[0].logprobs or [], expected.outputs[0].logprobs or []):
            assert list(entry) == list(expected_entry)
            assert list(entry.values()) == pytest.approx(list(expected_entry.values()), abs=1e-5)
    # the replays covered placeholders filled in the graph, in-graph table writes and the writes past them
    assert seen["replays"] == seen["graph_steps"] > 20
    assert seen["placeholders"] > 10 and seen["overflow"] > 0 and seen["preemptions"] > 0


def test_a_step_uploads_its_inputs_in_one_copy(tiny_qwen3, monkeypatch):
    """Decode steps of requests with sampling parameters, penalties and min_tokens: one upload per launch,
    and no tensor built from host values outside the model (each would be a copy of its own on a GPU)."""
    llm = LLM(str(tiny_qwen3), **CACHE)
    engine, runner = llm.engine, llm.engine.runner
    for i, (prompt, params) in enumerate(zip(random_prompts(engine.vocab_size, (5, 7, 6, 4), seed=2), PARAMS[1:5])):
        engine.add_request(str(i), prompt, params)
    counts = dict(uploads=0, tensors=0, launches=0)
    upload, tensor = InputBuffers.upload, torch.tensor
    in_model = [False]

    def counted_upload(self):
        counts["uploads"] += 1
        upload(self)

    def counted_tensor(*args, **kwargs):
        counts["tensors"] += not in_model[0]
        return tensor(*args, **kwargs)

    model, compute_logits = runner.model.forward, runner.model.compute_logits

    def in_model_call(fn):
        def call(*args, **kwargs):
            in_model[0] = True
            try:
                return fn(*args, **kwargs)
            finally:
                in_model[0] = False
        return call

    launch = runner.launch

    def counted_launch(plan):
        decode = not plan.joining and all(n == 1 for n in plan.num_new_tokens)
        counts["launches"] += decode
        before = dict(counts)
        pending = launch(plan)
        if not decode:                                 # prefill, joins: not counted
            counts.update(before, launches=counts["launches"])
        return pending

    monkeypatch.setattr(InputBuffers, "upload", counted_upload)
    monkeypatch.setattr(torch, "tensor", counted_tensor)
    monkeypatch.setattr(runner.model, "forward", in_model_call(model))
    monkeypatch.setattr(runner.model, "compute_logits", in_model_call(compute_logits))
    runner.launch = counted_launch
    while engine.has_unfinished():
        engine.step()
    assert counts["launches"] > 20
    assert counts["uploads"] == counts["launches"] and counts["tensors"] == 0
