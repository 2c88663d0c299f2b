"""Weights that turn M members' validation probabilities into one ensemble.

Three ways to fit them, each cheap next to training a member: uniform (no fitting, the
baseline), greedy ensemble selection (Caruana et al. 2004, as in AutoGluon) and weights plus a
temperature fitted to validation NLL. `choose` keeps whichever scores best on validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ar_ray.metrics import PROB_FLOOR, check_probs, negative_log_likelihood, top_k_accuracy

TEMPERATURE_RANGE = (0.1, 10.0)
"""A small validation set is often classified perfectly by the ensemble; unbounded, the NLL
fit would then drive T towards 0 and make every test prediction one-hot."""


@dataclass(frozen=True)
class FittedWeights:
    method: str
    weights: np.ndarray  # [M], >= 0, sums to 1
    temperature: float = 1.0

    def __post_init__(self) -> None:
        """Reject bad weights here, once, rather than as odd probabilities downstream."""
        weights = np.array(self.weights, dtype=np.float64)
        if weights.ndim != 1 or weights.size == 0:
            raise ValueError(f"weights must be a non-empty [M] vector; got {list(weights.shape)}")
        if (weights < 0).any() or not math.isclose(weights.sum(), 1.0, abs_tol=1e-9):
            raise ValueError(f"weights must be >= 0 and sum to 1; got {weights.tolist()}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature}")
        weights.flags.writeable = False
        object.__setattr__(self, "weights", weights)


Score = tuple[float, float]


def _score(probs: np.ndarray, labels: np.ndarray) -> Score:
    """Higher is better: top-1 first, then NLL, which also separates equally accurate ensembles."""
    return top_k_accuracy(probs, labels, 1), -negative_log_likelihood(probs, labels)


def _check_members(member_probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    member_probs = np.asarray(member_probs, dtype=np.float64)
    labels = np.asarray(labels)
    if member_probs.ndim != 3 or member_probs.shape[0] == 0:
        raise ValueError(
            f"member_probs must be [M, N, K] with M >= 1; got {list(member_probs.shape)}"
        )
    if labels.ndim != 1 or labels.shape[0] != member_probs.shape[1]:
        raise ValueError(
            f"labels must be [N] with N = {member_probs.shape[1]} to match member_probs "
            f"{list(member_probs.shape)}; got {list(labels.shape)}"
        )
    return member_probs, check_probs(member_probs[0], labels)[1]


def _log_combine(
    member_probs: torch.Tensor, weights: torch.Tensor, temperature: torch.Tensor
) -> torch.Tensor:
    """Shared by `combine` and the NLL fit, so weights are fitted exactly as they are used."""
    mixed = torch.tensordot(weights, member_probs, dims=1)
    return torch.log_softmax(torch.log(mixed.clamp_min(PROB_FLOOR)) / temperature, dim=-1)


def combine(member_probs: np.ndarray, fitted: FittedWeights) -> np.ndarray:
    """[M, N, K] member probabilities -> [N, K]: the weighted mean, then softened or sharpened
    by the temperature, which moves confidence without changing any prediction."""
    member_probs = np.asarray(member_probs, dtype=np.float64)
    if member_probs.ndim != 3 or member_probs.shape[0] != fitted.weights.shape[0]:
        raise ValueError(
            f"member_probs must be [M, N, K] with M = {fitted.weights.shape[0]} "
            f"({fitted.method} weights); got {list(member_probs.shape)}"
        )
    with torch.no_grad():
        log_probs = _log_combine(
            torch.from_numpy(member_probs),
            torch.from_numpy(fitted.weights.copy()),  # torch wants a writable array
            torch.tensor(fitted.temperature, dtype=torch.float64),
        )
    return log_probs.exp().numpy()


def uniform(member_count: int) -> FittedWeights:
    if member_count < 1:
        raise ValueError(f"an ensemble needs at least one member; got {member_count}")
    return FittedWeights("uniform", np.full(member_count, 1.0 / member_count))


def greedy_selection(member_probs: np.ndarray, labels: np.ndarray, size: int = 25) -> FittedWeights:
    """Ensemble selection with replacement: picking a member again raises its weight.

    The best prefix over all steps is kept, not the last, so the result never scores below
    the first pick, which is the best single member. Ties go to the lower member index.
    """
    member_probs, labels = _check_members(member_probs, labels)
    if size < 1:
        raise ValueError(f"size must be >= 1; got {size}")
    counts = np.zeros(member_probs.shape[0], dtype=np.int64)
    total = np.zeros(member_probs.shape[1:])
    best_counts, best_score = counts, None
    for step in range(1, size + 1):
        scores = [_score((total + member) / step, labels) for member in member_probs]
        pick = max(range(len(scores)), key=scores.__getitem__)
        counts[pick] += 1
        total += member_probs[pick]
        if best_score is None or scores[pick] > best_score:
            best_counts, best_score = counts.copy(), scores[pick]
    return FittedWeights("greedy", best_counts / best_counts.sum())


def nll_optimal(member_probs: np.ndarray, labels: np.ndarray, steps: int = 200) -> FittedWeights:
    """Weights softmax(theta) and temperature exp(tau) minimising validation NLL.

    The search starts from uniform weights at T = 1 and L-BFGS with a strong-Wolfe line
    search only accepts steps that lower the loss, so the result is never worse than uniform.
    """
    member_probs, labels = _check_members(member_probs, labels)
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    probs_t, labels_t = torch.from_numpy(member_probs), torch.from_numpy(labels)
    theta = torch.zeros(member_probs.shape[0], dtype=torch.float64, requires_grad=True)
    tau = torch.zeros((), dtype=torch.float64, requires_grad=True)
    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    optimizer = torch.optim.LBFGS([theta, tau], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        log_probs = _log_combine(probs_t, theta.softmax(0), tau.clamp(low, high).exp())
        loss = F.nll_loss(log_probs, labels_t)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        weights, temperature = theta.softmax(0).numpy(), float(tau.clamp(low, high).exp())
    return FittedWeights("nll", weights, temperature)


def fit_all(
    member_probs: np.ndarray, labels: np.ndarray, size: int = 25
) -> dict[str, FittedWeights]:
    member_probs, labels = _check_members(member_probs, labels)
    return {
        "uniform": uniform(member_probs.shape[0]),
        "greedy": greedy_selection(member_probs, labels, size),
        "nll": nll_optimal(member_probs, labels),
    }


def choose(fitted: dict[str, FittedWeights], member_probs: np.ndarray, labels: np.ndarray) -> str:
    """The method that scores best on validation; a tie keeps the earlier (simpler) one."""
    if not fitted:
        raise ValueError("no fitted weights to choose from")
    member_probs, labels = _check_members(member_probs, labels)
    scores = {name: _score(combine(member_probs, w), labels) for name, w in fitted.items()}
    return max(scores, key=scores.__getitem__)
