"""Datasets as decoded in-memory splits: the built-in Fashion-MNIST few-shot set or a folder."""

from __future__ import annotations

from pathlib import Path

from ar_ray.data.builtin import load_builtin
from ar_ray.data.folder import IMAGE_EXTENSIONS, decode_image, load_folder
from ar_ray.data.splits import DataError, DatasetSplits, ImageSplit

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "DatasetSplits",
    "decode_image",
    "ImageSplit",
    "load_builtin",
    "load_dataset",
    "load_folder",
]


def load_dataset(
    data_dir: Path | str | None, image_size: int, skip_bad_images: bool = False
) -> DatasetSplits:
    """None -> built-in Fashion-MNIST few-shot split; else the folder layout."""
    if data_dir is None:
        return load_builtin(image_size)
    return load_folder(Path(data_dir), image_size, skip_bad_images=skip_bad_images)
