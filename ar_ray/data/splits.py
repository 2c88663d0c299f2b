"""In-memory dataset splits shared by the built-in and folder loaders.

Every split is decoded up front into one uint8 numpy array: holding it decoded means Ray workers
and Tune trials never re-read or re-decode image files, and numpy (unlike torch) is read
zero-copy from Ray's object store, so every trial and DDP worker on a node maps one buffer.
Arrays read from the object store are read-only: consumers copy the rows they turn into tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import numpy as np
import torch

from ar_ray.errors import UserError

STATS_CHUNK = 256  # images per step of the streaming statistics: bounded memory at any size


class DataError(UserError):
    """A user-facing data problem; str(e) is ONE line naming the offending path."""


class ChannelStats(NamedTuple):
    """Per-channel mean and (Bessel-corrected) std of a split's pixels, in [0, 1] units."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def channel_stats(images: np.ndarray) -> ChannelStats:
    """Mean and std of uint8 [N, 3, H, W] images, streamed over chunks of STATS_CHUNK images.

    The accumulator is an exact per-channel histogram of the 256 pixel values, so neither the
    whole set nor its square is ever held as float, and the result does not depend on the
    chunking; the moments are then taken from the histogram in float64.
    """
    counts = np.zeros((3, 256), dtype=np.int64)
    for start in range(0, len(images), STATS_CHUNK):
        chunk = images[start : start + STATS_CHUNK]
        for channel in range(3):
            counts[channel] += np.bincount(chunk[:, channel].ravel(), minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    total = counts.sum(axis=1)
    mean = counts @ values / total
    variance = (counts * (values - mean[:, None]) ** 2).sum(axis=1) / np.maximum(total - 1, 1)
    return ChannelStats(mean=tuple(mean.tolist()), std=tuple(np.sqrt(variance).tolist()))


@dataclass(frozen=True, eq=False)
class ImageSplit:
    """uint8 images [N, 3, H, W] with int64 labels [N], or None for an unlabelled test folder."""

    images: np.ndarray
    labels: np.ndarray | None
    ids: list[str]

    def __post_init__(self) -> None:
        # Catch loader bugs here, where the cause is obvious, not deep inside a training step.
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be a uint8 numpy array [N, C, H, W], got {type(images).__name__} "
                f"{getattr(images, 'dtype', '')} {tuple(getattr(images, 'shape', ()))}"
            )
        if labels is not None and (
            not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.ndim != 1
        ):
            raise ValueError(f"labels must be an int64 numpy array [N] or None, got {labels!r:.80}")
        count = len(images)
        if len(self.ids) != count or (labels is not None and len(labels) != count):
            raise ValueError("images, labels and ids must have the same length")

    def __len__(self) -> int:
        return len(self.images)

    @cached_property
    def channel_stats(self) -> ChannelStats:
        """Computed once per split object; pickled with it, so trials receive it ready-made."""
        return channel_stats(self.images)

    def take(self, indices: np.ndarray) -> ImageSplit:
        """The subset at `indices`, in the order given (its own copy of those rows)."""
        return ImageSplit(
            images=self.images[indices],
            labels=None if self.labels is None else self.labels[indices],
            ids=[self.ids[i] for i in indices.tolist()],
        )

    def rows(self, start: int, stop: int) -> ImageSplit:
        """Rows [start, stop) as a split of their own, writable, contiguous copies.

        The way to cut chunks: a chunk pickles (or goes to an actor) as just its rows, and
        `torch.from_numpy` takes its arrays without the read-only warning or aliasing the
        shared buffer of a split read from the object store.
        """
        return ImageSplit(
            images=self.images[start:stop].copy(),
            labels=None if self.labels is None else self.labels[start:stop].copy(),
            ids=self.ids[start:stop],
        )

    def limit_per_class(self, n: int, seed: int = 0, *, num_classes: int = 1) -> ImageSplit:
        """A seeded random sample of at most `n` images per class, kept in the original order.

        Sampling rather than taking the head avoids whatever order the files were listed in
        (often grouped or sorted by source), and a fixed seed keeps repeated runs comparable.
        The permutation comes from torch's generator because recorded tune runs (which
        `ar-ray ensemble` reloads with their `limit_per_class`) were sampled with it.
        An unlabelled split cannot be balanced, so it keeps `n * num_classes` images from the
        same seeded shuffle: the same budget a balanced labelled split of that size would have.
        """
        if n < 1:
            raise ValueError(f"limit_per_class needs n >= 1, got {n}")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).numpy()
        if self.labels is None:
            kept = order[: n * num_classes]
        else:
            shuffled = self.labels[order]
            per_class = [order[shuffled == label][:n] for label in np.unique(shuffled)]
            kept = np.concatenate(per_class) if per_class else order
        return self.take(np.sort(kept))


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """Train/val (always labelled) and an optional test split over one class list.

    The train split's channel statistics (the model's normalisation) are computed here, when
    the splits are built, so that trials and members do not each recompute them.
    """

    train: ImageSplit
    val: ImageSplit
    test: ImageSplit | None
    classes: list[str]
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _ = self.train.channel_stats  # cached on the split, and pickled with it

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def stored_size(self) -> int:
        """The side of the stored squares, read from the arrays themselves: runs record it
        (`request.yaml`, `ensemble.yaml`) so `predict` decodes new images to the same size."""
        return int(self.train.images.shape[-1])

    def for_training(self) -> DatasetSplits:
        """Train and val only: what trials and members need, so the test set stays home."""
        return DatasetSplits(
            train=self.train,
            val=self.val,
            test=None,
            classes=list(self.classes),
            skipped=list(self.skipped),
        )

    def limit_per_class(self, n: int | None, seed: int = 0) -> DatasetSplits:
        """Shrink every split alike (e.g. for smoke runs); None leaves the splits unchanged."""
        if n is None:
            return self

        def limit(split: ImageSplit) -> ImageSplit:
            return split.limit_per_class(n, seed, num_classes=self.num_classes)

        return DatasetSplits(
            train=limit(self.train),
            val=limit(self.val),
            test=None if self.test is None else limit(self.test),
            classes=list(self.classes),
            skipped=list(self.skipped),
        )
