"""`ar-ray ensemble`: members -> probabilities -> fitted weights -> outputs.

Weights are fitted on validation probabilities only; test numbers are reported for every
method, so the choice can be checked but never tuned on test. Validation scores of ensembles
are out of fold (`cross_fit`), and `metrics.csv` says so in its `estimate` column.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ar_ray import storage
from ar_ray.data import DatasetSplits
from ar_ray.diversity import member_diversity
from ar_ray.ensemble_weights import CrossFit, best_member, combine, cross_fit, stratified_folds
from ar_ray.errors import UserError
from ar_ray.inference import InferenceOptions, PoolTally, member_probabilities
from ar_ray.leaderboard import TuneRecord, config_for_row, searched_columns
from ar_ray.members import (
    MemberSpec,
    TrainOptions,
    finished_member,
    member_dir,
    select_members,
    train_members,
    with_cycles,
    with_snapshots,
)
from ar_ray.metrics import classification_metrics, reliability_table, top_k_correct
from ar_ray.mlflow_tracking import (
    ARTIFACT_SUFFIXES,
    Tracking,
    log_files,
    log_table,
    record_fit,
    tracked_run,
)
from ar_ray.outputs import atomic_write_csv, environment_info
from ar_ray.predictions import predictions_frame
from ar_ray.recipe.checkpoint import CHECKPOINT_FILE
from ar_ray.report import write_report
from ar_ray.resources import DEFAULT_MAX_ACTORS, Resources
from ar_ray.saved_ensemble import ENSEMBLE_DIR, SavedEnsemble
from ar_ray.uncertainty import paired_gain


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
    retrain: bool = False  # True: train every member, even one a finished trial already is
    snapshots: int = 1  # > 1: members train lr_cycles=snapshots, each cycle's end a member

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
    name and split, with how each was estimated and its gain over `best_member`), the chosen
    weighting and why, and its folder."""

    metrics: pd.DataFrame
    chosen: str
    run: str  # the run folder: `predict` takes it
    best_member: str = ""  # best on val: the member a user without the ensemble would keep
    reason: str = ""  # why `chosen` (ensemble_weights.choose_method)

    @property
    def folder(self) -> str:
        """Where the outputs are: <run>/ensemble."""
        return storage.join(self.run, ENSEMBLE_DIR)

    def summary_lines(self) -> list[str]:
        """What a user looks for last, on screen and atop the report: why these weights, and
        the final ensemble against the best member on every scored split, with the paired
        bootstrap's 95% interval of the gain, so a loss can be told from noise."""
        lines = [f"weights: {self.reason}"] if self.reason else []
        for split, rows in self.metrics.groupby("split", sort=False):
            final = rows[rows["name"] == "final"].iloc[0]
            member = rows[rows["name"] == self.best_member].iloc[0]
            gain = f"{final.vs_best_member:+.2f} points [{final.vs_best_member_low:+.2f}, "
            gain += f"{final.vs_best_member_high:+.2f}]"
            lines.append(
                f"{split} top-1: ensemble ({self.chosen} weights) {100 * final.top1:.2f}% "
                f"({final.estimate}) vs best member {self.best_member} "
                f"{100 * member.top1:.2f}% ({member.estimate}; best on val): {gain}"
            )
        return lines


def _checkpoints(run: str, specs: list[MemberSpec]) -> list[str]:
    return [storage.join(member_dir(run, s.member_id), CHECKPOINT_FILE) for s in specs]


def estimate(split: str, kind: str) -> str:
    """How far a score can be trusted. Test was never used to fit or choose anything.
    On val, an ensemble's weights and method are cross-fitted; a member fitted nothing on
    val, but val picked its config in tune, so its val score is mildly optimistic."""
    if split != "val":
        return "held-out"
    return "out-of-fold" if kind == "ensemble" else "selected-on-val"


@dataclass(frozen=True)
class _Scored:
    """A labelled split, as its metric rows and the report's reliability curve need it."""

    split: str  # "val" or "test"
    member_probs: np.ndarray  # [M, N, K]
    labels: np.ndarray  # [N]
    ensembles: dict[str, np.ndarray]  # each method and "final" -> [N, K]


GAIN_COLUMNS = ["vs_best_member", "vs_best_member_low", "vs_best_member_high"]
"""Top-1 minus the best-on-val member's on the same split and images, in points, with the
paired bootstrap's 95% interval (`uncertainty.paired_gain`)."""


def _metric_rows(scored: _Scored, names: list[str], best: int) -> list[dict[str, Any]]:
    """Rows for every member and every ensemble's [N, K] probabilities on one split, each
    with its gain over member `best`."""
    members = zip(names, scored.member_probs, strict=True)
    rated = [("member", name, probs) for name, probs in members]
    rated += [("ensemble", name, probs) for name, probs in scored.ensembles.items()]
    baseline = top_k_correct(scored.member_probs[best], scored.labels, 1)
    return [
        metric_row(name, kind, scored.split, probs, scored.labels, baseline)
        for kind, name, probs in rated
    ]


def metric_row(
    name: str,
    kind: str,
    split: str,
    probs: np.ndarray,
    labels: np.ndarray,
    baseline: np.ndarray,
    estimated_as: str | None = None,
) -> dict[str, Any]:
    """One metrics.csv row: `probs`' scores, how far they can be trusted (`estimate` of
    `estimated_as`, default `kind`), and the paired gain over `baseline` (the best member's
    per-image top-1 correctness) with its interval. `ensemble` and `distill` both write it."""
    gain = paired_gain(top_k_correct(probs, labels, 1), baseline)
    return {
        "name": name,
        "kind": kind,
        "split": split,
        "estimate": estimate(split, estimated_as or kind),
        **classification_metrics(probs, labels),
        **dict(zip(GAIN_COLUMNS, (gain.points, gain.low, gain.high), strict=True)),
    }


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
    """The members, each marked with the finished trial it is where one is (unless
    `retrain`), and with `snapshots` > 1 each trained one followed by its snapshots;
    cheap, so the CLI checks it before starting any Ray work."""
    base = record.base.replace(epochs=request.epochs or record.base.epochs)
    specs = select_members(
        record.board, base, request.members, request.archs, request.seed, not request.retrain
    )
    if request.snapshots > 1:  # another schedule: a trial is reused only if it ran it too
        specs = [with_cycles(number, s, request.snapshots) for number, s in enumerate(specs)]
    if not (request.retrain or request.workers_per_member > 1):  # DDP: not a trial's run
        specs = [replace(spec, reuse=_finished_trial(spec, record)) for spec in specs]
    return with_snapshots(specs) if request.snapshots > 1 else specs


def _finished_trial(spec: MemberSpec, record: TuneRecord) -> str:
    """The final checkpoint folder of the trial whose full-length run is `spec`, or ""."""
    rows = record.board[record.board["trial_id"].astype(str) == spec.trial_id]
    if "checkpoint" not in rows or rows.empty:  # a leaderboard from before reuse
        return ""
    row = rows.iloc[0].to_dict()
    trial = config_for_row(record.base, row, searched_columns(record.board))
    same = row["status"] == "COMPLETE" and trial == spec.config
    return str(row["checkpoint"]) if same and isinstance(row["checkpoint"], str) else ""


def describe_members(specs: list[MemberSpec], root: str) -> str:
    """What `ensemble` will spend before it starts: members taken from finished trials or
    an earlier run cost no training, nor do snapshots of the members that train; the rest
    train for their epochs."""
    open_specs = [spec for spec in specs if not finished_member(root, spec)]
    done = len(specs) - len(open_specs)
    reused = sum(bool(spec.reuse) for spec in open_specs)
    snapshots = sum(bool(spec.snapshot_of) for spec in open_specs)
    todo = [spec for spec in open_specs if not spec.reuse and not spec.snapshot_of]
    epochs = sum(spec.config.epochs for spec in todo)
    parts = [f"{reused} reused from finished tune trials"] if reused else []
    parts += [f"{done} finished in an earlier run"] if done else []
    parts.append(f"{len(todo)} to train ({epochs} epochs in all)")
    parts += [f"{snapshots} snapshots of them (no extra epochs)"] if snapshots else []
    return f"members: {', '.join(parts)}"


def run_ensemble(
    request: EnsembleRequest,
    record: TuneRecord,
    splits: DatasetSplits,
    options: TrainOptions,
    tracking: Tracking | None = None,
    resume: bool = False,
) -> EnsembleResult:
    """Train (or reuse) the members, predict val/test on actors, fit weights, write outputs.

    The caller decides what may be overwritten (`prepare_ensemble_dir`) before calling.
    Tracked, it is MLflow's parent run of its members' (`resume`: the one it left).
    """
    specs = plan_members(request, record)
    with tracked_run(
        tracking, "ensemble", f"ensemble of {len(specs)}", kind="ensemble",
        params=asdict(request), resume=resume,
    ) as parent:  # fmt: skip
        options = replace(options, tracking=tracking, parent_run=parent)
        return _run_ensemble(request, record, specs, splits, options)


def _run_ensemble(
    request: EnsembleRequest,
    record: TuneRecord,
    specs: list[MemberSpec],
    splits: DatasetSplits,
    options: TrainOptions,
) -> EnsembleResult:
    run = storage.resolve(request.run)
    names = [s.member_id for s in specs]
    with storage.staged_folder(storage.join(run, ENSEMBLE_DIR)) as stage:
        selection = _selection(specs)
        atomic_write_csv(stage / "members.csv", selection)
        fold_of = val_folds(request, splits.val.labels)
        status = train_members(specs, splits, options)
        pool = request.inference_options()
        val, test = _member_probs(_checkpoints(run, specs), splits, request.tta, pool, stage)
        fit = _cross_fit_val(val, splits, fold_of, request.greedy_size, stage)
        scored = [_Scored("val", val, splits.val.labels, fit.out_of_fold)]
        scored += _test_outputs(test, fit, splits, stage)
        best = best_member(val, splits.val.labels)
        metrics = pd.DataFrame([row for part in scored for row in _metric_rows(part, names, best)])
        weights = _weights_frame(fit, names, metrics)
        selection["status"] = selection["member"].map(status)
        members = selection.merge(_member_runs(run, specs)).join(_member_roles(val, splits, fit))
        atomic_write_csv(stage / "members.csv", members)
        atomic_write_csv(stage / "weights.csv", weights)
        atomic_write_csv(stage / "metrics.csv", metrics)
        result = EnsembleResult(
            metrics, fit.chosen, run, best_member=names[best], reason=fit.reason
        )
        write_report(
            stage,
            metrics=metrics,
            weights=weights,
            reliability=_reliability(scored[-1]),
            title=f"ar-ray ensemble of {len(specs)} members ({fit.chosen} weights, {request.tta})",
            summary=result.summary_lines(),
        )
        _saved_ensemble(request, record, splits, names, fit, pool).save(stage)
        _track_outputs(options, run, specs, status, metrics, stage)
        return result


def _member_roles(val: np.ndarray, splits: DatasetSplits, fit: CrossFit) -> pd.DataFrame:
    """Per member: how it differs from the rest on val (`diversity`), its weight in the final
    ensemble, and why a member that carries none was left out."""
    final = fit.fitted[fit.chosen].weights
    left_out = f"left out: adds no val top-1 to the members {fit.chosen} selection picked first"
    return member_diversity(val, splits.val.labels).assign(
        final_weight=final, note=np.where(final > 0, "", left_out)
    )


def _selection(specs: list[MemberSpec]) -> pd.DataFrame:
    """Which members and why: written before training, so a stopped run still says what it
    was training; the final members.csv adds each member's status and runs to it."""
    return pd.DataFrame(
        [
            {
                "member": s.member_id,
                "trial_id": s.trial_id,
                "tune_rank": s.tune_rank,
                "arch": s.config.arch,
                "seed": s.config.seed,
                "epochs": s.snapshot_epoch or s.config.epochs,  # a snapshot: its cycle end
                "reason": s.reason,
            }
            for s in specs
        ]
    )


def _member_probs(
    checkpoints: list[str],
    splits: DatasetSplits,
    tta: str,
    pool: InferenceOptions,
    stage: Path,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Every member's val and test probabilities from one actor pool (one start-up, one
    load of the members), and the pool's record (inference_pool.csv). Test: None if absent."""
    parts = [splits.val.images] + ([] if splits.test is None else [splits.test.images])
    tally = PoolTally()
    val, *tested = member_probabilities(checkpoints, parts, tta=tta, options=pool, tally=tally)
    atomic_write_csv(stage / "inference_pool.csv", tally.frame())
    return val, (tested[0] if tested else None)


def _cross_fit_val(
    val: np.ndarray, splits: DatasetSplits, fold_of: np.ndarray, greedy_size: int, stage: Path
) -> CrossFit:
    """Fit the weights on val, scored out of fold; probs_val.npz keeps what they were fitted
    on (with the folds), so the weights and scores can be reproduced without the members."""
    fit = cross_fit(val, splits.val.labels, fold_of, greedy_size)
    np.savez_compressed(
        stage / "probs_val.npz",
        member_probs=val,
        labels=splits.val.labels,
        ids=np.array(splits.val.ids),
        folds=fit.fold_of,
    )
    return fit


def _test_outputs(
    test: np.ndarray | None, fit: CrossFit, splits: DatasetSplits, stage: Path
) -> list[_Scored]:
    """The final weights' test predictions: a submission where test has no labels, else
    scores (returned) and the members' test probabilities (probs_test.npz). Test is never
    used to fit or choose anything, so this comes after the weights."""
    if test is None or splits.test is None:
        return []
    ensembles = _refitted_ensembles(test, fit)
    labels = splits.test.labels
    frame = predictions_frame(ensembles["final"], splits.test.ids, splits.classes, labels)
    atomic_write_csv(stage / "predictions.csv", frame)
    if labels is None:
        atomic_write_csv(stage / "submission.csv", frame[["image_id", "predicted"]])
        return []
    np.savez_compressed(
        stage / "probs_test.npz", member_probs=test, labels=labels, ids=np.array(splits.test.ids)
    )
    return [_Scored("test", test, labels, ensembles)]


def _weights_frame(fit: CrossFit, names: list[str], metrics: pd.DataFrame) -> pd.DataFrame:
    """Each method's weight and temperature per member, next to the member's own top-1 on
    every scored split: a heavy weight on a weak member stands out."""
    member_solo = metrics[metrics["kind"] == "member"].pivot(
        index="name", columns="split", values="top1"
    )
    return pd.DataFrame(
        [
            {
                "member": name,
                "method": method,
                "weight": float(w.weights[i]),
                "temperature": w.temperature,
                **{f"solo_{split}_top1": member_solo.loc[name, split] for split in member_solo},
            }
            for method, w in fit.fitted.items()
            for i, name in enumerate(names)
        ]
    )


def _reliability(scored: _Scored) -> pd.DataFrame:
    """The report's calibration of the final ensemble, on the last scored split: test where
    it has labels, else val (out of fold, as its ensembles there are cross-fitted)."""
    where = "val, out-of-fold" if scored.split == "val" else scored.split
    return reliability_table(scored.ensembles["final"], scored.labels).assign(
        name=f"final ({where})"
    )


def _saved_ensemble(
    request: EnsembleRequest,
    record: TuneRecord,
    splits: DatasetSplits,
    names: list[str],
    fit: CrossFit,
    pool: InferenceOptions,
) -> SavedEnsemble:
    """What `predict` loads: the members the chosen weights use (one left out costs no
    inference), those weights, and how images were prepared."""
    chosen = fit.fitted[fit.chosen]
    kept = [i for i, weight in enumerate(chosen.weights) if weight > 0]
    return SavedEnsemble(
        members=[names[i] for i in kept],
        checkpoints=[storage.join("members", names[i], CHECKPOINT_FILE) for i in kept],
        method=fit.chosen,
        weights=chosen.weights[kept].tolist(),
        temperature=chosen.temperature,
        tta=request.tta,
        classes=list(splits.classes),
        image_size=record.base.image_size,
        stored_size=splits.stored_size,
        images_per_call=pool.images_per_call,
        fold_methods=list(fit.fold_choices),
        request=asdict(request),
        env=environment_info(),
    )


def _history(run: str, spec: MemberSpec) -> pd.DataFrame:
    """A member's epochs (its metrics.csv), however it came to be: trained, reused, snapshot."""
    text = storage.read_text(storage.join(member_dir(run, spec.member_id), "metrics.csv"))
    return pd.read_csv(io.StringIO(text))


def _track_outputs(
    options: TrainOptions,
    run: str,
    specs: list[MemberSpec],
    status: dict[str, str],
    metrics: pd.DataFrame,
    stage: Path,
) -> None:
    """MLflow's parent run gets the ensembles' scores and the outputs (ARTIFACT_SUFFIXES: metrics,
    weights, members, report and plots); a member that did not train now (a reused trial, a
    snapshot) gets a finished run from its metrics.csv, unless it has one."""
    tracking, parent = options.tracking, options.parent_run
    if tracking is None or parent is None:
        return
    for spec in specs:
        if status[spec.member_id] != "trained":
            record_fit(
                tracking, f"member/{spec.member_id}", spec.member_id,
                _history(run, spec).to_dict("records"), kind="member",
                params=spec.config.to_dict(), tags={"status": status[spec.member_id]},
                parent=parent,
            )  # fmt: skip
    log_table(tracking, parent, metrics[metrics["kind"] == "ensemble"])
    log_files(tracking, parent, sorted(p for p in stage.iterdir() if p.suffix in ARTIFACT_SUFFIXES))


def _member_runs(run: str, specs: list[MemberSpec]) -> pd.DataFrame:
    """Where and when each member trained, and what it held (from its epochs' records).

    A member moved by a lost node lists every node it ran on.
    """
    rows = []
    for spec in specs:
        history = _history(run, spec)
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
