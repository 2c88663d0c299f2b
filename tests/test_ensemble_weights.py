"""Ensemble weights on synthetic members whose strengths are known by construction."""

from __future__ import annotations

import numpy as np
import pytest

from ar_ray.ensemble_weights import (
    TEMPERATURE_RANGE,
    FittedWeights,
    MethodChoice,
    best_member,
    best_method,
    choose_method,
    combine,
    cross_fit,
    fit_all,
    greedy_selection,
    nll_optimal,
    stratified_folds,
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


FOLD_OF = stratified_folds(LABELS, 5, seed=0)


def in_fold(fold: int) -> np.ndarray:
    return np.equal(FOLD_OF, fold)


def fold_top1(probs: np.ndarray, labels: np.ndarray = LABELS) -> list[float]:
    return [top_k_accuracy(probs[in_fold(k)], labels[in_fold(k)], 1) for k in range(5)]


def test_greedy_beats_the_best_member_out_of_fold_with_a_complementary_pair():
    """Complementary errors are structure, not noise: weights fitted on four folds mend the
    fifth. Every fold is scored with weights that never saw it."""
    fit = cross_fit(MEMBERS, LABELS, FOLD_OF)
    greedy = fold_top1(fit.out_of_fold["greedy"])
    best_member = fold_top1(STRONG)
    assert all(g > b for g, b in zip(greedy, best_member, strict=True)), (greedy, best_member)
    assert top_k_accuracy(fit.out_of_fold["greedy"], LABELS, 1) == 1.0 > 0.8
    fitted = fit.fitted["greedy"]  # refitted on all of val
    assert fitted.method == "greedy" and fitted.weights.sum() == pytest.approx(1.0)
    assert fitted.weights[2] > 0 and fitted.weights[3] > 0
    assert fitted.weights[1] == 0  # the weak member never helps


def put(probs: np.ndarray, mask: np.ndarray, on_label: float, on_next: float) -> None:
    """Rows in `mask`: `on_label` on the label, `on_next` on the next class, the rest shared."""
    rows = np.flatnonzero(mask)
    probs[rows] = (1 - on_label - on_next) / (K - 2)
    probs[rows, LABELS[rows]] = on_label
    probs[rows, (LABELS[rows] + 1) % K] = on_next


def overfitting_members() -> np.ndarray:
    """A dominant member (80%) and five that only flatter it on the images they were fitted
    on: member f confidently mends the dominant member's errors in fold f and is weakly wrong
    on 3 images of every other fold. Alone each is worse than the dominant member; mixed in,
    the weak errors vanish, so in-sample they look like pure gain. On a fold they never saw
    they mend nothing (the fold they mend is never both fitted on and scored)."""
    right = np.random.default_rng(2).permutation(N) < 0.8 * N
    dominant = np.empty((N, K))
    put(dominant, right, 0.55, 0.15)
    put(dominant, ~right, 0.15, 0.55)
    members = [dominant]
    for fold in range(5):
        member = dominant.copy()
        put(member, in_fold(fold) & ~right, 0.9, 0.02)
        weakly_wrong = np.zeros(N, dtype=bool)
        for other in set(range(5)) - {fold}:
            weakly_wrong[np.flatnonzero(in_fold(other) & right)[:3]] = True
        put(member, weakly_wrong, 0.35, 0.45)
        members.append(member)
    return np.stack(members)


OVERFITTING = overfitting_members()


@pytest.fixture(scope="module")
def overfitting_fit():
    return cross_fit(OVERFITTING, LABELS, FOLD_OF)


def test_out_of_fold_greedy_does_not_beat_a_dominant_member_that_in_sample_greedy_beats(
    overfitting_fit,
):
    solo = [top_k_accuracy(m, LABELS, 1) for m in OVERFITTING]
    assert solo[0] == pytest.approx(0.8) and max(solo[1:]) < solo[0]  # the dominant member
    in_sample = combine(OVERFITTING, greedy_selection(OVERFITTING, LABELS))
    assert top_k_accuracy(in_sample, LABELS, 1) > solo[0] + 0.05  # the trap is real
    # Weights fitted in-sample, or on folds that include the one scored, would pass it on.
    assert top_k_accuracy(overfitting_fit.out_of_fold["greedy"], LABELS, 1) <= solo[0]
    # The method is chosen by its out-of-fold score, so greedy's in-sample win does not count.
    assert overfitting_fit.chosen != "greedy"
    assert top_k_accuracy(overfitting_fit.out_of_fold["final"], LABELS, 1) >= solo[0]


def test_a_folds_own_labels_never_fit_the_weights_that_score_it(overfitting_fit):
    """Scramble fold 0's labels: everything scored in fold 0 stays as it was (the weights
    and method choice for it come from folds 1-4), while other folds, whose weights were
    fitted with fold 0's labels, change."""
    labels = LABELS.copy()
    first_fold = in_fold(0)
    labels[first_fold] = np.random.default_rng(3).permutation((LABELS[first_fold] + 1) % K)
    scrambled = cross_fit(OVERFITTING, labels, FOLD_OF)
    for method, probs in overfitting_fit.out_of_fold.items():
        np.testing.assert_array_equal(scrambled.out_of_fold[method][first_fold], probs[first_fold])
    assert scrambled.fold_choices[0] == overfitting_fit.fold_choices[0]
    assert any(
        not np.array_equal(scrambled.out_of_fold[method][~first_fold], probs[~first_fold])
        for method, probs in overfitting_fit.out_of_fold.items()
    )


def test_final_is_the_method_each_fold_chose_and_the_refit_uses_all_of_val(overfitting_fit):
    fit = overfitting_fit
    for fold, method in enumerate(fit.fold_choices):
        rows = in_fold(fold)
        np.testing.assert_array_equal(fit.out_of_fold["final"][rows], fit.out_of_fold[method][rows])
    scores = {m: p for m, p in fit.out_of_fold.items() if m != "final"}
    assert (fit.chosen, fit.reason) == tuple(vars(choose_method(scores, LABELS)).values())
    for method, weights in fit_all(OVERFITTING, LABELS).items():
        np.testing.assert_allclose(fit.fitted[method].weights, weights.weights, atol=1e-9)


def confidently_wrong(seed: int) -> np.ndarray:
    """Right on 30% of rows (seeded), and sure of the next class on the rest."""
    right = np.random.default_rng(seed).permutation(N) < 0.3 * N
    probs = np.empty((N, K))
    put(probs, right, 0.5, 0.2)
    put(probs, ~right, 0.02, 0.9)
    return probs


# Two members agreeing on the wrong class drag the uniform mean down: greedy wins every fold.
DRAGGED = np.stack([STRONG, confidently_wrong(5), confidently_wrong(6)])


@pytest.mark.parametrize("members", [OVERFITTING, DRAGGED], ids=["uniform", "greedy"])
def test_each_folds_method_is_chosen_on_the_other_folds_alone(members):
    """Fold k's choice applies the rule to folds != k, each of them scored with weights
    fitted on the remaining three (worked out here fold by fold): fold k's own images and
    labels play no part in choosing how fold k is combined."""
    fit = cross_fit(members, LABELS, FOLD_OF)
    for k, chosen in enumerate(fit.fold_choices):
        others = ~in_fold(k)
        scored: dict[str, np.ndarray] = {}
        for j in sorted(set(range(5)) - {k}):
            fitted_on = ~np.isin(FOLD_OF, [k, j])
            for method, weights in fit_all(members[:, fitted_on], LABELS[fitted_on]).items():
                rows = scored.setdefault(method, np.zeros((N, K)))
                rows[in_fold(j)] = combine(members[:, in_fold(j)], weights)
        inner = {method: probs[others] for method, probs in scored.items()}
        assert chosen == choose_method(inner, LABELS[others]).method
    assert set(fit.fold_choices) == ({"uniform"} if members is OVERFITTING else {"greedy"})


def first(count: int) -> np.ndarray:
    """A member right on the first `count` images."""
    return member(np.arange(N) < count)


def test_uniform_wins_when_a_fitted_methods_gain_is_within_noise():
    """Greedy is right on 3 more of 200 images: the best score, but a resample without
    those 3 images (about 5% of them) gains nothing, so its interval reaches zero."""
    probs = {"uniform": first(140), "greedy": first(143), "nll": first(141)}
    assert best_method(probs, LABELS) == "greedy"
    choice = choose_method(probs, LABELS)
    assert choice.method == "uniform"
    assert choice.reason.startswith("uniform: greedy's out-of-fold gain over it, +1.50 points")
    assert choice.reason.endswith("is within noise")


def test_a_fitted_method_is_kept_when_its_interval_lies_above_zero():
    probs = {"uniform": first(140), "greedy": first(143), "nll": first(170)}
    choice = choose_method(probs, LABELS)
    assert choice.method == "nll"
    assert choice.reason.startswith("nll beats uniform out of fold by +15.00 points [+")


def test_uniform_scoring_best_needs_no_interval():
    probs = {"uniform": first(150), "greedy": first(143), "nll": first(150)}
    assert choose_method(probs, LABELS) == MethodChoice(
        "uniform", "uniform scores best out of fold"
    )


def test_a_method_ahead_only_on_nll_is_not_kept():
    """The complementary pair: uniform already gets every image right, nll only sharpens."""
    fit = cross_fit(MEMBERS, LABELS, FOLD_OF)
    assert top_k_accuracy(fit.out_of_fold["uniform"], LABELS, 1) == 1.0
    scores = {m: p for m, p in fit.out_of_fold.items() if m != "final"}
    assert best_method(scores, LABELS) == "nll"
    assert fit.chosen == "uniform" and set(fit.fold_choices) == {"uniform"}
    assert (
        fit.reason
        == "uniform: nll's out-of-fold gain over it, +0.00 points [+0.00, +0.00], is within noise"
    )


def test_best_member_is_best_on_the_labels_given_then_by_nll_then_first():
    assert best_member(np.stack([first(100), first(150), first(120)]), LABELS) == 1
    sharper = first(150) ** 2 / (first(150) ** 2).sum(axis=1, keepdims=True)  # same argmax
    assert best_member(np.stack([first(150), sharper]), LABELS) == 1  # lower NLL
    assert best_member(np.stack([first(150), first(150)]), LABELS) == 0


def test_stratified_folds_are_seeded_balanced_and_cover_every_image():
    labels = np.repeat(np.arange(3), [7, 12, 5])
    folds = stratified_folds(labels, 5, seed=1)
    assert np.array_equal(folds, stratified_folds(labels, 5, seed=1))
    assert not np.array_equal(folds, stratified_folds(labels, 5, seed=2))
    sizes = np.bincount(folds, minlength=5)
    assert sizes.sum() == labels.size and sizes.max() - sizes.min() <= 1
    for label, count in enumerate([7, 12, 5]):
        per_fold = np.bincount(folds[labels == label], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1 and per_fold.sum() == count


@pytest.mark.parametrize(
    ("count", "folds", "message"),
    [(4, 5, "5 folds need at least 5 validation images"), (10, 2, "at least 3 folds")],
)
def test_too_few_images_or_folds_is_a_clear_error(count, folds, message):
    with pytest.raises(ValueError, match=message):
        stratified_folds(np.zeros(count, dtype=int), folds)


def test_cross_fit_rejects_an_empty_fold():
    fold_of = np.arange(N) % 4
    fold_of[fold_of == 1] = 0
    with pytest.raises(ValueError, match=r"non-empty folds.*\[100, 0, 50, 50\]"):
        cross_fit(MEMBERS, LABELS, fold_of)


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


def test_greedy_picks_the_better_member_twice_when_two_to_one_is_best():
    """Three images of class 0, P(class 0) per member, traced by hand:
    A = [0.6, 0.6, 0.3] (2/3 right), B = [0.35, 0.35, 0.95] (1/3 right).
    Step 1 picks A; step 2 picks A again ((A+B)/2 = [.475, .475, .625] gets 1/3); step 3
    picks B: (2A+B)/3 = [.517, .517, .517] gets 3/3, the best prefix. Step 4's mixtures get
    2/3 ((3A+B)/4) or 1/3 ((2A+2B)/4), so the weights stay 2/3 and 1/3, never uniform."""
    a, b = np.array([0.6, 0.6, 0.3]), np.array([0.35, 0.35, 0.95])
    members = np.stack([np.stack([a, 1 - a], 1), np.stack([b, 1 - b], 1)])
    labels = np.zeros(3, dtype=np.int64)
    for size in (3, 4):
        fitted = greedy_selection(members, labels, size=size)
        np.testing.assert_allclose(fitted.weights, [2 / 3, 1 / 3], atol=1e-12)
    np.testing.assert_allclose(greedy_selection(members, labels, size=2).weights, [1.0, 0.0])


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


def applied(fitted: dict[str, FittedWeights]) -> dict[str, np.ndarray]:
    return {name: combine(MEMBERS, weights) for name, weights in fitted.items()}


def test_best_method_picks_the_best_score():
    fitted = {
        "weak": FittedWeights("weak", [0, 1, 0, 0]),
        "pair": FittedWeights("pair", [0, 0, 0.5, 0.5]),
        "strong": FittedWeights("strong", [1, 0, 0, 0]),
    }
    assert best_method(applied(fitted), LABELS) == "pair"
    # Equal top-1 (both 100%): the lower NLL wins.
    sharper = {**fitted, "sharp pair": FittedWeights("pair", [0, 0, 0.5, 0.5], 0.5)}
    assert best_method(applied(sharper), LABELS) == "sharp pair"
    # A tie in both keeps the earlier one.
    assert best_method(applied({"a": uniform(4), "b": uniform(4)}), LABELS) == "a"


def test_fit_all_returns_every_method_and_best_method_agrees_with_the_scores():
    fitted = fit_all(MEMBERS, LABELS, size=10)
    assert set(fitted) == {"uniform", "greedy", "nll"}
    best = best_method(applied(fitted), LABELS)
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


def test_float32_member_probabilities_are_fitted_and_combined_in_float64():
    """Members' softmax arrives as float32; mixed with float64 weights it must not fail."""
    members = MEMBERS.astype(np.float32)
    fitted = fit_all(members, LABELS, size=3)
    assert fitted["nll"].weights.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(
        combine(members[:2], uniform(2)), (members[0] + members[1]) / 2, atol=1e-6
    )


def test_temperature_is_applied_at_full_precision():
    """p^(1/T) renormalised, by hand; T = 0.3 is not a float32 number, so a float32
    temperature would be off by about 1e-8."""
    probs = np.array([[[0.2, 0.3, 0.5]]])
    expected = probs[0] ** (1 / 0.3) / (probs[0] ** (1 / 0.3)).sum()
    got = combine(probs, FittedWeights("t", [1.0], 0.3))
    np.testing.assert_allclose(got, expected, rtol=1e-13)


def test_the_smallest_legal_sizes_work():
    """One member, one greedy pick, one L-BFGS iteration and three folds are all valid."""
    np.testing.assert_array_equal(uniform(1).weights, [1.0])
    best = greedy_selection(MEMBERS, LABELS, size=1)
    np.testing.assert_array_equal(best.weights, [1.0, 0.0, 0.0, 0.0])  # STRONG, 80%
    one_step = nll_optimal(MEMBERS, LABELS, steps=1)
    assert nll(one_step) < nll(uniform(4))
    assert stratified_folds(np.arange(3), 3).tolist() == [0, 1, 2]
    assert np.bincount(stratified_folds(LABELS)).tolist() == [40] * 5  # 5 folds by default
    assert (
        cross_fit(MEMBERS[:2], LABELS, np.arange(N) % 3, size=1).fold_of.tolist()
        == (np.arange(N) % 3).tolist()
    )


def test_size_reaches_every_greedy_fit_inside_fit_all_and_cross_fit():
    """With one pick, greedy is one member; 25 picks would mix HALF_A and HALF_B."""
    pair = np.stack([HALF_A, HALF_B])
    assert fit_all(pair, LABELS, size=1)["greedy"].weights.tolist() == [1.0, 0.0]
    fit = cross_fit(pair, LABELS, np.arange(N) % 3, size=1)
    assert fit.fitted["greedy"].weights.tolist() == [1.0, 0.0]
    greedy = fit.out_of_fold["greedy"]
    is_a_member = np.isclose(greedy[None], pair, atol=1e-12).all(axis=2).any(axis=0)
    assert is_a_member.all()


def test_cross_fit_records_its_folds_choices_and_a_complete_final():
    fold_of = np.arange(N) % 3
    fit = cross_fit(MEMBERS, LABELS, fold_of, size=5)
    assert fit.fold_of.tolist() == fold_of.tolist()
    assert fit.chosen in {"uniform", "greedy", "nll"}
    assert len(fit.fold_choices) == 3 and set(fit.fold_choices) <= {"uniform", "greedy", "nll"}
    np.testing.assert_allclose(fit.out_of_fold["final"].sum(axis=1), 1.0)


def test_an_overconfident_guesser_gets_the_top_temperature():
    """Always 0.99 on a class that is right a quarter of the time, chance with K = 4: the NLL
    falls all the way to uniform as T grows, so the fit stops at the range's top, 10."""
    correct = np.arange(N) % K == 0
    coin = np.full((N, K), 0.01 / (K - 1))
    coin[np.arange(N), np.where(correct, LABELS, (LABELS + 1) % K)] = 0.99
    assert nll_optimal(coin[None], LABELS).temperature == pytest.approx(TEMPERATURE_RANGE[1])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: uniform(0), "an ensemble needs at least one member; got 0"),
        (lambda: greedy_selection(MEMBERS, LABELS, size=0), "size must be >= 1; got 0"),
        (lambda: nll_optimal(MEMBERS, LABELS, steps=0), "steps must be >= 1; got 0"),
        (lambda: best_method({}, LABELS), "no probabilities to choose from"),
        (lambda: FittedWeights("t", [1.0], 0.0), "temperature must be > 0; got 0.0"),
        (
            lambda: fit_all(MEMBERS, LABELS[:-1]),
            "labels must be [N] with N = 200 to match member_probs [4, 200, 4]; got [199]",
        ),
        (
            lambda: cross_fit(MEMBERS, LABELS, np.zeros(3, dtype=int)),
            "fold_of must be [N] with N = 200; got [3]",
        ),
        (
            lambda: cross_fit(MEMBERS, LABELS, np.arange(N) % 2),
            "need at least 3 non-empty folds 0..F-1; got sizes [100, 100, 0]",
        ),
    ],
)
def test_errors_say_what_is_wrong(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert str(error.value) == message
