"""Aggressive training augmentation from hyperparameters, and centre / TenCrop evaluation.

Training transforms run per image on uint8 tensors (cheap, any worker can do them);
Mixup/CutMix run per batch on floats. Evaluation works on whole uint8 batches, resized and
cropped on the model's device, so TenCrop is one forward of 10B images, never ten of B.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ar_ray.config import RecipeConfig
from ar_ray.data.size import stored_size
from ar_ray.recipe.sampling import SAMPLE, mixed_seed

CROPS_PER_IMAGE = {"none": 1, "center": 1, "tencrop": 10}


def build_train_transform(config: RecipeConfig) -> v2.Compose:
    """The per-image pipeline; `magnitude`/`num_ops` shape RandAugment, the others are fixed."""
    steps: list[nn.Module] = [
        v2.RandomResizedCrop(config.image_size, scale=(config.rrc_scale_min, 1.0), antialias=True)
    ]
    if config.hflip:
        steps.append(v2.RandomHorizontalFlip())
    policy = build_policy(config)
    if policy is not None:
        steps.append(policy)
    if config.erasing_p > 0:
        steps.append(v2.RandomErasing(p=config.erasing_p))
    return v2.Compose(steps)


def build_policy(config: RecipeConfig) -> nn.Module | None:
    """The configured policy; the batched device path applies the same object's ops."""
    policy = {
        "none": None,
        "randaugment": lambda: v2.RandAugment(num_ops=config.num_ops, magnitude=config.magnitude),
        "trivialaugment": v2.TrivialAugmentWide,
        "autoaugment": v2.AutoAugment,
    }[config.policy]
    return None if policy is None else policy()


class AugmentedViews(Dataset):
    """In-memory uint8 images served as `views` independent augmentations of each image.

    Two views feed contrastive regularisation; with CR off one view saves half the compute.
    Items are keyed by (epoch, index), as `EpochSampler` yields them: each sample's
    augmentation is seeded from (seed, epoch, rank, index) inside a forked RNG, so it is the
    same in any worker, and the training process's own RNG (Mixup's draws) is left alone.
    With no `transform` the stored image is served as it is, for augmentation on the device.
    The arrays may be the read-only object-store buffer every process on a node shares, so
    each image is copied before torch sees it: transforms can never write into the shared copy.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        transform: Callable | None,
        views: int,
        *,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        self.images, self.labels, self.transform, self.views = images, labels, transform, views
        self.seed, self.rank = seed, rank

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        epoch, index = key
        image = torch.from_numpy(self.images[index].copy())
        if self.transform is None:
            return image, int(self.labels[index])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mixed_seed(SAMPLE, self.seed, epoch, self.rank, index))
            views = torch.stack([self.transform(image) for _ in range(self.views)])
        return views, int(self.labels[index])


BatchMixer = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def build_batch_mixer(config: RecipeConfig, num_classes: int) -> BatchMixer:
    """Mixup/CutMix over [B, V, C, H, W] float batches; returns soft targets [B, K].

    The views of one image are stacked on the channel axis before mixing so they share the
    same partner, lambda and box: the contrastive twins stay twins after mixing.
    """
    choices: list[nn.Module] = []
    if config.mixup_alpha > 0:
        choices.append(v2.MixUp(alpha=config.mixup_alpha, num_classes=num_classes))
    if config.cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=config.cutmix_alpha, num_classes=num_classes))
    mixer = v2.RandomChoice(choices) if choices else None

    def mix(views: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if mixer is None or torch.rand(()).item() >= config.mix_prob:
            return views, F.one_hot(labels, num_classes).float()
        batch, count, channels, height, width = views.shape
        mixed, targets = mixer(views.reshape(batch, count * channels, height, width), labels)
        return mixed.reshape(batch, count, channels, height, width), targets

    return mix


def to_unit_float(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float [0, 1]; the model normalises with its own train statistics."""
    return images.float().div_(255.0)


def _resized(images: Tensor, size: int) -> Tensor:
    """Square `size`; images already that size come back untouched (no resampling blur)."""
    return v2.functional.resize(images, [size, size], antialias=True)


def whole_image_batch(images: Tensor, image_size: int) -> Tensor:
    """tta "none": the whole stored image, scaled to the model's input size, nothing cut."""
    return _resized(images, image_size)


def center_crop_batch(images: Tensor, image_size: int) -> Tensor:
    stored = _resized(images, stored_size(image_size))
    return v2.functional.center_crop(stored, [image_size, image_size])


def ten_crop_batch(images: Tensor, image_size: int) -> Tensor:
    """[B, C, H, W] -> [10 * B, C, S, S], crop-major: 4 corners + centre, then their flips."""
    stored = _resized(images, stored_size(image_size))
    return torch.cat(v2.functional.ten_crop(stored, [image_size, image_size]))


def device_autocast(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on CUDA (tensor cores, fp32's range); plain fp32 elsewhere, where CPU
    autocast would only add casts around the convolutions."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def model_layout(images: Tensor) -> Tensor:
    """channels_last on CUDA, the layout `models.place_model` gives the weights there."""
    if images.device.type == "cuda":
        return images.contiguous(memory_format=torch.channels_last)
    return images


EVAL_VIEWS: dict[str, Callable[[Tensor, int], Tensor]] = {
    "none": whole_image_batch,
    "center": center_crop_batch,
    "tencrop": ten_crop_batch,
}


@torch.no_grad()
def predict_probabilities(model: nn.Module, images: Tensor, image_size: int, tta: str) -> Tensor:
    """Softmax probabilities [B, K] for uint8 images: whole image, centre crop or TenCrop.

    The uint8 chunk crosses to the model's device first (a quarter of the bytes of floats,
    and ten times fewer than TenCrop's crops), so resizing and cropping run there too. On
    CUDA the forward runs in bf16 with channels_last, as training does; the CPU stays fp32.
    """
    if tta not in EVAL_VIEWS:
        raise ValueError(f"unknown tta {tta!r}")
    device = next(model.parameters()).device
    crops = to_unit_float(EVAL_VIEWS[tta](images.to(device, non_blocking=True), image_size))
    with device_autocast(device):
        logits = model(model_layout(crops))
    probabilities = torch.softmax(logits.float(), dim=1)
    return probabilities.view(-1, len(images), probabilities.shape[1]).mean(dim=0)
