"""`ar-ray distill`: one student learns the saved ensemble, then is scored, timed and saved.

Plan (cheap, before Ray): the student's config is the best-on-val member's, with the
asked-for backbone, epochs and seed; its name hashes that config and the distillation
settings, so `--resume` continues the same Train run and a changed request is refused.
Then train (`distill_job`), publish the checkpoint (last, as the done marker), score and
time it beside the ensemble (`distill_outputs`), and save it as a one-member ensemble,
which is what `predict --model distilled` and `export --model distilled` read.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from ar_ray import storage
from ar_ray.config import RecipeConfig
from ar_ray.data import DatasetSplits
from ar_ray.distill_job import train_student
from ar_ray.distill_outputs import (
    best_member_name,
    metrics_frame,
    remote_score_and_time,
    write_outputs,
)
from ar_ray.errors import UserError
from ar_ray.members import MEMBERS_DIR, TrainOptions, fit_tags
from ar_ray.mlflow_tracking import ARTIFACT_SUFFIXES, Tracking, log_files, log_table, tracked_run
from ar_ray.outputs import environment_info
from ar_ray.recipe.checkpoint import CHECKPOINT_FILE, load_checkpoint
from ar_ray.resources import Resources
from ar_ray.saved_ensemble import DISTILLED_DIR, SavedEnsemble

REQUEST_FILE = "request.yaml"


@dataclass
class DistillRequest:
    """The resolved `ar-ray distill` command, recorded next to its results."""

    run: str
    arch: str | None = None  # None: the best member's
    epochs: int | None = None  # None: the members'
    temperature: float = 4.0
    label_weight: float = 0.0
    seed: int = 0


@dataclass
class DistillResult:
    """A distilled student: its scores beside the ensemble's and the best member's
    (`metrics`, one row per model and split), its speed beside theirs, and where it is."""

    metrics: pd.DataFrame
    speed: pd.DataFrame
    run: str
    student: str  # the Train run's name (hashes its config and the distillation settings)
    summary: list[str]

    @property
    def folder(self) -> str:
        """Where the outputs are: <run>/distilled."""
        return storage.join(self.run, DISTILLED_DIR)


def member_config(run: str, member: str) -> RecipeConfig:
    location = storage.join(run, MEMBERS_DIR, member, "config.yaml")
    return RecipeConfig.from_dict(yaml.safe_load(storage.read_text(location)), source=location)


def student_config(request: DistillRequest, best: RecipeConfig) -> RecipeConfig:
    """The best member's recipe with the student's overrides. One lr cycle (cycles only
    make snapshot members); without a label term, contrastive regularisation and Mean
    Teacher are off: their losses would be computed and thrown away, and the projector
    they train would be an unused parameter under DDP."""
    changes: dict[str, Any] = {"seed": request.seed, "lr_cycles": 1}
    if request.epochs is not None:
        changes["epochs"] = request.epochs
    if request.label_weight == 0:
        changes |= {"cr_weight": 0.0, "mt_weight": 0.0}
    config = best.replace(**changes)
    if request.arch is not None:
        config = config.replace_checked("arch", request.arch, "--arch")
    return config


def student_name(config: RecipeConfig, request: DistillRequest, saved: SavedEnsemble) -> str:
    """Readable backbone and seed plus a hash of all that shapes the student: its config,
    the distillation settings and the teacher (members and weights)."""
    shaped = {
        "config": config.to_dict(),
        "temperature": request.temperature,
        "label_weight": request.label_weight,
        "teacher": [saved.members, saved.weights, saved.temperature],
    }
    digest = hashlib.sha256(json.dumps(shaped, sort_keys=True).encode()).hexdigest()
    return f"student-{config.arch}-s{config.seed}-{digest[:8]}"


def check_request(request: DistillRequest) -> None:
    if request.temperature <= 0:
        raise UserError(f"--temperature={request.temperature:g} must be > 0")
    if request.label_weight < 0:
        raise UserError(f"--label-weight={request.label_weight:g} must be >= 0")
    if request.epochs is not None and request.epochs < 1:
        raise UserError(f"--epochs={request.epochs} must be >= 1")


def prepare_distill_dir(root: str, name: str, *, resume: bool, overwrite: bool) -> None:
    """A second distill into the same run must be asked for; `--resume` continues only the
    same student (same name), since another would silently mix two runs' files."""
    folder = storage.join(root, DISTILLED_DIR)
    if not storage.exists(folder):
        return
    if resume:
        record = storage.join(folder, REQUEST_FILE)
        recorded = yaml.safe_load(storage.read_text(record)) if storage.exists(record) else {}
        if recorded.get("student", name) != name:
            raise UserError(
                f"{record}: records student {recorded['student']}, not {name}; "
                "--resume continues the recorded one (pass --overwrite to replace it)"
            )
        return
    if not overwrite:
        raise UserError(f"{folder}: already exists; pass --resume or --overwrite")
    storage.remove_tree(folder)


def _finished(folder: str, name: str) -> bool:
    """The student is published once its checkpoint is (written last, atomically)."""
    record = storage.join(folder, REQUEST_FILE)
    if not storage.exists(storage.join(folder, CHECKPOINT_FILE)) or not storage.exists(record):
        return False
    return yaml.safe_load(storage.read_text(record)).get("student") == name


def publish_student(local: Path, config: RecipeConfig, folder: str) -> pd.DataFrame:
    """history.csv and config.yaml, then the checkpoint (the done marker), last."""
    history = pd.DataFrame(load_checkpoint(local)["history"])
    storage.write_text(storage.join(folder, "history.csv"), history.to_csv(index=False))
    storage.write_text(
        storage.join(folder, "config.yaml"), yaml.safe_dump(config.to_dict(), sort_keys=False)
    )
    storage.upload_file(local, storage.join(folder, CHECKPOINT_FILE))
    return history


def saved_student(
    saved: SavedEnsemble, config: RecipeConfig, name: str, request: DistillRequest
) -> SavedEnsemble:
    """The student as a one-member ensemble of weight 1 and temperature 1, served with the
    ensemble's TTA, image sizes and inference pool (its request keeps the actor settings
    `predict` inherits, plus the distill request)."""
    return SavedEnsemble(
        members=[name],
        checkpoints=[storage.join(DISTILLED_DIR, CHECKPOINT_FILE)],
        method="distilled",
        weights=[1.0],
        temperature=1.0,
        tta=saved.tta,
        classes=list(saved.classes),
        image_size=config.image_size,
        stored_size=saved.stored_size,
        images_per_call=saved.images_per_call,
        request={**saved.request, "distill": asdict(request)},
        env=environment_info(),
    )


@dataclass(frozen=True)
class DistillPlan:
    """What `run_distill` will train, worked out before Ray starts."""

    saved: SavedEnsemble
    best: str  # the best-on-val member's id
    config: RecipeConfig
    name: str
    worker: Resources
    workers: int


def plan_distill(request: DistillRequest) -> DistillPlan:
    """The teacher, the student's config and name, and the member resources the ensemble
    recorded; every bad input fails here, as one line."""
    check_request(request)
    root = storage.resolve(request.run)
    saved = SavedEnsemble.load(root)
    best = best_member_name(root)
    config = student_config(request, member_config(root, best))
    worker = Resources.from_record(saved.request, "cpus_per_worker", "gpus_per_worker")
    workers = int(saved.request.get("workers_per_member") or 1)
    return DistillPlan(saved, best, config, student_name(config, request, saved), worker, workers)


def describe_plan(plan: DistillPlan, request: DistillRequest) -> str:
    return (
        f"distilling {len(plan.saved.members)} members ({plan.saved.method} weights) into one "
        f"{plan.config.arch} for {plan.config.epochs} epochs (T={request.temperature:g}, "
        f"label weight {request.label_weight:g}); each of {plan.workers} worker(s) requests "
        f"{plan.worker.describe()} (the ensemble's members')"
    )


def run_distill(
    request: DistillRequest,
    plan: DistillPlan,
    splits: DatasetSplits,
    tracking: Tracking | None = None,
    resume: bool = False,
) -> DistillResult:
    """Train (or resume, or reuse) the student, then score, time and save it. The caller
    decided what may be overwritten (`prepare_distill_dir`) and connected to Ray. Tracked,
    the student is an MLflow run (`resume`: the one it left) in the run folder's experiment,
    with its epochs, scores and outputs."""
    folder = storage.join(storage.resolve(request.run), DISTILLED_DIR)
    options = TrainOptions(root=folder, workers_per_member=plan.workers, worker=plan.worker)
    with tracked_run(
        tracking, f"distilled/{plan.name}", plan.name, kind="distilled",
        params={**plan.config.to_dict(), **asdict(request)}, tags=fit_tags(options),
        resume=resume,
    ) as run_id:  # fmt: skip
        tracked = None if run_id is None else (tracking, run_id)
        return _run_distill(request, plan, splits, options, tracked)


def _run_distill(
    request: DistillRequest,
    plan: DistillPlan,
    splits: DatasetSplits,
    options: TrainOptions,
    tracked: tuple[Tracking, str] | None,
) -> DistillResult:
    root = storage.resolve(request.run)
    folder = options.root
    record = {"request": asdict(request), "student": plan.name, "teacher_best": plan.best}
    storage.write_text(storage.join(folder, REQUEST_FILE), yaml.safe_dump(record, sort_keys=False))
    if _finished(folder, plan.name):
        text = storage.read_text(storage.join(folder, "history.csv"))
        history = pd.read_csv(io.StringIO(text))
    else:
        checkpoint = train_student(
            plan.name,
            plan.config,
            plan.saved,
            splits,
            options,
            temperature=request.temperature,
            label_weight=request.label_weight,
            folder=folder,
            tracked=tracked,
        )
        with checkpoint.as_directory() as trained:
            history = publish_student(Path(trained) / CHECKPOINT_FILE, plan.config, folder)
    best = storage.join(root, MEMBERS_DIR, plan.best, CHECKPOINT_FILE)
    scored = remote_score_and_time(
        plan.worker, storage.join(folder, CHECKPOINT_FILE), best, plan.saved, splits
    )
    metrics = metrics_frame(root, plan.best, {"val": scored["val"], "test": scored["test"]})
    speed = pd.DataFrame(scored["speed"])
    title = f"ar-ray distill: {plan.config.arch} student of {len(plan.saved.members)} members"
    with storage.staged_folder(folder) as stage:
        summary = write_outputs(stage, metrics, speed, history, title)
        student = saved_student(plan.saved, plan.config, plan.name, request)
        student.save(stage)  # what predict and serve load
        if tracked is not None:
            log_table(*tracked, metrics)  # the student beside the ensemble and its best member
            artifacts = sorted(p for p in stage.iterdir() if p.suffix in ARTIFACT_SUFFIXES)
            log_files(*tracked, artifacts)
    return DistillResult(metrics, speed, root, plan.name, summary)
