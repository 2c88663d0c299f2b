"""TenCrop inference for an ensemble on an autoscaling pool of Ray Data actors.

One path serves `ensemble` (val and test, held in memory) and `predict` (image files,
read and decoded on the cluster). Each actor holds every member's weights and answers
batches; the pool (`ActorPoolStrategy(min_size=1, max_size=max_actors)`) grows while there
is work and nodes can join, and Ray Data retries the batches of an actor lost with its
node. Rows carry their own index (or path), so results are placed by id, not by order.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
import ray.data
import torch
from ray.data.extensions import ArrowTensorArray

from ar_ray import storage
from ar_ray.cluster import assigned_device, placement_labels
from ar_ray.ensemble_weights import FittedWeights, combine
from ar_ray.predictions import top_k
from ar_ray.progress import InferenceProgress
from ar_ray.recipe.augment import predict_probabilities
from ar_ray.recipe.checkpoint import inference_model, load_checkpoint
from ar_ray.recipe.models import place_model
from ar_ray.resources import DEFAULT_MAX_ACTORS, Resources

# Images per actor call, by the actor's device: TenCrop makes 10 crops of each, so a CPU
# forward holds 640 crops and a GPU forward 2,560 (about 6 GiB of bf16 ResNet-50
# activations: small for an 80-140 GiB device, and large enough to keep it busy).
IMAGES_PER_CALL = {"cpu": 64, "cuda": 256}
IDENTITY = ("actor", "node", "cpus", "gpus")  # columns saying which actor answered a row
CheckpointSource = str | ray.ObjectRef  # a storage URI, or a local file's bytes


@dataclass(frozen=True)
class InferenceOptions:
    """The pool: what each actor holds and how far it may grow."""

    actor: Resources = field(default_factory=Resources)
    max_actors: int = DEFAULT_MAX_ACTORS
    batch_size: int | None = None  # None: IMAGES_PER_CALL for the actor's device

    @classmethod
    def from_record(cls, request: dict[str, Any]) -> InferenceOptions:
        """The pool a recorded `ensemble` request ran on; `predict` inherits it."""
        actor = Resources.from_record(request, "cpus_per_actor", "gpus_per_actor")
        return cls(
            actor=actor,
            max_actors=request.get("max_actors", DEFAULT_MAX_ACTORS),
            batch_size=request.get("images_per_call"),
        )

    @property
    def images_per_call(self) -> int:
        """The stated batch, or the constant for the device the actor will hold."""
        if self.batch_size is not None:
            return self.batch_size
        return IMAGES_PER_CALL["cuda" if self.actor.gpus > 0 else "cpu"]

    def map_batches_args(self) -> dict[str, Any]:
        return {
            "compute": ray.data.ActorPoolStrategy(min_size=1, max_size=self.max_actors),
            "batch_size": self.images_per_call,
            **self.actor.ray_options(),
        }


def checkpoint_sources(locations: list[str]) -> list[CheckpointSource]:
    """Make every checkpoint reachable from an actor on any node.

    A bucket URI is read by the actor itself; a local file (only this machine may see it)
    travels as bytes through the object store, so no remote node ever meets a path it
    cannot open.
    """
    return [
        location if storage.is_uri(location) else ray.put(Path(location).read_bytes())
        for location in locations
    ]


def _fetch(source: CheckpointSource, local: Path) -> Path:
    if isinstance(source, ray.ObjectRef):
        local.write_bytes(ray.get(source))
        return local
    return storage.download_file(source, local)


class EnsemblePredictor:
    """The callable class of the pool: the members' models and the TenCrop transform.

    Without weights it answers every member's probabilities (ensemble fits weights on
    them); with weights it answers only the weighted ensemble's top-k classes, so what
    leaves the actor does not grow with the number of classes or members.
    """

    def __init__(
        self,
        checkpoints: list[CheckpointSource],
        tta: str,
        weights: FittedWeights | None = None,
        top_k: int = 5,
    ) -> None:
        self.device = assigned_device()
        self.models = []
        sizes = set()
        with tempfile.TemporaryDirectory() as folder:
            for index, source in enumerate(checkpoints):
                state = load_checkpoint(_fetch(source, Path(folder) / f"{index}.pt"))
                self.models.append(place_model(inference_model(state), self.device))
                sizes.add(int(state["config"]["image_size"]))
        if len(sizes) != 1:
            raise ValueError(f"members were trained at different image sizes {sorted(sizes)}")
        self.image_size = sizes.pop()
        self.tta, self.weights, self.top_k = tta, weights, top_k
        self.identity = {"actor": ray.get_runtime_context().get_actor_id(), **placement_labels()}

    def member_probabilities(self, images: np.ndarray) -> np.ndarray:
        """[M, B, K] float32 for uint8 images [B, 3, S, S].

        The uint8 batch crosses to the device once for all members, and the answers come
        back in one copy: one transfer each way per call, however many members there are.
        """
        batch = torch.from_numpy(np.array(images))  # a writable copy of read-only rows
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        batch = batch.to(self.device, non_blocking=True)
        probs = torch.stack(
            [
                predict_probabilities(model, batch, self.image_size, self.tta)
                for model in self.models
            ]
        )
        return probs.float().cpu().numpy()

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """The weighted ensemble's probabilities [B, K] for uint8 images [B, 3, S, S]."""
        if self.weights is None:
            raise ValueError("an EnsemblePredictor without weights answers members only")
        return combine(self.member_probabilities(images), self.weights)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.weights is None:
            member = self.member_probabilities(batch["image"])
            answer = {"index": batch["index"], "member_probs": member.transpose(1, 0, 2)}
        else:
            answer = self._top_k(batch)
        rows = len(next(iter(batch.values())))
        return answer | {key: np.full(rows, value) for key, value in self.identity.items()}

    def _top_k(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Top-k of the weighted ensemble; rows that failed to decode pass through as -1."""
        good = batch["error"] == ""
        count = len(good)
        classes = np.full((count, self.top_k), -1, dtype=np.int64)
        probs = np.zeros((count, self.top_k), dtype=np.float32)
        if good.any():
            order, top = top_k(self.probabilities(batch["image"][good]), self.top_k)
            classes[good, : order.shape[1]] = order
            probs[good, : order.shape[1]] = top
        return {"path": batch["path"], "error": batch["error"], "classes": classes, "probs": probs}


class PoolTally:
    """Which actors answered how many images, on which node, holding what: the record that
    shows the pool grew with the cluster."""

    def __init__(self) -> None:
        self.counts: Counter[tuple] = Counter()

    def add(self, batch: dict[str, np.ndarray]) -> None:
        self.counts.update(zip(*(batch[key].tolist() for key in IDENTITY), strict=True))

    def frame(self) -> pd.DataFrame:
        rows = [
            dict(zip(IDENTITY, key, strict=True)) | {"images": n} for key, n in self.counts.items()
        ]
        return pd.DataFrame(rows, columns=[*IDENTITY, "images"])


def row_blocks(parts: list[np.ndarray], block_rows: int) -> list[pa.Table]:
    """In-memory image arrays cut into blocks that hold copies of their own rows only, each
    row tagged with its index in the concatenation of `parts` (so one pool serves val and
    test). Blocks of one batch let the pool spread the work over as many actors as it
    grows to."""
    blocks = []
    offset = 0
    for images in parts:
        for start in range(0, len(images), block_rows):
            rows = np.ascontiguousarray(images[start : start + block_rows])
            index = np.arange(offset + start, offset + start + len(rows))
            blocks.append(pa.table({"index": index, "image": ArrowTensorArray.from_numpy(rows)}))
        offset += len(images)
    return blocks


def member_probabilities(
    checkpoints: list[str],
    parts: list[np.ndarray],
    *,
    tta: str,
    options: InferenceOptions,
    tally: PoolTally | None = None,
) -> list[np.ndarray]:
    """Every member's probabilities [M, N, K] for each uint8 array [N, 3, S, S] in `parts`."""
    sizes = [len(images) for images in parts]
    if sum(sizes) == 0:
        raise ValueError("no images to predict")
    quiet_ray_data()
    predicted = ray.data.from_arrow(row_blocks(parts, options.images_per_call)).map_batches(
        EnsemblePredictor,
        fn_constructor_args=(checkpoint_sources(checkpoints), tta),
        **options.map_batches_args(),
    )
    result: np.ndarray | None = None
    with InferenceProgress(sum(sizes)) as progress:
        for batch in predicted.iter_batches(batch_size=None, batch_format="numpy"):
            probs = batch["member_probs"]  # [B, M, K]
            if result is None:
                result = np.empty((probs.shape[1], sum(sizes), probs.shape[2]), dtype=np.float32)
            result[:, batch["index"]] = probs.transpose(1, 0, 2)
            progress.advance(len(probs))
            if tally is not None:
                tally.add(batch)
    if result is None:
        raise RuntimeError("the inference pool returned no rows")
    return np.split(result, np.cumsum(sizes)[:-1], axis=1)


def ensemble_top_k(
    images: ray.data.Dataset,
    checkpoints: list[str],
    weights: FittedWeights,
    *,
    tta: str,
    options: InferenceOptions,
    top_k: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Stream batches of (path, error, top-k classes, top-k probabilities) as they finish.

    `images` has columns path, image (uint8 CHW) and error ("" where the image decoded).
    """
    quiet_ray_data()
    predicted = images.map_batches(
        EnsemblePredictor,
        fn_constructor_args=(checkpoint_sources(checkpoints), tta, weights, top_k),
        **options.map_batches_args(),
    )
    with InferenceProgress(len(images.input_files())) as progress:
        for batch in predicted.iter_batches(batch_size=None, batch_format="numpy"):
            progress.advance(len(batch["path"]))
            yield batch


def quiet_ray_data() -> None:
    """Ray Data's per-operator progress lines would bury ar-ray's own images/s and ETA."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
