"""The distilled student's Ray Train job: the member loop, with the ensemble as teacher.

It is a member's `TorchTrainer` run (`members.fit_on_train`, `checkpointed_fit`: a
checkpoint every epoch, retries, resume by name), whose engine loss is replaced by the
distillation objective. Each worker loads the teacher once, on its own device.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch

from ar_ray import storage
from ar_ray.config import RecipeConfig
from ar_ray.data import DatasetSplits
from ar_ray.members import TrainOptions, ddp_backend, fit_on_train, worker_device, worker_fit
from ar_ray.mlflow_tracking import Tracking
from ar_ray.progress import MemberProgress
from ar_ray.recipe.checkpoint import inference_model, load_checkpoint
from ar_ray.recipe.distillation import EnsembleTeacher, distillation_objective
from ar_ray.recipe.models import place_model
from ar_ray.saved_ensemble import SavedEnsemble

TRAIN_DIR = "train"  # Train's own run folder, under the distilled folder


def load_teacher(saved: SavedEnsemble, device: torch.device) -> EnsembleTeacher:
    """The saved ensemble's members (as `predict` serves them), weights and temperature,
    frozen on `device`."""
    members = []
    with tempfile.TemporaryDirectory() as folder:
        for index, location in enumerate(saved.locations()):
            local = storage.download_file(location, Path(folder) / f"{index}.pt")
            members.append(inference_model(load_checkpoint(local), source=location))
    teacher = EnsembleTeacher(members, saved.weights, saved.temperature)
    for member in teacher.members:
        place_model(member, device)
    return teacher.to(device).eval()


def distill_train_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Train worker: a member's fit (`members.worker_fit`) whose loss is the
    distillation objective, with the teacher loaded once here (not per step or epoch)."""
    saved = SavedEnsemble.from_record(loop_config["teacher"], loop_config["run"])
    teacher = load_teacher(saved, worker_device())
    objective = distillation_objective(
        teacher, loop_config["temperature"], loop_config["label_weight"]
    )
    worker_fit(loop_config, loop_config["name"], objective=objective)


def train_student(
    name: str,
    config: RecipeConfig,
    saved: SavedEnsemble,
    splits: DatasetSplits,
    options: TrainOptions,
    *,
    temperature: float,
    label_weight: float,
    folder: str,
    tracked: tuple[Tracking, str] | None = None,
) -> ray.train.Checkpoint:
    """Train (or resume, by `name`) the student under `folder/train`; return its final
    checkpoint (the caller publishes it, as a member's is, leaving no copy behind). Only the
    train split is shipped: val and test stay held out (val is scored each epoch, never
    trained on).

    The fit runs in a thread and the main thread waits in short steps, so Ctrl+C (or
    SIGTERM) reaches it: the epochs done are in Train's checkpoints, for `--resume`."""
    loop_config = {
        "config": config.to_dict(),
        "splits": ray.put(splits.for_training()),
        "name": name,
        "teacher": saved.to_record(),
        "run": saved.run,
        "temperature": temperature,
        "label_weight": label_weight,
        "mlflow": tracked,  # rank 0 logs each epoch into this MLflow run
    }
    backend = ddp_backend(options.worker)
    progress = MemberProgress().start()
    loop_config["progress"] = progress.handle
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(
        fit_on_train,
        distill_train_loop,
        loop_config,
        name,
        storage.join(folder, TRAIN_DIR),
        options,
        backend,
    )
    try:
        while not wait([future], timeout=1.0).done:
            pass
        result = future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        progress.close()
    return result.checkpoint
