"""The two-phase staged search: stage one searched on runs cut where Mean Teacher starts,
then Mean Teacher's keys searched on the best stage-one checkpoints, resumed at the cut.

With ASHA's first rung raised past Mean Teacher's start (`ar_ray.staged`) a one-phase
search runs every trial at least that far; here the stages are searched as stages, and a
stage-two trial trains only the epochs after the cut. It is still its own config's run from
scratch, bit for bit: stage one does not depend on Mean Teacher's keys.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import yaml
from ray import tune

from ar_ray import staged, storage
from ar_ray.data import DatasetSplits
from ar_ray.errors import UserError
from ar_ray.leaderboard import STAGE_ONE, STAGE_TWO, TUNE_DIR, PhaseRecord, checkpoint_dir
from ar_ray.recipe.checkpoint import CHECKPOINT_FILE
from ar_ray.search_space import SearchSpace
from ar_ray.tune_phase import METRIC, Phase, fit_phase, phase_rows, trial_trainable
from ar_ray.tune_request import (
    TuneRequest,
    base_config,
    budget_marker,
    experiment_dir,
    experiment_root,
)

PHASE_DIRS = {STAGE_ONE: "phase1", STAGE_TWO: "phase2"}  # Tune experiments under tune/
PARENTS = "stage2_parents.yaml"
"""Phase 2's starting points, written once phase 1 has ended: a resumed search that finds
it continues in phase 2."""


def stage_one_phase(request: TuneRequest, space: SearchSpace) -> Phase:
    """Every key but Mean Teacher's, each trial on the full schedule cut where it starts."""
    base = base_config(request, space)
    stages = stages_of(request, space)
    record = PhaseRecord(
        STAGE_ONE, _relative(STAGE_ONE), epochs=stages.cut, first_rung=request.first_rung
    )
    sampled = space.searching(stages.stage_two_keys, only=False).to_tune()
    folder = storage.join(experiment_dir(request), PHASE_DIRS[STAGE_ONE])
    fixed = staged.stage_one_base(space, base)
    return Phase(folder, sampled, request.trials, record, fixed, {"until_epoch": stages.cut})


def stage_two_phase(
    request: TuneRequest, space: SearchSpace, parents: dict[str, dict[str, Any]]
) -> Phase:
    """Mean Teacher's keys, each trial resuming one of `parents` at the cut."""
    base = base_config(request, space)
    stages = stages_of(request, space)
    sampled = {
        **space.searching(stages.stage_two_keys, only=True).to_tune(),
        "stage1_trial": tune.choice(sorted(parents)),
    }
    record = PhaseRecord(
        STAGE_TWO,
        _relative(STAGE_TWO),
        epochs=base.epochs - stages.cut,
        start=stages.cut,
        first_rung=stages.first_rung,
        parents={trial: parent["params"] for trial, parent in parents.items()},
    )
    folder = storage.join(experiment_dir(request), PHASE_DIRS[STAGE_TWO])
    trial = {"start": stages.cut, "parents": parents}
    return Phase(folder, sampled, request.stage2_trials, record, base, trial)


def _relative(phase: str) -> str:
    return f"{TUNE_DIR}/{PHASE_DIRS[phase]}"


def stages_of(request: TuneRequest, space: SearchSpace) -> staged.Stages:
    """The stages of a request resolved as staged; derived again, not recorded, so the
    cut and rungs always follow the space and epochs the request names."""
    stages = staged.staging(space, base_config(request, space), "auto").stages
    if stages is None:  # the request was resolved as staged from this space
        raise UserError(f"{request.space}: no longer fits a two-phase search")
    return stages


def stage_one_parents(
    grid: tune.ResultGrid, phase: Phase, count: int, root: str
) -> dict[str, dict[str, Any]]:
    """The best `count` stage-one trials that reached the cut: their sampled values and
    where their checkpoint at the cut lies (path or URI)."""
    reached = [
        result
        for result in grid
        if result.error is None
        and result.checkpoint is not None
        and (result.metrics or {}).get("epoch") == phase.last_epoch
    ]
    reached.sort(key=lambda result: result.metrics[METRIC], reverse=True)
    parents = {}
    for result in reached[:count]:
        folder = checkpoint_dir(result, phase.record.folder)
        parents[result.metrics["trial_id"]] = {
            "params": dict(result.config),
            "checkpoint": storage.join(root, folder, CHECKPOINT_FILE),
            "val_top1": float(result.metrics[METRIC]),
        }
    return parents


def two_phase_rows(
    request: TuneRequest,
    space: SearchSpace,
    splits: DatasetSplits,
    resume: bool,
    verbose: bool,
    hours_line: Callable[[float], str],
) -> list[dict[str, Any]]:
    """Phase 1, then phase 2 from its best checkpoints. A resumed search continues the phase
    it stopped in: phase 1 is done once its parents are recorded (`stage2_parents.yaml`)."""
    one = stage_one_phase(request, space)
    parents_file = storage.join(experiment_dir(request), PARENTS)
    started = time.monotonic()
    if resume and storage.exists(parents_file):
        trainable = trial_trainable(splits, one.base, request, **one.trial)
        grid = tune.Tuner.restore(one.folder, trainable=trainable).get_results()
        parents = yaml.safe_load(storage.read_text(parents_file))
    else:
        grid = fit_phase(
            request, one, splits, resume=resume, verbose=verbose, hours_line=hours_line,
            budget=request.time_budget,
        )  # fmt: skip
        if storage.exists(budget_marker(request)):
            return phase_rows(grid, one, space, request)
        parents = stage_one_parents(grid, one, request.stage2_from, experiment_root(request))
        if not parents:
            raise UserError(f"{one.folder}: no stage-one trial reached epoch {one.last_epoch}")
        storage.write_text(parents_file, yaml.safe_dump(parents, sort_keys=False))
    two = stage_two_phase(request, space, parents)
    print(
        f"phase 2: {two.trials} trials resume the best {len(parents)} stage-one checkpoints "
        f"at epoch {one.last_epoch} ({', '.join(parents)})",
        flush=True,
    )
    spent = time.monotonic() - started
    budget = None if request.time_budget is None else max(1.0, request.time_budget - spent)
    second = fit_phase(
        request, two, splits, resume=resume, verbose=verbose, hours_line=None, budget=budget
    )
    return phase_rows(grid, one, space, request) + phase_rows(second, two, space, request)
