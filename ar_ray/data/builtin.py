"""The bundled Fashion-MNIST few-shot split, so `ar-ray` runs offline with no `--data-dir`.

The npz is produced by `scripts/make_builtin_dataset.py` (50 train + 50 val per class, plus the
official 10k test set); see `builtin/LICENSE-fashion-mnist.txt` for the data's licence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from ar_ray.data.size import stored_size
from ar_ray.data.splits import DataError, DatasetSplits, ImageSplit

BUILTIN_PATH = Path(__file__).with_name("builtin") / "fashion_mnist_fewshot.npz"
NATIVE_SIZE = 28  # the originals are 28 px: stored images are upsampled from them


def _to_rgb(grey: np.ndarray, size: int) -> np.ndarray:
    """Grey [N, H, W] -> uint8 [N, 3, S, S]; resizing the single channel first is 3x cheaper."""
    images = torch.from_numpy(grey).unsqueeze(1)
    if size != NATIVE_SIZE:
        images = TF.resize(images, [size, size], antialias=True)
    # Materialise the channels: an expanded view would alias, and in-place edits would corrupt it.
    return images.expand(-1, 3, -1, -1).contiguous().numpy()


def _split(data: np.lib.npyio.NpzFile, name: str, size: int) -> ImageSplit:
    labels = data[f"{name}_labels"].astype(np.int64)
    return ImageSplit(
        images=_to_rgb(data[f"{name}_images"], size),
        labels=labels,
        ids=[f"builtin-{name}-{i:05d}" for i in range(len(labels))],
    )


def load_builtin(image_size: int = NATIVE_SIZE) -> DatasetSplits:
    """Fashion-MNIST few-shot splits as 3-channel uint8 squares of `stored_size(image_size)`
    pixels (32 for the default 28), stored like a folder's images so evaluation crops alike.

    The originals are 28 px, so at any size this is an upsampled copy: there are no extra
    real pixels to keep, but train and evaluation see the same geometry as on photos.
    """
    size = stored_size(image_size)
    if not BUILTIN_PATH.is_file():
        raise DataError(
            f"{BUILTIN_PATH}: built-in dataset missing; regenerate it with "
            "scripts/make_builtin_dataset.py or pass a data directory"
        )
    with np.load(BUILTIN_PATH) as data:
        return DatasetSplits(
            train=_split(data, "train", size),
            val=_split(data, "val", size),
            test=_split(data, "test", size),
            classes=[str(name) for name in data["classes"]],
        )
