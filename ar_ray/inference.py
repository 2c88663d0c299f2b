"""TenCrop inference for an ensemble on a pool of Ray actors.

Each actor loads every member's weights once and keeps them; image chunks stream through
the pool (`ray.util.ActorPool`, a few chunks in flight), so throughput grows with actors
and driver memory holds only probabilities, never more than a few chunks of images.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from ray.util import ActorPool

from ar_ray.ensemble_weights import FittedWeights, combine
from ar_ray.recipe.augment import predict_probabilities
from ar_ray.recipe.checkpoint import inference_model, load_checkpoint
from ar_ray.recipe.engine import default_device
from ar_ray.storage import download_file

CHUNK = 64  # images per actor call: 640 crops per forward with TenCrop


@dataclass(frozen=True)
class Predictions:
    member_probs: np.ndarray  # [M, N, K]
    ensemble_probs: np.ndarray | None  # [N, K] once weights are known


class EnsemblePredictor:
    """Holds the members' models and the TenCrop transform; answers image chunks.

    Given fitted weights it also returns the weighted ensemble, so `ar-ray predict` gets
    final answers from the actors without shipping per-member results around.
    """

    def __init__(
        self,
        checkpoints: list[str],
        tta: str,
        weights: FittedWeights | None = None,
    ) -> None:
        self.device = default_device()
        self.models = []
        sizes = set()
        with tempfile.TemporaryDirectory() as folder:
            for index, location in enumerate(checkpoints):
                state = load_checkpoint(download_file(location, Path(folder) / f"{index}.pt"))
                self.models.append(inference_model(state, source=location).to(self.device))
                sizes.add(int(state["config"]["image_size"]))
        if len(sizes) != 1:
            raise ValueError(f"members were trained at different image sizes {sorted(sizes)}")
        self.image_size = sizes.pop()
        self.tta = tta
        self.weights = weights

    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        member = np.stack(
            [
                predict_probabilities(model, images, self.image_size, self.tta).cpu().numpy()
                for model in self.models
            ]
        )
        ensemble = combine(member, self.weights) if self.weights is not None else None
        return member, ensemble


def _chunks(images: Iterable[torch.Tensor] | torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    """Split a tensor, or batch an iterable of single images, into chunks of `size`."""
    if isinstance(images, torch.Tensor):
        yield from images.split(size)
        return
    pending: list[torch.Tensor] = []
    for image in images:
        pending.append(image)
        if len(pending) == size:
            yield torch.stack(pending)
            pending = []
    if pending:
        yield torch.stack(pending)


def actor_count() -> tuple[int, dict[str, float]]:
    """One actor per GPU, or per CPU slot without GPUs, and the resources each takes.

    Counted on the cluster's total, not what is free right now: members that just finished
    training may still hold their CPUs for a moment, and the actors simply wait for them.
    """
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return gpus, {"num_gpus": 1}
    return max(1, int(resources.get("CPU", 1))), {"num_cpus": 1}


def run_predictors(
    checkpoints: list[str],
    images: Iterable[torch.Tensor] | torch.Tensor,
    *,
    tta: str,
    weights: FittedWeights | None = None,
    actors: int | None = None,
    chunk: int = CHUNK,
) -> Predictions:
    """Stream `images` (uint8 [N, 3, S, S], or an iterable of [3, S, S]) through the pool."""
    count, options = actor_count()
    remote = ray.remote(EnsemblePredictor).options(**options)
    pool_actors = [remote.remote(checkpoints, tta, weights) for _ in range(actors or count)]
    pool = ActorPool(pool_actors)
    results = []
    try:
        for batch in _chunks(images, chunk):  # one chunk in flight per actor, no more
            if not pool.has_free():
                results.append(pool.get_next())
            pool.submit(lambda actor, images: actor.predict.remote(images), batch)
        while pool.has_next():
            results.append(pool.get_next())
    finally:
        for actor in pool_actors:
            ray.kill(actor)
    if not results:
        raise ValueError("no images to predict")
    member = np.concatenate([m for m, _ in results], axis=1)
    ensemble = np.concatenate([e for _, e in results]) if weights is not None else None
    return Predictions(member_probs=member, ensemble_probs=ensemble)
