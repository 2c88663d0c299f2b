"""What a search will cost, in epochs, before any of it runs.

GPU-hours are what a user pays for, and a search's epochs are known from its options alone:
the trials, each phase's epochs, and ASHA's rungs. ASHA (Li et al. 2020, as Ray implements
it in `ray.tune.schedulers.async_hyperband`) judges a trial at each rung
`grace_period * reduction_factor ** k` below `max_t` and lets the top `1 / reduction_factor`
of the scores recorded there go on. So in expectation every trial runs to the first rung, a
`1 / rf` share of them to the second, `1 / rf ** 2` to the third, and so on up to `max_t`.
The worst case is every trial running to the end: asynchronous ASHA lets the first trial to
reach a rung through, and a run of trials each better than the last all go on, which is what
a search without early stopping costs.

This module needs neither Ray nor torch; `ar-ray tune --plan` prints it and exits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def asha_rungs(grace_period: int, max_t: int, reduction_factor: float) -> tuple[int, ...]:
    """The epochs at which ASHA may stop a trial, ascending: Ray's `_Bracket` milestones
    (one bracket) that lie before `max_t`; a rung at `max_t` stops nothing, the trial has
    finished anyway."""
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    milestones = (grace_period * reduction_factor**k for k in range(count))
    return tuple(int(m) for m in milestones if m < max_t)


@dataclass(frozen=True)
class PhaseBudget:
    """One Ray Tune experiment of a search: `trials` trials of at most `epochs` epochs each,
    judged by ASHA at `rungs` (epochs counted within the phase), or never if `rungs` is
    empty."""

    name: str
    trials: int
    epochs: int
    rungs: tuple[int, ...]
    reduction_factor: float

    @property
    def expected_epochs(self) -> float:
        """Epochs summed over the trials if ASHA keeps exactly its share at every rung."""
        per_trial, start, share = 0.0, 0, 1.0
        for rung in (*self.rungs, self.epochs):
            per_trial += share * (rung - start)
            start, share = rung, share / self.reduction_factor
        return self.trials * per_trial

    @property
    def worst_epochs(self) -> int:
        """Every trial to the end: the cost of this phase without early stopping."""
        return self.trials * self.epochs

    def describe(self) -> str:
        rungs = ", ".join(map(str, self.rungs)) if self.rungs else "none"
        return (
            f"{self.name}: {self.trials} trials x {self.epochs} epochs, ASHA rungs at epoch "
            f"{rungs} (reduction factor {self.reduction_factor:g}): expected "
            f"{self.expected_epochs:,.0f} epochs, at most {self.worst_epochs:,}"
        )


@dataclass(frozen=True)
class SearchPlan:
    """A search's phases and what they add up to, in epochs and, once an epoch has been
    timed, in device-hours."""

    phases: tuple[PhaseBudget, ...]

    @property
    def expected_epochs(self) -> float:
        return sum(phase.expected_epochs for phase in self.phases)

    @property
    def worst_epochs(self) -> int:
        return sum(phase.worst_epochs for phase in self.phases)

    def record(self) -> dict[str, float | int]:
        """The totals as request.yaml keeps them, beside what the run then spent."""
        return {
            "expected_epochs": round(self.expected_epochs, 1),
            "worst_epochs": self.worst_epochs,
        }

    def lines(self) -> list[str]:
        """What `ar-ray tune` prints before Ray starts (and all `--plan` prints)."""
        total = (
            f"plan: expected {self.expected_epochs:,.0f} epochs under ASHA, at most "
            f"{self.worst_epochs:,} (= without early stopping)"
        )
        return [*(f"plan: {phase.describe()}" for phase in self.phases), total]

    def hours_line(self, epoch_seconds: float, gpus: float, cpus: float) -> str:
        """The plan in GPU-hours (CPU-hours on a CPU run) at a measured epoch time: the
        device-hours are epochs x seconds per epoch x devices each trial holds."""
        unit, devices = ("GPU", gpus) if gpus > 0 else ("CPU", cpus)
        per_epoch = epoch_seconds * devices / 3600
        return (
            f"plan: at {epoch_seconds:.1f} s per epoch (measured), expected "
            f"{self.expected_epochs * per_epoch:,.2f} {unit}-hours, at most "
            f"{self.worst_epochs * per_epoch:,.2f}"
        )


def flat_search(trials: int, epochs: int, first_rung: int, reduction_factor: float) -> SearchPlan:
    """One ASHA experiment over every key, its first rung as resolved (`ar_ray.staged`)."""
    rungs = asha_rungs(first_rung, epochs, reduction_factor)
    return SearchPlan((PhaseBudget("search", trials, epochs, rungs, reduction_factor),))


def two_phase_search(
    trials: int,
    stage2_trials: int,
    cut: int,
    epochs: int,
    first_rung: int,
    stage2_first_rung: int,
    reduction_factor: float,
) -> SearchPlan:
    """Phase 1 to the cut (Mean Teacher's start) from the user's grace period; phase 2 over
    the remaining epochs, judged first when the teacher has acted (`ar_ray.staged`)."""
    tail = epochs - cut
    one = asha_rungs(min(first_rung, cut), cut, reduction_factor)
    two = asha_rungs(stage2_first_rung, tail, reduction_factor)
    return SearchPlan(
        (
            PhaseBudget(f"phase 1 (to epoch {cut})", trials, cut, one, reduction_factor),
            PhaseBudget(
                f"phase 2 (epochs {cut + 1}-{epochs})", stage2_trials, tail, two, reduction_factor
            ),
        )
    )
