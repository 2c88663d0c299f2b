"""Checkpoints as plain dicts of tensors and builtins, so they load with `weights_only=True`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ar_ray.config import RecipeConfig
from ar_ray.errors import UserError
from ar_ray.outputs import atomic_save
from ar_ray.recipe.models import ARNet

CHECKPOINT_FILE = "checkpoint.pt"


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt or does not fit the model asked for."""


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """torch.save beside the target, then rename: a crash never leaves half a checkpoint."""
    atomic_save(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load with weights_only=True: a checkpoint from a shared bucket must not run code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except Exception as error:  # torch raises many kinds for a damaged file
        reason = type(error).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not an ar-ray checkpoint")
    return state


def check_same_arch(state: dict[str, Any], config: RecipeConfig) -> None:
    """A run resumes only on the backbone its checkpoint was trained with."""
    theirs = state["config"].get("arch")
    if theirs != config.arch:
        raise CheckpointError(f"checkpoint was trained with arch={theirs!r}, not {config.arch!r}")


def load_weights(model: torch.nn.Module, weights: dict, source: str) -> None:
    """load_state_dict with a one-line error instead of a page of mismatched keys."""
    try:
        model.load_state_dict(weights)
    except RuntimeError:
        raise CheckpointError(f"{source}: weights do not fit this architecture") from None


def serving_weights(state: dict[str, Any], config: RecipeConfig) -> dict[str, Any]:
    """The weights to serve, as `engine.fit` evaluates them: SWA's average in a finished
    run (its BatchNorm statistics are recomputed only after the last epoch), else the Mean
    Teacher when one was trained, else the student. A snapshot taken mid-run is thus the
    model it trained at that epoch, never a half-made average."""
    swa, teacher = state.get("swa"), state.get("teacher")
    if swa and state["epoch"] == config.epochs:
        return swa["module"]
    return teacher["module"] if teacher else state["model"]


def inference_model(state: dict[str, Any], source: str = "checkpoint") -> ARNet:
    """The model to serve (`serving_weights`), ready for evaluation."""
    config = RecipeConfig.from_dict(state["config"], source=source)
    model = ARNet(config, state["num_classes"])
    load_weights(model, serving_weights(state, config), source)
    return model.eval()
