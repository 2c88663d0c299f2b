"""One Ray Tune experiment of a search (a phase): its trial, searcher, scheduler and time
budget, run or resumed, and read back into leaderboard rows.

Each trial is one `engine.fit` run reporting val top-1 every epoch with a checkpoint, so
Tune can pause, retry or resume it. The decoded dataset goes into the object store once and
every trial on a node reads that one copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.stopper import TimeoutStopper

from ar_ray import storage
from ar_ray.checkpointed_fit import RaySession, checkpointed_fit
from ar_ray.cluster import assigned_device
from ar_ray.config import RecipeConfig
from ar_ray.data import DatasetSplits
from ar_ray.errors import Interrupted, UserError
from ar_ray.interrupts import sigint_handler_restored
from ar_ray.leaderboard import STAGE_TWO, PhaseRecord, trial_rows
from ar_ray.optuna_search import EarlyStopAwareOptunaSearch, optuna_states
from ar_ray.optuna_storage import study_name, study_states
from ar_ray.progress import format_duration
from ar_ray.ray_output import tune_verbosity
from ar_ray.search_space import SearchSpace
from ar_ray.trial_progress import TrialProgress
from ar_ray.tune_request import TuneRequest, budget_marker, experiment_root, trial_resources

METRIC, MODE = "val_top1", "max"


PHASE_EPOCH = "phase_epoch"
"""ASHA's clock: epochs a trial ran in its phase (a stage-two trial resumes at the cut)."""


class TimeBudget(TimeoutStopper):
    """Tune's time budget that leaves a marker when it ends the search.

    Tune stops every running trial at the budget (each keeps its last checkpoint) and starts
    no more, then returns its grid as it does on Ctrl+C. The marker tells the two apart, so a
    search that ran out of time writes its leaderboard instead of reporting an interruption.
    Tune pickles the stopper with the experiment: a resumed search gets what was left.
    """

    def __init__(self, seconds: float, marker: str) -> None:
        super().__init__(seconds)
        self.marker = marker

    def stop_all(self) -> bool:
        reached = super().stop_all()
        if reached and not storage.exists(self.marker):
            storage.write_text(self.marker, f"{self._timeout_seconds:g}\n")
        return reached


def report_in_phase(
    metrics: dict[str, Any], checkpoint: tune.Checkpoint | None = None, *, start: int
) -> None:
    """tune.report with the epochs run in this phase added: ASHA's clock."""
    tune.report({**metrics, PHASE_EPOCH: metrics["epoch"] - start}, checkpoint=checkpoint)


def trial_values(
    params: dict[str, Any], base: dict[str, Any], parents: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A trial's whole config: the fixed values, then (stage two) its parent's sampled ones,
    then its own; what it trains and what MLflow records as its params."""
    values = {**base, **params}
    parent = values.pop("stage1_trial", None)
    if parent is not None:
        values = {**values, **parents[parent]["params"], **params}
        values.pop("stage1_trial")
    return values


def run_trial(
    params: dict[str, Any],
    *,
    splits: DatasetSplits,
    base: dict[str, Any],
    start: int = 0,
    until_epoch: int | None = None,
    parents: dict[str, dict[str, Any]] | None = None,
) -> None:
    """One Tune trial: fit the sampled config, report and checkpoint every epoch.

    A stage-one trial stops at `until_epoch`. A stage-two trial's `stage1_trial` names its
    parent in `parents`: it runs the parent's values with its own and, unless Tune hands it
    a checkpoint of its own (a retry), resumes the parent's checkpoint at `start`."""
    parent = params.get("stage1_trial")
    start_from = None if parent is None else parents[parent]["checkpoint"]
    session = RaySession(
        tune.get_checkpoint, partial(report_in_phase, start=start), tune.Checkpoint
    )
    checkpointed_fit(
        RecipeConfig.from_dict(trial_values(params, base, parents)),
        splits,
        session,
        assigned_device(),
        start_from=start_from,
        until_epoch=until_epoch,
    )


def trial_trainable(splits: DatasetSplits, base: RecipeConfig, request: TuneRequest, **phase: Any):
    """run_trial with train+val shared through the object store and per-trial resources;
    `phase` are run_trial's stage arguments."""
    trainable = tune.with_parameters(
        run_trial, splits=splits.for_training(), base=base.to_dict(), **phase
    )
    resources = trial_resources(request)
    return tune.with_resources(trainable, {"cpu": resources.cpus, "gpu": resources.gpus})


@dataclass(frozen=True)
class Phase:
    """One Ray Tune experiment of a search: where it lives, what it samples, how many trials,
    how its rows read (`record`) and what its trials are given (`trial`: run_trial's stage
    arguments and the fixed config)."""

    folder: str
    param_space: dict[str, Any]
    trials: int
    record: PhaseRecord
    base: RecipeConfig
    trial: dict[str, Any]

    @property
    def last_epoch(self) -> int:
        return self.record.start + self.record.epochs


def _trial_runs(request: TuneRequest, phase: Phase) -> list[tune.Callback]:
    """MLflow's runs of the phase's trials, when the search is tracked."""
    if request.tracking_uri is None:
        return []
    from ar_ray.mlflow_tracking import TrialRuns

    resolve = partial(trial_values, base=phase.base.to_dict(), parents=phase.trial.get("parents"))
    name = phase.folder.rstrip("/").rsplit("/", 1)[1]
    return [TrialRuns(request.tracking_uri, experiment_root(request), resolve, name)]


def _build_tuner(
    request: TuneRequest,
    phase: Phase,
    splits: DatasetSplits,
    verbose: bool,
    hours_line: Callable[[float], str] | None,
    budget: float | None,
) -> tune.Tuner:
    stored = request.optuna_storage
    searcher = EarlyStopAwareOptunaSearch(
        metric=METRIC,
        mode=MODE,
        sampler=optuna.samplers.TPESampler(seed=request.seed),
        full_epochs=phase.last_epoch,
        storage=None if stored is None else optuna.storages.RDBStorage(stored),
        study_name=None if stored is None else study_name(request.name, phase.folder),
    )
    scheduler = ASHAScheduler(
        time_attr=PHASE_EPOCH,
        max_t=phase.record.epochs,
        grace_period=phase.record.first_rung,
        reduction_factor=request.reduction_factor,
    )
    parent, name = phase.folder.rstrip("/").rsplit("/", 1)
    return tune.Tuner(
        trial_trainable(splits, phase.base, request, **phase.trial),
        param_space=phase.param_space,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=phase.trials,
            max_concurrent_trials=request.max_concurrent,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=parent,
            failure_config=tune.FailureConfig(max_failures=request.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=tune_verbosity(verbose),
            callbacks=[TrialProgress(phase.last_epoch, hours_line), *_trial_runs(request, phase)],
            stop=None if budget is None else TimeBudget(budget, budget_marker(request)),
        ),
    )


def fit_phase(
    request: TuneRequest,
    phase: Phase,
    splits: DatasetSplits,
    *,
    resume: bool,
    verbose: bool,
    hours_line: Callable[[float], str] | None,
    budget: float | None,
) -> tune.ResultGrid:
    """Run the phase's experiment, or continue it where an interrupted one left off; one
    that never started begins now."""
    if resume and tune.Tuner.can_restore(phase.folder):
        trainable = trial_trainable(splits, phase.base, request, **phase.trial)
        tuner = tune.Tuner.restore(phase.folder, trainable=trainable, resume_errored=True)
    else:
        tuner = _build_tuner(request, phase, splits, verbose, hours_line, budget)
    with sigint_handler_restored():
        grid = tuner.fit()
    ran = trials_that_ran(grid)
    if storage.exists(budget_marker(request)):
        if not ran and phase.record.phase != STAGE_TWO:
            raise UserError(
                f"--time-budget {format_duration(request.time_budget)} ran out before any trial "
                f"of {phase.folder} finished an epoch: nothing to rank"
            )
        print(
            f"time budget of {format_duration(request.time_budget)} reached: {ran} of "
            f"{phase.trials} trials ran in {phase.folder}; the leaderboard ranks them",
            flush=True,
        )
    elif ran < phase.trials:  # Tune returns on SIGINT
        raise Interrupted(f"tune experiment {phase.folder} stopped before all trials finished")
    return grid


def trials_that_ran(grid: tune.ResultGrid) -> int:
    """Trials that reported an epoch or failed.

    Tune catches Ctrl+C (and the infeasible watch's interrupt) and returns its grid; a trial
    it never started comes back as terminated with no result, so counting terminated trials
    would call an interrupted search finished and write a leaderboard of empty rows.
    """
    return sum(
        1 for result in grid if result.error is not None or (result.metrics or {}).get("epoch")
    )


def phase_rows(
    grid: tune.ResultGrid, phase: Phase, space: SearchSpace, request: TuneRequest
) -> list[dict[str, Any]]:
    """The leaderboard rows of a phase, with each trial's state in the Optuna study: the
    stored study's where there is one (Optuna's public API), else the in-memory study that
    Tune saved with the searcher."""
    if request.optuna_storage is None:
        states = optuna_states(phase.folder)
    else:
        states = study_states(request.optuna_storage, study_name(request.name, phase.folder))
    return trial_rows(grid, space.searched, replace(phase.record, optuna_states=states))
