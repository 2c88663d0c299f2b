"""Stochastic Weight Averaging (Izmailov et al. 2018) through `torch.optim.swa_utils`.

The average is of the *student*, the weights the optimiser moves, also under Mean Teacher:
the teacher is already an EMA of the student, and Athiwaratkun et al. 2019 ("There are many
consistent explanations of unlabeled data: why you should average") found SWA of a Mean
Teacher's student beats the teacher itself. The teacher keeps making the pseudo-labels
while training; once the averaged model's BatchNorm statistics are recomputed it is the
model evaluated, checkpointed and served, instead of the teacher.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, update_bn

from ar_ray.data import ImageSplit
from ar_ray.recipe.augment import center_crop_batch, model_layout, to_unit_float


class WeightAverage:
    """The equal-weight average of the student's parameters at the epoch ends it is given."""

    def __init__(self, student: nn.Module) -> None:
        self.averaged = AveragedModel(student)  # a deep copy; its first update copies

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @property
    def count(self) -> int:
        return int(self.averaged.n_averaged)

    def update(self, student: nn.Module) -> None:
        self.averaged.update_parameters(student)

    def recompute_batchnorm(self, split: ImageSplit, image_size: int, batch_size: int) -> None:
        """BatchNorm statistics for the averaged weights, which no step ever ran with: the
        running statistics copied along belong to another model (Izmailov et al. 2018).

        One pass over the training images, un-augmented and centre-cropped as evaluation
        and serving see them, so the statistics describe the inputs the model will be
        served. It is also deterministic (no augmentation draws), so a resumed run ends
        on the same statistics, and every DDP rank runs the same batches (the whole split,
        not its shard): SyncBatchNorm's collectives then match and all ranks agree.
        """
        update_bn(self._batches(split, image_size, batch_size), self.module)

    def _batches(self, split: ImageSplit, image_size: int, batch_size: int) -> Iterator[Tensor]:
        device = next(self.module.parameters()).device
        for start in range(0, len(split), batch_size):
            images = torch.from_numpy(split.rows(start, start + batch_size).images)
            crops = center_crop_batch(images.to(device, non_blocking=True), image_size)
            yield model_layout(to_unit_float(crops))

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.averaged.n_averaged.fill_(int(state["count"]))
