"""Run folders as `ar-ray ensemble` and `ar-ray distill` leave them, made in a second from
untrained members, and `ar-ray predict`'s answer for them worked out by hand: what the
export and serve tests compare their outputs with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ar_ray.config import RecipeConfig
from ar_ray.ensemble_weights import combine
from ar_ray.recipe.augment import predict_probabilities
from ar_ray.recipe.checkpoint import inference_model, load_checkpoint, save_checkpoint
from ar_ray.recipe.models import ARNet
from ar_ray.saved_ensemble import SavedEnsemble

CLASSES = ["boot", "cat", "dog", "shirt"]
IMAGE_SIZE, STORED = 28, 32


def write_member(path: Path, seed: int) -> None:
    """An untrained resnet18 made to answer confidently and differently from its peers:
    random normalisation, batch-norm statistics and a scaled-up classifier, so a graph that
    dropped or mixed up any of them would answer differently."""
    torch.manual_seed(seed)
    config = RecipeConfig(arch="resnet18", image_size=IMAGE_SIZE, seed=seed)
    model = ARNet(config, len(CLASSES)).eval()
    model.set_normalization(torch.rand(3) * 0.5 + 0.25, torch.rand(3) * 0.3 + 0.1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
        model.classifier.weight.mul_(20)
    state = {"model": model.state_dict(), "config": config.to_dict(), "num_classes": len(CLASSES)}
    save_checkpoint(state, path)


def write_run(
    root: Path, *, weights: list[float], tta: str, temperature: float = 1.7, folder="ensemble"
) -> Path:
    """A run folder holding members and the `ensemble.yaml` `ar-ray ensemble` would write
    (`folder="distilled"`: the record `ar-ray distill` writes for its one student)."""
    names = [f"m{index}" for index in range(len(weights))]
    for index, name in enumerate(names):
        write_member(root / "members" / name / "checkpoint.pt", seed=index)
    SavedEnsemble(
        members=names,
        checkpoints=[f"members/{name}/checkpoint.pt" for name in names],
        method="nll",
        weights=weights,
        temperature=temperature,
        tta=tta,
        classes=CLASSES,
        image_size=IMAGE_SIZE,
        stored_size=STORED,
    ).save(root / folder)
    return root


def images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 3, STORED, STORED), np.uint8)


def predict_path(run: Path, batch: np.ndarray, fitted=None, folder="ensemble") -> np.ndarray:
    """`ar-ray predict`'s answer, from the saved record: each member's probabilities under the
    recorded TTA, combined with the saved weights and temperature (or `fitted`)."""
    saved = SavedEnsemble.load(str(run), folder)
    members = [inference_model(load_checkpoint(Path(p))) for p in saved.locations()]
    tensor = torch.from_numpy(batch)
    probs = [predict_probabilities(m, tensor, saved.image_size, saved.tta) for m in members]
    return combine(torch.stack(probs).numpy(), fitted or saved.fitted_weights)
