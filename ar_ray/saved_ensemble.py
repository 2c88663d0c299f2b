"""`SavedEnsemble`: the one writer and the one reader of a run's `ensemble/ensemble.yaml`.

Everything that uses a finished ensemble (`predict` today, a server or an exporter later)
depends on this record, inference and data only: never on the search or training stack,
so labelling images does not import Ray Tune, Ray Train or Optuna. Records written by older
versions still load; a key they lack takes the value that reproduces what they did.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ar_ray import storage
from ar_ray.ensemble_weights import FittedWeights
from ar_ray.errors import UserError
from ar_ray.outputs import atomic_write_text
from ar_ray.recipe.checkpoint import load_checkpoint

ENSEMBLE_DIR = "ensemble"
ENSEMBLE_FILE = "ensemble.yaml"
DISTILLED_DIR = "distilled"  # `ar-ray distill`'s student, saved as a one-member ensemble


@dataclass(frozen=True)
class SavedEnsemble:
    """What an ensemble is, as `ar-ray ensemble` saved it.

    `checkpoints` are relative to the run folder, so a run copied to a bucket or another
    machine still finds its members; `locations()` resolves them against where it was read.
    """

    members: list[str]
    checkpoints: list[str]
    method: str
    weights: list[float]
    temperature: float
    tta: str
    classes: list[str]
    image_size: int
    stored_size: int  # `predict` decodes new images to this square, as the run stored its own
    images_per_call: int | None = None  # each inference actor's batch (None: older records)
    fold_methods: list[str] = field(default_factory=list)  # what "final" used per val fold
    request: dict[str, Any] = field(default_factory=dict)  # the resolved `ensemble` command
    env: dict[str, str] = field(default_factory=dict)
    run: str = ""  # the run folder it was read from; not written

    def __post_init__(self) -> None:
        """A record whose parts disagree fails when read, not as odd answers later."""
        self.fitted_weights  # noqa: B018 (FittedWeights rejects bad weights)
        if not len(self.members) == len(self.checkpoints) == len(self.weights):
            raise ValueError("members, checkpoints and weights differ in length")

    @property
    def fitted_weights(self) -> FittedWeights:
        return FittedWeights(self.method, np.array(self.weights), self.temperature)

    def locations(self) -> list[str]:
        """Each member's checkpoint, resolved against the run folder it was read from."""
        return [storage.join(self.run, path) for path in self.checkpoints]

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        del record["run"]
        return record

    def save(self, folder: Path) -> Path:
        """Write `folder/ensemble.yaml` (temp file, then rename)."""
        path = folder / ENSEMBLE_FILE
        atomic_write_text(path, yaml.safe_dump(self.to_record(), sort_keys=False))
        return path

    @classmethod
    def from_record(cls, record: dict[str, Any], run: str = "") -> SavedEnsemble:
        """A parsed `ensemble.yaml`. Ensembles saved before `stored_size` was recorded stored
        their images at `image_size` (evaluation resized them up), so that reproduces them."""
        return cls(
            members=list(record["members"]),
            checkpoints=list(record["checkpoints"]),
            method=str(record["method"]),
            weights=[float(w) for w in record["weights"]],
            temperature=float(record["temperature"]),
            tta=str(record["tta"]),
            classes=[str(name) for name in record["classes"]],
            image_size=int(record["image_size"]),
            stored_size=int(record.get("stored_size", record["image_size"])),
            images_per_call=record.get("images_per_call"),
            fold_methods=list(record.get("fold_methods", [])),
            request=dict(record.get("request") or {}),
            env=dict(record.get("env") or {}),
            run=run,
        )

    @classmethod
    def load(cls, run: str, folder: str = ENSEMBLE_DIR) -> SavedEnsemble:
        """The ensemble saved in `run` (`folder`: `distilled` for the student); a missing
        or corrupted record is a one-line error naming the file, and so is a local member
        checkpoint that cannot be read (here, rather than later inside an inference actor)."""
        run = storage.resolve(run)
        location = storage.join(run, folder, ENSEMBLE_FILE)
        if not storage.exists(location):
            what = "distilled model" if folder == DISTILLED_DIR else "ensemble"
            command = "distill" if folder == DISTILLED_DIR else "ensemble"
            raise UserError(f"{location}: no saved {what}; run `ar-ray {command}` first")
        try:
            saved = cls.from_record(yaml.safe_load(storage.read_text(location)), run)
        except (yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError) as error:
            raise UserError(
                f"{location}: corrupted ensemble record ({type(error).__name__})"
            ) from None
        for checkpoint in saved.locations():
            if not storage.is_uri(checkpoint):
                load_checkpoint(Path(checkpoint))
        return saved


def load_model(run: str, model: str = "ensemble") -> SavedEnsemble:
    """What `--model` names in `run`: the ensemble, or the distilled student (one member,
    weight 1), both read through the same record so predict and export need no other path."""
    folders = {"ensemble": ENSEMBLE_DIR, "distilled": DISTILLED_DIR}
    if model not in folders:
        raise UserError(f"--model {model}: unknown; one of {', '.join(folders)}")
    return SavedEnsemble.load(run, folders[model])
