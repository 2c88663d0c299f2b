"""A listed folder decoded in shards of files, by Ray tasks on the cluster or in this process.

One function, `decode_shard`, turns a shard's files into arrays wherever it runs; only the
executor differs (`run_on_ray` for `tune` and `ensemble`, `run_in_process` for `train`, which
has no cluster). The driver preallocates each split's uint8 array once and copies every shard
into it as the shard finishes, dropping the shard right away, so its peak memory stays about
one decoded set (plus the shards in flight), however many images there are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, replace
from itertools import islice

import numpy as np

from ar_ray import storage
from ar_ray.data.image import decode_image_bytes, unreadable_file
from ar_ray.data.listing import FolderListing
from ar_ray.data.splits import DataError

SHARD_FILES = 64  # files per task: a fraction of a second of decoding, so Ray's per-task cost
# stays small while a few thousand images already keep dozens of CPUs busy
IN_FLIGHT = 64  # shards submitted at once: enough to grow an autoscaling cluster, few enough
# that the bytes a driver reads for them (a local folder) stay a bounded slice of the data

FileRead = bytes | OSError  # a file's contents, or why it could not be read


@dataclass(frozen=True)
class Shard:
    """Files of one split, decoded by one task.

    `contents` holds the files when the driver has read them already; otherwise the task
    reads `paths` (relative to `root`) itself, through its own node's filesystem client.
    """

    root: str  # resolved data location: an absolute path or a URI
    paths: tuple[str, ...]
    names: tuple[str, ...]  # each file as messages name it: the data location as given
    size: int  # side of the stored square (`size.stored_size`)
    contents: tuple[FileRead, ...] | None = None

    def read_here(self) -> Shard:
        """The shard with its files read by this process.

        A local folder is read by the driver: only the driver's machine is sure to hold it
        (cluster heads run no tasks, and other nodes may not mount it), while a bucket
        prefix is read by each task on its own node.
        """
        return replace(self, contents=tuple(read_files(self.root, self.paths)))


@dataclass(frozen=True)
class DecodedShard:
    """A shard's images in shard order, bad files left out, and why each bad file failed."""

    images: np.ndarray  # uint8 [decoded files, 3, S, S]
    errors: dict[int, str]  # position in the shard -> one-line message naming the file


@dataclass(frozen=True)
class DecodedFolder:
    """Every split's images, without the files that were skipped."""

    images: dict[str, np.ndarray]  # split name -> uint8 [N, 3, S, S]
    skipped: tuple[str, ...]  # paths relative to the data root, in listing order


def read_files(root: str, paths: Sequence[str]) -> list[FileRead]:
    fs, base = storage.filesystem(root)
    contents: list[FileRead] = []
    for path in paths:
        try:
            with fs.open_input_stream(f"{base.rstrip('/')}/{path}") as stream:
                contents.append(stream.read())
        except OSError as error:
            contents.append(error)
    return contents


def decode_shard(shard: Shard) -> DecodedShard:
    """Decode a shard's files; a bad file is reported, not raised, so the driver decides
    between failing the run and skipping it (`--skip-bad-images`)."""
    size = shard.size
    contents = read_files(shard.root, shard.paths) if shard.contents is None else shard.contents
    images = np.empty((len(shard.paths), 3, size, size), dtype=np.uint8)
    errors: dict[int, str] = {}
    for position, (name, data) in enumerate(zip(shard.names, contents, strict=True)):
        if isinstance(data, OSError):
            errors[position] = unreadable_file(name, data)
            continue
        try:
            images[position - len(errors)] = decode_image_bytes(data, name, size)
        except DataError as error:
            errors[position] = str(error)
    return DecodedShard(images=images[: len(shard.paths) - len(errors)], errors=errors)


ShardRunner = Callable[[Sequence[Shard]], Iterator[tuple[int, DecodedShard]]]
"""Decodes shards, yielding (index into the shards, result) as each one finishes."""


def run_in_process(shards: Sequence[Shard]) -> Iterator[tuple[int, DecodedShard]]:
    for index, shard in enumerate(shards):
        yield index, decode_shard(shard)


def run_on_ray(shards: Sequence[Shard]) -> Iterator[tuple[int, DecodedShard]]:
    """One 1-CPU Ray task per shard, at most IN_FLIGHT at once; closing it cancels the rest."""
    import ray  # here: `ar-ray train` decodes without a cluster and need not load Ray

    task = ray.remote(num_cpus=1)(decode_shard)
    waiting = iter(enumerate(shards))
    running: dict[ray.ObjectRef, int] = {}
    try:
        while True:
            for index, shard in islice(waiting, IN_FLIGHT - len(running)):
                shipped = shard if storage.is_uri(shard.root) else shard.read_here()
                running[task.remote(shipped)] = index
            if not running:
                return
            (done,), _ = ray.wait(list(running), num_returns=1)
            yield running.pop(done), ray.get(done)
    finally:
        for ref in running:
            ray.cancel(ref)


def _shards(listing: FolderListing, size: int) -> list[tuple[str, int, Shard]]:
    """(split name, first row, shard) for every SHARD_FILES files of each split."""
    planned = []
    for split in listing.splits:
        for start in range(0, len(split.files), SHARD_FILES):
            paths = tuple(file.path for file in split.files[start : start + SHARD_FILES])
            names = tuple(listing.name(path) for path in paths)
            planned.append((split.name, start, Shard(listing.resolved, paths, names, size)))
    return planned


def _compact(images: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """The kept rows moved to the front in place: leaving bad files out costs no second copy
    of the split (a row only ever moves to a lower index, so none is overwritten unread)."""
    if kept.all():
        return images
    for row, source in enumerate(np.flatnonzero(kept)):
        images[row] = images[source]
    return images[: int(kept.sum())]


def decode_folder(
    listing: FolderListing, size: int, skip_bad_images: bool, runner: ShardRunner
) -> DecodedFolder:
    """Decode every listed file to a `size` square (the stored size); a bad one fails the
    run (naming it) unless `skip_bad_images`.

    Images/s and the ETA are shown as shards finish.
    """
    from ar_ray.progress import InferenceProgress  # loads Ray: only once there is work to show

    planned = _shards(listing, size)
    arrays = {s.name: np.empty((len(s.files), 3, size, size), np.uint8) for s in listing.splits}
    kept = {split.name: np.ones(len(split.files), dtype=bool) for split in listing.splits}
    shards = [shard for _, _, shard in planned]
    with (
        InferenceProgress(listing.num_files, verb="decoded") as progress,
        closing(runner(shards)) as finished,
    ):
        for index, result in finished:
            split, start, shard = planned[index]
            rows = slice(start, start + len(shard.paths))
            for position, message in sorted(result.errors.items()):
                if not skip_bad_images:
                    raise DataError(message)
                kept[split][start + position] = False
            arrays[split][rows][kept[split][rows]] = result.images
            progress.advance(len(shard.paths))
    skipped = tuple(
        file.path
        for split in listing.splits
        for file, keep in zip(split.files, kept[split.name], strict=True)
        if not keep
    )
    images = {name: _compact(array, kept[name]) for name, array in arrays.items()}
    return DecodedFolder(images=images, skipped=skipped)
