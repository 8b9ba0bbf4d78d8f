"""Async scheduling: the host prepares step N+1 while the device runs step N, with the tokens of step N as
placeholders. On the CPU the same code path runs synchronously, so these tests check its bookkeeping:
overlapped outputs equal synchronous ones token for token, and no placeholder ever reaches the host's view
of token values (block hashes, recomputation after preemption, outputs)."""
from __future__ import annotations

import pytest
import torch

from runtime import LLM, SamplingParams
from runtime.kv_cache import CacheSpec, KVCacheManager, group_cache_specs, hash_block
from runtime.request import PLACEHOLDER_TOKEN_ID, Request
from runtime.scheduler import Scheduler
from tools.parity import random_prompts

# block_size 4, a 16-token budget and 47 blocks (188 tokens) for about 370 tokens of work: chunked prefill,
# mixed steps and preemption all happen.
TIGHT_CACHE = dict(device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=16, num_gpu_blocks=48)
PROMPT_LENGTHS = (3, 17, 40, 64, 9, 30, 21, 12)
ABORTED = "6"
ABORT_AFTER_STEPS = 12


def mixed_params(stop_string: str) -> list[tuple[SamplingParams, bool]]:
    """(params, stream) per prompt: every sampling feature that decides how a step is read back."""
    return [
        (SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), False),
        (SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=20, ignore_eos=True), False),
        (SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop_string]), False),
        (SamplingParams(temperature=0.7, seed=9, presence_penalty=0.5, frequency_penalty=0.3,
                        repetition_penalty=1.2, max_tokens=16, ignore_eos=True), False),
        (SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=12, logprobs=2, ignore_eos=True), False),
        (SamplingParams(temperature=0.5, seed=3, min_tokens=6, max_tokens=14), False),
        (SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True), False),      # aborted mid-way
        (SamplingParams(temperature=0.0, max_tokens=18, ignore_eos=True), True),
    ]


def stop_string_for(llm: LLM, prompt: list[int]) -> str:
    """Three characters from the middle of the prompt's greedy text: a stop string it is sure to meet."""
    text = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                        use_tqdm=False)[0].text
    middle = len(text) // 2
    return text[middle:middle + 3]


class PlaceholderWatch:
    """Wraps the runner's prepare_inputs: counts batches holding placeholders, and checks that a placeholder
    only ever sits at the end of a request that is owed exactly that one token (never in a prefill or a
    recomputation after preemption)."""

    def __init__(self, runner):
        self.batches_with_placeholders = 0
        self.runner = runner
        self._prepare = runner.prepare_inputs
        runner.prepare_inputs = self._prepare_inputs

    def _prepare_inputs(self, plan, *args, **kwargs):
        prepared = self._prepare(plan, *args, **kwargs)
        pending = 0
        for request_id, num_computed in zip(plan.request_ids, plan.num_computed):
            token_ids = self.runner.states[request_id].token_ids       # the runner's own history
            assert PLACEHOLDER_TOKEN_ID not in token_ids[:-1], request_id
            if token_ids[-1] == PLACEHOLDER_TOKEN_ID:
                assert num_computed == len(token_ids) - 1, request_id
                pending += 1
        self.batches_with_placeholders += pending > 0
        return prepared


def run_mixed_workload(path, async_scheduling: bool, stop_string: str):
    llm = LLM(str(path), async_scheduling=async_scheduling, **TIGHT_CACHE)
    engine = llm.engine
    watch = PlaceholderWatch(engine.runner)
    prompts = random_prompts(engine.vocab_size, PROMPT_LENGTHS, seed=21)
    requests: dict[str, list[Request]] = {}
    for i, (prompt, (params, stream)) in enumerate(zip(prompts, mixed_params(stop_string))):
        engine.add_request(str(i), prompt, params, stream=stream)
        requests[str(i)] = list(engine.groups[str(i)].children)
    finished, streamed, steps = {}, [], 0
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
            else:
                streamed.append(output.request_id)
        steps += 1
        if steps == ABORT_AFTER_STEPS:
            engine.abort(ABORTED)
    return engine, watch, requests, finished, streamed


# Logprobs of the same token differ by fp32 rounding when the batch around a request differs (CPU matmuls
# block by shape), and async batches do differ: a request that stopped rides along one more step.
LOGPROB_ROUNDING = 1e-5


def completions(output) -> list[tuple]:
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in output.outputs]


def assert_same_logprobs(ours: list[dict[int, float]] | None, expected: list[dict[int, float]] | None) -> None:
    assert (ours is None) == (expected is None) and len(ours or []) == len(expected or [])
    for entry, expected_entry in zip(ours or [], expected or []):
        assert list(entry) == list(expected_entry)
        assert list(entry.values()) == pytest.approx(list(expected_entry.values()), abs=LOGPROB_ROUNDING)


@pytest.fixture(scope="module")
def stop_string(tiny_qwen3):
    llm = LLM(str(tiny_qwen3), device="cpu", dtype="float32", async_scheduling=False)
    return stop_string_for(llm, random_prompts(llm.engine.vocab_size, PROMPT_LENGTHS, seed=21)[2])


@pytest.fixture(scope="module")
def runs(tiny_qwen3, stop_string):
    return {mode: run_mixed_workload(tiny_qwen3, mode, stop_string) for mode in (False, True)}


def test_overlapped_outputs_equal_synchronous_outputs(runs):
    (_, _, _, sync_finished, _), (_, _, _, async_finished, _) = runs[False], runs[True]
    assert sorted(async_finished) == sorted(sync_finished) == [i for i in map(str, range(8)) if i != ABORTED]
    for request_id, output in sync_finished.items():
        assert completions(async_finished[request_id]) == completions(output), request_id
        for ours, expected in zip(async_finished[request_id].outputs, output.outputs):
            assert_same_logprobs(ours.logprobs, expected.logprobs)


def test_mixed_workload_exercised_every_feature(runs, stop_string):
    for engine, _, _, finished, streamed in runs.values():
        assert engine.scheduler.stats.num_preemptions > 0
        assert engine.scheduler.stats.num_prefill_chunks > 0
        assert finished["2"].finish_reason == "stop" and finished["2"].outputs[0].stop_reason == stop_string
        assert len(finished["4"].outputs) == 2 and all(c.logprobs for c in finished["4"].outputs)
        assert len(finished["5"].token_ids) >= 6
        assert "7" in streamed


def test_the_overlapped_run_filled_placeholders_on_the_device(runs):
    assert runs[True][1].batches_with_placeholders > 10
    assert runs[False][1].batches_with_placeholders == 0


def test_block_hashes_cover_only_real_tokens(runs):
    engine, _, requests, _, _ = runs[True]
    block_size = engine.config.block_size
    for request_id, children in requests.items():
        for request in children:
            if request_id != ABORTED:
                assert PLACEHOLDER_TOKEN_ID not in request.token_ids
            expected, parent = [], None
            for b in range(len(request.block_hashes)):
                parent = hash_block(parent, tuple(request.token_ids[b * block_size:(b + 1) * block_size]))
                expected.append(parent)
            assert request.block_hashes == expected, request_id


def test_every_block_is_returned_after_the_run(runs):
    for engine, *_ in runs.values():
        assert not engine.has_unfinished()
        assert all(pool.num_used == 0 for pool in engine.kv.pools)


def test_output_arrives_one_step_later_while_the_step_is_in_flight(tiny_qwen3):
    llm = LLM(str(tiny_qwen3), device="cpu", dtype="float32")
    engine = llm.engine
    engine.add_request("one", random_prompts(engine.vocab_size, (7,))[0],
                       SamplingParams(temperature=0.0, max_tokens=1))
    assert engine.step() == []                     # the prefill is launched; its token is not read yet
    assert engine.has_unfinished()
    outputs = engine.step()                        # nothing left to schedule: read the token back
    assert [(o.request_id, len(o.token_ids), o.finished) for o in outputs] == [("one", 1, True)]
    assert not engine.has_unfinished()


def test_cli_flag_turns_async_scheduling_off():
    from runtime.cli import build_parser, engine_config
    from runtime.registry import get_package
    package = get_package("qwen3")
    assert engine_config(build_parser().parse_args(["qwen3"]), package).async_scheduling
    assert not engine_config(build_parser().parse_args(["qwen3", "--no-async-scheduling"]), package).async_scheduling


def bare_scheduler() -> Scheduler:
    layout = group_cache_specs([CacheSpec((2, 2, 8), torch.float32)], 16)
    kv = KVCacheManager(layout, 16, [64], 8, max_model_len=1024, enable_prefix_caching=True)
    return Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)


def test_a_pending_token_that_reaches_max_tokens_is_not_scheduled():
    scheduler = bare_scheduler()
    last, more = (Request(name, list(range(20)), SamplingParams(max_tokens=2)) for name in ("last", "more"))
    for request in (last, more):
        scheduler.add(request)
    scheduler.finish_step(scheduler.schedule())                 # both prompts prefilled
    last.token_ids += [5, PLACEHOLDER_TOKEN_ID]                  # its second and final token is pending
    more.token_ids += [PLACEHOLDER_TOKEN_ID]
    last.num_computed_tokens = last.num_tokens - 1
    batch = scheduler.schedule()
    assert batch.request_ids == [more.request_id] and batch.num_new_tokens == [1]


def test_finish_step_keeps_nothing_of_a_request_that_finished_while_its_batch_ran():
    scheduler = bare_scheduler()
    request = Request("a", list(range(40)), SamplingParams(max_tokens=4))
    scheduler.add(request)
    batch = scheduler.schedule()
    scheduler.finish(request)                                    # e.g. the previous step's token was a stop
    scheduler.finish_step(batch)
    assert request.num_computed_tokens == 0
    assert scheduler.kv.pools[0].num_used == 0 and scheduler.kv.pools[0].cached == {}   # nothing registered
