"""What `ar-ray distill` writes after training: the student scored and timed beside the
ensemble and its best member, a report, and the student saved as a one-member ensemble.

Scores and speeds come from one Ray task holding a member worker's resources: the student,
the ensemble and the best member answer the same images with the same TTA on the same
device, so their images/s compare. The ensemble's and the member's scores are read from
`ensemble/` (its probabilities), not recomputed, so the rows are the ensemble's own.
"""

from __future__ import annotations

import io
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import torch
from torch import Tensor, nn

from ar_ray import storage
from ar_ray.cluster import assigned_device
from ar_ray.data import ImageSplit
from ar_ray.ensemble_weights import best_member, log_combine
from ar_ray.ensembling import metric_row
from ar_ray.metrics import top_k_correct
from ar_ray.outputs import atomic_save, atomic_write_csv, atomic_write_text
from ar_ray.recipe.augment import CROPS_PER_IMAGE, predict_probabilities
from ar_ray.recipe.checkpoint import inference_model, load_checkpoint
from ar_ray.recipe.engine import EVAL_CROPS
from ar_ray.recipe.models import place_model
from ar_ray.report import REPORT_FILE, markdown_table
from ar_ray.resources import Resources
from ar_ray.saved_ensemble import ENSEMBLE_DIR, SavedEnsemble

TIMED_IMAGES = 256  # images each model answers for images/s, after one warm-up chunk
STUDENT = "distilled"
PLOT_FILE = "top1_vs_speed.png"

Predict = Callable[[Tensor], Tensor]


def _load(location: str) -> nn.Module:
    with tempfile.TemporaryDirectory() as folder:
        local = storage.download_file(location, Path(folder) / "checkpoint.pt")
        return inference_model(load_checkpoint(local), source=location)


def _combined(members: Sequence[nn.Module], saved: SavedEnsemble) -> Predict:
    """`predict`'s answer (`ensemble_weights.combine`), in torch on the task's device."""
    weights = torch.tensor(saved.weights, dtype=torch.float64)

    def predict(images: Tensor) -> Tensor:
        probs = torch.stack(
            [predict_probabilities(m, images, saved.image_size, saved.tta) for m in members]
        )
        return log_combine(probs.double().cpu(), weights, saved.temperature).exp()

    return predict


def _single(model: nn.Module, saved: SavedEnsemble) -> Predict:
    """One model's answer, as `predict` gives it for a one-member ensemble of weight 1."""
    return lambda images: predict_probabilities(model, images, saved.image_size, saved.tta)


def _answers(predict: Predict, split: ImageSplit, chunk: int) -> np.ndarray:
    parts = []
    for start in range(0, len(split), chunk):
        images = torch.from_numpy(split.rows(start, start + chunk).images)
        parts.append(predict(images).double().cpu().numpy())
    return np.concatenate(parts)


def _images_per_second(predict: Predict, images: np.ndarray, chunk: int) -> tuple[float, int]:
    """Images/s over up to TIMED_IMAGES images, after a warm-up chunk (first-call costs)."""
    batch = torch.from_numpy(np.ascontiguousarray(images[:TIMED_IMAGES]))
    predict(batch[:chunk]).cpu()
    started = time.perf_counter()
    for start in range(0, len(batch), chunk):
        predict(batch[start : start + chunk]).cpu()  # .cpu(): waits for the device
    return len(batch) / (time.perf_counter() - started), len(batch)


def score_and_time(
    student: str, best: str, saved: SavedEnsemble, val: ImageSplit, test: ImageSplit | None
) -> dict[str, Any]:
    """Runs in the Ray task: the student's val/test probabilities (the ensemble's TTA), and
    images/s of student, ensemble and best member on the same val images."""
    device = assigned_device()
    models = {
        STUDENT: [_load(student)],
        "ensemble": [_load(location) for location in saved.locations()],
        "best member": [_load(best)],
    }
    for members in models.values():
        for member in members:
            place_model(member, device)
    chunk = max(1, EVAL_CROPS // CROPS_PER_IMAGE[saved.tta])
    predictors = {
        name: _single(members[0], saved)
        if len(members) == 1 and name != "ensemble"
        else _combined(members, saved)
        for name, members in models.items()
    }
    speed = []
    for name, predict in predictors.items():
        rate, count = _images_per_second(predict, val.images, chunk)
        speed.append(
            {
                "model": name,
                "members": len(models[name]),
                "tta": saved.tta,
                "forwards_per_image": len(models[name]) * CROPS_PER_IMAGE[saved.tta],
                "images": count,
                "images_per_second": rate,
                "device": str(device),
                "host": socket.gethostname(),
            }
        )
    return {
        "val": _answers(predictors[STUDENT], val, chunk),
        "test": None if test is None else _answers(predictors[STUDENT], test, chunk),
        "speed": speed,
    }


def remote_score_and_time(
    worker: Resources, student: str, best: str, saved: SavedEnsemble, splits: Any
) -> dict[str, Any]:
    """`score_and_time` as one Ray task holding what a member worker held."""
    task = ray.remote(score_and_time).options(**worker.ray_options(), max_retries=1)
    return ray.get(task.remote(student, best, saved, splits.val, splits.test))


def ensemble_probabilities(run: str, split: str) -> dict[str, np.ndarray] | None:
    """The members' probabilities `ensemble` saved for `split` (None where not saved)."""
    location = storage.join(run, ENSEMBLE_DIR, f"probs_{split}.npz")
    if not storage.exists(location):
        return None
    with tempfile.TemporaryDirectory() as folder:
        local = storage.download_file(location, Path(folder) / "p.npz")
        with np.load(local) as saved:
            return {key: saved[key] for key in saved.files}


def best_member_name(run: str) -> str:
    """The best-on-val member, chosen as `ensemble` chose it, from what it saved."""
    val = ensemble_probabilities(run, "val")
    assert val is not None, "an ensemble always saves its val probabilities"
    names = pd.read_csv(
        io.StringIO(storage.read_text(storage.join(run, ENSEMBLE_DIR, "members.csv")))
    )
    return str(names["member"].iloc[best_member(val["member_probs"], val["labels"])])


def metrics_frame(run: str, best: str, student: dict[str, np.ndarray | None]) -> pd.DataFrame:
    """The ensemble's final and best-member rows (as `ensemble` scored them), and the
    student's on the same splits and images, with the same estimate and gain columns."""
    text = storage.read_text(storage.join(run, ENSEMBLE_DIR, "metrics.csv"))
    theirs = pd.read_csv(io.StringIO(text))
    members = pd.read_csv(
        io.StringIO(storage.read_text(storage.join(run, ENSEMBLE_DIR, "members.csv")))
    )
    index = list(members["member"]).index(best)
    rows = []
    for split in dict.fromkeys(theirs["split"]):
        saved, probs = ensemble_probabilities(run, split), student.get(split)
        if saved is None or probs is None:
            continue
        labels = saved["labels"]
        baseline = top_k_correct(saved["member_probs"][index], labels, 1)
        # estimated as a member: it fitted nothing on val
        rows.append(metric_row(STUDENT, "distilled", split, probs, labels, baseline, "member"))
        pick = theirs[(theirs["split"] == split) & theirs["name"].isin(["final", best])]
        rows += pick.replace({"name": {"final": "ensemble"}}).to_dict("records")
    return pd.DataFrame(rows)[list(theirs.columns)]


def summary_lines(metrics: pd.DataFrame, speed: pd.DataFrame) -> list[str]:
    """Per split: the student against the ensemble and its best member, and the share of
    the ensemble's gain it kept; then how much faster it answers."""
    lines = []
    for split, rows in metrics.groupby("split", sort=False):
        top1 = dict(zip(rows["kind"], rows["top1"], strict=True))
        gain = 100 * (top1["ensemble"] - top1["member"])
        kept = 100 * (top1["distilled"] - top1["member"])
        share = f", {kept / gain:.0%} of the ensemble's gain" if gain > 0 else ""
        lines.append(
            f"{split} top-1: distilled {100 * top1['distilled']:.2f}% vs ensemble "
            f"{100 * top1['ensemble']:.2f}% vs best member {100 * top1['member']:.2f}%"
            f" ({kept:+.2f} points over the member{share})"
        )
    rate = dict(zip(speed["model"], speed["images_per_second"], strict=True))
    lines.append(
        f"images/s ({speed['tta'].iloc[0]}, {speed['device'].iloc[0]}): distilled "
        f"{rate[STUDENT]:.1f}, ensemble {rate['ensemble']:.1f} "
        f"({rate[STUDENT] / rate['ensemble']:.1f}x faster)"
    )
    return lines


def _plot(metrics: pd.DataFrame, speed: pd.DataFrame, path: Path) -> None:
    """Top-1 (test where scored, else val) against images/s, one point per model."""
    import matplotlib.pyplot as plt  # report.py has set the Agg backend

    split = "test" if "test" in set(metrics["split"]) else "val"
    rows = metrics[metrics["split"] == split]
    top1 = dict(zip(rows["kind"], rows["top1"], strict=True))
    rate = dict(zip(speed["model"], speed["images_per_second"], strict=True))
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for kind, model in (
        ("distilled", STUDENT),
        ("ensemble", "ensemble"),
        ("member", "best member"),
    ):
        ax.scatter(rate[model], top1[kind], s=60)
        ax.annotate(model, (rate[model], top1[kind]), textcoords="offset points", xytext=(6, 4))
    ax.set_xscale("log")
    ax.set_xlabel(f"images/s ({speed['tta'].iloc[0]}, {speed['device'].iloc[0]})")
    ax.set_ylabel(f"{split} top-1")
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def write_outputs(
    stage: Path, metrics: pd.DataFrame, speed: pd.DataFrame, history: pd.DataFrame, title: str
) -> list[str]:
    """metrics.csv, speed.csv, the plot, then report.md (which links it); the summary."""
    atomic_write_csv(stage / "metrics.csv", metrics)
    atomic_write_csv(stage / "speed.csv", speed)
    _plot(metrics, speed, stage / PLOT_FILE)
    lines = summary_lines(metrics, speed)
    sections = [
        f"# {title}",
        "\n".join(f"- {line}" for line in lines),
        "## Distilled vs ensemble",
        markdown_table(metrics),
        "## Speed",
        markdown_table(speed),
        f"![top-1 against images/s]({PLOT_FILE})",
        "## Student training",
        markdown_table(history),
    ]
    atomic_write_text(stage / REPORT_FILE, "\n\n".join(sections) + "\n")
    return lines
