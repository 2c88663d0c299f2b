"""The training augmentation of `build_train_transform`, run on a whole uint8 batch at once.

On a GPU the per-image CPU pipeline cannot keep up with the model, so the stored images go
to the device once and are cropped, flipped, policy-augmented and erased there. Every image
still gets its own random draws, from the same distributions as the per-image pipeline:
crop boxes are sampled per image (as v2.RandomResizedCrop samples them) and resized in one
`roi_align`; a policy op is drawn per image and the v2 op itself is applied to each group of
images that drew the same op and magnitude. The parameters are read off the per-image
pipeline's own modules, so the two paths cannot drift apart.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align
from torchvision.transforms import v2

from ar_ray.config import RunConfig
from ar_ray.recipe.augment import build_train_transform

ATTEMPTS = 10  # box draws per image before the central fallback, as in torchvision
RANDAUGMENT_BINS = 31  # v2.RandAugment / TrivialAugmentWide default num_magnitude_bins
AUTOAUGMENT_BINS = 10


def _step(transform: v2.Compose, kind: type) -> nn.Module | None:
    return next((step for step in transform.transforms if isinstance(step, kind)), None)


def sample_boxes(
    count: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(top, left, box height, box width), long [count] each: RandomResizedCrop's draw.

    Up to ten (area, log-aspect) tries per image, the first that fits wins; an image with
    none falls back to the largest central box within `ratio`, as torchvision does.
    """
    area = height * width
    target = area * torch.empty(count, ATTEMPTS).uniform_(*scale, generator=generator)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.empty(count, ATTEMPTS).uniform_(*log_ratio, generator=generator).exp_()
    widths = torch.sqrt(target * aspect).round().long()
    heights = torch.sqrt(target / aspect).round().long()
    fits = (widths > 0) & (widths <= width) & (heights > 0) & (heights <= height)
    first = fits.long().argmax(dim=1, keepdim=True)
    box_w = widths.gather(1, first).squeeze(1)
    box_h = heights.gather(1, first).squeeze(1)
    fallback_w, fallback_h = _central_box(height, width, ratio)
    fitted = fits.any(dim=1)
    box_w = torch.where(fitted, box_w, fallback_w)
    box_h = torch.where(fitted, box_h, fallback_h)
    top = (torch.rand(count, generator=generator) * (height - box_h + 1)).long()
    left = (torch.rand(count, generator=generator) * (width - box_w + 1)).long()
    top = torch.where(fitted, top, (height - box_h) // 2)
    left = torch.where(fitted, left, (width - box_w) // 2)
    return top, left, box_h, box_w


def _central_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    in_ratio = width / height
    if in_ratio < min(ratio):
        return width, int(round(width / min(ratio)))
    if in_ratio > max(ratio):
        return int(round(height * max(ratio))), height
    return width, height


def resized_crops(images: Tensor, boxes: tuple[Tensor, ...], size: int) -> Tensor:
    """Crop each image to its own box and resize it to size x size, in one call.

    roi_align's adaptive sampling averages ceil(box/size) samples per output pixel, so a
    downscale is antialiased as v2's resize(antialias=True) is; upscales are bilinear.
    """
    top, left, box_h, box_w = (part.to(images.device, torch.float32) for part in boxes)
    index = torch.arange(len(images), device=images.device, dtype=torch.float32)
    rois = torch.stack([index, left, top, left + box_w, top + box_h], dim=1)
    crops = roi_align(
        images.float(), rois, size, spatial_scale=1.0, sampling_ratio=-1, aligned=True
    )
    return crops.round_().clamp_(0, 255).to(torch.uint8)


def erase(images: Tensor, eraser: v2.RandomErasing, generator: torch.Generator) -> Tensor:
    """v2.RandomErasing per image: with probability p, one box of its scale/ratio set to value."""
    count, _, height, width = images.shape
    area = height * width
    target = area * torch.empty(count, ATTEMPTS).uniform_(*eraser.scale, generator=generator)
    log_ratio = (math.log(eraser.ratio[0]), math.log(eraser.ratio[1]))
    aspect = torch.empty(count, ATTEMPTS).uniform_(*log_ratio, generator=generator).exp_()
    heights = torch.sqrt(target * aspect).round().long()
    widths = torch.sqrt(target / aspect).round().long()
    fits = (heights < height) & (widths < width)
    first = fits.long().argmax(dim=1, keepdim=True)
    box_h = heights.gather(1, first).squeeze(1)
    box_w = widths.gather(1, first).squeeze(1)
    top = (torch.rand(count, generator=generator) * (height - box_h + 1)).long()
    left = (torch.rand(count, generator=generator) * (width - box_w + 1)).long()
    chosen = (torch.rand(count, generator=generator) < eraser.p) & fits.any(dim=1)
    top, left, box_h, box_w, chosen = (
        part.to(images.device) for part in (top, left, box_h, box_w, chosen)
    )
    rows = torch.arange(height, device=images.device).view(1, height, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, width)
    inside = (
        (rows >= top.view(-1, 1, 1))
        & (rows < (top + box_h).view(-1, 1, 1))
        & (cols >= left.view(-1, 1, 1))
        & (cols < (left + box_w).view(-1, 1, 1))
        & chosen.view(-1, 1, 1)
    )
    value = float(eraser.value[0]) if eraser.value is not None else 0.0
    return images.masked_fill(inside.unsqueeze(1), value)


def flip(images: Tensor, generator: torch.Generator) -> Tensor:
    """v2.RandomHorizontalFlip(p=0.5), drawn per image."""
    flipped = (torch.rand(len(images), generator=generator) < 0.5).to(images.device)
    return torch.where(flipped.view(-1, 1, 1, 1), images.flip(-1), images)


PolicyStep = tuple[list[str], list[float]]  # the op and its signed magnitude, per image


class BatchedPolicy:
    """RandAugment, TrivialAugmentWide or AutoAugment with per-image ops on a batch.

    Draws follow the v2 classes' `forward` (op uniform over the class's augmentation space,
    magnitude bin, sign with probability 0.5 for signed ops; AutoAugment: a sub-policy per
    image and each of its ops with its probability). Images that drew the same (op,
    magnitude) go through the v2 op together: at most one call per distinct draw.
    """

    def __init__(self, policy: nn.Module, config: RunConfig) -> None:
        self.policy, self.config = policy, config

    def steps(self, count: int, size: int, generator: torch.Generator) -> list[PolicyStep]:
        space = self.policy._AUGMENTATION_SPACE
        names = list(space)
        if isinstance(self.policy, v2.AutoAugment):
            return self._autoaugment_steps(count, size, generator)
        slots = self.config.num_ops if isinstance(self.policy, v2.RandAugment) else 1
        result = []
        for _ in range(slots):
            ops = [names[i] for i in torch.randint(len(names), (count,), generator=generator)]
            if isinstance(self.policy, v2.RandAugment):
                bins = torch.full((count,), self.config.magnitude)
            else:
                bins = torch.randint(RANDAUGMENT_BINS, (count,), generator=generator)
            result.append(self._magnitudes(ops, bins, RANDAUGMENT_BINS, size, generator))
        return result

    def _autoaugment_steps(
        self, count: int, size: int, generator: torch.Generator
    ) -> list[PolicyStep]:
        subpolicies = self.policy._policies
        picks = torch.randint(len(subpolicies), (count,), generator=generator).tolist()
        result = []
        for slot in range(2):
            drawn = [subpolicies[pick][slot] for pick in picks]
            applied = torch.rand(count, generator=generator).tolist()
            ops = [
                op if roll <= p else "Identity"
                for (op, p, _), roll in zip(drawn, applied, strict=True)
            ]
            bins = torch.tensor([index or 0 for _, _, index in drawn])
            result.append(self._magnitudes(ops, bins, AUTOAUGMENT_BINS, size, generator))
        return result

    def _magnitudes(
        self, ops: list[str], bins: Tensor, num_bins: int, size: int, generator: torch.Generator
    ) -> PolicyStep:
        negative = (torch.rand(len(ops), generator=generator) <= 0.5).tolist()
        magnitudes = []
        for op, index, flip_sign in zip(ops, bins.tolist(), negative, strict=True):
            magnitudes_fn, signed = self.policy._AUGMENTATION_SPACE.get(op, (None, False))
            table = magnitudes_fn(num_bins, size, size) if magnitudes_fn else None
            value = 0.0 if table is None else float(table[index])
            magnitudes.append(-value if signed and flip_sign else value)
        return ops, magnitudes

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        for ops, magnitudes in self.steps(len(images), images.shape[-1], generator):
            groups: dict[tuple[str, float], list[int]] = defaultdict(list)
            for position, key in enumerate(zip(ops, magnitudes, strict=True)):
                if key[0] != "Identity":
                    groups[key].append(position)
            if not groups:
                continue
            images = images.clone()
            for (op, magnitude), positions in groups.items():
                index = torch.tensor(positions, device=images.device)
                images[index] = self.policy._apply_image_or_video_transform(
                    images[index],
                    op,
                    magnitude,
                    interpolation=self.policy.interpolation,
                    fill=self.policy._fill,
                )
        return images


class BatchAugment:
    """[B, C, H, W] uint8 on any device -> [B, V, C, S, S] uint8: `views` independent draws.

    The same layout AugmentedViews batches into, so the loss cannot tell the paths apart.
    Random parameters are drawn on the CPU from `generator` (a handful of numbers per image)
    and only the pixel work runs on the images' device.
    """

    def __init__(self, config: RunConfig, views: int) -> None:
        transform = build_train_transform(config)
        self.crop: v2.RandomResizedCrop = _step(transform, v2.RandomResizedCrop)
        self.hflip = _step(transform, v2.RandomHorizontalFlip) is not None
        policy = next(
            (step for step in transform.transforms if hasattr(step, "_AUGMENTATION_SPACE")), None
        )
        self.policy = BatchedPolicy(policy, config) if policy is not None else None
        self.eraser: v2.RandomErasing | None = _step(transform, v2.RandomErasing)
        self.views = views

    def view(self, images: Tensor, generator: torch.Generator) -> Tensor:
        count, _, height, width = images.shape
        boxes = sample_boxes(count, height, width, self.crop.scale, self.crop.ratio, generator)
        out = resized_crops(images, boxes, self.crop.size[0])
        if self.hflip:
            out = flip(out, generator)
        if self.policy is not None:
            out = self.policy(out, generator)
        if self.eraser is not None:
            out = erase(out, self.eraser, generator)
        return out

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        return torch.stack([self.view(images, generator) for _ in range(self.views)], dim=1)
