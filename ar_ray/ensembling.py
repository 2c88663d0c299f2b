"""`ar-ray ensemble`: members -> probabilities -> fitted weights -> outputs.

Weights are fitted on validation probabilities only; test numbers are reported for every
method, so the choice can be checked but never tuned on test. Validation scores of ensembles
are out of fold (`cross_fit`), and `metrics.csv` says so in its `estimate` column.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ar_ray import storage
from ar_ray.data import DatasetSplits
from ar_ray.ensemble_weights import CrossFit, combine, cross_fit, stratified_folds
from ar_ray.errors import UserError
from ar_ray.inference import InferenceOptions, PoolTally, member_probabilities
from ar_ray.leaderboard import TuneRecord
from ar_ray.members import (
    MemberSpec,
    TrainOptions,
    member_dir,
    select_members,
    train_members,
)
from ar_ray.metrics import classification_metrics, reliability_table
from ar_ray.outputs import atomic_write_csv, environment_info
from ar_ray.predictions import predictions_frame
from ar_ray.recipe.checkpoint import CHECKPOINT_FILE
from ar_ray.report import write_report
from ar_ray.resources import DEFAULT_MAX_ACTORS, Resources
from ar_ray.saved_ensemble import ENSEMBLE_DIR, SavedEnsemble


@dataclass
class EnsembleRequest:
    """The resolved `ar-ray ensemble` command, recorded next to its results."""

    run: str
    members: int = 3
    archs: list[str] | None = None
    epochs: int | None = None
    workers_per_member: int = 1
    tta: str = "tencrop"
    greedy_size: int = 25
    folds: int = 5  # cross-fitting folds of val, dealt with `seed`
    seed: int = 0
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_concurrent: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    max_actors: int = DEFAULT_MAX_ACTORS
    images_per_call: int | None = None  # None: by the actors' device (inference.py)

    def train_options(self, root: str) -> TrainOptions:
        worker = Resources(cpus=self.cpus_per_worker, gpus=self.gpus_per_worker)
        return TrainOptions(
            root=root,
            workers_per_member=self.workers_per_member,
            worker=worker,
            max_concurrent=self.max_concurrent,
        )

    def inference_options(self) -> InferenceOptions:
        return InferenceOptions.from_record(asdict(self))


@dataclass
class EnsembleResult:
    """A finished ensemble: every member's and method's scores (`metrics`, one row per
    name and split, with how each was estimated), the chosen weighting and its folder."""

    metrics: pd.DataFrame
    chosen: str
    run: str  # the run folder: `predict` takes it

    @property
    def folder(self) -> str:
        """Where the outputs are: <run>/ensemble."""
        return storage.join(self.run, ENSEMBLE_DIR)


def _checkpoints(run: str, specs: list[MemberSpec]) -> list[str]:
    return [storage.join(member_dir(run, s.member_id), CHECKPOINT_FILE) for s in specs]


def estimate(split: str, kind: str) -> str:
    """How far a score can be trusted. Test was never used to fit or choose anything.
    On val, an ensemble's weights and method are cross-fitted; a member fitted nothing on
    val, but val picked its config in tune, so its val score is mildly optimistic."""
    if split != "val":
        return "held-out"
    return "out-of-fold" if kind == "ensemble" else "selected-on-val"


def _metric_rows(
    split: str,
    member_probs: np.ndarray,
    labels: np.ndarray,
    names: list[str],
    ensembles: dict[str, np.ndarray],
) -> list[dict[str, Any]]:
    """Rows for every member and every ensemble's [N, K] probabilities on one split."""
    scored = [("member", name, probs) for name, probs in zip(names, member_probs, strict=True)]
    scored += [("ensemble", name, probs) for name, probs in ensembles.items()]
    return [
        {
            "name": name,
            "kind": kind,
            "split": split,
            "estimate": estimate(split, kind),
            **classification_metrics(probs, labels),
        }
        for kind, name, probs in scored
    ]


def _refitted_ensembles(member_probs: np.ndarray, fit: CrossFit) -> dict[str, np.ndarray]:
    """Each method's weights fitted on all of val, and "final" (the chosen one), applied."""
    fitted = {**fit.fitted, "final": fit.fitted[fit.chosen]}
    return {method: combine(member_probs, weights) for method, weights in fitted.items()}


def val_folds(request: EnsembleRequest, val_labels: np.ndarray) -> np.ndarray:
    """The cross-fitting fold of each val image; dealt before members train, so a val split
    too small to cross-fit fails then, not after the training."""
    try:
        return stratified_folds(val_labels, request.folds, request.seed)
    except ValueError as error:
        raise UserError(f"val: {error}") from None


def _stage(run: str) -> tuple[Path, bool]:
    """Outputs are written in a local folder; for a URI run that folder is uploaded after."""
    folder = storage.join(run, ENSEMBLE_DIR)
    if storage.is_uri(run):
        return Path(tempfile.mkdtemp(prefix="ar-ray-ensemble-")), True
    return Path(folder), False


def _publish(stage: Path, run: str) -> None:
    for path in sorted(stage.iterdir()):
        storage.upload_file(path, storage.join(run, ENSEMBLE_DIR, path.name))
    shutil.rmtree(stage)


def prepare_ensemble_dir(run: str, *, resume: bool, overwrite: bool) -> None:
    """A second run into the same folder must be asked for: --resume reuses finished members."""
    folders = [storage.join(run, ENSEMBLE_DIR), storage.join(run, "members")]
    if not any(storage.exists(folder) for folder in folders) or resume:
        return
    if not overwrite:
        raise UserError(f"{folders[0]}: already exists; pass --resume or --overwrite")
    for folder in folders:
        if storage.exists(folder):
            storage.remove_tree(folder)


def plan_members(request: EnsembleRequest, record: TuneRecord) -> list[MemberSpec]:
    """The members to train; cheap, so the CLI checks it before starting any Ray work."""
    base = record.base.replace(epochs=request.epochs or record.base.epochs)
    return select_members(record.board, base, request.members, request.archs, request.seed)


def run_ensemble(
    request: EnsembleRequest,
    record: TuneRecord,
    splits: DatasetSplits,
    options: TrainOptions,
) -> EnsembleResult:
    """Train (or reuse) the members, predict val/test on actors, fit weights, write outputs.

    The caller decides what may be overwritten (`prepare_ensemble_dir`) before calling.
    """
    run = storage.resolve(request.run)
    specs = plan_members(request, record)
    stage, remote = _stage(run)
    selection = pd.DataFrame(
        [
            {
                "member": s.member_id,
                "trial_id": s.trial_id,
                "tune_rank": s.tune_rank,
                "arch": s.config.arch,
                "seed": s.config.seed,
                "epochs": s.config.epochs,
                "reason": s.reason,
            }
            for s in specs
        ]
    )
    atomic_write_csv(stage / "members.csv", selection)
    fold_of = val_folds(request, splits.val.labels)
    status = train_members(specs, splits, options)

    checkpoints = _checkpoints(run, specs)
    names = [s.member_id for s in specs]
    parts = [splits.val.images] + ([] if splits.test is None else [splits.test.images])
    tally = PoolTally()
    pool = request.inference_options()
    val, *tested = member_probabilities(
        checkpoints, parts, tta=request.tta, options=pool, tally=tally
    )
    atomic_write_csv(stage / "inference_pool.csv", tally.frame())
    val_labels = splits.val.labels
    fit = cross_fit(val, val_labels, fold_of, request.greedy_size)
    fitted, chosen = fit.fitted, fit.chosen
    rows = _metric_rows("val", val, val_labels, names, fit.out_of_fold)
    np.savez_compressed(
        stage / "probs_val.npz",
        member_probs=val,
        labels=val_labels,
        ids=np.array(splits.val.ids),
        folds=fit.fold_of,
    )

    test = None
    if splits.test is not None:
        test = tested[0]
        test_ensembles = _refitted_ensembles(test, fit)
        final_test = test_ensembles["final"]
        test_labels = splits.test.labels
        frame = predictions_frame(final_test, splits.test.ids, splits.classes, test_labels)
        atomic_write_csv(stage / "predictions.csv", frame)
        if splits.test.labels is None:
            submission = frame[["image_id", "predicted"]]
            atomic_write_csv(stage / "submission.csv", submission)
        else:
            rows += _metric_rows("test", test, test_labels, names, test_ensembles)
            np.savez_compressed(
                stage / "probs_test.npz",
                member_probs=test,
                labels=test_labels,
                ids=np.array(splits.test.ids),
            )

    metrics = pd.DataFrame(rows)
    member_solo = metrics[metrics["kind"] == "member"].pivot(
        index="name", columns="split", values="top1"
    )
    weights = pd.DataFrame(
        [
            {
                "member": name,
                "method": method,
                "weight": float(w.weights[i]),
                "temperature": w.temperature,
                **{f"solo_{split}_top1": member_solo.loc[name, split] for split in member_solo},
            }
            for method, w in fitted.items()
            for i, name in enumerate(names)
        ]
    )
    selection["status"] = selection["member"].map(status)
    atomic_write_csv(stage / "members.csv", selection.merge(_member_runs(run, specs)))
    atomic_write_csv(stage / "weights.csv", weights)
    atomic_write_csv(stage / "metrics.csv", metrics)
    report_probs, report_labels, report_split = (
        (final_test, test_labels, "test")
        if test is not None and test_labels is not None
        else (fit.out_of_fold["final"], val_labels, "val, out-of-fold")
    )
    reliability = reliability_table(report_probs, report_labels).assign(
        name=f"final ({report_split})"
    )
    write_report(
        stage,
        metrics=metrics,
        weights=weights,
        reliability=reliability,
        title=f"ar-ray ensemble of {len(specs)} members ({chosen} weights, {request.tta})",
    )
    SavedEnsemble(
        members=names,
        checkpoints=[storage.join("members", n, CHECKPOINT_FILE) for n in names],
        method=chosen,
        weights=fitted[chosen].weights.tolist(),
        temperature=fitted[chosen].temperature,
        tta=request.tta,
        classes=list(splits.classes),
        image_size=record.base.image_size,
        stored_size=splits.stored_size,
        images_per_call=pool.images_per_call,
        fold_methods=list(fit.fold_choices),
        request=asdict(request),
        env=environment_info(),
    ).save(stage)
    if remote:
        _publish(stage, run)
    return EnsembleResult(metrics=metrics, chosen=chosen, run=run)


def _member_runs(run: str, specs: list[MemberSpec]) -> pd.DataFrame:
    """Where and when each member trained, and what it held (from its epochs' records).

    A member moved by a lost node lists every node it ran on.
    """
    rows = []
    for spec in specs:
        text = storage.read_text(storage.join(member_dir(run, spec.member_id), "metrics.csv"))
        history = pd.read_csv(io.StringIO(text))
        rows.append(
            {
                "member": spec.member_id,
                "epochs_trained": int(history["epoch"].max()),
                "val_top1": float(history["val_top1"].iloc[-1]),
                "node": " ".join(dict.fromkeys(history["node"].astype(str))),
                "cpus": history["cpus"].max() if "cpus" in history else np.nan,
                "gpus": history["gpus"].max() if "gpus" in history else np.nan,
                "started": _timestamp(history, "started_at", "min"),
                "finished": _timestamp(history, "finished_at", "max"),
            }
        )
    return pd.DataFrame(rows)


def _timestamp(history: pd.DataFrame, column: str, how: str) -> str:
    if column not in history:  # a member trained before times were recorded
        return ""
    seconds = getattr(history[column], how)()
    return pd.Timestamp(seconds, unit="s", tz="UTC").isoformat()
