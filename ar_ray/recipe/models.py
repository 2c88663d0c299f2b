"""Backbones by torchvision name, trained from scratch, with a small-input stem and CR head."""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn

from ar_ray.config import RecipeConfig


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def _adapt_stem(backbone: nn.Module, stride: int) -> None:
    """Swap the first (ImageNet-sized) conv for a 3x3 one and drop the max-pool.

    At 28-64 px a stride-4 ImageNet stem throws away most of the image before the first block.
    """
    name, first = next((n, m) for n, m in backbone.named_modules() if isinstance(m, nn.Conv2d))
    small = nn.Conv2d(
        first.in_channels, first.out_channels, 3, stride, 1, bias=first.bias is not None
    )
    _replace_module(backbone, name, small)
    if isinstance(getattr(backbone, "maxpool", None), nn.MaxPool2d):
        backbone.maxpool = nn.Identity()


def _strip_classifier(backbone: nn.Module) -> int:
    """Replace the last Linear by Identity so the backbone returns pooled features."""
    name, last = [(n, m) for n, m in backbone.named_modules() if isinstance(m, nn.Linear)][-1]
    _replace_module(backbone, name, nn.Identity())
    return last.in_features


class ARNet(nn.Module):
    """Backbone + linear classifier (+ projection head when CR is on).

    Takes float images in [0, 1] and normalises with train-set statistics held as buffers,
    so a checkpoint alone is enough to serve predictions.
    """

    def __init__(self, config: RecipeConfig, num_classes: int) -> None:
        super().__init__()
        self.backbone = torchvision.models.get_model(config.arch, weights=None)
        if config.small_input:
            _adapt_stem(self.backbone, config.stem_stride)
        features = _strip_classifier(self.backbone)
        self.classifier = nn.Linear(features, num_classes)
        self.projector = (
            nn.Sequential(
                nn.Linear(features, features),
                nn.ReLU(inplace=True),
                nn.Linear(features, config.proj_dim),
            )
            if config.cr_weight > 0
            else None
        )
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5))
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.25))

    def set_normalization(self, mean: Tensor, std: Tensor) -> None:
        self.mean.copy_(mean.view(1, 3, 1, 1))
        self.std.copy_(std.view(1, 3, 1, 1).clamp(min=1e-3))

    def forward(self, images: Tensor, with_projection: bool = False):
        features = self.backbone((images - self.mean) / self.std)
        logits = self.classifier(features)
        if not with_projection:
            return logits
        return logits, self.projector(features)


def place_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move to `device`; on CUDA also to channels_last, the layout bf16 convolutions run
    fastest in (training and `predict_probabilities` hand it channels_last inputs to match)."""
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model
