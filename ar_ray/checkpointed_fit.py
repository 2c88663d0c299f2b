"""The epoch loop a Tune trial and a Train worker share: resume, fit, report, checkpoint.

Both run `engine.fit` from their latest checkpoint and report every epoch with a new one,
so Ray can pause, retry or resume them. Only the Ray calls differ: in Ray 2.60 Tune and
Train each have their own `get_checkpoint`, `report` and `Checkpoint` class
(`ray.tune.Checkpoint is not ray.train.Checkpoint`), and a report must go through the API of
the session it belongs to. `RaySession` names those calls; the loop itself is written once.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ar_ray import storage
from ar_ray.cluster import assigned_loader_workers, placement_labels
from ar_ray.config import RecipeConfig
from ar_ray.data import DatasetSplits
from ar_ray.recipe.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from ar_ray.recipe.engine import Objective, fit

if TYPE_CHECKING:  # ray.tune.Checkpoint subclasses ray.train.Checkpoint
    from ray.train import Checkpoint


KeepState = Callable[[Mapping[str, Any], dict[str, Any], Path], None]
"""(metrics, checkpoint state, its file): keeps an epoch's checkpoint beyond Ray's."""


@dataclass(frozen=True)
class RaySession:
    """The Ray calls of the session a fit runs in: a Tune trial's or a Train worker's."""

    get_checkpoint: Callable[[], Checkpoint | None]
    report: Callable[..., None]  # report(metrics) or report(metrics, checkpoint=...)
    checkpoint_type: type[Checkpoint]  # the class this session's `report` accepts
    uploads_weights: bool = True  # False on DDP ranks other than 0: one copy of the weights


def checkpointed_fit(
    config: RecipeConfig,
    splits: DatasetSplits,
    session: RaySession,
    device: torch.device,
    after_epoch: Callable[[Mapping[str, Any]], None] | None = None,
    start_from: str | None = None,
    until_epoch: int | None = None,
    before_report: KeepState | None = None,
    objective: Objective | None = None,
) -> None:
    """Fit `config`, continuing after the session's latest checkpoint if it has one (else
    after the checkpoint file at `start_from`, a path or URI: a staged search's stage-one
    checkpoint), and report every epoch (with a checkpoint where this process uploads
    weights). `until_epoch` cuts the run on its full schedule (`engine.fit`).

    Every process reports each epoch, as Train expects of each of its ranks.
    `after_epoch(metrics)` runs only where the weights are uploaded, after the report, so
    it sees each epoch once however many ranks train.
    `before_report(metrics, state, weights)` runs there too, with the epoch's checkpoint file
    just written, but before the report: whatever it keeps (a snapshot member) is then
    never behind a reported checkpoint, so a retry that resumes after it cannot skip it.
    `objective` replaces the recipe's loss (`engine.fit`), e.g. by distillation's.
    """
    state = None
    checkpoint = session.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(Path(folder) / CHECKPOINT_FILE)
    elif start_from is not None:
        with tempfile.TemporaryDirectory() as folder:
            local = storage.download_file(start_from, Path(folder) / CHECKPOINT_FILE)
            state = load_checkpoint(local)

    def on_epoch(metrics: dict[str, Any], state: dict[str, Any]) -> None:
        if not session.uploads_weights:
            session.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(state, Path(folder) / CHECKPOINT_FILE)
            if before_report is not None:
                before_report(metrics, state, Path(folder) / CHECKPOINT_FILE)
            session.report(metrics, checkpoint=session.checkpoint_type.from_directory(folder))
        if after_epoch is not None:
            after_epoch(metrics)

    fit(
        config,
        splits,
        on_epoch=on_epoch,
        resume_from=state,
        device=device,
        epoch_labels=placement_labels(),
        loader_workers=assigned_loader_workers(),
        until_epoch=until_epoch,
        objective=objective,
    )
