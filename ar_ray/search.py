"""`ar-ray tune`: Optuna (TPE) proposes recipe hyperparameters, ASHA stops the weak early.

Each trial is one `engine.fit` run reporting val top-1 every epoch with a checkpoint, so
Tune can pause, retry or resume it. The decoded dataset goes into the object store once and
every trial on a node reads that one copy.
"""

from __future__ import annotations

import fnmatch
import tempfile
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pyarrow.fs
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import TimeoutStopper

from ar_ray import staged, storage
from ar_ray.checkpointed_fit import RaySession, checkpointed_fit
from ar_ray.cluster import assigned_device
from ar_ray.config import RecipeConfig
from ar_ray.data import DatasetSplits
from ar_ray.errors import Interrupted, UserError
from ar_ray.leaderboard import (
    BEST_CONFIGS,
    LEADERBOARD,
    TUNE_DIR,
    best_configs_yaml,
    leaderboard,
)
from ar_ray.outputs import environment_info
from ar_ray.progress import format_duration
from ar_ray.ray_output import tune_verbosity
from ar_ray.resources import Resources
from ar_ray.search_plan import SearchPlan, flat_search
from ar_ray.search_space import SearchSpace
from ar_ray.trial_progress import TrialProgress

METRIC, MODE = "val_top1", "max"
TRIAL_SESSION = RaySession(tune.get_checkpoint, tune.report, tune.Checkpoint)


@dataclass
class TuneRequest:
    """The resolved `ar-ray tune` command, recorded next to its results."""

    space: str
    trials: int = 16
    epochs: int | None = None
    data: str | None = None  # as given; None: the built-in set
    data_resolved: str | None = None  # absolute path or URI: what `ensemble` reads
    skip_bad_images: bool = False  # `ensemble` skips the same files
    limit_per_class: int | None = None
    storage: str = "runs"
    name: str = "ar"
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None
    grace_period: int = 1
    first_rung: int | None = None  # the grace period in effect (see staged.py); None: unresolved
    reduction_factor: int = 3
    max_failures: int = 2
    seed: int = 0
    time_budget: float | None = None  # seconds of search; None: no limit


BUDGET_REACHED = "time_budget_reached"
"""A marker in the experiment folder: the search ended at its time budget."""


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


class EarlyStopAwareOptunaSearch(OptunaSearch):
    """Tells Optuna that ASHA-stopped trials were PRUNED rather than COMPLETE.

    Ray hands a stopped trial's last (early-epoch) score to Optuna as a finished result, so
    TPE would rank a 1-epoch score against 8-epoch scores. Dropping the final value makes
    Ray report PRUNED; TPE then orders pruned trials by their per-epoch values (which
    OptunaSearch already reports), below every trial that ran to the end.
    """

    def __init__(self, *args: Any, full_epochs: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.full_epochs = full_epochs

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if result and not error and result.get("epoch", 0) < self.full_epochs:
            result = {key: value for key, value in result.items() if key != self.metric}
        super().on_trial_complete(trial_id, result, error)


SEARCHER_STATE = OptunaSearch.CKPT_FILE_TMPL.format("*")


def optuna_states(path: str) -> dict[str, str]:
    """Each Ray trial's state as the Optuna study holds it (COMPLETE, PRUNED, FAIL), read
    back from the searcher state Tune saved in the experiment: what TPE really learned from,
    not what we meant to tell it. OptunaSearch keeps the study and Ray's trial ids only in
    its private attributes; this is the one place that reads them."""
    fs, folder = storage.filesystem(path)
    names = [
        info.base_name
        for info in fs.get_file_info(pyarrow.fs.FileSelector(folder))
        if fnmatch.fnmatch(info.base_name, SEARCHER_STATE)
    ]
    if not names:
        return {}
    searcher = OptunaSearch()
    with tempfile.TemporaryDirectory() as local:
        newest = max(names)  # session names are timestamps
        searcher.restore(
            str(storage.download_file(storage.join(path, newest), Path(local, newest)))
        )
    study = searcher._ot_study.trials
    return {
        trial_id: study[trial.number].state.name for trial_id, trial in searcher._ot_trials.items()
    }


def run_trial(params: dict[str, Any], *, splits: DatasetSplits, base: dict[str, Any]) -> None:
    """One Tune trial: fit the sampled config, report and checkpoint every epoch."""
    config = RecipeConfig.from_dict({**base, **params})
    checkpointed_fit(config, splits, TRIAL_SESSION, assigned_device())


def trial_resources(request: TuneRequest) -> Resources:
    """What the user stated (or the CPU default): never what the cluster holds right now."""
    return Resources(cpus=request.cpus_per_trial, gpus=request.gpus_per_trial)


def experiment_root(request: TuneRequest) -> str:
    """`<storage>/<name>`: the tune results, members, ensemble and data cache live under it."""
    return storage.join(storage.resolve(request.storage), request.name)


def experiment_dir(request: TuneRequest) -> str:
    return storage.join(experiment_root(request), TUNE_DIR)


def trial_trainable(splits: DatasetSplits, base: RecipeConfig, request: TuneRequest):
    """run_trial with train+val shared through the object store and per-trial resources."""
    trainable = tune.with_parameters(run_trial, splits=splits.for_training(), base=base.to_dict())
    resources = trial_resources(request)
    return tune.with_resources(trainable, {"cpu": resources.cpus, "gpu": resources.gpus})


def _build_tuner(
    request: TuneRequest,
    space: SearchSpace,
    base: RecipeConfig,
    splits: DatasetSplits,
    verbose: bool,
) -> tune.Tuner:
    searcher = EarlyStopAwareOptunaSearch(
        metric=METRIC,
        mode=MODE,
        sampler=optuna.samplers.TPESampler(seed=request.seed),
        full_epochs=base.epochs,
    )
    scheduler = ASHAScheduler(
        time_attr="epoch",
        max_t=base.epochs,
        grace_period=request.first_rung,
        reduction_factor=request.reduction_factor,
    )
    root = experiment_root(request)
    hours_line = partial(
        search_plan(request, space).hours_line,
        gpus=request.gpus_per_trial,
        cpus=request.cpus_per_trial,
    )
    budget = request.time_budget
    return tune.Tuner(
        trial_trainable(splits, base, request),
        param_space=space.to_tune(),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=request.trials,
            max_concurrent_trials=request.max_concurrent,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=root,
            failure_config=tune.FailureConfig(max_failures=request.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=tune_verbosity(verbose),
            callbacks=[TrialProgress(base.epochs, hours_line)],
            stop=None if budget is None else TimeBudget(budget, budget_marker(request)),
        ),
    )


def search_plan(request: TuneRequest, space: SearchSpace) -> SearchPlan:
    """The search's epochs, expected under ASHA and at most, from the resolved request."""
    epochs = base_config(request, space).epochs
    return flat_search(request.trials, epochs, request.first_rung, request.reduction_factor)


def budget_marker(request: TuneRequest) -> str:
    return storage.join(experiment_dir(request), BUDGET_REACHED)


def base_config(request: TuneRequest, space: SearchSpace) -> RecipeConfig:
    overrides = {"seed": request.seed}
    if request.epochs is not None:
        overrides["epochs"] = request.epochs
    return space.base_config().replace(**overrides)


def prepare_experiment_dir(path: str, *, resume: bool, overwrite: bool) -> None:
    """Resume needs an experiment; a new one must not silently mix with an old one."""
    if resume:
        if not tune.Tuner.can_restore(path):
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
    if resume:
        tuner = tune.Tuner.restore(
            path, trainable=trial_trainable(splits, base, request), resume_errored=True
        )
    else:
        request = resolve_first_rung(request, space)
        tuner = _build_tuner(request, space, base, splits, verbose)
        record = {
            "request": asdict(request),
            "base_config": base.to_dict(),
            "stored_size": splits.stored_size,  # the side images were decoded to (data.size)
            "plan": search_plan(request, space).record(),
            "env": environment_info(),
        }
        storage.write_text(request_path(request), yaml.safe_dump(record, sort_keys=False))
    grid = tuner.fit()
    ran = trials_that_ran(grid)
    if storage.exists(budget_marker(request)):
        if not ran:
            raise UserError(
                f"--time-budget {format_duration(request.time_budget)} ran out before any trial "
                f"of {path} finished an epoch: nothing to rank"
            )
        print(
            f"time budget of {format_duration(request.time_budget)} reached: {ran} of "
            f"{request.trials} trials ran; the leaderboard ranks them",
            flush=True,
        )
    elif ran < request.trials:  # Tune returns on SIGINT
        raise Interrupted(f"tune experiment {path} stopped before all trials finished")
    board = leaderboard(grid, space, base.epochs, request.first_rung, optuna_states(path))
    storage.write_text(storage.join(path, LEADERBOARD), board.to_csv(index=False))
    storage.write_text(storage.join(path, BEST_CONFIGS), best_configs_yaml(board, space, base))
    return board


def trials_that_ran(grid: tune.ResultGrid) -> int:
    """Trials that reported an epoch or failed.

    Tune catches Ctrl+C (and the infeasible watch's interrupt) and returns its grid; a trial
    it never started comes back as terminated with no result, so counting terminated trials
    would call an interrupted search finished and write a leaderboard of empty rows.
    """
    return sum(
        1 for result in grid if result.error is not None or (result.metrics or {}).get("epoch")
    )


def request_path(request: TuneRequest) -> str:
    return storage.join(experiment_dir(request), "request.yaml")


def resolve_first_rung(request: TuneRequest, space: SearchSpace) -> TuneRequest:
    """The request with ASHA's first rung settled (a no-op once it is); one line says when
    Mean Teacher raised it. Cheap: the CLI calls it before Ray starts, so a searched key that
    can never act fails at once."""
    if request.first_rung is not None:
        return request
    rung = staged.first_rung(space, base_config(request, space), request.grace_period)
    if rung.raised_for:
        print(staged.describe(rung, request.grace_period), flush=True)
    return replace(request, first_rung=rung.epoch)
