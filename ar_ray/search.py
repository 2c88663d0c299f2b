"""`ar-ray tune`: Optuna (TPE) proposes recipe hyperparameters, ASHA stops the weak early;
in two phases when Mean Teacher's keys are searched (`ar_ray.two_phase`).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from functools import partial

import pandas as pd
import yaml
from ray import tune

from ar_ray import staged, storage
from ar_ray.data import DatasetSplits
from ar_ray.errors import UserError
from ar_ray.leaderboard import (
    BEST_CONFIGS,
    LEADERBOARD,
    STAGE_ONE,
    PhaseRecord,
    best_configs_yaml,
    ranked,
)
from ar_ray.outputs import environment_info
from ar_ray.search_plan import SearchPlan, flat_search, two_phase_search
from ar_ray.search_space import SearchSpace
from ar_ray.tune_phase import Phase, fit_phase, phase_rows
from ar_ray.tune_request import TuneRequest, base_config, experiment_dir, request_path
from ar_ray.two_phase import PHASE_DIRS, stages_of, two_phase_rows


def flat_phase(request: TuneRequest, space: SearchSpace) -> Phase:
    """Today's single search: every key, every epoch, ASHA from the (raised) first rung."""
    base = base_config(request, space)
    record = PhaseRecord(epochs=base.epochs, first_rung=request.first_rung)
    path = experiment_dir(request)
    return Phase(path, space.to_tune(), request.trials, record, base, {})


def search_plan(request: TuneRequest, space: SearchSpace) -> SearchPlan:
    """The search's epochs, expected under ASHA and at most, from the resolved request."""
    epochs = base_config(request, space).epochs
    if request.staged:
        stages = stages_of(request, space)
        return two_phase_search(
            request.trials,
            request.stage2_trials,
            stages.cut,
            epochs,
            request.first_rung,
            stages.first_rung,
            request.reduction_factor,
        )
    return flat_search(request.trials, epochs, request.first_rung, request.reduction_factor)


def prepare_experiment_dir(path: str, *, resume: bool, overwrite: bool) -> None:
    """Resume needs an experiment; a new one must not silently mix with an old one."""
    if resume:
        phase_one = storage.join(path, PHASE_DIRS[STAGE_ONE])
        if not (tune.Tuner.can_restore(path) or tune.Tuner.can_restore(phase_one)):
            raise UserError(f"{path}: no tune experiment to resume")
    elif storage.exists(path):
        if not overwrite:
            raise UserError(f"{path}: holds an experiment; pass --resume or --overwrite")
        storage.remove_tree(path)


def run_tune(
    request: TuneRequest,
    space: SearchSpace,
    splits: DatasetSplits,
    *,
    resume: bool = False,
    verbose: bool = False,
) -> pd.DataFrame:
    """Run (or resume) the search and write leaderboard, best configs and the request.

    The caller decides what may be replaced (`prepare_experiment_dir`) before Ray starts.
    A resumed run keeps the request recorded when it began: `request` is that one, and Tune
    restores its reporter (verbosity, `TrialProgress`) as the run began, too.
    """
    base = base_config(request, space)
    path = experiment_dir(request)
    if not resume:
        request = resolve_schedule(request, space)
        record = {
            "request": asdict(request),
            "base_config": base.to_dict(),
            "stored_size": splits.stored_size,  # the side images were decoded to (data.size)
            "plan": search_plan(request, space).record(),
            "env": environment_info(),
        }
        storage.write_text(request_path(request), yaml.safe_dump(record, sort_keys=False))
    hours_line = partial(
        search_plan(request, space).hours_line,
        gpus=request.gpus_per_trial,
        cpus=request.cpus_per_trial,
    )
    if request.staged:
        rows = two_phase_rows(request, space, splits, resume, verbose, hours_line)
    else:
        phase = flat_phase(request, space)
        grid = fit_phase(
            request, phase, splits, resume=resume, verbose=verbose, hours_line=hours_line,
            budget=request.time_budget,
        )  # fmt: skip
        rows = phase_rows(grid, phase, space, request)
    board = ranked(rows)
    storage.write_text(storage.join(path, LEADERBOARD), board.to_csv(index=False))
    storage.write_text(storage.join(path, BEST_CONFIGS), best_configs_yaml(board, space, base))
    return board


def resolve_schedule(request: TuneRequest, space: SearchSpace) -> TuneRequest:
    """The request with its phases and ASHA's first rung settled (a no-op once they are).
    Cheap: the CLI calls it before Ray starts, so a searched key that can never act fails
    at once. One line says which search runs when Mean Teacher shapes it."""
    if request.first_rung is not None:
        return request
    if request.staged_search not in staged.STAGED_MODES:
        raise UserError(
            f"--staged-search {request.staged_search}: expected one of "
            f"{', '.join(staged.STAGED_MODES)}"
        )
    base = base_config(request, space)
    rung = staged.first_rung(space, base, request.grace_period)  # refuses a key never acting
    staging = staged.staging(space, base, request.staged_search)
    if staging.stages is None:
        if rung.raised_for:
            line = staged.describe(rung, request.grace_period)
            print(f"one search ({staging.reason}): {line}", flush=True)
        return replace(request, staged=False, first_rung=rung.epoch)
    stages = staging.stages
    stage2_trials = request.stage2_trials or max(1, request.trials // 2)
    print(
        f"two-phase search ({staging.reason}): phase 1 runs {request.trials} trials of the "
        f"other keys to epoch {stages.cut}; phase 2 runs {stage2_trials} trials of "
        f"{', '.join(stages.stage_two_keys)} from the best {request.stage2_from} stage-one "
        "checkpoints (--staged-search off: one search)",
        flush=True,
    )
    first = min(request.grace_period, stages.cut)
    return replace(request, staged=True, first_rung=first, stage2_trials=stage2_trials)
