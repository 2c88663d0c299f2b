"""Accuracy, NLL and calibration against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ar_ray.metrics import (
    RELIABILITY_COLUMNS,
    classification_metrics,
    expected_calibration_error,
    reliability_table,
    top_k_accuracy,
)

# Row 0 right (0.7), row 1 wrong with the label ranked last (0.1), row 2 right (0.5).
PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3]])
LABELS = np.array([0, 0, 1])


def two_class(confidence: float, right: int, wrong: int) -> tuple[np.ndarray, np.ndarray]:
    """`right + wrong` rows predicting class 0 with `confidence`; `right` of them labelled 0."""
    probs = np.tile([confidence, 1 - confidence], (right + wrong, 1))
    return probs, np.array([0] * right + [1] * wrong)


def stack(*parts: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([p for p, _ in parts]), np.concatenate([y for _, y in parts])


def test_accuracy_and_nll_on_a_hand_made_example():
    got = classification_metrics(PROBS, LABELS)
    assert got["top1"] == pytest.approx(2 / 3)
    assert top_k_accuracy(PROBS, LABELS, 2) == pytest.approx(2 / 3)
    assert got["top5"] == 1.0  # top-5 of 3 classes is top-3
    assert got["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.1) + math.log(0.5)) / 3)


def test_a_tie_goes_to_the_lower_class_like_argmax():
    probs = np.array([[0.4, 0.4, 0.2]])
    assert top_k_accuracy(probs, np.array([0]), 1) == 1.0
    assert top_k_accuracy(probs, np.array([1]), 1) == 0.0
    assert top_k_accuracy(probs, np.array([1]), 2) == 1.0


def test_nll_of_a_zero_probability_is_finite():
    nll = classification_metrics(np.array([[1.0, 0.0]]), np.array([1]))["nll"]
    assert nll == pytest.approx(-math.log(1e-12))


def test_ece_is_zero_when_confidence_matches_accuracy():
    probs, labels = stack(two_class(0.8, right=8, wrong=2), two_class(0.6, right=3, wrong=2))
    assert classification_metrics(probs, labels, bins=10)["ece"] == pytest.approx(0.0, abs=1e-12)


def test_ece_of_a_miscalibrated_case_matches_hand_computation():
    # 4 rows at 0.85 with half right (gap 0.35), 6 rows at 0.65 all right (gap 0.35).
    probs, labels = stack(two_class(0.85, right=2, wrong=2), two_class(0.65, right=6, wrong=0))
    assert classification_metrics(probs, labels, bins=10)["ece"] == pytest.approx(0.35)
    # One bin pools them: mean confidence 0.73, accuracy 0.8.
    assert classification_metrics(probs, labels, bins=1)["ece"] == pytest.approx(0.07)


def test_reliability_table_has_one_row_per_non_empty_bin_and_counts_every_sample():
    probs, labels = stack(two_class(0.85, right=2, wrong=2), two_class(0.65, right=6, wrong=0))
    table = reliability_table(probs, labels, bins=10)
    assert list(table.columns) == RELIABILITY_COLUMNS
    assert table["count"].tolist() == [6, 4]
    assert table["bin_lower"].tolist() == pytest.approx([0.6, 0.8])
    assert table["accuracy"].tolist() == pytest.approx([1.0, 0.5])
    assert expected_calibration_error(table) == pytest.approx(0.35)


def test_reliability_counts_sum_to_n_and_full_confidence_lands_in_the_top_bin():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=300)
    probs[0] = [1.0, 0, 0, 0, 0]
    labels = rng.integers(0, 5, 300)
    table = reliability_table(probs, labels)
    assert table["count"].sum() == 300
    assert table["bin_upper"].iloc[-1] == 1.0
    assert (table["confidence"] > table["bin_lower"]).all()
    assert (table["confidence"] <= table["bin_upper"]).all()


@pytest.mark.parametrize(
    ("probs", "labels"),
    [(PROBS, LABELS[:2]), (PROBS[0], LABELS), (PROBS, np.array([0, 1, 3]))],
)
def test_bad_shapes_or_labels_raise(probs, labels):
    with pytest.raises(ValueError, match="labels|probs"):
        classification_metrics(probs, labels)


def test_top1_and_top5_count_only_their_own_ranks():
    # 7 classes; the labels rank 1st, 2nd and 6th: top-1 1/3, top-2 2/3, top-5 2/3, top-6 1.
    probs = np.tile([0.3, 0.25, 0.15, 0.1, 0.08, 0.07, 0.05], (3, 1))
    got = classification_metrics(probs, np.array([0, 1, 5]))
    assert got["top1"] == pytest.approx(1 / 3)
    assert got["top5"] == pytest.approx(2 / 3)


def test_fifteen_bins_by_default():
    # Confidences 0.934 (right) and 0.938 (wrong) share the top bin (14/15, 1] of 15, so the
    # ECE is |0.936 - 0.5| = 0.436; 16 bins would split them at 15/16 = 0.9375.
    probs, labels = stack(two_class(0.934, right=1, wrong=0), two_class(0.938, right=0, wrong=1))
    assert classification_metrics(probs, labels)["ece"] == pytest.approx(0.436)
    table = reliability_table(probs, labels)
    assert table["bin_lower"].tolist() == pytest.approx([14 / 15])


def test_reliability_accuracy_is_per_row_argmax():
    # PROBS' confidences 0.5, 0.6, 0.7 fall in three bins of 10; rows 0 and 2 are right.
    table = reliability_table(PROBS, LABELS, bins=10)
    assert table["confidence"].tolist() == pytest.approx([0.5, 0.6, 0.7])
    assert table["accuracy"].tolist() == [1.0, 0.0, 1.0]


def test_half_precision_probabilities_still_meet_the_floor():
    """Scored in float64: in float16, 1e-12 would round to 0 and a zero make the NLL inf."""
    probs = np.array([[1.0, 0.0]], dtype=np.float16)
    assert classification_metrics(probs, np.array([1]))["nll"] == pytest.approx(-math.log(1e-12))


@pytest.mark.parametrize(
    ("probs", "labels", "bins", "message"),
    [
        (np.zeros((0, 3)), np.zeros(0, dtype=np.int64), 15, "no samples to score (N == 0)"),
        (PROBS, LABELS, 0, "bins must be >= 1; got 0"),
    ],
)
def test_empty_input_and_zero_bins_raise_with_their_message(probs, labels, bins, message):
    with pytest.raises(ValueError) as error:
        reliability_table(probs, labels, bins)
    assert str(error.value) == message
