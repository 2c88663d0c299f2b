"""ASHA's first rung: no trial is judged before every searched staged parameter has acted.

ASHA compares trials at rungs (the grace period, then times the reduction factor). A
parameter that only acts from a later epoch would otherwise be judged on scores it never
influenced, and TPE would learn it from noise. Mean Teacher is the staged stage today.

Epochs below are Tune's `epoch`, which counts finished epochs (1-based). The engine
(`recipe/engine.py`, `train_epoch`) creates the teacher at the start of the 0-based epoch
index `mt_start_epoch`, i.e. during reported epoch `mt_start_epoch + 1`; from then on val is
scored on the teacher. Its loss weight ramps up with the epoch progress since that start and
reaches full weight after `mt_rampup_epochs`, at the end of reported epoch
`mt_start_epoch + ceil(mt_rampup_epochs)`. With no ramp-up that sum is `mt_start_epoch`, an
epoch the teacher has not run yet: it must have trained for at least one full epoch, hence
`mt_start_epoch + max(1, ceil(mt_rampup_epochs))`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ar_ray.config import ConfigError, RecipeConfig
from ar_ray.search_space import SearchSpace

MEAN_TEACHER_PREFIX = "mt_"


@dataclass(frozen=True)
class FirstRung:
    epoch: int  # ASHA's grace period in effect
    raised_for: tuple[str, ...] = ()  # the searched staged keys that raised it


def mean_teacher_keys(space: SearchSpace) -> tuple[str, ...]:
    """The searched keys that act only once Mean Teacher runs."""
    return tuple(key for key in space.searched if key.startswith(MEAN_TEACHER_PREFIX))


def _upper(space: SearchSpace, base: RecipeConfig, key: str) -> float:
    """The latest value a trial may get: the upper end of a searched range."""
    domain = space.searched.get(key)
    return getattr(base, key) if domain is None else max(domain.values)


def mean_teacher_acts_by(space: SearchSpace, base: RecipeConfig) -> int:
    """The first epoch at which every trial's Mean Teacher has run at full weight."""
    start = int(_upper(space, base, "mt_start_epoch"))
    rampup = _upper(space, base, "mt_rampup_epochs")
    return start + max(1, math.ceil(rampup))


def first_rung(space: SearchSpace, base: RecipeConfig, grace_period: int) -> FirstRung:
    """`grace_period` (capped by the epochs), raised to when Mean Teacher has acted if any
    `mt_*` key is searched; a searched key that can never act is a one-line error."""
    epochs = base.epochs
    searched = mean_teacher_keys(space)
    requested = min(grace_period, epochs)
    if not searched:
        return FirstRung(requested)
    if "mt_weight" not in space.searched and not base.mean_teacher:
        raise ConfigError(
            f"{space.source}: {searched[0]} is searched but mt_weight is 0: Mean Teacher never runs"
        )
    start = int(_upper(space, base, "mt_start_epoch"))
    if start + 1 > epochs:
        raise ConfigError(
            f"{space.source}: mt_start_epoch={start} leaves Mean Teacher no epoch of the "
            f"{epochs} to act in, so the searched {searched[0]} is never judged"
        )
    needed = min(mean_teacher_acts_by(space, base), epochs)
    if needed <= requested:
        return FirstRung(requested)
    return FirstRung(needed, searched)


def describe(rung: FirstRung, grace_period: int) -> str:
    """The line printed when the grace period was raised."""
    keys = ", ".join(rung.raised_for)
    return (
        f"ASHA's first rung is epoch {rung.epoch}, not {grace_period}: the searched {keys} "
        "act only once Mean Teacher has run (mt_start_epoch + ramp-up)"
    )


STAGED_MODES = ("auto", "off")


@dataclass(frozen=True)
class Stages:
    """A two-phase search. Phase 1 searches every key but the Mean Teacher ones and trains
    each trial on the full schedule, cut at `cut` (`mt_start_epoch`: the teacher has not
    started, so its keys cannot matter). Phase 2 resumes the best stage-one checkpoints
    there and searches `stage_two_keys`; its ASHA judges first at `first_rung` epochs after
    the cut, when every trial's teacher has run at full weight."""

    cut: int
    stage_two_keys: tuple[str, ...]
    first_rung: int


@dataclass(frozen=True)
class Staging:
    stages: Stages | None  # None: one flat search
    reason: str  # why, one line (printed when auto falls back to a flat search)


def staging(space: SearchSpace, base: RecipeConfig, mode: str) -> Staging:
    """Two phases whenever `mt_*` keys are searched and Mean Teacher starts after epoch 0
    (`mode` "auto"), unless a phase-2 trial could not be its own run resumed at the cut."""
    keys = mean_teacher_keys(space)
    if mode == "off":
        return Staging(None, "--staged-search off")
    if not keys:
        return Staging(None, "no mt_* key is searched")
    if "mt_start_epoch" in space.searched:
        return Staging(None, "mt_start_epoch is searched: stage one has no single end")
    weight = space.searched.get("mt_weight")
    if weight is not None and weight.kind == "choice" and min(weight.values) <= 0:
        # mt_weight 0 switches Mean Teacher off, which changes stage one (`views_per_image`);
        # a range starting at 0 draws exactly 0 with probability 0
        return Staging(None, "mt_weight may be 0, which changes stage one too")
    cut = base.mt_start_epoch
    if not 0 < cut < base.epochs:
        return Staging(None, f"Mean Teacher starts at epoch {cut} of {base.epochs}")
    rung = min(mean_teacher_acts_by(space, base), base.epochs) - cut
    return Staging(Stages(cut, keys, rung), f"Mean Teacher starts at epoch {cut}")


def stage_one_base(space: SearchSpace, base: RecipeConfig) -> RecipeConfig:
    """The fixed part of a phase-1 trial: the base config with Mean Teacher on (a searched
    `mt_weight` whose base is 0 takes its upper end), since every phase-2 trial runs it and
    the view count of stage one depends on it; no other Mean Teacher key acts before the
    cut."""
    weight = space.searched.get("mt_weight")
    if weight is not None and not base.mean_teacher:
        return base.replace(mt_weight=max(weight.values))
    return base
