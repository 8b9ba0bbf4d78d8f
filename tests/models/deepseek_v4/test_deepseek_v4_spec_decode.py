"""Speculative decoding on DeepSeek V4 is lossless: with the MTP drafter, and with n-gram drafts that get
accepted (so the window, compressed entries, indexer keys and compressor state rewind past rejected drafts),
under small blocks, chunked prefill and preemption. The MTP drafter replayed from CUDA graphs over padded
batches drafts exactly what it drafts eagerly: on the CPU through the runner's padded bookkeeping with eager
stand-ins for the graphs, and (`-m gpu`) with real graphs."""
from __future__ import annotations

import pytest
import torch

from runtime import LLM, SamplingParams
from runtime.runner import DraftGraph
from tools.parity import random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
STRESS = dict(device="cpu", dtype="float32", block_size=8, max_num_batched_tokens=16, num_gpu_blocks=24)


def _prompts() -> list[list[int]]:
    """Random prompts, and periodic ones whose continuations may repeat earlier n-grams."""
    return random_prompts(512, (5, 37, 90), seed=6) + [[20, 21, 22, 23, 24] * 8, [30, 31, 32] * 12]


@pytest.fixture(scope="module")
def plain_outputs(tiny_deepseek_v4):
    llm = LLM(str(tiny_deepseek_v4), **STRESS)
    return [o.outputs[0].token_ids for o in llm.generate(_prompts(), GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("method", ["mtp", "ngram"])
def test_speculative_greedy_outputs_equal_plain_ones(tiny_deepseek_v4, plain_outputs, method):
    llm = LLM(str(tiny_deepseek_v4), speculative_config={"method": method, "num_speculative_tokens": 3}, **STRESS)
    outputs = [o.outputs[0].token_ids for o in llm.generate(_prompts(), GREEDY, use_tqdm=False)]
    assert outputs == plain_outputs
    stats = llm.engine.spec_stats
    assert stats.num_draft_tokens > 0 and llm.engine.scheduler.stats.num_preemptions > 0
    if method == "ngram":
        assert stats.num_accepted_tokens > 0             # the caches really rewound past rejected drafts
    else:                                                # the random MTP layer rarely guesses right
        assert llm.engine.drafter.layers[0].attn.window_layer == len(llm.engine.model.cache_specs())


def test_mtp_lookahead_past_max_model_len(tiny_deepseek_v4):
    """A prompt one short of max_model_len with 2 drafts: the lookahead would need a block past the table's
    width; the table stops at its width (those positions are never written) instead of overflowing."""
    llm = LLM(str(tiny_deepseek_v4), device="cpu", dtype="float32", block_size=16, max_model_len=64,
              speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    prompt = random_prompts(512, (63,), seed=9)
    spec = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    plain = LLM(str(tiny_deepseek_v4), device="cpu", dtype="float32", block_size=16, max_model_len=64).generate(
        prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    assert spec[0].outputs[0].token_ids == plain[0].outputs[0].token_ids


class _EagerReplay:
    """Stands in for a CUDA graph on the CPU: `replay` runs the forward on the step's live inputs."""

    def __init__(self, run):
        self.run = run

    def replay(self) -> None:
        self.run()


def _replay_padded_eagerly(llm: LLM, rows: int, checks: list[bool]) -> list[int]:
    """Give the runner stand-in graphs of `rows` padded rows for query lengths 1 and 1 + k, target and
    drafter, so that every uniform step takes the graph path (padding, fixed buffers, the drafter over every
    padded row). Checks that the padding rows' draft contexts write nothing and have positive lengths; returns
    the number of padding rows each drafting step carried."""
    runner = llm.engine.runner
    llm.engine.pad_drafts = True
    k = runner.num_speculative_tokens
    model, drafter = runner.model, runner.drafter
    width = model.config.hc_mult * model.config.hidden_size
    vocab = model.compute_logits(torch.zeros(1, width)).shape[1]
    live, padding = {}, []
    prepare, draft_inputs, draft_context = runner.prepare_inputs, runner._draft_inputs, runner._draft_context

    def prepare_inputs(*args, **kwargs):
        live["step"] = prepare(*args, **kwargs)
        return live["step"]

    def recorded_draft_inputs(step, *args):
        live["inputs"], live["requests"] = draft_inputs(step, *args), len(step.sampling)
        padding.append(len(live["inputs"].last_rows) - live["requests"])
        return live["inputs"]

    def checked_draft_context(ctx, sampling_rows, positions, last_writable):
        out = draft_context(ctx, sampling_rows, positions, last_writable)
        real = live["requests"]
        checks.extend(bool((slots[real:] == -1).all()) for slots in out.slot_mappings)
        checks.append(bool((out.seq_lens >= 1).all()) and bool((out.num_computed >= 0).all()))
        return out

    runner.prepare_inputs, runner._draft_inputs = prepare_inputs, recorded_draft_inputs
    runner._draft_context = checked_draft_context
    for query_len in (1, 1 + k):
        hidden = torch.zeros(rows * query_len, width)
        logits = torch.zeros(rows * query_len, vocab)
        drafts = torch.zeros(rows, k, dtype=torch.long)

        def forward(hidden=hidden, logits=logits):
            input_ids, ctx, _ = live["step"]
            hidden.copy_(model(input_ids, ctx.positions, ctx))
            logits.copy_(model.compute_logits(hidden))

        def propose(drafts=drafts):
            drafts.copy_(drafter.propose(live["inputs"]))

        runner.graphs[(rows, query_len)] = (_EagerReplay(forward), hidden, logits)
        runner.draft_graphs[(rows, query_len)] = DraftGraph(_EagerReplay(propose), drafts)
    return padding


def _run(llm: LLM, prompts, params) -> tuple[list[list[int]], list, int]:
    """Greedy tokens, every step's (request ids, drafts), accepted draft tokens."""
    runner, steps = llm.engine.runner, []
    wait = runner.wait

    def recorded_wait(pending):
        out = wait(pending)
        steps.append((out.request_ids, out.drafts))
        return out
    runner.wait = recorded_wait
    outputs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    return outputs, steps, llm.engine.spec_stats.num_accepted_tokens


def test_mtp_drafts_over_padded_graph_rows_equal_eager_ones(tiny_deepseek_v4):
    """Three requests of different lengths and lifetimes in a 4-row padded batch (1..3 padding rows): the
    drafter runs over the padding rows too, and the real rows' drafts, tokens and acceptances stay eager's."""
    options = dict(STRESS, max_num_seqs=4, speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    prompts = random_prompts(512, (5, 37, 20), seed=11)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (14, 9, 12)]
    eager_llm = LLM(str(tiny_deepseek_v4), **options)
    eager_llm.engine.pad_drafts = True
    eager = _run(eager_llm, prompts, params)
    padded_llm, checks = LLM(str(tiny_deepseek_v4), **options), []
    padding = _replay_padded_eagerly(padded_llm, 4, checks)
    padded = _run(padded_llm, prompts, params)
    assert padded == eager
    assert sum(p > 0 for p in padding) >= 5 and {1, 2, 3} <= set(padding)
    assert checks and all(checks)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1, 2])
def test_mtp_drafter_graphs_match_eager_drafts_on_gpu(tiny_deepseek_v4, k):
    """The drafter replayed from CUDA graphs after the target's (3 requests of 9..300 tokens in the 4-row graph,
    one row padding, then 2 and 1 in their own: contexts unlike the capture's) gives eager's tokens, every
    step's drafts and the same acceptances; fp32, so that the comparison is exact rather than subject to bf16
    near ties."""
    from tools.gpu_parity import free_gpu
    prompts = random_prompts(512, (9, 300, 77), seed=5)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (40, 24, 32)]
    results, replays = {}, []
    for eager in (True, False):
        llm = LLM(str(tiny_deepseek_v4), device="cuda", dtype="float32", enforce_eager=eager,
                  skip_tokenizer_init=True, num_gpu_blocks=512, block_size=16, max_num_batched_tokens=256,
                  max_num_seqs=4, speculative_config={"method": "mtp", "num_speculative_tokens": k})
        llm.engine.pad_drafts = True                   # the same step plans with and without graphs
        runner = llm.engine.runner
        assert bool(runner.draft_graphs) is not eager
        propose = runner._propose

        def recorded_propose(step, input_ids, ctx, target_hidden, out, key=None, runner=runner, propose=propose):
            if key in runner.draft_graphs:
                replays.append((key, len(step.sampling)))
            return propose(step, input_ids, ctx, target_hidden, out, key)
        runner._propose = recorded_propose
        results[eager] = _run(llm, prompts, params)
        del runner._propose, runner, llm
        free_gpu()
    assert results[False] == results[True]
    assert len(replays) >= 20
    assert {((4, k + 1), 3), ((2, k + 1), 2), ((1, k + 1), 1)} <= set(replays)
