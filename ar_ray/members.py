"""Ensemble members: pick strong and mutually different configs, train each on Ray Train.

Averaging near-identical models buys little; members should differ in architecture, seed
and config. Each member is a `TorchTrainer` (DDP over `workers_per_member` workers) that
runs the recipe's engine, checkpoints every epoch and survives worker or node loss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import ray.train
import torch
import yaml
from ray.train.torch import TorchConfig, TorchTrainer

from ar_ray import storage
from ar_ray.checkpointed_fit import KeepState, RaySession, checkpointed_fit
from ar_ray.cluster import assigned_device
from ar_ray.config import RecipeConfig, cycle_ends
from ar_ray.data import DatasetSplits
from ar_ray.errors import UserError
from ar_ray.leaderboard import config_for_row, finished_trials, searched_columns
from ar_ray.mlflow_tracking import EpochMetrics, Tracking, tracked_run
from ar_ray.progress import MemberProgress, ProgressHandle, quiet_train_reports
from ar_ray.recipe.checkpoint import CHECKPOINT_FILE, load_checkpoint
from ar_ray.resources import Resources
from ar_ray.tensorboard_log import TENSORBOARD_DIR, EpochScalars

MEMBERS_DIR = "members"
MIN_DISTANCE = 0.15
"""Mean per-hyperparameter distance (see `config_distances`) below which two configs count
as the same recipe."""


@dataclass(frozen=True)
class MemberSpec:
    member_id: str
    config: RecipeConfig
    trial_id: str
    tune_rank: int
    reason: str
    reuse: str = ""  # the trial's final checkpoint folder (relative to the run) it is, if any
    snapshot_of: str = ""  # the member whose run it is a snapshot of (no training of its own)
    snapshot_epoch: int = 0  # the epoch of that run it is the model at (a cycle's end)


def config_distances(board: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Mean per-hyperparameter distance between trials, in [0, 1].

    Numbers are scaled to the span the trials cover (on a log scale where that span is over
    10x, as for learning rates), so every hyperparameter weighs the same; categories are
    equal (0) or not (1).
    """
    parts = []
    for column in columns:
        values = board[column]
        if pd.api.types.is_numeric_dtype(values):
            scaled = _unit_scale(values.to_numpy(dtype=float))
            parts.append(np.abs(scaled[:, None] - scaled[None, :]))
        else:
            labels = values.astype(str).to_numpy()
            parts.append((labels[:, None] != labels[None, :]).astype(float))
    return np.mean(parts, axis=0) if parts else np.zeros((len(board), len(board)))


def _unit_scale(values: np.ndarray) -> np.ndarray:
    if (values > 0).all() and values.max() / values.min() > 10:
        values = np.log(values)
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


def select_members(
    board: pd.DataFrame,
    base: RecipeConfig,
    count: int,
    archs: list[str] | None = None,
    seed: int = 0,
    keep_trial_seeds: bool = True,
) -> list[MemberSpec]:
    """Walk the leaderboard best-first, keeping configs far enough from those already kept.

    With `archs`, member i is re-run with `archs[i % len(archs)]`: the best recipes on other
    backbones. Too few distant configs are topped up by rank. A member keeps its trial's
    seed, so that a finished trial can be the member (`keep_trial_seeds`); a trial picked
    again gets seed `seed + i`, as every member does without `keep_trial_seeds`.
    """
    ranked = finished_trials(board)
    searched = searched_columns(board)
    if count < 1:
        raise UserError(f"--members={count} must be >= 1")
    if len(ranked) == 0:
        raise UserError("the tune run has no finished trial to build members from")
    if count > len(ranked) and not archs:
        raise UserError(f"--members={count} but the tune run has {len(ranked)} finished trials")
    distance = config_distances(ranked, searched)
    chosen: list[tuple[int, str]] = []
    for index in range(len(ranked)):
        if len(chosen) == count:
            break
        if not chosen:
            chosen.append((index, f"best val top-1 {ranked['val_top1'][index]:.4f}"))
            continue
        nearest = min(distance[index, other] for other, _ in chosen)
        if nearest >= MIN_DISTANCE:
            chosen.append((index, f"config distance {nearest:.2f} >= {MIN_DISTANCE} from picks"))
    for index in range(len(ranked)):
        if len(chosen) == count:
            break
        if index not in {picked for picked, _ in chosen}:
            chosen.append((index, f"topped up by rank: no config {MIN_DISTANCE} away left"))
    distinct = list(chosen)
    while len(chosen) < count:  # more members than trials (only with --archs)
        chosen.append((distinct[len(chosen) % len(distinct)][0], "re-run on another backbone"))
    members = []
    for number, (index, reason) in enumerate(chosen):
        config = config_for_row(base, ranked.iloc[index].to_dict(), searched)
        if not keep_trial_seeds or index in [picked for picked, _ in chosen[:number]]:
            config = config.replace(seed=seed + number)
        if archs:
            config = config.replace(arch=archs[number % len(archs)])
        trial = str(ranked["trial_id"][index])
        member_id = make_member_id(number, trial, config)
        members.append(MemberSpec(member_id, config, trial, int(ranked["rank"][index]), reason))
    return members


def make_member_id(number: int, trial_id: str, config: RecipeConfig) -> str:
    """Readable (pick, backbone, trial, seed) plus a hash of the whole resolved config:
    `--resume` reuses a member only if it was trained exactly so, epochs included, and a
    changed config trains a new member instead of reusing a stale one."""
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()
    return f"m{number + 1}-{config.arch}-{trial_id}-s{config.seed}-{digest[:8]}"


def with_cycles(number: int, spec: MemberSpec, cycles: int) -> MemberSpec:
    """The member trained with `cycles` warm restarts (`--snapshots`): another config, so
    another id (and no finished trial matches it unless one ran those cycles)."""
    config = spec.config.replace_checked("lr_cycles", cycles, "--snapshots")
    member_id = make_member_id(number, spec.trial_id, config)
    return dataclasses.replace(spec, config=config, member_id=member_id)


def snapshot_specs(parent: MemberSpec) -> list[MemberSpec]:
    """Members that cost no epochs (Huang et al. 2017, "Snapshot Ensembles"): the parent's
    model at the end of each of its lr cycles but the last (the parent itself is the last).
    `<parent>-c<k>` is as stable as the parent's id, which hashes its config."""
    ends = cycle_ends(parent.config.epochs, parent.config.lr_cycles)[:-1]
    return [
        dataclasses.replace(
            parent,
            member_id=f"{parent.member_id}-c{cycle}",
            reason=f"snapshot of {parent.member_id}: end of lr cycle {cycle} (epoch {epoch})",
            reuse="",
            snapshot_of=parent.member_id,
            snapshot_epoch=epoch,
        )
        for cycle, epoch in enumerate(ends, start=1)
    ]


def with_snapshots(specs: Sequence[MemberSpec]) -> list[MemberSpec]:
    """Each member followed by its snapshots; a member that is a finished trial has none:
    that run's cycle ends were not kept (Train keeps its last two checkpoints only)."""
    return [
        s for parent in specs for s in [parent, *([] if parent.reuse else snapshot_specs(parent))]
    ]


def _snapshot_keeper(snapshots: Sequence[tuple[int, MemberSpec, str]]) -> KeepState | None:
    """Publish a snapshot member from the epoch's checkpoint at each of its epochs."""
    at_epoch = {epoch: (spec, folder) for epoch, spec, folder in snapshots}
    if not at_epoch:
        return None

    def keep(metrics: Mapping[str, Any], state: dict[str, Any], weights: Path) -> None:
        if metrics["epoch"] in at_epoch:
            spec, folder = at_epoch[metrics["epoch"]]
            publish_member(weights, state, spec, folder)

    return keep


def member_train_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Train worker: the engine joins DDP because Train set up the process group."""
    snapshots = _snapshot_keeper(loop_config.get("snapshots", ()))
    worker_fit(loop_config, loop_config["member_id"], before_report=snapshots)


def worker_fit(loop_config: dict[str, Any], name: str, **fit_options: Any) -> None:
    """What every ar-ray Train worker runs (a member's, a distilled student's): the shared
    splits, the progress line named `name`, and `checkpointed_fit` on Train's checkpoints,
    with `fit_options` (a snapshot keeper, a distillation objective) passed on."""
    quiet_train_reports()
    config = RecipeConfig.from_dict(loop_config["config"])
    splits = ray.get(loop_config["splits"])
    rank_zero = ray.train.get_context().get_world_rank() == 0
    progress: ProgressHandle | None = loop_config.get("progress")  # None: called directly
    after_epoch = [progress.reporter(name, config.epochs)] if progress else []
    if rank_zero and loop_config.get("tensorboard"):
        after_epoch.append(EpochScalars(loop_config["tensorboard"]))
    if rank_zero and loop_config.get("mlflow"):
        after_epoch.append(EpochMetrics(*loop_config["mlflow"]))
    session = RaySession(
        ray.train.get_checkpoint,
        ray.train.report,
        ray.train.Checkpoint,
        uploads_weights=rank_zero,
    )

    def each_epoch(metrics: Mapping[str, Any]) -> None:
        for callback in after_epoch:
            callback(metrics)

    checkpointed_fit(
        config, splits, session, worker_device(), after_epoch=each_epoch, **fit_options
    )


def worker_device() -> torch.device:
    """Train's device (the GPU of this worker's local rank) where the worker holds a usable
    GPU; the CPU where it holds none, or only a logical one."""
    usable = assigned_device().type == "cuda"
    return ray.train.torch.get_device() if usable else torch.device("cpu")


def ddp_backend(worker: Resources) -> str:
    """nccl needs CUDA where the workers run, which the driver (often a GPU-less head) cannot
    see: one probe task with a worker's resources asks its node. It also starts the first
    node of that type on an autoscaling cluster, which the members then use."""
    if worker.gpus == 0:
        return "gloo"
    probe = ray.remote(assigned_device).options(**worker.ray_options())
    return "nccl" if ray.get(probe.remote()).type == "cuda" else "gloo"


@dataclass(frozen=True)
class TrainOptions:
    root: str  # <storage>/<name>
    workers_per_member: int = 1
    worker: Resources = field(default_factory=Resources)  # each DDP worker's request
    max_concurrent: int | None = None  # members training at once; None: all of them
    max_failures: int = 3
    tracking: Tracking | None = None  # MLflow: a run per fit, each under `parent_run`
    parent_run: str | None = None


def member_dir(root: str, member_id: str) -> str:
    return storage.join(root, MEMBERS_DIR, member_id)


def finished_member(root: str, spec: MemberSpec) -> bool:
    """A member is done when its final checkpoint was published (written last, atomically)."""
    return storage.exists(storage.join(member_dir(root, spec.member_id), CHECKPOINT_FILE))


def fit_tags(options: TrainOptions) -> dict[str, str]:
    """What a tracked fit holds: its DDP workers and each one's request."""
    return {"workers": str(options.workers_per_member), "worker": options.worker.describe()}


def train_member(
    spec: MemberSpec,
    splits_ref: ray.ObjectRef,
    options: TrainOptions,
    train_loop: Callable[[dict[str, Any]], None] = member_train_loop,
    backend: str = "gloo",
    progress: ProgressHandle | None = None,
    snapshots: Sequence[MemberSpec] = (),
) -> dict[str, Any]:
    """Fit one member; a re-run with the same id resumes from its latest Train checkpoint.

    Rank 0 publishes each of `snapshots` (this member's) at its epoch, through storage, so
    to a bucket too: Train's own checkpoints of that epoch are gone by the end. Tracked,
    the member's MLflow run (the one under the same parent, when resumed) gets its epochs."""
    with tracked_run(
        options.tracking,
        f"member/{spec.member_id}",
        spec.member_id,
        kind="member",
        params=spec.config.to_dict(),
        tags=fit_tags(options),
        parent=options.parent_run,
        resume=True,
    ) as run_id:
        result = fit_on_train(
            train_loop,
            {
                "config": spec.config.to_dict(),
                "splits": splits_ref,
                "member_id": spec.member_id,
                "progress": progress,
                "tensorboard": storage.join(
                    member_dir(options.root, spec.member_id), TENSORBOARD_DIR
                ),
                "mlflow": None if run_id is None else (options.tracking, run_id),
                "snapshots": [
                    (s.snapshot_epoch, s, member_dir(options.root, s.member_id)) for s in snapshots
                ],
            },
            spec.member_id,
            storage.join(options.root, MEMBERS_DIR),
            options,
            backend,
        )
    with result.checkpoint.as_directory() as local:
        weights = Path(local) / CHECKPOINT_FILE
        return publish_member(
            weights, load_checkpoint(weights), spec, member_dir(options.root, spec.member_id)
        )


def fit_on_train(
    train_loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    name: str,
    storage_path: str,
    options: TrainOptions,
    backend: str = "gloo",
) -> ray.train.Result:
    """One `TorchTrainer` run named `name` under `storage_path`, with the options' workers,
    retries and two kept checkpoints; a re-run of the same name resumes from its latest
    checkpoint. Members and a distilled student train through this one place."""
    worker = options.worker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=backend),
        scaling_config=ray.train.ScalingConfig(
            num_workers=options.workers_per_member,
            use_gpu=worker.gpus > 0,
            resources_per_worker={"CPU": worker.cpus, "GPU": worker.gpus},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=options.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    return trainer.fit()


def publish_member(
    weights: Path, state: dict[str, Any], spec: MemberSpec, folder: str
) -> dict[str, Any]:
    """Write the member's metrics and config, then its checkpoint at the fixed path, last, as
    the done marker. One download of the checkpoint (`weights`, `state` loaded from it)
    serves all three: from a bucket it is the costly part. Returns the last epoch's metrics."""
    history = pd.DataFrame(state["history"])
    storage.write_text(storage.join(folder, "metrics.csv"), history.to_csv(index=False))
    config = yaml.safe_dump(spec.config.to_dict(), sort_keys=False)
    storage.write_text(storage.join(folder, "config.yaml"), config)
    storage.upload_file(weights, storage.join(folder, CHECKPOINT_FILE))
    return history.iloc[-1].to_dict()


def reuse_trial(spec: MemberSpec, root: str) -> bool:
    """Publish the finished trial's final checkpoint as the member, without training; False
    (train it) if the checkpoint is not the member's config after all."""
    with tempfile.TemporaryDirectory() as local:
        source = storage.join(root, spec.reuse, CHECKPOINT_FILE)
        weights = storage.download_file(source, Path(local) / CHECKPOINT_FILE)
        state = load_checkpoint(weights)
        if state["config"] != spec.config.to_dict() or state["epoch"] != spec.config.epochs:
            print(f"{spec.member_id}: trial {spec.trial_id}'s checkpoint differs; training it")
            return False
        publish_member(weights, state, spec, member_dir(root, spec.member_id))
    return True


def train_members(
    specs: list[MemberSpec],
    splits: DatasetSplits,
    options: TrainOptions,
    train_loop: Callable[[dict[str, Any]], None] = member_train_loop,
) -> dict[str, str]:
    """Train the unfinished members side by side; return each member's status.

    All of them are submitted at once (or `max_concurrent`): the autoscaler sees their
    whole demand and grows the cluster to fit it, instead of one member at a time.
    """
    open_specs = [spec for spec in specs if not finished_member(options.root, spec)]
    status = {spec.member_id: "reused" for spec in specs if spec not in open_specs}
    snapshots = [spec for spec in open_specs if spec.snapshot_of]
    todo = [spec for spec in open_specs if not spec.snapshot_of]
    _check_parents_open(snapshots, todo)
    for spec in [spec for spec in todo if spec.reuse and reuse_trial(spec, options.root)]:
        status[spec.member_id] = f"reused from trial {spec.trial_id}"
        todo.remove(spec)
    status |= {spec.member_id: f"snapshot of {spec.snapshot_of}" for spec in snapshots}
    if not todo:
        return status
    splits_ref = ray.put(splits.for_training())
    backend = ddp_backend(options.worker)
    pool = ThreadPoolExecutor(max_workers=min(len(todo), options.max_concurrent or len(todo)))
    progress = MemberProgress().start()
    futures = {
        spec.member_id: pool.submit(
            train_member,
            spec,
            splits_ref,
            options,
            train_loop,
            backend,
            progress.handle,
            [snapshot for snapshot in snapshots if snapshot.snapshot_of == spec.member_id],
        )
        for spec in todo
    }
    try:
        pending = set(futures.values())
        while pending:  # short waits: a blocked main thread would hold back Ctrl+C
            done, pending = wait(pending, timeout=1.0, return_when=FIRST_EXCEPTION)
            for future in done:
                future.result()
    finally:  # on Ctrl+C, do not wait for members still training: their epochs are saved
        pool.shutdown(wait=False, cancel_futures=True)
        progress.close()
    return status | {member_id: "trained" for member_id in futures}


def _check_parents_open(snapshots: list[MemberSpec], training: list[MemberSpec]) -> None:
    """A snapshot is published while its parent trains; a finished parent cannot make it
    again (Train resumes it at its end), so a missing one is an error, before any work."""
    parents = {spec.member_id for spec in training}
    for spec in snapshots:
        if spec.snapshot_of not in parents:
            raise UserError(
                f"member {spec.member_id} is missing but {spec.snapshot_of}, whose run it is "
                "a snapshot of, finished; pass --overwrite to train both again"
            )
