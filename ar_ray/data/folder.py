"""A dataset folder as in-memory splits: listed and checked (`listing`), decoded in shards
(`decode`) or taken from the experiment's cache (`cache`), and assembled into one uint8 array
per split with the labels and ids the listing gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ar_ray.data.cache import load_cached, save_cached
from ar_ray.data.decode import DecodedFolder, ShardRunner, decode_folder, run_in_process
from ar_ray.data.listing import FolderListing, SplitListing, list_folder
from ar_ray.data.size import stored_size
from ar_ray.data.splits import DataError, DatasetSplits, ImageSplit

NOTHING_LEFT = "no readable images left after skipping bad files"


def load_listing(
    listing: FolderListing,
    image_size: int,
    skip_bad_images: bool = False,
    *,
    runner: ShardRunner = run_in_process,
    cache: str | None = None,
) -> DatasetSplits:
    """Decode a listed folder with `runner` into squares of `stored_size(image_size)`; with
    `cache` (a folder in the experiment's storage), reuse the images decoded there when the
    folder has not changed, and store them there when they had to be decoded.

    With `skip_bad_images`, unreadable images are left out and listed in `skipped` instead of
    failing the run; a class (or flat test folder) left with no images still fails.
    """
    size = stored_size(image_size)
    decoded = None if cache is None else load_cached(cache, listing, size, skip_bad_images)
    if decoded is not None:
        print(f"reusing the images of {listing.location} decoded in {cache}", flush=True)
        return _splits(listing, decoded)
    print(f"decoding {listing.num_files} images of {listing.location}", flush=True)
    decoded = decode_folder(listing, size, skip_bad_images, runner)
    splits = _splits(listing, decoded)  # fails if skipping emptied a class: nothing to cache
    if cache is not None:
        save_cached(cache, listing, size, skip_bad_images, decoded)
    return splits


def load_folder(
    location: str | Path, image_size: int, skip_bad_images: bool = False
) -> DatasetSplits:
    """List, check and decode a VIPriors/ImageFolder tree (a local path or a URI) in this
    process; class order is the sorted train class folder names."""
    return load_listing(list_folder(location), image_size, skip_bad_images)


def _splits(listing: FolderListing, decoded: DecodedFolder) -> DatasetSplits:
    skipped = set(decoded.skipped)
    built = {
        split.name: _split(listing, split, decoded.images[split.name], skipped)
        for split in listing.splits
    }
    return DatasetSplits(
        train=built["train"],
        val=built["val"],
        test=built.get("test"),
        classes=list(listing.classes),
        skipped=[listing.name(path) for path in decoded.skipped],
    )


def _split(
    listing: FolderListing, split: SplitListing, images: np.ndarray, skipped: set[str]
) -> ImageSplit:
    kept = [row for row, file in enumerate(split.files) if file.path not in skipped]
    ids = split.ids()
    labels = None
    if split.labels is None:
        if not kept:
            raise DataError(f"{listing.name(split.name)}: {NOTHING_LEFT}")
    else:
        listed = np.array(split.labels, dtype=np.int64)
        labels = listed[kept]
        counts = np.bincount(labels, minlength=len(listing.classes))
        emptied = np.flatnonzero((np.bincount(listed, minlength=len(counts)) > 0) & (counts == 0))
        if emptied.size:
            folder = listing.name(f"{split.name}/{listing.classes[emptied[0]]}")
            raise DataError(f"{folder}: {NOTHING_LEFT}")
    return ImageSplit(images=images, labels=labels, ids=[ids[row] for row in kept])
