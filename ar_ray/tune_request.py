"""The resolved `ar-ray tune` command and where its run lives.

Every module of the search reads the request; none of them needs Ray to do so.
"""

from __future__ import annotations

from dataclasses import dataclass

from ar_ray import storage
from ar_ray.config import RecipeConfig
from ar_ray.leaderboard import TUNE_DIR
from ar_ray.resources import Resources
from ar_ray.search_space import SearchSpace


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
    staged_search: str = "auto"  # "auto": two phases when Mean Teacher keys are searched
    staged: bool | None = None  # resolved with first_rung; None (older records): one phase
    stage2_trials: int | None = None  # phase-2 trials; None: half of `trials`
    stage2_from: int = 4  # phase 2 resumes the best this many stage-one trials
    reduction_factor: int = 3
    max_failures: int = 2
    seed: int = 0
    time_budget: float | None = None  # seconds of search; None: no limit
    optuna_storage: str | None = None  # a database URL for the studies; None: in memory
    tracking_uri: str | None = None  # the MLflow server its trials log to; None: untracked


BUDGET_REACHED = "time_budget_reached"
"""A marker in the experiment folder: the search ended at its time budget."""


def trial_resources(request: TuneRequest) -> Resources:
    """What the user stated (or the CPU default): never what the cluster holds right now."""
    return Resources(cpus=request.cpus_per_trial, gpus=request.gpus_per_trial)


def experiment_root(request: TuneRequest) -> str:
    """`<storage>/<name>`: the tune results, members, ensemble and data cache live under it."""
    return storage.join(storage.resolve(request.storage), request.name)


def experiment_dir(request: TuneRequest) -> str:
    return storage.join(experiment_root(request), TUNE_DIR)


def request_path(request: TuneRequest) -> str:
    return storage.join(experiment_dir(request), "request.yaml")


def budget_marker(request: TuneRequest) -> str:
    return storage.join(experiment_dir(request), BUDGET_REACHED)


def base_config(request: TuneRequest, space: SearchSpace) -> RecipeConfig:
    overrides = {"seed": request.seed}
    if request.epochs is not None:
        overrides["epochs"] = request.epochs
    return space.base_config().replace(**overrides)
