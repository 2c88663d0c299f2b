"""Weights that turn M members' validation probabilities into one ensemble.

Three ways to fit them, each cheap next to training a member: uniform (no fitting, the
baseline), greedy ensemble selection (Caruana et al. 2004, as in AutoGluon) and weights plus a
temperature fitted to validation NLL.

Validation both fits the weights and picks the method, so a score on the images it was fitted
on flatters it. `cross_fit` scores every method, and the method choice itself, out of fold:
each fold's probabilities come from weights fitted (and a method chosen) on the other folds.
The final weights are refitted on all of validation with the method those scores prefer,
and only where its out-of-fold gain in top-1 over uniform is beyond noise (`choose_method`):
a few hundred validation images flatter a fitted method more often than they reward it.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ar_ray.metrics import (
    PROB_FLOOR,
    check_probs,
    negative_log_likelihood,
    top_k_accuracy,
    top_k_correct,
)
from ar_ray.uncertainty import paired_gain

TEMPERATURE_RANGE = (0.1, 10.0)
"""A small validation set is often classified perfectly by the ensemble; unbounded, the NLL
fit would then drive T towards 0 and make every test prediction one-hot."""


ONE_THREAD_BELOW = 1 << 20
"""Member probabilities (M x N x K values) below which the NLL fit runs on one thread: each of
its hundreds of small ops otherwise pays an OpenMP fork/join, which on a busy machine costs
far more than the arithmetic (measured: 0.2 s on one thread, 1.5-8 s on two, for 4 x 200 x 4
on a loaded 2-core machine). Cross-fitting runs the fit 16 times."""


@contextlib.contextmanager
def _threads_for(elements: int) -> Iterator[None]:
    before = torch.get_num_threads()
    if elements < ONE_THREAD_BELOW:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


def log_combine(
    member_probs: torch.Tensor, weights: torch.Tensor, temperature: torch.Tensor | float
) -> torch.Tensor:
    """[M, N, K] member probabilities -> [N, K] log-probabilities of the ensemble. The one
    formula: `combine` and the NLL fit use it (weights are fitted exactly as they are used),
    and so do the distillation teacher, the student's timing and the exported graph."""
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
        log_probs = log_combine(
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
        log_probs = log_combine(probs_t, theta.softmax(0), tau.clamp(low, high).exp())
        loss = F.nll_loss(log_probs, labels_t)
        loss.backward()
        return loss

    with _threads_for(member_probs.size):
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


def best_member(member_probs: np.ndarray, labels: np.ndarray) -> int:
    """The member a user without the ensemble would keep: best on `labels` (val) by top-1,
    then NLL; a tie keeps the earlier member. Greedy selection's first pick is this one."""
    member_probs, labels = _check_members(member_probs, labels)
    scores = [_score(probs, labels) for probs in member_probs]
    return max(range(len(scores)), key=scores.__getitem__)


def best_method(probs: dict[str, np.ndarray], labels: np.ndarray) -> str:
    """The method whose [N, K] probabilities score best; a tie keeps the earlier (simpler) one."""
    if not probs:
        raise ValueError("no probabilities to choose from")
    scores = {name: _score(p, labels) for name, p in probs.items()}
    return max(scores, key=scores.__getitem__)


@dataclass(frozen=True)
class MethodChoice:
    method: str
    reason: str  # one line, for the closing lines of `ensemble` and the report


def choose_method(probs: dict[str, np.ndarray], labels: np.ndarray) -> MethodChoice:
    """The best-scoring method (`best_method`), kept only where its gain in top-1 over
    uniform has a paired-bootstrap 95% interval above zero; otherwise uniform, which fits
    nothing and so cannot have overfitted. `probs` must be scores the weights never saw."""
    best = best_method(probs, labels)
    if best == "uniform":
        return MethodChoice("uniform", "uniform scores best out of fold")
    gain = paired_gain(
        top_k_correct(probs[best], labels, 1), top_k_correct(probs["uniform"], labels, 1)
    )
    if gain.above_zero:
        return MethodChoice(best, f"{best} beats uniform out of fold by {gain}")
    return MethodChoice(
        "uniform", f"uniform: {best}'s out-of-fold gain over it, {gain}, is within noise"
    )


def stratified_folds(labels: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """The fold (0..folds-1) of each image: classes shuffled within, then dealt round-robin,
    so every fold holds each class in proportion and fold sizes differ by at most one."""
    labels = np.asarray(labels)
    if folds < 3:  # choosing the method inside a fold needs two folds left to cross-fit on
        raise ValueError(f"cross-fitting needs at least 3 folds; got {folds}")
    if labels.size < folds:
        raise ValueError(
            f"{folds} folds need at least {folds} validation images (one per fold); "
            f"got {labels.size}"
        )
    order = np.random.default_rng(seed).permutation(labels.size)
    order = order[np.argsort(labels[order], kind="stable")]
    fold_of = np.empty(labels.size, dtype=np.int64)
    fold_of[order] = np.arange(labels.size) % folds
    return fold_of


@dataclass(frozen=True)
class CrossFit:
    """Every method refitted on all of validation, and validation scored out of fold."""

    fitted: dict[str, FittedWeights]  # each method, fitted on all of validation
    chosen: str  # `choose_method` on the out-of-fold scores
    reason: str  # why it was chosen
    out_of_fold: dict[str, np.ndarray]  # each method and "final" -> [N, K]
    fold_of: np.ndarray  # [N] the fold of each validation image
    fold_choices: tuple[str, ...]  # the method "final" used in each fold


def cross_fit(
    member_probs: np.ndarray, labels: np.ndarray, fold_of: np.ndarray, size: int = 25
) -> CrossFit:
    """Weights and method choice, with scores none of them saw.

    "final" is cross-fitted as the whole procedure: for fold k, the method is chosen by its
    out-of-fold score over the other folds (weights fitted without fold k and that fold), and
    fold k is scored with that method's weights fitted on all folds but k. The choice is
    `choose_method` at both levels, so "final" scores the rule that picks the weights. Both
    levels reuse the same folds (`fold_of`, e.g. from `stratified_folds`), so this costs one
    fit per fold and one per pair of folds.
    """
    member_probs, labels = _check_members(member_probs, labels)
    folds = _check_folds(fold_of, labels.size)

    def fit_without(*excluded: int) -> dict[str, FittedWeights]:
        keep = ~np.isin(fold_of, excluded)
        return fit_all(member_probs[:, keep], labels[keep], size)

    single = {k: fit_without(k) for k in range(folds)}
    pairs = {frozenset(p): fit_without(*p) for p in itertools.combinations(range(folds), 2)}
    out_of_fold = _out_of_fold(member_probs, fold_of, single)
    fold_choices = []
    final = np.empty_like(out_of_fold["uniform"])
    for k in range(folds):
        inner = fold_of != k
        inner_fits = {j: pairs[frozenset((k, j))] for j in range(folds) if j != k}
        inner_probs = _out_of_fold(member_probs[:, inner], fold_of[inner], inner_fits)
        method = choose_method(inner_probs, labels[inner]).method
        fold_choices.append(method)
        final[fold_of == k] = out_of_fold[method][fold_of == k]
    choice = choose_method(out_of_fold, labels)
    return CrossFit(
        fitted=fit_all(member_probs, labels, size),
        chosen=choice.method,
        reason=choice.reason,
        out_of_fold={**out_of_fold, "final": final},
        fold_of=fold_of,
        fold_choices=tuple(fold_choices),
    )


def _check_folds(fold_of: np.ndarray, count: int) -> int:
    """The number of folds; each must hold an image, or some weights are fitted on nothing."""
    fold_of = np.asarray(fold_of)
    if fold_of.shape != (count,):
        raise ValueError(f"fold_of must be [N] with N = {count}; got {list(fold_of.shape)}")
    sizes = np.bincount(fold_of, minlength=3) if fold_of.size else np.zeros(3, dtype=np.int64)
    if sizes.size < 3 or (sizes == 0).any():
        raise ValueError(f"need at least 3 non-empty folds 0..F-1; got sizes {sizes.tolist()}")
    return int(sizes.size)


def _out_of_fold(
    member_probs: np.ndarray, fold_of: np.ndarray, fits: dict[int, dict[str, FittedWeights]]
) -> dict[str, np.ndarray]:
    """Each method's [N, K] probabilities, every fold's rows combined with the weights
    `fits[fold]`, which were fitted without that fold."""
    methods = next(iter(fits.values()))
    out = {method: np.empty(member_probs.shape[1:]) for method in methods}
    for fold, fitted in fits.items():
        rows = fold_of == fold
        for method, weights in fitted.items():
            out[method][rows] = combine(member_probs[:, rows], weights)
    return out
