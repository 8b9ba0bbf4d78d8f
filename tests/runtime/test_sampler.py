"""The sampler against independent references: greedy, seeded random draws, the top-k/top-p/min-p filters,
logprobs, penalties, min_tokens and the validation of SamplingParams."""
from __future__ import annotations

import math

import pytest
import torch

from runtime.request import Request, SamplingParams
from runtime.sampler import SamplingBatch, apply_penalties, apply_top_k_top_p_min_p, sample, uniform_noise

CPU = torch.device("cpu")


def make_request(seed: int = 7, prompt: list[int] | None = None, output: list[int] = (), eos: tuple[int, ...] = (),
                 **params) -> Request:
    request = Request("r", list(prompt or [1, 2, 3]), SamplingParams(**params), eos_token_ids=eos, seed=seed)
    request.token_ids += list(output)
    return request


def sample_requests(logits: torch.Tensor, requests: list[Request]):
    return sample(logits, SamplingBatch.from_requests(requests, logits.shape[-1], CPU))


def random_logits(rows: int, vocab: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=generator) * scale       # [rows, vocab]


# ---------------------------------------------------------------- greedy


def test_greedy_is_argmax():
    logits = random_logits(6, 97, seed=0)
    out = sample_requests(logits, [make_request(seed=s, temperature=0.0) for s in range(6)])
    expected = [max(range(97), key=lambda t: logits[row, t].item()) for row in range(6)]
    assert out.token_ids.tolist() == expected


def test_mixed_batch_greedy_rows_stay_argmax_and_random_rows_sample():
    # Flat logits: the argmax holds 1/vocab of the mass, so random rows almost never land on it by chance.
    vocab = 512
    logits = random_logits(8, vocab, seed=1, scale=0.01)
    argmax = logits.argmax(dim=-1)
    random_hits = 0
    for draw in range(8):
        requests = [make_request(seed=100 * draw + row, temperature=0.0 if row % 2 == 0 else 1.0) for row in range(8)]
        tokens = sample_requests(logits, requests).token_ids
        assert torch.equal(tokens[0::2], argmax[0::2])
        random_hits += int((tokens[1::2] == argmax[1::2]).sum())
    assert random_hits <= 2          # 32 random draws, each hitting the argmax with probability ~1/512


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-8, 5e-6])
def test_tiny_temperatures_sample_like_greedy(temperature):
    """logits / 1e-40 overflows to inf and the softmax to NaN: below a small epsilon, sampling is greedy."""
    logits = random_logits(6, 97, seed=3, scale=8.0)
    requests = [make_request(seed=s, temperature=temperature) for s in range(3)]
    requests += [make_request(seed=s, temperature=1.0) for s in range(3)]       # not an all-greedy batch
    tokens = sample_requests(logits, requests).token_ids
    assert torch.equal(tokens[:3], logits[:3].argmax(dim=-1))


# ---------------------------------------------------------------- seeded sampling


def test_same_seed_and_step_give_same_token_whatever_the_batch():
    vocab = 300
    logits_a = random_logits(1, vocab, seed=2, scale=0.5)
    others = random_logits(3, vocab, seed=3, scale=0.5)

    def request_a():
        return make_request(seed=1234, output=[5, 6], temperature=0.9, top_p=0.95)

    alone = sample_requests(logits_a, [request_a()]).token_ids[0]
    other_requests = [make_request(seed=s, output=[9] * s, temperature=t, top_k=k)
                      for s, t, k in [(1, 1.0, 0), (2, 0.0, 0), (3, 0.5, 10)]]
    first = sample_requests(torch.cat([logits_a, others]), [request_a()] + other_requests).token_ids[0]
    middle = sample_requests(torch.cat([others[:2], logits_a, others[2:]]),
                             other_requests[:2] + [request_a()] + other_requests[2:]).token_ids[2]
    assert first == alone and middle == alone


def test_different_seeds_give_different_tokens():
    vocab = 1000
    logits = random_logits(1, vocab, seed=4, scale=0.1).expand(200, vocab)
    tokens = sample_requests(logits, [make_request(seed=s, temperature=1.0) for s in range(200)]).token_ids
    # Near-uniform over 1000 tokens: 200 draws give ~181 distinct values on average.
    assert len(set(tokens.tolist())) > 150


def test_different_steps_of_one_request_give_different_tokens():
    vocab = 1000
    logits = random_logits(1, vocab, seed=5, scale=0.1).expand(200, vocab)
    tokens = sample_requests(logits, [make_request(seed=99, output=[1] * step, temperature=1.0)
                                      for step in range(200)]).token_ids
    assert len(set(tokens.tolist())) > 150


# Pearson's chi-square with 7 degrees of freedom exceeds 29.9 with probability 1e-4 when the draws follow the
# expected distribution; a sampler that ignored the temperature (or the filters) scores in the hundreds here.
CHI2_LIMIT_DF7 = 29.9


def chi_square(tokens: torch.Tensor, expected_probs: torch.Tensor) -> float:
    observed = torch.bincount(tokens, minlength=expected_probs.numel()).double()
    expected = expected_probs.double() * tokens.numel()
    support = expected > 0
    assert observed[~support].sum() == 0, "a token outside the support was sampled"
    return float(((observed[support] - expected[support]) ** 2 / expected[support]).sum())


def test_seeded_draws_follow_softmax_of_logits_over_temperature():
    logits = torch.tensor([[1.0, 0.2, -0.5, 2.0, 0.0, -1.5, 1.2, 0.7]])
    temperature, draws = 0.7, 20000
    expected = torch.tensor([math.exp(v / temperature) for v in logits[0].tolist()], dtype=torch.float64)
    expected /= expected.sum()
    by_seed = sample_requests(logits.expand(draws, 8), [make_request(seed=s, temperature=temperature)
                                                        for s in range(draws)]).token_ids
    assert chi_square(by_seed, expected) < CHI2_LIMIT_DF7
    # Also a plain bound: each frequency's standard deviation is at most sqrt(0.25 / 20000) = 0.0035.
    frequencies = torch.bincount(by_seed, minlength=8).double() / draws
    assert (frequencies - expected).abs().max() < 5 * 0.0035


def test_draws_along_the_steps_of_one_seed_follow_the_filtered_distribution():
    logits = torch.tensor([[1.0, 0.2, -0.5, 2.0, 0.0, -1.5, 1.2, 0.7, -3.0, 0.4]])
    draws = 10000
    # top_k=8 drops the two smallest (-3.0, -1.5); of the rest, top_p=0.8 keeps 2.0, 1.2, 1.0, 0.7, 0.4
    # (mass before 0.4 is ~0.781 < 0.8, mass before 0.2 is ~0.857).
    expected = torch.zeros(10, dtype=torch.float64)
    kept = [3, 6, 0, 7, 9]
    weights = torch.tensor([math.exp(logits[0, t].item()) for t in kept], dtype=torch.float64)
    expected[kept] = weights / weights.sum()
    assert reference_filter(logits, [8], [0.8], [0.0])[0].nonzero()[:, 0].tolist() == sorted(kept)
    request = make_request(seed=5, temperature=1.0, top_k=8, top_p=0.8)
    batch = SamplingBatch.from_requests([request] * draws, 10, CPU)
    batch.steps = torch.arange(draws)          # the same request at output steps 0 .. draws - 1
    tokens = sample(logits.expand(draws, 10), batch).token_ids
    # 5 tokens in the support: 4 degrees of freedom; P(chi2_4 > 23.5) = 1e-4.
    assert chi_square(tokens, expected) < 23.5


def test_uniform_noise_is_strictly_inside_the_unit_interval():
    # 1024 x 4096 = 2**22 draws; with 24-bit noise this range held the top code word, which rounded to u = 1.0.
    u = uniform_noise(torch.arange(1024, 2048), torch.zeros(1024, dtype=torch.int64), 4096)
    assert u.min() > 0 and u.max() < 1


def test_sampling_never_returns_a_token_removed_by_top_k():
    # Many rows of a wide vocabulary: the noise of a few million masked tokens, the extremes included.
    vocab, rows = 4096, 1024
    logits = random_logits(1, vocab, seed=6).expand(rows, vocab)
    tokens = sample_requests(logits, [make_request(seed=s, temperature=1.0, top_k=3)
                                      for s in range(1024, 1024 + rows)]).token_ids
    allowed = set(torch.topk(logits[0], 3).indices.tolist())
    assert set(tokens.tolist()) <= allowed


def test_sampling_never_returns_a_masked_token_for_any_filter():
    vocab, rows = 64, 400
    logits = random_logits(rows, vocab, seed=7)
    settings = [dict(top_k=5), dict(top_p=0.5), dict(min_p=0.2), dict(top_k=10, top_p=0.7, min_p=0.1)]
    for setting in settings:
        requests = [make_request(seed=s, temperature=1.3, **setting) for s in range(rows)]
        tokens = sample_requests(logits, requests).token_ids
        keep = reference_filter(logits / 1.3, [setting.get("top_k", 0)] * rows, [setting.get("top_p", 1.0)] * rows,
                                [setting.get("min_p", 0.0)] * rows)
        assert keep[torch.arange(rows), tokens].all(), setting


# ---------------------------------------------------------------- top-k / top-p / min-p


def reference_filter(logits: torch.Tensor, top_k: list[int], top_p: list[float], min_p: list[float]) -> torch.Tensor:
    """Boolean [rows, vocab] of the tokens kept: top-k (ties at the k-th value kept, 0 = off), then top-p over the
    renormalized survivors (keep tokens in descending order while the mass before them is below p; 1 = off),
    then min-p relative to the most likely token. Plain Python over float64 values."""
    keep = torch.zeros(logits.shape, dtype=torch.bool)
    for row in range(logits.shape[0]):
        values = logits[row].double().tolist()
        kept = set(range(len(values)))
        if top_k[row] > 0:
            kth = sorted(values, reverse=True)[min(top_k[row], len(values)) - 1]
            kept = {t for t in kept if values[t] >= kth}
        if top_p[row] < 1.0:
            best = max(values[t] for t in kept)
            weights = {t: math.exp(values[t] - best) for t in kept}
            total = sum(weights.values())
            mass_before, survivors = 0.0, set()
            for t in sorted(kept, key=lambda t: -values[t]):
                if mass_before >= top_p[row]:
                    break
                survivors.add(t)
                mass_before += weights[t] / total
            kept = survivors
        if min_p[row] > 0.0:
            best = max(values[t] for t in kept)
            kept = {t for t in kept if math.exp(values[t] - best) >= min_p[row]}
        keep[row, sorted(kept)] = True
    return keep


def filter_tensors(top_k, top_p, min_p):
    return (torch.tensor(top_k, dtype=torch.int64), torch.tensor(top_p, dtype=torch.float32),
            torch.tensor(min_p, dtype=torch.float32))


def test_top_k_top_p_min_p_match_the_reference():
    logits = random_logits(8, 50, seed=8)
    top_k = [0, 1, 5, 17, 0, 0, 7, 50]
    top_p = [1.0, 1.0, 0.9, 1.0, 0.3, 0.75, 0.6, 1.0]
    min_p = [0.0, 0.0, 0.0, 0.05, 0.0, 0.1, 0.02, 0.5]
    masked = apply_top_k_top_p_min_p(logits, *filter_tensors(top_k, top_p, min_p))
    keep = reference_filter(logits, top_k, top_p, min_p)
    assert torch.equal(masked.isfinite(), keep)
    assert torch.equal(masked[keep], logits[keep])
    assert keep.sum(dim=-1).tolist()[0] == 50 and keep.sum(dim=-1).tolist()[1] == 1


def test_top_k_keeps_every_token_tied_with_the_kth():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, -1.0, 0.5],
                           [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])
    masked = apply_top_k_top_p_min_p(logits, torch.tensor([2, 3]), None, None)
    assert masked.isfinite().tolist() == [[True, False, True, True, True, False, False], [True] * 7]
    assert torch.equal(masked.isfinite(), reference_filter(logits, [2, 3], [1.0, 1.0], [0.0, 0.0]))


def test_min_p_keeps_ties_with_the_threshold_side():
    logits = torch.tensor([[2.0, 2.0, 1.0, 0.0, -4.0]])
    masked = apply_top_k_top_p_min_p(logits, None, None, torch.tensor([0.3]))
    # exp(-1) = 0.37 >= 0.3 is kept, exp(-2) = 0.14 is not; both maxima are kept.
    assert masked.isfinite().tolist() == [[True, True, True, False, False]]


def test_top_p_with_tied_logits_keeps_the_right_number_of_the_largest_values():
    # Which of several tied tokens a sort puts first is unspecified, so compare the kept values, not the ids.
    generator = torch.Generator().manual_seed(9)
    logits = torch.randint(-3, 4, (6, 40), generator=generator).float() * 0.5
    top_p = [0.2, 0.5, 0.8, 0.9, 0.55, 0.35]
    masked = apply_top_k_top_p_min_p(logits, None, torch.tensor(top_p), None)
    keep = reference_filter(logits, [0] * 6, top_p, [0.0] * 6)
    for row in range(6):
        assert sorted(logits[row][masked[row].isfinite()].tolist()) == sorted(logits[row][keep[row]].tolist())


def test_rows_with_filters_off_are_untouched_next_to_rows_with_filters_on():
    # 32000 tokens: the float32 running sum of the sorted probabilities reaches 1.0 before the tail ends.
    logits = random_logits(4, 32000, seed=10, scale=4.0)
    masked = apply_top_k_top_p_min_p(logits, *filter_tensors([0, 40, 0, 0], [1.0, 1.0, 0.9, 1.0],
                                                             [0.0, 0.0, 0.0, 0.1]))
    assert torch.equal(masked[0], logits[0])
    assert int(masked[1].isfinite().sum()) == 40 and int(masked[2].isfinite().sum()) < 32000


def test_top_k_larger_than_vocab_is_off():
    logits = random_logits(2, 10, seed=11)
    request = make_request(temperature=1.0, top_k=1000)
    batch = SamplingBatch.from_requests([request, request], 10, CPU)
    assert batch.top_k.tolist() == [10, 10]
    masked = apply_top_k_top_p_min_p(logits, batch.top_k, None, None)
    assert masked.isfinite().all()


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_log_softmax_of_the_raw_logits():
    vocab = 40
    logits = random_logits(3, vocab, seed=12)
    requests = [make_request(seed=1, output=[3, 3, 4], temperature=0.5, logprobs=5, repetition_penalty=1.5,
                             presence_penalty=1.0),
                make_request(seed=2, temperature=0.0, logprobs=2, frequency_penalty=0.5,
                             output=[int(logits[1].argmax())]),
                make_request(seed=3, temperature=1.2, top_k=4)]
    out = sample_requests(logits, requests)
    raw = logits.double()
    expected = raw - torch.logsumexp(raw, dim=-1, keepdim=True)          # [rows, vocab]
    torch.testing.assert_close(out.sampled_logprobs.double(), expected.gather(1, out.token_ids[:, None])[:, 0],
                               rtol=0, atol=1e-5)
    order = expected.argsort(dim=-1, descending=True)[:, :5]
    assert out.top_ids.tolist() == order.tolist()
    torch.testing.assert_close(out.top_logprobs.double(), expected.gather(1, order), rtol=0, atol=1e-5)


def test_no_logprobs_unless_asked():
    out = sample_requests(random_logits(2, 10, seed=13), [make_request(), make_request(temperature=0.0)])
    assert out.sampled_logprobs is None and out.top_logprobs is None and out.top_ids is None


# ---------------------------------------------------------------- penalties


def test_penalties_match_a_hand_computed_example():
    # prompt [0, 1, 1], output [1, 2, 2, 2]: seen = {0, 1, 2}; output counts: 1 -> 1, 2 -> 3.
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0],
                           [2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    penalized = make_request(prompt=[0, 1, 1], output=[1, 2, 2, 2], repetition_penalty=2.0,
                             frequency_penalty=0.5, presence_penalty=0.25)
    plain = make_request(prompt=[0, 1, 1], output=[1, 2, 2, 2])
    batch = SamplingBatch.from_requests([penalized, plain], 6, CPU)
    # repetition: 2.0 / 2 = 1.0, -1.0 * 2 = -2.0, 0.5 / 2 = 0.25;
    # then token 1: -2.0 - 0.5 * 1 - 0.25 = -2.75; token 2: 0.25 - 0.5 * 3 - 0.25 = -1.5.
    expected = torch.tensor([[1.0, -2.75, -1.5, 3.0, -2.0, 1.0],
                             [2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    assert torch.equal(apply_penalties(logits, batch.penalties), expected)


def test_penalties_change_the_greedy_choice():
    logits = torch.tensor([[1.0, 3.0, 2.5, -1.0]])
    assert sample_requests(logits, [make_request(temperature=0.0, output=[1])]).token_ids.tolist() == [1]
    # presence 1.0 on the repeated token 1: 3.0 - 1.0 = 2.0 < 2.5.
    assert sample_requests(logits, [make_request(temperature=0.0, output=[1], presence_penalty=1.0)]
                           ).token_ids.tolist() == [2]
    # repetition 1.5 applies to prompt tokens too: token 1 is in the prompt [1, 2, 3] (3.0 / 1.5 = 2.0),
    # token 2 as well (2.5 / 1.5 = 1.67): token 0 (1.0) still loses, token 1 wins.
    assert sample_requests(logits, [make_request(temperature=0.0, repetition_penalty=1.5)]).token_ids.tolist() == [1]
    # prompt [2], output [1], repetition 2.0, presence 0.6: token 1 -> 3.0 / 2 - 0.6 = 0.9, token 2 (prompt only,
    # so no presence penalty) -> 2.5 / 2 = 1.25, token 0 unchanged at 1.0.
    assert sample_requests(logits, [make_request(temperature=0.0, prompt=[2], repetition_penalty=2.0, output=[1],
                                                 presence_penalty=0.6)]).token_ids.tolist() == [2]


# ---------------------------------------------------------------- min_tokens


def test_min_tokens_bans_eos_and_stop_tokens_until_reached():
    vocab = 8
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]]).expand(3, vocab)
    early = make_request(output=[0], eos=(7,), temperature=0.0, min_tokens=3, stop_token_ids=[6])
    ignore_eos = make_request(output=[0], eos=(7,), temperature=0.0, min_tokens=3, stop_token_ids=[5],
                              ignore_eos=True)
    reached = make_request(output=[0, 0, 0], eos=(7,), temperature=0.0, min_tokens=3, stop_token_ids=[6])
    batch = SamplingBatch.from_requests([early, ignore_eos, reached], vocab, CPU)
    rows, tokens = batch.banned
    assert sorted(zip(rows.tolist(), tokens.tolist())) == [(0, 6), (0, 7), (1, 5)]
    assert sample(logits, batch).token_ids.tolist() == [5, 7, 7]
    random_rows = [make_request(seed=s, output=[0], eos=(7,), temperature=1.0, min_tokens=2, stop_token_ids=[6])
                   for s in range(200)]
    tokens = sample_requests(logits[:1].expand(200, vocab), random_rows).token_ids
    assert not ({6, 7} & set(tokens.tolist()))


def test_no_ban_once_min_tokens_reached():
    batch = SamplingBatch.from_requests([make_request(output=[1, 1], eos=(2,), min_tokens=2)], 8, CPU)
    assert batch.banned is None


# ---------------------------------------------------------------- SamplingParams validation


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.2), ("max_tokens", 0), ("max_tokens", -3),
    ("n", 0), ("min_p", -0.01), ("min_p", 1.01),
])
def test_sampling_params_reject_out_of_range_values(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_sampling_params_accept_the_boundaries():
    params = SamplingParams(temperature=0.0, top_p=1.0, min_p=1.0, max_tokens=1, n=1, top_k=-1)
    assert params.greedy and params.top_k == 0
