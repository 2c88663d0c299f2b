"""How different the members are, measured on val: an ensemble gains only where they differ.

Members that make the same mistakes add nothing to their average, however good each is.
Both measures use the members' own val probabilities, which no weight was fitted on, so they
need no cross-fitting.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ar_ray.metrics import top_k_correct

DIVERSITY_COLUMNS = ["disagreement", "error_correlation"]


def member_diversity(member_probs: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """One row per member, in order:

    - `disagreement`: the share of val images on which the member's top-1 differs from the
      top-1 of the uniform average of the other members;
    - `error_correlation`: the mean over the other members of the Pearson correlation
      between the two members' errors (1 where wrong) across val images. Near 1, the two
      fail on the same images. A pair where either is never (or always) wrong has none and
      is left out of the mean; NaN if no pair has one.

    Both are NaN for a lone member: there is nobody to differ from.
    """
    member_probs = np.asarray(member_probs, dtype=np.float64)
    count = member_probs.shape[0]
    if count < 2:
        return pd.DataFrame({column: [np.nan] * count for column in DIVERSITY_COLUMNS})
    predicted = member_probs.argmax(axis=2)
    total = member_probs.sum(axis=0)
    rest = [((total - probs) / (count - 1)).argmax(axis=1) for probs in member_probs]
    errors = np.array([~top_k_correct(probs, labels, 1) for probs in member_probs], dtype=float)
    return pd.DataFrame(
        {
            "disagreement": [float((predicted[m] != rest[m]).mean()) for m in range(count)],
            "error_correlation": [_mean_correlation(errors, m) for m in range(count)],
        }
    )


def _mean_correlation(errors: np.ndarray, member: int) -> float:
    """Over the other members whose correlation with this one is defined."""
    others = [other for other in range(errors.shape[0]) if other != member]
    correlations = [_pearson(errors[member], errors[other]) for other in others]
    defined = [value for value in correlations if not np.isnan(value)]
    return float(np.mean(defined)) if defined else float("nan")


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """NaN (not numpy's divide warning) where a side is constant: no correlation is defined."""
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])
