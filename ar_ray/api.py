"""The workflows behind every `ar-ray` command, as Python functions.

`ar-ray tune` is `ar_ray.search(...)`, and so on: each function takes the command's options
(same names, same defaults), applies the same checks in the same order (cheap ones before
Ray starts), keeps the same records, caches and resume rules, and raises the same one-line
`UserError`s. The CLI only parses, calls one of these and prints.

Options that a run records (trials, epochs, seed, ...) default to None, meaning "not
stated": the documented default then applies, and `resume=True` refuses only an option
that was stated and differs from the record, as `--resume` refuses only a typed flag.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pandas as pd
import yaml

from ar_ray import storage as store
from ar_ray.config import RecipeConfig, load_config
from ar_ray.data import DatasetSplits, FolderListing, list_folder, load_builtin, load_listing
from ar_ray.data.cache import CACHE_DIR
from ar_ray.data.decode import run_on_ray
from ar_ray.errors import UserError
from ar_ray.extras import require_extra
from ar_ray.resources import (
    DEFAULT_MAX_ACTORS,
    Resources,
    actor_default,
    announce,
    loader_workers_for,
    local_cpus,
    stated,
)
from ar_ray.search_plan import SearchPlan

if TYPE_CHECKING:  # the Ray-heavy modules load only inside the workflows that need them
    from ray.serve.handle import DeploymentHandle

    from ar_ray.distilling import DistillResult
    from ar_ray.ensembling import EnsembleResult
    from ar_ray.exporting import ExportResult
    from ar_ray.labelling import PredictResult
    from ar_ray.leaderboard import TuneRecord
    from ar_ray.training import TrainResult

Request = TypeVar("Request")
LOCATING_OPTIONS = frozenset({"storage", "name", "run"})
"""They find the recorded run; a path spelt another way is still the same run."""


@dataclass
class TuneResult:
    """A finished search: its leaderboard (best first), where it lives and what it was
    planned to cost (`plan_only=True`: the plan alone, an empty leaderboard)."""

    leaderboard: pd.DataFrame
    run: str  # <storage>/<name>: what `ensemble` takes
    plan: SearchPlan

    @property
    def leaderboard_path(self) -> str:
        return store.join(self.run, "tune", "leaderboard.csv")


def stated_options(**options: Any) -> set[str]:
    """The option names given a value (not None, not False): what `resume` compares."""
    return {name for name, value in options.items() if value is not None and value is not False}


def refuse_changed_options(
    given: set[str], requested: dict[str, Any], recorded: dict[str, Any], where: str
) -> None:
    """`resume` continues the run recorded in `where`: an option the user stated that
    disagrees with the record is refused, naming it, rather than mixed in silently."""
    for key, value in requested.items():
        if key in given - LOCATING_OPTIONS and key in recorded and value != recorded[key]:
            raise UserError(
                f"--{key.replace('_', '-')} {_shown(value)} differs from {_shown(recorded[key])} "
                f"recorded in {where}; --resume continues the recorded run"
            )


def from_record(cls: type[Request], values: dict[str, Any]) -> Request:
    """A request dataclass from its recorded form; keys an older ar-ray wrote and this one
    dropped are ignored, fields it lacks keep their defaults."""
    known = {field.name for field in fields(cls)}
    return cls(**{key: value for key, value in values.items() if key in known})


def _recorded(where: str) -> dict[str, Any]:
    """The request a run began with (request.yaml, ensemble.yaml): `resume` continues it."""
    try:
        return yaml.safe_load(store.read_text(where))["request"]
    except (yaml.YAMLError, KeyError, TypeError) as error:
        raise UserError(f"{where}: corrupted record ({type(error).__name__})") from None


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _positive(**values: float | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')}={value} must be >= 1")


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(value: str | float | None, option: str) -> float | None:
    """`6h`, `90m`, `45s`, `1.5d` or a number of seconds; None stays None."""
    if value is None:
        return None
    text = str(value).strip().lower()
    scale = DURATION_UNITS.get(text[-1:])
    try:
        seconds = float(text[:-1] if scale else text) * (scale or 1)
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        raise UserError(
            f"--{option.replace('_', '-')}={value}: expected a positive duration "
            "such as 6h, 90m or 3600"
        )
    return seconds


def _default(cls: type, name: str, value: Any) -> Any:
    """`value`, or the request dataclass's default for the field when it was not stated."""
    return next(f.default for f in fields(cls) if f.name == name) if value is None else value


def resources(
    unit: str, per: str, cpus: float | None, gpus: float | None, inherited: Resources, origin: str
) -> Resources:
    """The stated `cpus`/`gpus` over what was inherited; unless both were stated, one line
    says what each unit will request and how to change it."""
    for kind, value in (("cpus", cpus), ("gpus", gpus)):
        if value is not None and value < 0:
            raise UserError(f"--{kind}-per-{per}={value:g} must be >= 0")
    chosen = stated(cpus, gpus, inherited)
    if chosen.cpus + chosen.gpus == 0:
        raise UserError(f"--cpus-per-{per} and --gpus-per-{per} are both 0: a {unit} needs one")
    if cpus is None or gpus is None:
        flags = f"--cpus-per-{per} / --gpus-per-{per}"
        print(announce(unit, chosen.describe(), origin, flags), flush=True)
    return chosen


def list_data(location: str | None) -> FolderListing | None:
    """The folder's files, its layout checked; None for the built-in set. Called before Ray
    starts, so a bad layout fails in milliseconds and leaves nothing behind."""
    return None if location is None else list_folder(location)


def load_splits(
    listing: FolderListing | None,
    image_size: int,
    *,
    skip_bad_images: bool,
    limit_per_class: int | None,
    experiment: str | None = None,
) -> DatasetSplits:
    """The splits every workflow trains on. With an `experiment` root (tune and ensemble,
    once Ray is connected), a folder is decoded by Ray tasks and cached under the
    experiment, so later commands on the same unchanged folder reuse it; without one
    (train), it is decoded in this process."""
    if listing is None:
        splits = load_builtin(image_size)
    elif experiment is None:
        splits = load_listing(listing, image_size, skip_bad_images)
    else:
        cache = store.join(experiment, CACHE_DIR)
        splits = load_listing(listing, image_size, skip_bad_images, runner=run_on_ray, cache=cache)
    for path in splits.skipped:
        print(f"skipped unreadable image: {path}", file=sys.stderr, flush=True)
    return splits.limit_per_class(limit_per_class)


def tuned_splits(record: TuneRecord, listing: FolderListing | None, root: str) -> DatasetSplits:
    """The splits the tune run in `root` searched on, read as it read them (image size, bad
    images, per-class limit): what its ensemble and distilled student train and score on."""
    return load_splits(
        listing,
        record.base.image_size,
        skip_bad_images=record.skip_bad_images,
        limit_per_class=record.limit_per_class,
        experiment=root,
    )


def train(
    config: str | Path | RecipeConfig | None = None,
    *,
    rank: int = 1,
    data: str | None = None,
    skip_bad_images: bool = False,
    limit_per_class: int | None = None,
    epochs: int | None = None,
    seed: int | None = None,
    out: str | Path = "runs/train",
    resume: bool = False,
    overwrite: bool = False,
    loader_workers: int | None = None,
) -> TrainResult:
    """`ar-ray train`: one run of the recipe on this machine, no cluster.

    `config` is a YAML file (the `rank`-th config of a ranked list such as
    best_configs.yaml), a `RecipeConfig`, or None for the default recipe.
    """
    from ar_ray.training import run_training

    if isinstance(config, RecipeConfig):
        base = config
    else:
        base = load_config(Path(config), rank) if config is not None else RecipeConfig()
    overrides = {"epochs": epochs, "seed": seed}
    base = base.replace(**{k: v for k, v in overrides.items() if v is not None})
    _positive(limit_per_class=limit_per_class)
    if loader_workers is None:
        loader_workers = loader_workers_for(local_cpus())
    elif loader_workers < 0:
        raise UserError(f"--loader-workers={loader_workers} must be >= 0")
    splits = load_splits(
        list_data(data),
        base.image_size,
        skip_bad_images=skip_bad_images,
        limit_per_class=limit_per_class,
    )
    print(
        f"training {base.arch} for {base.epochs} epochs on {len(splits.train)} images "
        f"({splits.num_classes} classes); outputs in {out}",
        flush=True,
    )
    return run_training(
        base, splits, Path(out), resume=resume, overwrite=overwrite, loader_workers=loader_workers
    )


def tune(
    space: str | Path,
    *,
    data: str | None = None,
    trials: int | None = None,
    epochs: int | None = None,
    skip_bad_images: bool = False,
    limit_per_class: int | None = None,
    storage: str = "runs",
    name: str = "ar",
    cpus_per_trial: float | None = None,
    gpus_per_trial: float | None = None,
    max_concurrent: int | None = None,
    grace_period: int | None = None,
    max_failures: int | None = None,
    seed: int | None = None,
    time_budget: str | float | None = None,
    staged_search: str | None = None,
    stage2_trials: int | None = None,
    stage2_from: int | None = None,
    optuna_storage: str | None = None,
    track: str | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    verbose: bool = False,
    plan_only: bool = False,
) -> TuneResult:
    """`ar-ray tune`: Optuna (TPE) proposes configs of `space`, ASHA stops weak trials.

    Defaults: 16 trials, the space's epochs, 1 CPU and 0 GPUs per trial, grace period 1,
    2 retries per failed trial, seed 0, no time budget; outputs under `<storage>/<name>`.
    The plan (epochs expected under ASHA and at most) is printed before Ray starts, and
    again in device-hours once an epoch has been timed; `plan_only` stops after the first
    print, touching nothing. `time_budget` (`6h`, or seconds) ends the search there and
    ranks the trials that ran. When `mt_*` keys are searched and Mean Teacher starts after
    epoch 0, the search has two phases (`staged_search="off"`: one): phase 1 searches the
    other keys on runs cut where Mean Teacher starts, phase 2 (`stage2_trials`, default half
    of `trials`) searches the `mt_*` keys resuming the best `stage2_from` (default 4)
    stage-one checkpoints. A line per trial epoch is printed; `verbose` adds Ray's own
    output (Tune's boxes, workers' notices). `optuna_storage` (`sqlite:///PATH.db`,
    `postgresql://USER@HOST/DB`) keeps each phase's Optuna study in that database, named
    after the run, for `optuna-dashboard URL`; by default it lives in memory. `track`
    ("mlflow") logs a run per trial to `tracking_uri` (default: MLFLOW_TRACKING_URI), in the
    run folder's experiment; a resumed search goes on tracking where it began.
    """
    from ar_ray.cluster import connect
    from ar_ray.feasibility import Demand, failing_fast
    from ar_ray.mlflow_tracking import open_experiment, tolerated
    from ar_ray.mlflow_tracking import tracking_uri as tracked_to
    from ar_ray.optuna_storage import check_url
    from ar_ray.ray_output import ray_output
    from ar_ray.search import prepare_experiment_dir, resolve_schedule, run_tune, search_plan
    from ar_ray.search_space import load_search_space
    from ar_ray.tune_request import (
        TuneRequest,
        base_config,
        experiment_dir,
        experiment_root,
        request_path,
        trial_resources,
    )

    given = stated_options(
        trials=trials, epochs=epochs, data=data, skip_bad_images=skip_bad_images,
        limit_per_class=limit_per_class, cpus_per_trial=cpus_per_trial,
        gpus_per_trial=gpus_per_trial, max_concurrent=max_concurrent,
        grace_period=grace_period, max_failures=max_failures, seed=seed,
        time_budget=time_budget, staged_search=staged_search, stage2_trials=stage2_trials,
        stage2_from=stage2_from, optuna_storage=optuna_storage, tracking_uri=track,
    )  # fmt: skip
    _positive(
        trials=trials,
        epochs=epochs,
        max_concurrent=max_concurrent,
        grace_period=grace_period,
        limit_per_class=limit_per_class,
        stage2_trials=stage2_trials,
        stage2_from=stage2_from,
    )
    loaded = load_search_space(Path(space))
    trial = resources("trial", "trial", cpus_per_trial, gpus_per_trial, Resources(), "default")
    listing = list_data(data)
    request = TuneRequest(
        space=str(space),
        trials=_default(TuneRequest, "trials", trials),
        epochs=epochs,
        data=data,
        data_resolved=None if listing is None else listing.resolved,
        skip_bad_images=skip_bad_images,
        limit_per_class=limit_per_class,
        storage=storage,
        name=name,
        cpus_per_trial=trial.cpus,
        gpus_per_trial=trial.gpus,
        max_concurrent=max_concurrent,
        grace_period=_default(TuneRequest, "grace_period", grace_period),
        max_failures=_default(TuneRequest, "max_failures", max_failures),
        seed=_default(TuneRequest, "seed", seed),
        time_budget=duration_seconds(time_budget, "time_budget"),
        staged_search=_default(TuneRequest, "staged_search", staged_search),
        stage2_trials=stage2_trials,
        stage2_from=_default(TuneRequest, "stage2_from", stage2_from),
        optuna_storage=None if optuna_storage is None else check_url(optuna_storage),
        tracking_uri=tracked_to(track, tracking_uri),
    )
    if resume:  # the recorded request goes on; an option that disagrees with it is refused
        prepare_experiment_dir(experiment_dir(request), resume=True, overwrite=False)
        recorded = from_record(TuneRequest, _recorded(request_path(request)))
        refuse_changed_options(given, asdict(request), asdict(recorded), request_path(request))
        if recorded.data != request.data:
            listing = list_data(recorded.data_resolved or recorded.data)
        request = recorded
    else:  # a searched key that can never act fails here, before Ray starts
        request = resolve_schedule(request, loaded)
    plan = search_plan(request, loaded)
    for line in plan.lines():
        print(line, flush=True)
    if plan_only:
        return TuneResult(leaderboard=pd.DataFrame(), run=experiment_root(request), plan=plan)
    store.ensure_writable(experiment_root(request))
    if request.tracking_uri is not None:  # a server that is down: one line; on resume, the
        # run goes on with a warning, as if the server went down now
        with tolerated(f"tracking to {request.tracking_uri}") if resume else nullcontext():
            open_experiment(request.tracking_uri, experiment_root(request))
    if not resume:
        prepare_experiment_dir(experiment_dir(request), resume=False, overwrite=overwrite)
    embedded = connect(address)
    trial_demand = [Demand("trial", "trial", trial_resources(request))]
    with failing_fast(trial_demand, embedded), ray_output(verbose):
        splits = load_splits(
            listing,
            base_config(request, loaded).image_size,
            skip_bad_images=request.skip_bad_images,
            limit_per_class=request.limit_per_class,
            experiment=experiment_root(request),
        )
        board = run_tune(request, loaded, splits, resume=resume, verbose=verbose)
    return TuneResult(leaderboard=board, run=experiment_root(request), plan=plan)


def ensemble(
    run: str | TuneResult,
    *,
    members: int | None = None,
    archs: Sequence[str] | None = None,
    epochs: int | None = None,
    workers_per_member: int | None = None,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float | None = None,
    max_concurrent: int | None = None,
    tta: str | None = None,
    cpus_per_actor: float | None = None,
    gpus_per_actor: float | None = None,
    max_actors: int | None = None,
    images_per_call: int | None = None,
    seed: int | None = None,
    retrain: bool = False,
    snapshots: int | None = None,
    track: str | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    verbose: bool = False,
) -> EnsembleResult:
    """`ar-ray ensemble`: train the tune run's best mutually different configs as members,
    TenCrop them on an actor pool, fit the weights on val (cross-fitted), write outputs.

    Defaults: 3 members, the tune's epochs, 1 DDP worker per member holding what each trial
    held, TenCrop, actors holding what a worker held (at most 1 GPU), at most 4 actors
    answering 64 images per call on a CPU and 256 on a GPU, seed 0. A member whose config
    and epochs are a finished trial's is that trial's final checkpoint, not trained again
    (members keep their trial's seed; `retrain` trains every member, each with seed
    `seed + i`). `snapshots` N > 1 trains each member with N cosine cycles with warm
    restarts (`lr_cycles`) and adds the model at each earlier cycle's end as a member, at no
    extra epochs. A line says how many members are reused and how many train; a line per
    member epoch and inference progress follow; `verbose` adds Ray's own output. `track`
    ("mlflow") logs a parent run with a run per member to `tracking_uri` (default:
    MLFLOW_TRACKING_URI), in the run folder's experiment, beside its trials'.
    """
    from ar_ray.cluster import connect
    from ar_ray.ensembling import (
        EnsembleRequest,
        describe_members,
        plan_members,
        prepare_ensemble_dir,
        run_ensemble,
    )
    from ar_ray.feasibility import ensemble_demands, failing_fast
    from ar_ray.leaderboard import load_tune_record
    from ar_ray.mlflow_tracking import open_experiment
    from ar_ray.mlflow_tracking import tracking_uri as tracked_to
    from ar_ray.ray_output import ray_output
    from ar_ray.saved_ensemble import ENSEMBLE_DIR, ENSEMBLE_FILE

    run = run.run if isinstance(run, TuneResult) else run
    archs = list(archs) if archs else None
    given = stated_options(
        members=members, archs=archs, epochs=epochs, workers_per_member=workers_per_member,
        cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
        max_concurrent=max_concurrent, tta=tta, cpus_per_actor=cpus_per_actor,
        gpus_per_actor=gpus_per_actor, max_actors=max_actors, images_per_call=images_per_call,
        seed=seed, retrain=retrain, snapshots=snapshots,
    )  # fmt: skip
    _positive(
        members=members,
        epochs=epochs,
        workers_per_member=workers_per_member,
        max_concurrent=max_concurrent,
        max_actors=max_actors,
        images_per_call=images_per_call,
        snapshots=snapshots,
    )
    tracked = tracked_to(track, tracking_uri)
    record = load_tune_record(run)
    root = store.resolve(run)
    store.ensure_writable(root)
    for arch in archs or []:
        record.base.replace_checked("arch", arch, "--archs")
    tuned = f"the tune run's trials in {run}"
    worker = resources(
        "member worker", "worker", cpus_per_worker, gpus_per_worker, record.trial_resources, tuned
    )
    actor = resources(
        "inference actor", "actor", cpus_per_actor, gpus_per_actor, actor_default(worker),
        "member workers'",
    )  # fmt: skip
    request = EnsembleRequest(
        run=run,
        members=_default(EnsembleRequest, "members", members),
        archs=archs,
        epochs=epochs,
        workers_per_member=_default(EnsembleRequest, "workers_per_member", workers_per_member),
        tta=_default(EnsembleRequest, "tta", tta),
        seed=_default(EnsembleRequest, "seed", seed),
        cpus_per_worker=worker.cpus,
        gpus_per_worker=worker.gpus,
        max_concurrent=max_concurrent,
        cpus_per_actor=actor.cpus,
        gpus_per_actor=actor.gpus,
        max_actors=max_actors or DEFAULT_MAX_ACTORS,
        images_per_call=images_per_call,
        retrain=retrain,
        snapshots=_default(EnsembleRequest, "snapshots", snapshots),
    )
    where = store.join(root, ENSEMBLE_DIR, ENSEMBLE_FILE)
    if resume and store.exists(where):  # a finished ensemble: its request goes on
        recorded = from_record(EnsembleRequest, _recorded(where))
        refuse_changed_options(given, asdict(request), asdict(recorded), where)
        request = replace(recorded, run=run)
    specs = plan_members(request, record)  # a bad `members` fails before any Ray work starts
    listing = list_data(record.data)  # the folder tune read, checked again before Ray starts
    tracking = None if tracked is None else open_experiment(tracked, root)
    prepare_ensemble_dir(root, resume=resume, overwrite=overwrite)
    print(describe_members(specs, root), flush=True)
    embedded = connect(address)
    options = request.train_options(root)
    demands = ensemble_demands(options, request.inference_options())
    with failing_fast(demands, embedded), ray_output(verbose):
        splits = tuned_splits(record, listing, root)
        return run_ensemble(request, record, splits, options, tracking, resume=resume)


def distill(
    run: str | EnsembleResult,
    *,
    arch: str | None = None,
    epochs: int | None = None,
    temperature: float | None = None,
    label_weight: float | None = None,
    seed: int | None = None,
    track: str | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    verbose: bool = False,
) -> DistillResult:
    """`ar-ray distill`: train one student on the saved ensemble's answers, online (each
    step the ensemble scores the student's own augmented crops), and put it beside them.

    Defaults: the best-on-val member's recipe and backbone, the members' epochs, T=4, no
    label term, seed 0, as a Ray Train job with the member workers the ensemble recorded.
    The loss is `T^2 KL(softmax(teacher/T) || softmax(student/T))` (+ `label_weight` times
    the recipe's loss). Train images only; val and test stay held out. Outputs in
    `<run>/distilled/`: the checkpoint, metrics.csv, speed.csv, report.md and the saved
    one-member ensemble that `predict(..., model="distilled")` and `export` read. `track`
    ("mlflow") logs the student as a run to `tracking_uri` (default: MLFLOW_TRACKING_URI),
    in the run folder's experiment, beside its ensemble's.
    """
    from ar_ray.cluster import connect
    from ar_ray.distilling import (
        DistillRequest,
        describe_plan,
        plan_distill,
        prepare_distill_dir,
        run_distill,
    )
    from ar_ray.feasibility import Demand, failing_fast
    from ar_ray.leaderboard import load_tune_record
    from ar_ray.mlflow_tracking import start_tracking
    from ar_ray.ray_output import ray_output
    from ar_ray.saved_ensemble import DISTILLED_DIR

    run = run if isinstance(run, str) else run.run
    request = DistillRequest(
        run=run,
        arch=arch,
        epochs=epochs,
        temperature=_default(DistillRequest, "temperature", temperature),
        label_weight=_default(DistillRequest, "label_weight", label_weight),
        seed=_default(DistillRequest, "seed", seed),
    )
    plan = plan_distill(request)  # every bad input fails here, before Ray starts
    root = store.resolve(run)
    store.ensure_writable(store.join(root, DISTILLED_DIR))  # or the run, where it is missing
    record = load_tune_record(run)
    listing = list_data(record.data)
    tracking = start_tracking(track, tracking_uri, root)
    prepare_distill_dir(root, plan.name, resume=resume, overwrite=overwrite)
    print(describe_plan(plan, request), flush=True)
    embedded = connect(address)
    demand = Demand("member worker", "worker", plan.worker, plan.workers)
    with failing_fast([demand], embedded), ray_output(verbose):
        splits = tuned_splits(record, listing, root)
        return run_distill(request, plan, splits, tracking, resume=resume)


def predict(
    run: str | EnsembleResult,
    images: str | Sequence[str],
    *,
    model: str = "ensemble",
    out: str | Path = "predictions.csv",
    cpus_per_actor: float | None = None,
    gpus_per_actor: float | None = None,
    max_actors: int | None = None,
    images_per_call: int | None = None,
    address: str | None = None,
    verbose: bool = False,
) -> PredictResult:
    """`ar-ray predict`: label images (files, folders or bucket prefixes) with the ensemble
    saved in `run` (`model="distilled"`: its distilled student), on the actors it was
    scored on unless told otherwise; rows stream to `out` (CSV, or Parquet for a .parquet
    name) as batches finish. `verbose` adds Ray's own output to the progress lines."""
    from ar_ray.cluster import connect
    from ar_ray.feasibility import actor_demand, failing_fast
    from ar_ray.inference import InferenceOptions
    from ar_ray.labelling import check_locations, run_predict
    from ar_ray.ray_output import ray_output
    from ar_ray.saved_ensemble import load_model

    run = run if isinstance(run, str) else run.run
    _positive(max_actors=max_actors, images_per_call=images_per_call)
    saved = load_model(run, model)
    recorded = InferenceOptions.from_record(saved.request)
    actor = resources(
        "inference actor", "actor", cpus_per_actor, gpus_per_actor, recorded.actor,
        "the ensemble's",
    )  # fmt: skip
    options = replace(
        recorded,
        actor=actor,
        max_actors=max_actors or recorded.max_actors,
        batch_size=images_per_call or recorded.batch_size,
    )
    locations = check_locations([images] if isinstance(images, str) else list(images))
    embedded = connect(address)
    with failing_fast([actor_demand(options)], embedded), ray_output(verbose):
        return run_predict(saved, locations, Path(out), options)


def export(
    run: str | EnsembleResult,
    *,
    model: str = "ensemble",
    format: str = "onnx",
    out: str | Path | None = None,
) -> ExportResult:
    """`ar-ray export`: the ensemble saved in `run` as one ONNX file (default
    `<run>/export/<model>.onnx`) taking uint8 NCHW images at the stored size and answering
    class probabilities, with a JSON sidecar beside it. onnxruntime checks it against the
    PyTorch path before it is published. Needs the `export` extra; no Ray."""
    from ar_ray.exporting import run_export

    run = run if isinstance(run, str) else run.run
    return run_export(run, model=model, format=format, out=out)


def serve(
    run: str | EnsembleResult,
    *,
    model: str = "ensemble",
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int | str = "auto",
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    cpus_per_replica: float | None = None,
    gpus_per_replica: float | None = None,
    max_batch_size: int = 16,
    batch_wait_ms: float = 10.0,
    max_request_mb: float = 20.0,
    max_megapixels: float = 50.0,
    address: str | None = None,
    verbose: bool = False,
) -> DeploymentHandle:
    """`ar-ray serve`: the ensemble saved in `run` (`model="distilled"`: its student) as an
    HTTP service on Ray Serve at http://host:port (POST /predict, /predict/batch; GET
    /healthz, /info). Returns once the replicas answer, with the deployment's handle;
    `stop_serving()` ends it. Replicas hold the resources the ensemble's inference actors
    held unless told otherwise, and scale between `min_replicas` (1) and `max_replicas` (the
    ensemble's pool size) under `replicas="auto"`, or are a fixed count. Concurrent images
    join one forward of up to `max_batch_size`, waiting at most `batch_wait_ms`. Needs the
    `serve` extra."""
    require_extra("serve")
    from ar_ray.cluster import connect
    from ar_ray.feasibility import Demand, failing_fast
    from ar_ray.ray_output import ray_output
    from ar_ray.saved_ensemble import load_model
    from ar_ray.serving import LOOPBACK_HOSTS, ServiceSettings, describe_service, start

    run = run if isinstance(run, str) else run.run
    saved = load_model(run, model)
    settings = ServiceSettings(
        run=store.resolve(run),
        model=model,
        replicas=replicas,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        cpus_per_replica=cpus_per_replica,
        gpus_per_replica=gpus_per_replica,
        max_batch_size=max_batch_size,
        batch_wait_ms=batch_wait_ms,
        max_request_mb=max_request_mb,
        max_megapixels=max_megapixels,
        verbose=verbose,
    )
    replica = resources(
        "serve replica", "replica", cpus_per_replica, gpus_per_replica,
        settings.replica_resources(saved), "the ensemble's inference actors'",
    )  # fmt: skip
    settings = replace(settings, cpus_per_replica=replica.cpus, gpus_per_replica=replica.gpus)
    if host not in LOOPBACK_HOSTS:
        print(
            f"warning: serving on {host}:{port} with no authentication: anyone who can reach "
            "this port can use the model",
            file=sys.stderr,
            flush=True,
        )
    print(describe_service(settings, saved), flush=True)
    embedded = connect(address)
    with failing_fast([Demand("serve replica", "replica", replica)], embedded), ray_output(verbose):
        return start(settings, saved, host=host, port=port)


def stop_serving() -> None:
    """End what `serve` started: Serve's applications, replicas and proxies, all of them
    (nothing to do where Ray or Serve never started)."""
    import ray

    if ray.is_initialized():
        from ray import serve as ray_serve

        ray_serve.shutdown()
