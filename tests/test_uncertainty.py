"""The paired bootstrap's interval, against the normal approximation and cases with one answer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ar_ray.uncertainty import Gain, paired_gain


def pairs(plus: int, minus: int, both: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """Images where only a is right (`plus`), only b (`minus`), both, and neither; shuffled."""
    a = np.repeat([1, 0, 1, 0], [plus, minus, both, neither]).astype(bool)
    b = np.repeat([0, 1, 1, 0], [plus, minus, both, neither]).astype(bool)
    order = np.random.default_rng(0).permutation(a.size)
    return a[order], b[order]


@pytest.mark.parametrize(("plus", "minus"), [(300, 200), (700, 100)])
def test_the_interval_matches_the_normal_approximation_on_many_images(plus, minus):
    n = 2000
    a, b = pairs(plus=plus, minus=minus, both=1000, neither=n - 1000 - plus - minus)
    gain = paired_gain(a, b)
    mean = (plus - minus) / n  # +5 and +30 points
    # var of the per-image difference: E[d^2] - mean^2
    half_width = 100 * 1.96 * math.sqrt(((plus + minus) / n - mean**2) / n)
    assert gain.points == pytest.approx(100 * mean)
    assert gain.low == pytest.approx(100 * mean - half_width, abs=0.15)
    assert gain.high == pytest.approx(100 * mean + half_width, abs=0.15)
    assert gain.above_zero and str(gain).startswith(f"{100 * mean:+.2f} points [+")


def test_pairing_cancels_what_both_get_right():
    """Two models right on the same 1,000 of 2,000 images but for 20: the paired interval
    is the width of those 20 disagreements, not of two independent 50% accuracies."""
    gain = paired_gain(*pairs(plus=15, minus=5, both=990, neither=990))
    assert gain.points == pytest.approx(0.5)
    paired_width = 2 * 100 * 1.96 * math.sqrt((20 / 2000 - 0.005**2) / 2000)  # 0.88 points
    unpaired_width = 2 * 100 * 1.96 * math.sqrt(2 * 0.25 / 2000)  # 6.2 points
    assert gain.high - gain.low == pytest.approx(paired_width, abs=0.15)
    assert gain.high - gain.low < unpaired_width / 4


def test_a_small_gain_on_few_images_is_not_above_zero():
    gain = paired_gain(*pairs(plus=3, minus=0, both=150, neither=47))
    assert gain.points == pytest.approx(1.5)
    assert gain.low <= 0 < gain.high and not gain.above_zero


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [([1, 0, 1], [1, 0, 1], Gain(0.0, 0.0, 0.0)), ([1, 1], [0, 0], Gain(100.0, 100.0, 100.0))],
)
def test_a_difference_the_same_on_every_image_has_no_spread(a, b, expected):
    assert paired_gain(np.array(a), np.array(b)) == expected


def test_the_seed_fixes_the_resamples():
    a, b = pairs(plus=300, minus=200, both=1000, neither=500)
    assert paired_gain(a, b, seed=3) == paired_gain(a, b, seed=3)
    assert paired_gain(a, b, seed=3) != paired_gain(a, b, seed=4)


@pytest.mark.parametrize(("a", "b"), [([1, 0], [1]), ([], []), ([[1]], [[1]])])
def test_unpaired_or_empty_input_is_rejected(a, b):
    with pytest.raises(ValueError, match="same N > 0 images"):
        paired_gain(np.array(a), np.array(b))
