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
