"""In-memory dataset splits shared by the built-in and folder loaders.

Every split is decoded up front into one uint8 tensor: few-shot datasets are small, and holding
them decoded means Ray workers and Tune trials never re-read or re-decode image files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ar_ray.errors import UserError


class DataError(UserError):
    """A user-facing data problem; str(e) is ONE line naming the offending path."""


@dataclass(frozen=True, eq=False)
class ImageSplit:
    """Images with optional labels; `labels` is None for an unlabelled (flat) test folder."""

    images: torch.Tensor
    labels: torch.Tensor | None
    ids: list[str]

    def __post_init__(self) -> None:
        # Catch loader bugs here, where the cause is obvious, not deep inside a training step.
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        count = len(self.images)
        if len(self.ids) != count or (self.labels is not None and len(self.labels) != count):
            raise ValueError("images, labels and ids must have the same length")

    def __len__(self) -> int:
        return len(self.images)

    def take(self, indices: torch.Tensor) -> ImageSplit:
        """The subset at `indices`, in the order given."""
        return ImageSplit(
            images=self.images[indices],
            labels=None if self.labels is None else self.labels[indices],
            ids=[self.ids[i] for i in indices.tolist()],
        )

    def limit_per_class(self, n: int, seed: int = 0, *, num_classes: int = 1) -> ImageSplit:
        """A seeded random sample of at most `n` images per class, kept in the original order.

        Sampling rather than taking the head avoids whatever order the files were listed in
        (often grouped or sorted by source), and a fixed seed keeps repeated runs comparable.
        An unlabelled split cannot be balanced, so it keeps `n * num_classes` images from the
        same seeded shuffle: the same budget a balanced labelled split of that size would have.
        """
        if n < 1:
            raise ValueError(f"limit_per_class needs n >= 1, got {n}")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        if self.labels is None:
            kept = order[: n * num_classes]
        else:
            shuffled = self.labels[order]
            per_class = [order[shuffled == label][:n] for label in shuffled.unique()]
            kept = torch.cat(per_class) if per_class else order
        return self.take(kept.sort().values)


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """Train/val (always labelled) and an optional test split over one class list."""

    train: ImageSplit
    val: ImageSplit
    test: ImageSplit | None
    classes: list[str]
    skipped: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

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
