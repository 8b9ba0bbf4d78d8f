"""Speculative decoding through the engine: lossless greedy outputs with ngram drafts under every scheduler
condition, seeded sampling reproducible, the rejection rule's output distribution equal to the target's,
acceptance counts equal to a plain simulation of prompt lookup, and start-up errors for bad configurations."""
from __future__ import annotations

import pickle

import pytest
import torch

from runtime import LLM, SamplingParams
from runtime.sampler import SamplingBatch, sample
from tools.parity import make_tiny_checkpoint, random_prompts

# block_size 4, a 16-token budget and a cache too small for all prompts at once: chunked prefill, mixed
# steps and preemption all happen, also to requests with drafts in flight.
STRESS = dict(device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=16, num_gpu_blocks=60)
GREEDY = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)


def workload(vocab_size: int) -> list[list[int]]:
    """Random prompts of several lengths, two sharing a 24-token prefix (prefix hits), and two periodic ones
    whose continuations repeat earlier n-grams (drafts that get accepted)."""
    prompts = random_prompts(vocab_size, (3, 17, 40, 9, 30), seed=1)
    shared = random_prompts(vocab_size, (24,), seed=2)[0]
    prompts += [shared + [5, 6, 7], shared + [8, 9], [5, 6, 7, 8, 9] * 8, [11, 12, 13] * 10]
    return prompts


@pytest.fixture(scope="module")
def tiny_gpt_oss_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint("gpt_oss", tmp_path_factory.mktemp("tiny") / "gpt-oss")


@pytest.fixture(scope="module", params=["qwen3", "qwen3_moe", "gpt_oss"])
def checkpoint(request, tiny_qwen3, tiny_qwen3_moe, tiny_gpt_oss_checkpoint):
    return {"qwen3": tiny_qwen3, "qwen3_moe": tiny_qwen3_moe, "gpt_oss": tiny_gpt_oss_checkpoint}[request.param]


@pytest.fixture(scope="module")
def plain_outputs(checkpoint):
    llm = LLM(str(checkpoint), **STRESS)
    return [o.token_ids for o in llm.generate(workload(llm.engine.vocab_size), GREEDY, use_tqdm=False)]


class PreemptDrafted:
    """Besides the preemptions a small cache causes, preempt (as memory pressure would) the newest running
    request that holds drafts, every `every` steps: its drafts are dropped and it is recomputed later."""

    def __init__(self, engine, every: int = 5):
        self.count = 0
        step, scheduler = engine.step, engine.scheduler

        def stepped():
            outputs = step()
            self.steps = getattr(self, "steps", 0) + 1
            drafted = [r for r in scheduler.running if r.draft_token_ids]
            if drafted and self.steps % every == 0:
                scheduler._preempt(drafted[-1])
                self.count += 1
            return outputs
        engine.step = stepped


@pytest.mark.parametrize("k", [1, 3, 5])
def test_ngram_greedy_outputs_equal_plain_decoding(checkpoint, plain_outputs, k):
    llm = LLM(str(checkpoint), speculative_config={"method": "ngram", "num_speculative_tokens": k}, **STRESS)
    engine = llm.engine
    forced = PreemptDrafted(engine)

    outputs = llm.generate(workload(engine.vocab_size), GREEDY, use_tqdm=False)

    assert [o.token_ids for o in outputs] == plain_outputs
    spec, sched = engine.spec_stats, engine.scheduler.stats
    assert spec.num_accepted_tokens > 0 and spec.num_draft_tokens > spec.num_accepted_tokens   # both outcomes
    assert sched.num_preemptions > 0 and sched.num_prefill_chunks > 0 and sched.num_mixed_steps > 0
    assert engine.kv.stats.hits > 0 and forced.count > 0


def test_padded_drafts_keep_greedy_outputs_and_make_steps_uniform(tiny_qwen3):
    """With graphs the engine pads every request's drafts to k once any request has some (so the step replays
    a graph): forced on here, outputs stay those of plain decoding and every verification step is uniform."""
    k = 3
    llm = LLM(str(tiny_qwen3), speculative_config={"method": "ngram", "num_speculative_tokens": k}, **STRESS)
    engine = llm.engine
    engine.pad_drafts = True
    plain = LLM(str(tiny_qwen3), **STRESS)
    prompts = workload(engine.vocab_size)
    expected = [o.token_ids for o in plain.generate(prompts, GREEDY, use_tqdm=False)]
    uniform, schedule = [], engine.scheduler.schedule

    def recorded():
        plan = schedule()
        drafted = [len(d) for d, samples in zip(plan.draft_token_ids, plan.samples) if samples]
        if any(drafted):
            uniform.append(all(n == k for n in drafted))
        return plan
    engine.scheduler.schedule = recorded

    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)

    assert [o.token_ids for o in outputs] == expected
    assert uniform.count(True) > 10, uniform
    # a request whose budget cut its drafts short (a chunked row, or the room left before max_tokens) is the
    # only way a drafted step is not uniform
    assert engine.spec_stats.num_accepted_tokens > 0


def test_step_plans_survive_pickle(tiny_qwen3):
    """The runner steps from unpickled copies of every plan (what a worker process will receive)."""
    spec = {"method": "ngram", "num_speculative_tokens": 3}
    llm = LLM(str(tiny_qwen3), speculative_config=spec, **STRESS)
    prompts = workload(llm.engine.vocab_size)
    expected = [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]

    llm = LLM(str(tiny_qwen3), speculative_config=spec, **STRESS)
    runner = llm.engine.runner
    launch = runner.launch
    runner.launch = lambda plan: launch(pickle.loads(pickle.dumps(plan)))

    assert [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == expected


def test_seeded_sampling_with_speculation_is_reproducible(tiny_qwen3):
    # top-k 3 keeps random outputs repetitive enough that 1-gram lookups find drafts, some of them accepted
    params = [SamplingParams(temperature=1.0, top_k=3, seed=s, max_tokens=24, ignore_eos=True) for s in range(6)]
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
    runs = []
    for _ in range(2):
        llm = LLM(str(tiny_qwen3), speculative_config=spec, **STRESS)
        prompts = workload(llm.engine.vocab_size)[-len(params):]
        runs.append([o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        stats = llm.engine.spec_stats
        assert stats.num_draft_tokens > stats.num_accepted_tokens > 0

    assert runs[0] == runs[1]


# ---- the rejection rule -----------------------------------------------------------------------------------

TARGET = torch.tensor([0.05, 0.15, 0.40, 0.30, 0.10])            # p over a 5-token vocabulary
SECOND = torch.tensor([0.30, 0.05, 0.05, 0.20, 0.40])            # p at the next position
NUM_SEEDS = 40_000


def verify_two_drafts(drafts: tuple[int, int], temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0 verifies drafts[0] under TARGET, row 1 verifies drafts[1] under SECOND, for NUM_SEEDS seeds.
    Returns the tokens [seeds, 2] and acceptance flags [seeds, 2]."""
    logits = torch.stack([TARGET, SECOND]).log() * temperature                  # softmax(logits / T) = p
    logits = logits.repeat(NUM_SEEDS, 1)                                         # [seeds * 2, vocab]
    seeds = torch.arange(NUM_SEEDS).repeat_interleave(2)
    steps = torch.tensor([0, 1]).repeat(NUM_SEEDS)
    batch = SamplingBatch(temperature=torch.full((2 * NUM_SEEDS,), temperature), top_k=None, top_p=None,
                          min_p=None, seeds=seeds, steps=steps, all_greedy=False, use_top_k=False,
                          use_top_p=False, use_min_p=False, max_logprobs=None, penalties=None, banned=None)
    out = sample(logits, batch, torch.tensor(drafts).repeat(NUM_SEEDS))
    return out.token_ids.view(NUM_SEEDS, 2), out.accepted.view(NUM_SEEDS, 2)


def chi_square(tokens: torch.Tensor, p: torch.Tensor) -> float:
    observed = torch.bincount(tokens, minlength=len(p)).double()
    expected = p.double() * len(tokens)
    return float(((observed - expected) ** 2 / expected).sum())


# chi-square with 4 degrees of freedom: P(X > 18.47) = 0.001
CHI2_4DOF_999 = 18.47


@pytest.mark.parametrize("drafts", [(2, 4), (0, 1), (3, 3)])
def test_rejection_rule_emits_the_target_distribution(drafts):
    tokens, accepted = verify_two_drafts(drafts)

    first = tokens[:, 0]                                 # emitted whatever happens
    assert chi_square(first, TARGET) < CHI2_4DOF_999
    assert accepted[:, 0].double().mean().item() == pytest.approx(TARGET[drafts[0]].item(), abs=0.01)
    second = tokens[accepted[:, 0], 1]                   # emitted only after the first draft was accepted
    assert chi_square(second, SECOND) < CHI2_4DOF_999


def test_the_distribution_check_catches_a_wrong_residual():
    """The same noise with a residual that does not remove the draft (a classic mistake) fails the check:
    the test above has the power to see a wrong rule."""
    tokens, accepted = verify_two_drafts((2, 4))
    logits = TARGET.log().repeat(NUM_SEEDS, 1)
    batch = SamplingBatch(temperature=torch.ones(NUM_SEEDS), top_k=None, top_p=None, min_p=None,
                          seeds=torch.arange(NUM_SEEDS), steps=torch.zeros(NUM_SEEDS, dtype=torch.int64),
                          all_greedy=False, use_top_k=False, use_top_p=False, use_min_p=False,
                          max_logprobs=None, penalties=None, banned=None)
    plain = sample(logits, batch).token_ids              # a fresh draw from p, the draft not removed
    wrong = torch.where(accepted[:, 0], tokens[:, 0], plain)

    assert chi_square(wrong, TARGET) > 10 * CHI2_4DOF_999


def test_greedy_rows_accept_exactly_the_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    batch = SamplingBatch(None, None, None, None, None, None, True, False, False, False, None, None, None)

    out = sample(logits, batch, torch.tensor([1, 2, -1]))

    assert out.token_ids.tolist() == [1, 0, 2]
    assert out.accepted.tolist() == [True, False, False]


# ---- acceptance counts against a plain simulation ---------------------------------------------------------

def prompt_lookup(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Written out plainly: the longest n in [n_min, n_max] whose last-n suffix occurred earlier; the up to k
    tokens after its most recent earlier occurrence."""
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


def simulate_acceptance(prompt: list[int], output: list[int], k: int, max_tokens: int) -> tuple[int, int]:
    """(draft tokens, accepted tokens) that prompt lookup earns on a known greedy output. The first token
    comes from the prefill; each later step verifies drafts and emits the accepted ones plus one."""
    drafted = accepted = 0
    emitted = 1
    while emitted < len(output):
        room = max_tokens - emitted - 1
        drafts = prompt_lookup(prompt + output[:emitted], min(k, room), 2, 4) if room >= 1 else []
        hits = 0
        while hits < len(drafts) and emitted + hits < len(output) and drafts[hits] == output[emitted + hits]:
            hits += 1
        drafted += len(drafts)
        accepted += hits
        emitted += hits + 1
    return drafted, accepted


def test_accepted_counts_match_a_simulation_of_prompt_lookup(tiny_qwen3):
    roomy = dict(device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=256)
    llm = LLM(str(tiny_qwen3), **roomy)
    prompts = workload(llm.engine.vocab_size)
    outputs = [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    k = 3
    expected = [simulate_acceptance(p, o, k, GREEDY.max_tokens) for p, o in zip(prompts, outputs)]

    llm = LLM(str(tiny_qwen3), speculative_config={"method": "ngram", "num_speculative_tokens": k}, **roomy)
    llm.generate(prompts, GREEDY, use_tqdm=False)

    stats = llm.engine.spec_stats
    assert stats.num_draft_tokens == sum(d for d, _ in expected)
    assert stats.num_accepted_tokens == sum(a for _, a in expected) > 0
    assert stats.accepted_per_position[0] >= stats.accepted_per_position[-1]


# ---- bad configurations -----------------------------------------------------------------------------------

@pytest.mark.parametrize("config, message", [
    ({"method": "eagle9", "num_speculative_tokens": 2}, "choices: ngram"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be an integer >= 1"),
    ({"method": "ngram", "num_speculative_tokens": "3"}, "num_speculative_tokens must be an integer >= 1"),
    ({"method": "mtp", "num_speculative_tokens": 1}, "choices: ngram"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, "unknown speculative_config key"),
    ('{"method": "ngram", ', "not valid JSON"),
])
def test_bad_speculative_config_fails_at_start_up_in_one_line(tiny_qwen3, config, message):
    with pytest.raises(ValueError, match=message) as error:
        LLM(str(tiny_qwen3), device="cpu", dtype="float32", speculative_config=config)
    assert "\n" not in str(error.value)


def test_logprobs_with_drafts_equal_plain_decoding(tiny_qwen3):
    """Requests that report logprobs take drafts too; each emitted token's entry comes from its own
    verification row, also when requests with drafts sit before it in the batch."""
    with_logprobs = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=3)
    roomy = dict(device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=256)
    runs = []
    for spec in (None, {"method": "ngram", "num_speculative_tokens": 3}):
        llm = LLM(str(tiny_qwen3), speculative_config=spec, **roomy)
        prompts = workload(llm.engine.vocab_size)
        params = [with_logprobs if i % 2 else GREEDY for i in range(len(prompts))]
        runs.append(llm.generate(prompts, params, use_tqdm=False))
        if spec:
            assert llm.engine.spec_stats.num_accepted_tokens > 0
    for plain, drafted in zip(*runs):
        assert drafted.token_ids == plain.token_ids
        assert (drafted.logprobs is None) == (plain.logprobs is None)
        for ours, expected in zip(drafted.logprobs or [], plain.logprobs or []):
            assert list(ours) == list(expected)                 # the sampled token first, then the top 3
            # fp32 rows computed in batches of other shapes round differently (as with async scheduling)
            assert list(ours.values()) == pytest.approx(list(expected.values()), abs=1e-5)


def test_min_tokens_holds_for_every_verification_row(tiny_qwen3):
    """A stop token that greedy decoding meets early is banned until min_tokens, in each draft row by its
    own output index: the outputs equal plain decoding's."""
    roomy = dict(device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=256)
    llm = LLM(str(tiny_qwen3), **roomy)
    prompts = workload(llm.engine.vocab_size)[-4:]
    free = llm.generate(prompts, GREEDY, use_tqdm=False)
    params = [SamplingParams(temperature=0.0, max_tokens=30, min_tokens=12, stop_token_ids=[o.token_ids[3]])
              for o in free]
    runs = []
    for spec in (None, {"method": "ngram", "num_speculative_tokens": 3}):
        llm = LLM(str(tiny_qwen3), speculative_config=spec, **roomy)
        runs.append([(o.token_ids, o.finish_reason) for o in llm.generate(prompts, params, use_tqdm=False)])
        if spec:
            assert llm.engine.spec_stats.num_accepted_tokens > 0
    assert runs[0] == runs[1]
    assert all(len(tokens) >= 12 for tokens, _ in runs[0]) and any(reason == "stop" for _, reason in runs[0])


def test_verification_rows_ban_stop_tokens_by_their_own_output_index():
    class Sampled:                                   # what the runner passes per row: a request's state
        params = SamplingParams(temperature=0.0, max_tokens=30, min_tokens=12, stop_token_ids=[7])
        seed, num_output_tokens, eos_token_ids = 0, 10, (2,)

    batch = SamplingBatch.from_requests([Sampled()] * 4, 16, torch.device("cpu"), step_offsets=[0, 1, 2, 3])

    rows, tokens = batch.banned
    assert sorted(zip(rows.tolist(), tokens.tolist())) == [(0, 2), (0, 7), (1, 2), (1, 7)]   # outputs 10, 11
