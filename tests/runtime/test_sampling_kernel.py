"""The Triton sampling kernel against its torch reference (runtime/ops/sampling.py): on CPU in the interpreter
(small ragged shapes; `cap` set small so that both the candidate path and the bisection path run), and,
marked `gpu`, at 256 rows x 152k vocabulary. Both draw from the same hashed noise, so the tokens must be equal,
row for row; the draws' distribution is checked against the filtered softmax."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")        # before runtime.ops defines its kernels

triton = pytest.importorskip("triton")

from runtime.ops import sampling  # noqa: E402
from runtime.ops.sampling import apply_top_k_top_p_min_p, sample_rows_ref, sample_rows_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _kernel_runs():
    if DEVICE == "cpu":
        from triton.runtime.interpreter import InterpretedFunction
        if not isinstance(sampling._sample_rows_kernel, InterpretedFunction):
            pytest.skip("the kernel was built for a GPU: TRITON_INTERPRET was unset when runtime.ops was imported")


def random_rows(rows: int, vocab: int, seed: int) -> dict:
    """Logits with per-row quirks (ties, -inf masks, a huge scale) and mixed per-row parameters, every filter
    on and off somewhere, greedy and tiny temperatures included."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * (0.5 + 3 * torch.rand(rows, 1, generator=g))
    for row in range(rows):
        quirk = row % 5
        if quirk == 1:                                 # ties everywhere
            logits[row] = torch.randint(-4, 5, (vocab,), generator=g).float() * 0.5
        elif quirk == 2:                               # a grammar or a ban masked most of the row
            logits[row, torch.rand(vocab, generator=g) < 0.8] = float("-inf")
        elif quirk == 3:                               # a sharp distribution
            logits[row] *= 20
    top_k = torch.randint(0, vocab + 1, (rows,), generator=g)
    top_k[torch.rand(rows, generator=g) < 0.3] = 0
    top_k[::7] = 1
    top_p = torch.rand(rows, generator=g) * 0.9 + 0.05
    top_p[torch.rand(rows, generator=g) < 0.3] = 1.0
    min_p = torch.rand(rows, generator=g) * 0.3
    min_p[torch.rand(rows, generator=g) < 0.6] = 0.0
    temperature = torch.rand(rows, generator=g) * 1.5 + 0.1
    temperature[3::11] = 0.0
    temperature[4::13] = 1e-7
    exclude = torch.randint(-1, vocab, (rows,), generator=g)
    seeds = torch.randint(0, 2**40, (rows,), generator=g)
    steps = torch.randint(0, 5000, (rows,), generator=g)
    return dict(logits=logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seeds=seeds,
                steps=steps, exclude=exclude)


def on_device(case: dict) -> dict:
    return {name: value.to(DEVICE) for name, value in case.items()}


def assert_same_draws(case: dict, **tiles) -> None:
    ours = sample_rows_triton(**on_device(case), **tiles)
    expected = sample_rows_ref(**case)
    has_exclude = case["exclude"] >= 0
    assert torch.equal(ours.greedy.cpu(), expected.greedy)
    mismatch = (ours.random.cpu() != expected.random).nonzero()[:, 0].tolist()
    assert not mismatch, f"rows {mismatch} drew other tokens"
    torch.testing.assert_close(ours.excluded_prob.cpu()[has_exclude], expected.excluded_prob[has_exclude],
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("vocab, cap, seed, chunk", [(37, 64, 1, 128), (300, 16, 2, 128), (500, 128, 3, 128)])
def test_kernel_draws_the_reference_tokens_on_ragged_rows(vocab, cap, seed, chunk):
    # vocab <= cap runs the candidate path for every row; past it, rows whose filters bound few enough
    # candidates take it, rows with no filter race chunk by chunk, the rest (flat rows, small cap) bisect
    # over the whole row. Several chunks per row, the last one partial, except for the first case.
    assert_same_draws(random_rows(15, vocab, seed), block=64, level_block=64, chunk=chunk, cap=cap)


def test_kernel_takes_both_paths_for_the_same_row_alike():
    case = random_rows(6, 300, seed=5)
    case["top_k"][:] = 40
    case["top_p"][:3] = 1.0
    case["top_k"][5], case["top_p"][5], case["min_p"][5] = 0, 1.0, 0.0      # no filter: a race per chunk
    for cap in (512, 64, 8):                 # every row fits / the levels bound them / none fits
        assert_same_draws(case, block=64, level_block=64, chunk=128, cap=cap)


def test_top_p_ties_at_the_cut_keep_the_lowest_ids_like_a_stable_sort():
    logits = torch.tensor([[1.0, 2.0, 1.0, 0.0, 1.0, 2.0, 1.0, -1.0]] * 8)
    # Z = 2 e^2 + 4 e + 1 + e^-1 = 27.0: the two 2.0s have 0.273 each, each 1.0 has 0.101. p = 0.7 keeps
    # the 2.0s and the first two 1.0s by id (mass before them 0.547 and 0.647; before the third 0.748)
    top_p = torch.full((8,), 0.7)
    masked = apply_top_k_top_p_min_p(logits, None, top_p, None)
    assert masked[0].isfinite().tolist() == [True, True, True, False, False, True, False, False]
    case = dict(logits=logits, temperature=torch.ones(8), top_k=None, top_p=top_p, min_p=None,
                seeds=torch.arange(8), steps=torch.zeros(8, dtype=torch.int64), exclude=None)
    for cap in (16, 4):
        ours = sample_rows_triton(**{n: v.to(DEVICE) if v is not None else None for n, v in case.items()},
                                  block=4, level_block=4, chunk=4, cap=cap)   # ties across chunks
        assert set(ours.random.tolist()) <= {0, 1, 2, 5}
        assert torch.equal(ours.random.cpu(), sample_rows_ref(**case).random)


def test_kernel_draws_follow_the_filtered_distribution():
    vocab, draws = 16, 400
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(1, vocab, generator=g) * 1.5).expand(draws, vocab).contiguous()
    temperature = torch.full((draws,), 0.9)
    top_k, top_p = torch.full((draws,), 10), torch.full((draws,), 0.9)
    filtered = apply_top_k_top_p_min_p(logits[:1] / 0.9, top_k[:1], top_p[:1], None)
    expected = torch.softmax(filtered.double(), dim=-1)[0]
    for cap in (16,):                        # the candidate path (the bisection path draws alike, above)
        tokens = sample_rows_triton(logits.to(DEVICE), temperature.to(DEVICE), top_k.to(DEVICE),
                                    top_p.to(DEVICE), None, torch.arange(draws, device=DEVICE),
                                    torch.zeros(draws, dtype=torch.int64, device=DEVICE),
                                    block=16, level_block=16, cap=cap).random.cpu()
        support = expected > 0
        assert support[tokens].all(), "a filtered-out token was drawn"
        observed = torch.bincount(tokens, minlength=vocab).double()[support]
        chi2 = float(((observed - draws * expected[support]) ** 2 / (draws * expected[support])).sum())
        # degrees of freedom = support - 1 (<= 9); P(chi2_9 > 33.7) = 1e-4
        assert int(support.sum()) <= 10 and chi2 < 33.7, chi2


@pytest.mark.gpu
def test_kernel_draws_the_reference_tokens_at_full_vocabulary():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    case = random_rows(256, 151936, seed=7)
    case["top_k"][1::2] = 50
    case["top_p"][1::4] = 0.95
    assert_same_draws(case)


@pytest.mark.parametrize("rows, vocab, chunk", [(1, 1000, None), (3, 4097, 1024), (7, 300, 1024), (2, 64, 1024)])
def test_greedy_kernel_takes_the_first_maximum_like_torch(rows, vocab, chunk):
    g = torch.Generator().manual_seed(rows * vocab)
    # integer logits tie often, within and across chunks; a padded row (the slice's stride is the wider row)
    # and a row of -inf (everything masked) as torch.argmax sees them
    padded = torch.randint(-4, 4, (rows, vocab + 5), generator=g).float()
    padded[0, :] = float("-inf") if rows > 2 else padded[0, :]
    logits = padded[:, :vocab]
    ours = sampling.greedy_tokens_triton(logits.to(DEVICE), block=64, chunk=chunk)
    assert torch.equal(ours.cpu(), logits.argmax(dim=-1))


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 5, 256])
def test_greedy_kernel_matches_torch_at_full_vocabulary(rows):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    g = torch.Generator().manual_seed(rows)
    logits = (torch.randn(rows, 151936, generator=g) * 3).round().cuda()     # many ties at the top
    assert torch.equal(sampling.greedy_tokens(logits), logits.argmax(dim=-1))
