"""`ar-ray train`: one run on this machine, no cluster, with its outputs on disk."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from ar_ray.config import RecipeConfig, save_config
from ar_ray.data import DatasetSplits
from ar_ray.outputs import atomic_write_csv, atomic_write_text, environment_info, prepare_run_dir
from ar_ray.recipe.checkpoint import (
    CHECKPOINT_FILE,
    check_same_arch,
    load_checkpoint,
    save_checkpoint,
)
from ar_ray.recipe.engine import evaluate, fit


@dataclass
class TrainResult:
    """The run's folder, its per-epoch history and, where test labels exist, its test score."""

    out: Path
    history: list[dict[str, Any]]
    test: dict[str, Any] | None


def format_epoch(metrics: dict[str, Any], epochs: int) -> str:
    return (
        f"epoch {metrics['epoch']:>3}/{epochs}  loss {metrics['train_loss']:.4f}  "
        f"val top-1 {100 * metrics['val_top1']:5.1f}%  val NLL {metrics['val_nll']:.3f}  "
        f"{metrics['epoch_seconds']:.1f}s"
    )


def run_training(
    config: RecipeConfig,
    splits: DatasetSplits,
    out: Path,
    *,
    resume: bool,
    overwrite: bool,
    loader_workers: int = 0,
) -> TrainResult:
    """Train, writing config, per-epoch metrics and the checkpoint as each epoch ends.

    The checkpoint is rewritten every epoch, so `--resume` after a crash loses one epoch at
    most and continues to the same weights an uninterrupted run would reach.
    """
    out = prepare_run_dir(out, resume=resume, overwrite=overwrite)
    checkpoint_path = out / CHECKPOINT_FILE
    state = load_checkpoint(checkpoint_path) if resume and checkpoint_path.exists() else None
    if state is not None:  # before config.yaml is rewritten: a refused resume changes nothing
        check_same_arch(state, config)
    save_config(config, out / "config.yaml")
    atomic_write_text(out / "environment.yaml", yaml.safe_dump(environment_info()))

    def on_epoch(metrics: dict[str, Any], state: dict[str, Any]) -> None:
        save_checkpoint(state, checkpoint_path)
        columns = ["epoch", "train_loss", "val_top1", "val_nll", "lr", "epoch_seconds"]
        atomic_write_csv(out / "metrics.csv", pd.DataFrame(state["history"])[columns])
        print(format_epoch(metrics, config.epochs), flush=True)

    result = fit(
        config, splits, on_epoch=on_epoch, resume_from=state, loader_workers=loader_workers
    )
    test = None
    if splits.test is not None and splits.test.labels is not None:
        test = evaluate(result.model, splits.test, config.image_size, config.tta)
        test = {"top1": test["top1"], "nll": test["nll"], "tta": config.tta}
        atomic_write_text(out / "test_metrics.yaml", yaml.safe_dump(test, sort_keys=False))
    return TrainResult(out=out, history=result.history, test=test)
