"""Ensemble weights on synthetic members whose strengths are known by construction."""

from __future__ import annotations

import numpy as np
import pytest

from ar_ray.ensemble_weights import (
    TEMPERATURE_RANGE,
    FittedWeights,
    choose,
    combine,
    fit_all,
    greedy_selection,
    nll_optimal,
    uniform,
)
from ar_ray.metrics import negative_log_likelihood, top_k_accuracy

N, K = 200, 4
LABELS = np.random.default_rng(0).integers(0, K, N)
FIRST_HALF = np.arange(N) < N // 2


def member(correct: np.ndarray) -> np.ndarray:
    """0.7 on the label where `correct`; elsewhere 0.45 on the next class, 0.313 on the label.

    The odd numbers keep class scores of every mixture of up to 25 picks from tying exactly.
    """
    rows = np.arange(N)
    probs = np.full((N, K), 0.1)
    probs[rows, LABELS] = 0.7
    wrong = ~correct
    probs[wrong] = (1 - 0.45 - 0.313) / (K - 2)
    probs[rows[wrong], LABELS[wrong]] = 0.313
    probs[rows[wrong], (LABELS[wrong] + 1) % K] = 0.45
    return probs


def fraction(mask: np.ndarray, share: float) -> np.ndarray:
    """The first `share` of the rows in `mask`, so accuracies are exact, not sampled."""
    index = np.flatnonzero(mask)
    out = np.zeros(N, dtype=bool)
    out[index[: round(share * index.size)]] = True
    return out


# Wrong on 20% of rows spread over both halves, so neither half member alone mends it.
STRONG_RIGHT = np.random.default_rng(1).permutation(N) < 0.8 * N
STRONG = member(STRONG_RIGHT)
WEAK = member(fraction(np.ones(N, dtype=bool), 0.4))
# Right on one half each, plus a little of the other: alone 60%, together 100%.
HALF_A = member(FIRST_HALF | fraction(~FIRST_HALF, 0.2))
HALF_B = member(~FIRST_HALF | fraction(FIRST_HALF, 0.2))
MEMBERS = np.stack([STRONG, WEAK, HALF_A, HALF_B])


def top1(fitted: FittedWeights, members: np.ndarray = MEMBERS) -> float:
    return top_k_accuracy(combine(members, fitted), LABELS, 1)


def nll(fitted: FittedWeights, members: np.ndarray = MEMBERS) -> float:
    return negative_log_likelihood(combine(members, fitted), LABELS)


def test_members_are_as_constructed():
    accuracies = [top_k_accuracy(m, LABELS, 1) for m in MEMBERS]
    assert accuracies == pytest.approx([0.8, 0.4, 0.6, 0.6])


def test_uniform_weights_sum_to_one_and_average_the_members():
    fitted = uniform(4)
    assert fitted.method == "uniform"
    assert fitted.weights.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(combine(MEMBERS, fitted), MEMBERS.mean(axis=0), atol=1e-12)


def test_greedy_beats_the_best_member_with_a_complementary_pair():
    fitted = greedy_selection(MEMBERS, LABELS)
    assert fitted.method == "greedy"
    assert (fitted.weights >= 0).all()
    assert fitted.weights.sum() == pytest.approx(1.0)
    assert top1(fitted) == 1.0 > 0.8
    assert fitted.weights[2] > 0 and fitted.weights[3] > 0
    assert fitted.weights[1] == 0  # the weak member never helps


def test_greedy_keeps_the_best_single_member_when_nothing_helps():
    # A member right only where STRONG is right cannot mend it, and a copy adds nothing:
    # the first pick stands, and of two equal members the lower index is picked.
    subsumed = member(STRONG_RIGHT & FIRST_HALF)
    fitted = greedy_selection(np.stack([subsumed, STRONG, STRONG]), LABELS, size=5)
    np.testing.assert_array_equal(fitted.weights, [0.0, 1.0, 0.0])


def test_greedy_returns_the_best_prefix_not_the_last():
    # Half and half is best; a third pick must unbalance it, and is dropped.
    fitted = greedy_selection(np.stack([HALF_A, HALF_B]), LABELS, size=3)
    np.testing.assert_array_equal(fitted.weights, [0.5, 0.5])


def test_greedy_weights_are_pick_counts_over_picks():
    weights = greedy_selection(MEMBERS, LABELS, size=25).weights
    assert any(np.allclose(weights * n, np.round(weights * n)) for n in range(1, 26))


def test_nll_optimal_is_no_worse_than_uniform_and_prefers_the_better_members():
    fitted = nll_optimal(MEMBERS, LABELS)
    assert fitted.method == "nll"
    assert fitted.weights.sum() == pytest.approx(1.0)
    assert nll(fitted) < nll(uniform(4))
    assert fitted.weights[1] < fitted.weights[0]


def test_nll_optimal_softens_an_overconfident_member_with_temperature():
    correct = fraction(np.ones(N, dtype=bool), 0.6)
    overconfident = np.full((N, K), 0.01)
    overconfident[np.arange(N), np.where(correct, LABELS, (LABELS + 1) % K)] = 0.97
    fitted = nll_optimal(overconfident[None], LABELS)
    assert fitted.temperature > 1.5
    assert nll(fitted, overconfident[None]) < negative_log_likelihood(overconfident, LABELS)


def test_nll_temperature_stays_bounded_when_validation_is_separable():
    fitted = nll_optimal(MEMBERS, LABELS)
    assert top1(fitted) == 1.0
    assert fitted.temperature == pytest.approx(TEMPERATURE_RANGE[0])


def test_temperature_keeps_rows_normalised_and_the_argmax():
    members = np.random.default_rng(1).dirichlet(np.ones(K), size=(3, N))
    weights = np.array([0.5, 0.3, 0.2])
    base = combine(members, FittedWeights("t", weights))
    np.testing.assert_allclose(base, np.tensordot(weights, members, axes=1), atol=1e-12)
    for temperature in (0.3, 2.5):
        scaled = combine(members, FittedWeights("t", weights, temperature))
        np.testing.assert_allclose(scaled.sum(axis=1), 1.0)
        np.testing.assert_array_equal(scaled.argmax(axis=1), base.argmax(axis=1))
        sharper = (scaled.max(axis=1) > base.max(axis=1)).all()
        assert sharper == (temperature < 1)


def test_choose_picks_the_best_validation_score():
    fitted = {
        "weak": FittedWeights("weak", [0, 1, 0, 0]),
        "pair": FittedWeights("pair", [0, 0, 0.5, 0.5]),
        "strong": FittedWeights("strong", [1, 0, 0, 0]),
    }
    assert choose(fitted, MEMBERS, LABELS) == "pair"
    # Equal top-1 (both 100%): the lower NLL wins.
    sharper = {**fitted, "sharp pair": FittedWeights("pair", [0, 0, 0.5, 0.5], 0.5)}
    assert choose(sharper, MEMBERS, LABELS) == "sharp pair"


def test_fit_all_returns_every_method_and_choose_agrees_with_the_scores():
    fitted = fit_all(MEMBERS, LABELS, size=10)
    assert set(fitted) == {"uniform", "greedy", "nll"}
    best = choose(fitted, MEMBERS, LABELS)
    scores = {name: (top1(w), -nll(w)) for name, w in fitted.items()}
    assert scores[best] == max(scores.values())


@pytest.mark.parametrize(
    ("members", "labels"),
    [
        (MEMBERS, LABELS[:-1]),  # N mismatch
        (MEMBERS[0], LABELS),  # [N, K], not [M, N, K]
        (MEMBERS[:0], LABELS),  # M == 0
        (MEMBERS, LABELS[:, None]),  # labels not [N]
    ],
)
def test_shape_errors_raise(members, labels):
    with pytest.raises(ValueError, match=r"\[M, N, K\]|labels must be \[N\]"):
        fit_all(members, labels)


def test_combine_rejects_weights_for_another_member_count():
    with pytest.raises(ValueError, match="M = 3"):
        combine(MEMBERS, uniform(3))


@pytest.mark.parametrize("weights", [[0.5, 0.6], [-0.5, 1.5], [], [[1.0]]])
def test_invalid_weights_are_rejected(weights):
    with pytest.raises(ValueError, match="weights"):
        FittedWeights("bad", weights)


def test_fitted_weights_cannot_be_changed_in_place():
    fitted = uniform(2)
    with pytest.raises(ValueError):
        fitted.weights[0] = 1.0
