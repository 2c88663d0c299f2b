"""The VIPriors / ImageFolder layout: `root/{train,val}/<class>/<image>`, optional `root/test/`.

Layout problems are all found before any image is decoded, so a typo in a path fails in
milliseconds rather than after minutes of decoding. Every problem is a one-line DataError that
names the offending path, because the first thing a user needs is where to look.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ar_ray.data.splits import DataError, DatasetSplits, ImageSplit

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
LABELLED_SPLITS = ("train", "val")

# PIL's ways of saying "this file is not a (whole) image": truncated data is an OSError, some
# plugins report broken headers as SyntaxError, and oversized images as DecompressionBombError.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

ClassFiles = dict[str, list[Path]]


def _visible(path: Path) -> bool:
    """Dot-files are OS litter (.DS_Store, macOS `._x.jpg` forks), never data."""
    return not path.name.startswith(".")


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if _visible(p) and p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _visible(p) and p.is_dir())


def _check_root(root: Path) -> None:
    if not root.exists():
        raise DataError(f"{root}: data directory does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: data directory is a file, expected a folder with train/ and val/")


def _labelled_layout(split_dir: Path) -> ClassFiles:
    """Class name -> its image files, failing on anything that would silently shrink the data."""
    class_dirs = _subfolders(split_dir)
    if not class_dirs:
        raise DataError(f"{split_dir}: no class folders (expected {split_dir}/<class>/<image>)")
    layout = {d.name: _image_files(d) for d in class_dirs}
    for name, files in layout.items():
        if not files:
            extensions = " ".join(sorted(IMAGE_EXTENSIONS))
            raise DataError(f"{split_dir / name}: class folder has no image files ({extensions})")
    return layout


def _split_layout(root: Path, name: str) -> ClassFiles:
    split_dir = root / name
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: missing '{name}' split folder (expected {name}/<class>/)")
    return _labelled_layout(split_dir)


def _check_classes(root: Path, train: ClassFiles, other: ClassFiles, split: str) -> None:
    """Labels are indices into the train classes, so a split may not invent classes of its own."""
    extra = sorted(set(other) - set(train))
    if extra:
        raise DataError(f"{root / split / extra[0]}: class '{extra[0]}' is missing from train")
    missing = sorted(set(train) - set(other))
    if missing and split != "test":  # a test set may cover only some classes
        raise DataError(f"{root / split}: class '{missing[0]}' (in train) is missing from {split}")


def _test_layout(root: Path) -> ClassFiles | list[Path] | None:
    """A labelled test folder (class sub-folders), a flat one (a list of images), or None."""
    test_dir = root / "test"
    if not test_dir.exists():
        return None
    if not test_dir.is_dir():
        raise DataError(f"{test_dir}: expected a folder of images or of class folders")
    files, class_dirs = _image_files(test_dir), _subfolders(test_dir)
    if files and class_dirs:
        raise DataError(f"{test_dir}: mixes loose images with class folders; use one or the other")
    if class_dirs:
        return _labelled_layout(test_dir)
    if not files:
        raise DataError(f"{test_dir}: test folder has no images and no class folders")
    return files


def _resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size`, then the centre square: keeps aspect ratio, drops the margins."""
    width, height = image.size
    scale = size / min(width, height)
    resized = (max(size, round(width * scale)), max(size, round(height * scale)))
    if resized != image.size:
        image = image.resize(resized, Image.Resampling.BICUBIC)
    left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


# What PIL may call a file with that extension: phone cameras save JPEGs as MPO (a JPEG
# whose first frame is the photo, followed by e.g. a depth or preview frame).
FORMATS_OF_EXTENSION = {
    ".jpg": ("JPEG", "MPO"),
    ".jpeg": ("JPEG", "MPO"),
    ".png": ("PNG",),
    ".bmp": ("BMP",),
    ".webp": ("WEBP",),
    ".gif": ("GIF",),
    ".tif": ("TIFF",),
    ".tiff": ("TIFF",),
}
WIDE_INTEGER_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
WHITE = (255, 255, 255, 255)


class MislabelledImage(ValueError):
    """Content and name disagree (a PNG named .jpg): often a sign of a broken export, and
    tools other than PIL (e.g. JPEG-only decoders on the cluster) would fail on it."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB, keeping what a viewer would show.

    16-bit greyscale ("I;16", and "I" holding 16-bit values) is scaled to 8 bits by its top
    byte: PIL's own convert clips every value above 255 to white. Transparent images (RGBA,
    LA, PA, palette or RGB with a transparent colour) are composited on white rather than
    having the alpha dropped, which would expose whatever colour the invisible pixels hold
    (often black, or noise). CMYK and the other modes take PIL's conversion.
    """
    if image.mode in WIDE_INTEGER_MODES:
        top_byte = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        image = Image.fromarray(top_byte.astype(np.uint8), "L")
    if image.has_transparency_data:
        image = Image.alpha_composite(Image.new("RGBA", image.size, WHITE), image.convert("RGBA"))
    return image.convert("RGB")


def _decode(source: Path | BinaryIO, suffix: str, size: int) -> np.ndarray:
    """One full decode per file; `load()` forces truncated data to raise instead of passing.

    EXIF orientation is applied, so a phone photo is learnt upright, as it is displayed.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's EXIF chatter
        with Image.open(source) as image:
            expected = FORMATS_OF_EXTENSION.get(suffix.lower())
            if expected and image.format not in expected:
                raise MislabelledImage(f"holds {image.format} data but is named {suffix}")
            image.draft(None, (size, size))  # JPEG: decode at a reduced scale that is >= size
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            rgb = _to_rgb(image)
    return np.asarray(_resize_center_crop(rgb, size))  # HWC; made CHW once, for the whole split


def decode_image(path: Path, size: int) -> np.ndarray:
    """One image file as uint8 CHW at `size`, decoded exactly as the training images were."""
    try:
        array = _decode(path, path.suffix, size)
    except DECODE_ERRORS as error:
        raise DataError(_bad_image_message(path, error)) from error
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def decode_image_bytes(data: bytes, name: str, size: int) -> np.ndarray:
    """An image read elsewhere (a bucket, a Ray Data read task) as uint8 CHW at `size`,
    decoded exactly as training images were; a bad one raises DataError naming `name`."""
    try:
        array = _decode(io.BytesIO(data), PurePosixPath(name).suffix, size)
    except DECODE_ERRORS as error:
        raise DataError(f"{name}: {_bad_image_reason(error, empty=not data)}") from error
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def _bad_image_message(path: Path, error: Exception) -> str:
    empty = path.is_file() and path.stat().st_size == 0
    return f"{path}: {_bad_image_reason(error, empty)}"


def _bad_image_reason(error: Exception, empty: bool) -> str:
    """Why an image failed to decode, in words a user can act on."""
    if empty:
        return "image file is empty (0 bytes)"
    if isinstance(error, MislabelledImage):
        return f"{error}; rename it or pass --skip-bad-images"
    if isinstance(error, UnidentifiedImageError):  # its own message repeats the path
        return "not an image PIL can decode (corrupt or unknown format)"
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"unreadable or corrupt image ({reason})"


def _decode_files(
    files: list[Path], size: int, skipped: list[str] | None
) -> list[tuple[Path, np.ndarray]]:
    """Decode `files`; a bad one raises, or is recorded in `skipped` when that list is given."""
    decoded = []
    for path in files:
        try:
            decoded.append((path, _decode(path, path.suffix, size)))
        except DECODE_ERRORS as error:
            if skipped is None:
                raise DataError(_bad_image_message(path, error)) from error
            skipped.append(str(path))
    return decoded


def _split(
    split_dir: Path, decoded: list[tuple[Path, np.ndarray]], labels: list[int] | None
) -> ImageSplit:
    """Ids are paths relative to the split folder: stable across machines and mount points.

    The HWC -> CHW copy is done by numpy: torch's uint8 permute/stack copies can be many times
    slower on small multi-threaded CPU boxes.
    """
    hwc = np.stack([array for _, array in decoded])
    images = np.ascontiguousarray(hwc.transpose(0, 3, 1, 2))
    return ImageSplit(
        images=images,
        labels=None if labels is None else np.array(labels, dtype=np.int64),
        ids=[path.relative_to(split_dir).as_posix() for path, _ in decoded],
    )


def _load_labelled(
    split_dir: Path, layout: ClassFiles, classes: list[str], size: int, skipped: list[str] | None
) -> ImageSplit:
    decoded, labels = [], []
    for name, files in layout.items():
        kept = _decode_files(files, size, skipped)
        if not kept:
            raise DataError(f"{split_dir / name}: no readable images left after skipping bad files")
        decoded += kept
        labels += [classes.index(name)] * len(kept)
    return _split(split_dir, decoded, labels)


def _load_flat(
    split_dir: Path, files: list[Path], size: int, skipped: list[str] | None
) -> ImageSplit:
    decoded = _decode_files(files, size, skipped)
    if not decoded:
        raise DataError(f"{split_dir}: no readable images left after skipping bad files")
    return _split(split_dir, decoded, None)


def load_folder(root: Path, image_size: int, skip_bad_images: bool = False) -> DatasetSplits:
    """Decode a VIPriors/ImageFolder tree; class order is the sorted train class folder names.

    With `skip_bad_images`, unreadable images are left out and listed in `skipped` instead of
    failing the run; a class (or flat test folder) left with no images still fails.
    """
    root = Path(root)
    _check_root(root)
    layouts = {name: _split_layout(root, name) for name in LABELLED_SPLITS}
    _check_classes(root, layouts["train"], layouts["val"], "val")
    test_layout = _test_layout(root)
    if isinstance(test_layout, dict):
        _check_classes(root, layouts["train"], test_layout, "test")

    classes = sorted(layouts["train"])
    skipped: list[str] = []
    record = skipped if skip_bad_images else None
    train = _load_labelled(root / "train", layouts["train"], classes, image_size, record)
    val = _load_labelled(root / "val", layouts["val"], classes, image_size, record)
    if isinstance(test_layout, dict):
        test = _load_labelled(root / "test", test_layout, classes, image_size, record)
    elif isinstance(test_layout, list):
        test = _load_flat(root / "test", test_layout, image_size, record)
    else:
        test = None
    return DatasetSplits(train=train, val=val, test=test, classes=classes, skipped=skipped)
