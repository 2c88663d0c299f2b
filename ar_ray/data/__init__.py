"""Datasets as decoded in-memory splits: the built-in Fashion-MNIST few-shot set or a folder.

A folder is listed and checked first (`list_folder`, on the driver, before Ray starts), then
decoded (`load_listing`: in shards on the cluster or in this process, cached per experiment).
"""

from __future__ import annotations

from pathlib import Path

from ar_ray.data.builtin import load_builtin
from ar_ray.data.folder import load_folder, load_listing
from ar_ray.data.image import IMAGE_EXTENSIONS, decode_image
from ar_ray.data.listing import CLASS_SEPARATOR, FolderListing, list_folder
from ar_ray.data.splits import DataError, DatasetSplits, ImageSplit

__all__ = [
    "CLASS_SEPARATOR",
    "IMAGE_EXTENSIONS",
    "DataError",
    "DatasetSplits",
    "FolderListing",
    "decode_image",
    "ImageSplit",
    "list_folder",
    "load_builtin",
    "load_dataset",
    "load_folder",
    "load_listing",
]


def load_dataset(
    data: Path | str | None, image_size: int, skip_bad_images: bool = False
) -> DatasetSplits:
    """None -> built-in Fashion-MNIST few-shot split; else the folder layout at `data` (a local
    path or a URI), decoded in this process."""
    if data is None:
        return load_builtin(image_size)
    return load_folder(data, image_size, skip_bad_images=skip_bad_images)
