"""Members' diversity on a hand-built val set whose disagreements and errors are counted by hand."""

from __future__ import annotations

import numpy as np
import pytest

from ar_ray.diversity import DIVERSITY_COLUMNS, member_diversity

LABELS = np.array([0, 1, 2, 3, 0, 1])
PREDICTED = {  # member: (its top-1 per image, its probability on it; 4 classes)
    "a": ([0, 1, 2, 3, 0, 1], 0.7),  # always right
    "b": ([0, 1, 2, 3, 1, 2], 0.65),  # wrong on images 4, 5
    "c": ([0, 1, 3, 0, 1, 2], 0.6),  # wrong on images 2-5
}


def probs(predicted: list[int], confidence: float) -> np.ndarray:
    out = np.full((len(predicted), 4), (1 - confidence) / 3)
    out[np.arange(len(predicted)), predicted] = confidence
    return out


MEMBERS = np.stack([probs(*PREDICTED[m]) for m in "abc"])


def test_disagreement_is_the_share_of_images_where_the_rest_votes_otherwise():
    # The others' average, by hand (the more confident side wins a split):
    #   without a: b+c -> 0 1 2 3 1 2, a differs on 4, 5 -> 2/6
    #   without b: a+c -> 0 1 2 3 0 1, b differs on 4, 5 -> 2/6
    #   without c: a+b -> 0 1 2 3 0 1, c differs on 2, 3, 4, 5 -> 4/6
    table = member_diversity(MEMBERS, LABELS)
    assert list(table.columns) == DIVERSITY_COLUMNS
    assert table["disagreement"].tolist() == pytest.approx([2 / 6, 2 / 6, 4 / 6])


def test_error_correlation_averages_the_pairs_that_have_one():
    # errors: a 000000 (never wrong: no correlation), b 000011, c 001111.
    # corr(b, c): E[bc] - E[b]E[c] = 2/6 - 2/9 = 1/9; var b = var c = 2/9 -> 0.5
    table = member_diversity(MEMBERS, LABELS)
    assert np.isnan(table["error_correlation"][0])
    assert table["error_correlation"][1:].tolist() == pytest.approx([0.5, 0.5])


def test_identical_members_disagree_nowhere_and_fail_together():
    wrong_half = probs([0, 1, 2, 0, 1, 2], 0.7)  # wrong on 3, 4, 5
    table = member_diversity(np.stack([wrong_half, wrong_half]), LABELS)
    assert table["disagreement"].tolist() == [0.0, 0.0]
    assert table["error_correlation"].tolist() == pytest.approx([1.0, 1.0])


def test_a_lone_member_has_nobody_to_differ_from():
    table = member_diversity(MEMBERS[:1], LABELS)
    assert len(table) == 1 and table.isna().all(axis=None)
