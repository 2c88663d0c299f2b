"""Decoded images kept in the experiment's storage, so a folder is decoded once per experiment.

`tune` writes the cache under `<storage>/<name>/data_cache/`; `tune --resume` and `ensemble`
find it there. It is valid only while a fresh listing gives the same key: the same files
with the same sizes and modification times, decoded to the same stored size (which the
training `image_size` sets, `size.stored_size`), with the same `--skip-bad-images`, by the
same decoder (`FORMAT`). Anything else is decoded again and overwrites it, so a changed
folder can never train on stale pixels.

Layout: one `<split>.npy` (uint8 [N, 3, S, S]) per split and `manifest.json`. The manifest
is removed first and written last, so a cache caught half-written is never taken as valid.
Labels and ids are not stored: they follow from the listing, which the manifest pins.
Local storage or a URI alike, through `ar_ray.storage`.
"""

from __future__ import annotations

import json
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ar_ray import storage
from ar_ray.data.decode import DecodedFolder
from ar_ray.data.listing import FolderListing
from ar_ray.errors import UserError

CACHE_DIR = "data_cache"
MANIFEST = "manifest.json"
FORMAT = 1  # bump whenever decoding changes what a file becomes: older caches then miss


def _key(listing: FolderListing, size: int, skip_bad_images: bool) -> dict[str, Any]:
    """What the cached arrays depend on, as JSON values (so a stored key compares equal)."""
    return {
        "format": FORMAT,
        "data_resolved": listing.resolved,
        "stored_size": size,
        "skip_bad_images": skip_bad_images,
        "files": [[f.path, f.size, f.mtime_ns] for split in listing.splits for f in split.files],
    }


def _load_array(location: str, shape: tuple[int, ...]) -> np.ndarray | None:
    with tempfile.TemporaryDirectory() as folder:
        try:
            array = np.load(storage.download_file(location, Path(folder) / "array.npy"))
        except (OSError, ValueError):
            return None
    return array if array.shape == shape and array.dtype == np.uint8 else None


def load_cached(
    cache: str, listing: FolderListing, size: int, skip_bad_images: bool
) -> DecodedFolder | None:
    """The folder decoded to `size` squares from `cache`, or None when it is missing, stale
    or damaged."""
    path = storage.join(cache, MANIFEST)
    if not storage.exists(path):
        return None
    try:
        manifest = json.loads(storage.read_text(path))
    except (UserError, ValueError):
        return None
    key = _key(listing, size, skip_bad_images)
    if any(manifest.get(name) != value for name, value in key.items()):
        return None
    images = {}
    for split, count in manifest["split_sizes"].items():
        shape = (count, 3, size, size)
        images[split] = _load_array(storage.join(cache, f"{split}.npy"), shape)
        if images[split] is None:
            return None
    return DecodedFolder(images=images, skipped=tuple(manifest["skipped"]))


def save_cached(
    cache: str,
    listing: FolderListing,
    size: int,
    skip_bad_images: bool,
    decoded: DecodedFolder,
) -> None:
    """Write `decoded` with its manifest, replacing whatever cache was there."""
    manifest_path = storage.join(cache, MANIFEST)
    storage.remove_file(manifest_path)  # from here on, no manifest vouches for the arrays
    for split, images in decoded.images.items():
        storage.save_file(storage.join(cache, f"{split}.npy"), partial(_write_npy, images))
    key = _key(listing, size, skip_bad_images)
    files = key.pop("files")
    manifest = {
        "data": listing.location,
        **key,
        "classes": list(listing.classes),
        "split_sizes": {split: len(images) for split, images in decoded.images.items()},
        "skipped": list(decoded.skipped),
        "files": files,  # last: the long part, after what a reader looks for
    }
    storage.write_text(manifest_path, json.dumps(manifest))


def _write_npy(images: np.ndarray, path: str) -> None:
    with open(path, "wb") as stream:  # a file object: np.save would append .npy to a name
        np.save(stream, images, allow_pickle=False)
