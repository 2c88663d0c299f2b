"""Accuracy and calibration of predicted class probabilities.

Members and ensembles are all judged here, from their probabilities alone, so a number in
the report means the same thing whichever model produced it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

PROB_FLOOR = 1e-12
"""log(0) is -inf; one confidently wrong prediction would otherwise make the mean NLL infinite."""

RELIABILITY_COLUMNS = ["bin_lower", "bin_upper", "confidence", "accuracy", "count"]


def check_probs(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fail with the shapes in the message, before a broadcast hides the mismatch."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if probs.ndim != 2 or labels.ndim != 1 or probs.shape[0] != labels.shape[0]:
        raise ValueError(
            f"probs must be [N, K] and labels [N]; got {list(probs.shape)} and {list(labels.shape)}"
        )
    if probs.shape[0] == 0:
        raise ValueError("no samples to score (N == 0)")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(
            f"labels must lie in [0, {probs.shape[1]}); got {labels.min()}..{labels.max()}"
        )
    return probs, labels.astype(np.int64)


def top_k_correct(probs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """[N] booleans, the true class within the top k: rank it by counting the classes ahead
    of it, O(N K) with no sort. Greedy ensemble selection calls this hundreds of times on the
    whole validation set. A tie goes to the lower class index, as in argmax, so top-1 agrees
    with the predictions."""
    probs, labels = check_probs(probs, labels)
    true_prob = probs[np.arange(labels.shape[0]), labels][:, None]
    lower_index = np.arange(probs.shape[1]) < labels[:, None]
    ahead = (probs > true_prob) | ((probs == true_prob) & lower_index)
    return ahead.sum(axis=1) < k


def top_k_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    return float(top_k_correct(probs, labels, k).mean())


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray) -> float:
    probs, labels = check_probs(probs, labels)
    true_class = probs[np.arange(labels.shape[0]), labels]
    return float(-np.log(np.clip(true_class, PROB_FLOOR, None)).mean())


def reliability_table(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> pd.DataFrame:
    """Mean confidence and accuracy per equal-width confidence bin (Guo et al. 2017).

    Bins are right-closed, (lower, upper], so a confidence of exactly 1 lands in the top bin.
    Empty bins are dropped: they carry no weight in the ECE and no point on the diagram.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1; got {bins}")
    probs, labels = check_probs(probs, labels)
    confidence = probs.max(axis=1)
    correct = np.argmax(probs, axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.searchsorted(edges[1:-1], confidence, side="left")
    rows = [
        {
            "bin_lower": edges[b],
            "bin_upper": edges[b + 1],
            "confidence": float(confidence[index == b].mean()),
            "accuracy": float(correct[index == b].mean()),
            "count": int((index == b).sum()),
        }
        for b in np.unique(index)
    ]
    return pd.DataFrame(rows, columns=RELIABILITY_COLUMNS)


def expected_calibration_error(table: pd.DataFrame) -> float:
    """Count-weighted gap between confidence and accuracy, from a `reliability_table`."""
    weights = table["count"] / table["count"].sum()
    return float((weights * (table["accuracy"] - table["confidence"]).abs()).sum())


def classification_metrics(
    probs: np.ndarray, labels: np.ndarray, bins: int = 15
) -> dict[str, float]:
    """The four numbers every member and ensemble is reported with."""
    return {
        "top1": top_k_accuracy(probs, labels, 1),
        "top5": top_k_accuracy(probs, labels, 5),
        "nll": negative_log_likelihood(probs, labels),
        "ece": expected_calibration_error(reliability_table(probs, labels, bins)),
    }
