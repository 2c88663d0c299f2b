"""The VIPriors / ImageFolder layout, listed and checked: `root/{train,val}/<class>/<image>`,
optional `root/test/` (class folders or a flat folder of images).

Listing runs on the driver before Ray starts and reads no image, so a typo in a path fails in
milliseconds, leaving nothing behind. It goes through a pyarrow filesystem, so one code path
serves a local folder and an `s3://` or `gs://` prefix, and each file's size and modification
time come with it: they are what tells a decoded cache that the folder has not changed.
Every problem is a one-line DataError naming the path as the user gave it, because the first
thing a user needs is where to look.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

from pyarrow.fs import FileInfo, FileSelector, FileSystem, FileType

from ar_ray import storage
from ar_ray.data.image import IMAGE_EXTENSIONS
from ar_ray.data.splits import DataError

LABELLED_SPLITS = ("train", "val")
CLASS_SEPARATOR = "|"  # predictions join top-5 class names with it; spaces occur in names


@dataclass(frozen=True)
class ListedFile:
    """One image file: its path relative to the data root ("train/cat/0.jpg"), and what
    changes when the file does."""

    path: str
    size: int
    mtime_ns: int | None


@dataclass(frozen=True)
class SplitListing:
    """The image files of one split folder, class by class, and their labels (indices into
    the train classes), or None for a flat, unlabelled test folder."""

    name: str
    files: tuple[ListedFile, ...]
    labels: tuple[int, ...] | None

    def ids(self) -> list[str]:
        """Paths relative to the split folder: stable across machines and mount points."""
        return [file.path.split("/", 1)[1] for file in self.files]


@dataclass(frozen=True)
class FolderListing:
    """A checked dataset folder: where it is, its classes, and its splits' files."""

    location: str  # as the user gave it: what messages name
    resolved: str  # absolute path or URI: what readers on any node and later commands open
    classes: tuple[str, ...]
    splits: tuple[SplitListing, ...]  # train, val, and test when the folder has one

    def name(self, relative: str) -> str:
        """A path under the root as the user would write it."""
        return storage.join(self.location, relative)

    @property
    def num_files(self) -> int:
        return sum(len(split.files) for split in self.splits)


Tree = tuple[dict[str, list[FileInfo]], list[FileInfo]]  # class folder -> images; loose images


def _visible(parts: list[str]) -> bool:
    """Dot-files and dot-folders are OS litter (.DS_Store, macOS `._x.jpg` forks), never data."""
    return not any(part.startswith(".") for part in parts)


def _is_image(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _tree(fs: FileSystem, folder: str) -> Tree:
    """One recursive listing of a split folder (one paginated request on a bucket).

    A bucket has no real folders, so a class folder is any first-level name that is a folder
    or holds something; only images directly inside it count, as in a local folder.
    """
    classes: dict[str, list[FileInfo]] = {}
    loose: list[FileInfo] = []
    for info in fs.get_file_info(FileSelector(folder, recursive=True)):
        parts = info.path[len(folder) + 1 :].split("/")
        if not _visible(parts):
            continue
        if info.type == FileType.Directory or len(parts) > 1:
            classes.setdefault(parts[0], [])
        if info.type == FileType.File and _is_image(parts[-1]):
            if len(parts) == 1:
                loose.append(info)
            elif len(parts) == 2:
                classes[parts[0]].append(info)
    ordered = {name: sorted(classes[name], key=lambda info: info.path) for name in sorted(classes)}
    return ordered, sorted(loose, key=lambda info: info.path)


class _Root:
    """The data root on its filesystem, naming paths in errors as the user wrote them."""

    def __init__(self, location: str) -> None:
        self.location = location
        self.resolved = storage.resolve(location)
        self.fs, path = storage.filesystem(self.resolved)
        self.path = path.rstrip("/")

    def name(self, *parts: str) -> str:
        return storage.join(self.location, *parts)

    def kind(self, *parts: str) -> FileType:
        return self.fs.get_file_info(posixpath.join(self.path, *parts)).type

    def tree(self, split: str) -> Tree:
        return _tree(self.fs, posixpath.join(self.path, split))


def _check_root(root: _Root) -> None:
    kind = root.kind()
    if kind == FileType.NotFound:
        raise DataError(f"{root.name()}: data directory does not exist")
    if kind != FileType.Directory:
        raise DataError(
            f"{root.name()}: data directory is a file, expected a folder with train/ and val/"
        )


def _labelled(root: _Root, split: str, classes: dict[str, list[FileInfo]]) -> None:
    """Fail on anything that would silently shrink the data."""
    if not classes:
        folder = root.name(split)
        raise DataError(f"{folder}: no class folders (expected {folder}/<class>/<image>)")
    for name, files in classes.items():
        if CLASS_SEPARATOR in name:
            folder = root.name(split, name)
            raise DataError(f"{folder}: a class name may not contain '{CLASS_SEPARATOR}'")
        if not files:
            folder, extensions = root.name(split, name), " ".join(sorted(IMAGE_EXTENSIONS))
            raise DataError(f"{folder}: class folder has no image files ({extensions})")


def _labelled_split(root: _Root, split: str) -> dict[str, list[FileInfo]]:
    if root.kind(split) != FileType.Directory:
        raise DataError(
            f"{root.name(split)}: missing '{split}' split folder (expected {split}/<class>/)"
        )
    classes, _ = root.tree(split)
    _labelled(root, split, classes)
    return classes


def _check_classes(root: _Root, train: dict, other: dict, split: str) -> None:
    """Labels are indices into the train classes, so a split may not invent classes of its own."""
    extra = sorted(set(other) - set(train))
    if extra:
        raise DataError(f"{root.name(split, extra[0])}: class '{extra[0]}' is missing from train")
    missing = sorted(set(train) - set(other))
    if missing and split != "test":  # a test set may cover only some classes
        folder = root.name(split)
        raise DataError(f"{folder}: class '{missing[0]}' (in train) is missing from {split}")


def _test_split(root: _Root) -> dict[str, list[FileInfo]] | list[FileInfo] | None:
    """A labelled test folder (class folders), a flat one (a list of images), or None."""
    kind = root.kind("test")
    if kind == FileType.NotFound:
        return None
    if kind != FileType.Directory:
        raise DataError(f"{root.name('test')}: expected a folder of images or of class folders")
    classes, loose = root.tree("test")
    if loose and classes:
        raise DataError(
            f"{root.name('test')}: mixes loose images with class folders; use one or the other"
        )
    if classes:
        _labelled(root, "test", classes)
        return classes
    if not loose:
        raise DataError(f"{root.name('test')}: test folder has no images and no class folders")
    return loose


def _listed(root: _Root, info: FileInfo) -> ListedFile:
    return ListedFile(path=info.path[len(root.path) + 1 :], size=info.size, mtime_ns=info.mtime_ns)


def _split(
    root: _Root, name: str, files: dict[str, list[FileInfo]] | list[FileInfo], classes: list[str]
) -> SplitListing:
    if isinstance(files, list):
        return SplitListing(name, tuple(_listed(root, info) for info in files), None)
    listed, labels = [], []
    for class_name, infos in files.items():
        listed += [_listed(root, info) for info in infos]
        labels += [classes.index(class_name)] * len(infos)
    return SplitListing(name, tuple(listed), tuple(labels))


def list_folder(location: str | Path) -> FolderListing:
    """List and check a dataset folder (local path or URI); class order is the sorted train
    class folder names."""
    root = _Root(str(location))
    _check_root(root)
    layouts = {split: _labelled_split(root, split) for split in LABELLED_SPLITS}
    _check_classes(root, layouts["train"], layouts["val"], "val")
    test = _test_split(root)
    if isinstance(test, dict):
        _check_classes(root, layouts["train"], test, "test")
    if test is not None:
        layouts["test"] = test
    classes = sorted(layouts["train"])
    return FolderListing(
        location=root.location,
        resolved=root.resolved,
        classes=tuple(classes),
        splits=tuple(_split(root, name, files, classes) for name, files in layouts.items()),
    )
