"""The rows a person reads: each image's predicted class, top-5 and their probabilities.

One writer for `ensemble`'s predictions.csv and `predict`'s output, so the two read alike.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ar_ray.data import CLASS_SEPARATOR

TOP_K = 5


def top_k(probs: np.ndarray, k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """The k most probable classes of each row [N, K] (all, with fewer than k classes), most
    probable first, and their probabilities: what every answer lists."""
    order = np.argsort(-probs, axis=1)[:, :k]
    return order, np.take_along_axis(probs, order, axis=1)


def predictions_frame(
    probs: np.ndarray, ids: list[str], classes: list[str], labels: np.ndarray | None = None
) -> pd.DataFrame:
    """One row per image: predicted class, top-5 classes, confidence, the label where known."""
    frame = top_k_frame(ids, *top_k(probs), classes)
    if labels is not None:
        frame["label"] = [classes[i] for i in labels.tolist()]
    return frame


def top_k_frame(
    ids: list[str], top_classes: np.ndarray, top_probs: np.ndarray, classes: list[str]
) -> pd.DataFrame:
    """Rows from top-k class indices [N, k] and their probabilities; index -1 (an image that
    was not predicted) gives empty fields."""

    def names(row: np.ndarray) -> list[str]:
        return [classes[i] for i in row if i >= 0]

    return pd.DataFrame(
        {
            "image_id": ids,
            "predicted": [(names(row) or [""])[0] for row in top_classes],
            "top5": [CLASS_SEPARATOR.join(names(row)) for row in top_classes],
            "confidence": top_probs[:, 0],
            "top5_probs": [
                " ".join(f"{p:.4f}" for p, i in zip(row, idx, strict=True) if i >= 0)
                for row, idx in zip(top_probs, top_classes, strict=True)
            ],
        }
    )
