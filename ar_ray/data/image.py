"""One image file (or its bytes) as uint8 CHW at the stored size (`size.stored_size`): the
only decoder.

Training folders, the cluster's decode tasks and `ar-ray predict` all decode through here, so
an image is resized, cropped and coloured the same way wherever and whenever it is decoded.
Every bad image is a one-line DataError naming the file, with a reason a user can act on.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ar_ray.data.splits import DataError
from ar_ray.errors import first_line

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})

# PIL's ways of saying "this file is not a (whole) image": truncated data is an OSError, some
# plugins report broken headers as SyntaxError, and oversized images as DecompressionBombError.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


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


class OversizedImage(ValueError):
    """More pixels than the caller allows: checked from the header, before any pixel is
    decoded, so a decompression bomb (a small file that inflates to gigabytes) costs nothing."""


OVERSIZED = (OversizedImage, Image.DecompressionBombError)
"""Too many pixels: over the caller's limit, or over PIL's own decompression-bomb limit."""


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


def _decode(source: BinaryIO, suffix: str, size: int, max_pixels: int | None) -> np.ndarray:
    """One full decode per file; `load()` forces truncated data to raise instead of passing.

    EXIF orientation is applied, so a phone photo is learnt upright, as it is displayed.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's EXIF chatter
        with Image.open(source) as image:
            expected = FORMATS_OF_EXTENSION.get(suffix.lower())
            if expected and image.format not in expected:
                raise MislabelledImage(f"holds {image.format} data but is named {suffix}")
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise OversizedImage(
                    f"{width} x {height} pixels, over the limit of {max_pixels / 1e6:g} megapixels"
                )
            image.draft(None, (size, size))  # JPEG: decode at a reduced scale that is >= size
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            rgb = _to_rgb(image)
    return np.asarray(_resize_center_crop(rgb, size))  # HWC


def decode_image(path: Path, size: int) -> np.ndarray:
    """One image file as a uint8 CHW square of side `size` (a stored size), decoded exactly as
    the training images were."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise DataError(unreadable_file(str(path), error)) from error
    return decode_image_bytes(data, str(path), size)


def decode_image_bytes(
    data: bytes, name: str, size: int, max_pixels: int | None = None
) -> np.ndarray:
    """An image's bytes, however they were read, as a uint8 CHW square of side `size`, decoded
    exactly as training images were; a bad one raises DataError naming `name` (from the
    cause, e.g. OversizedImage over `max_pixels`; None: PIL's own bomb limit only)."""
    try:
        array = _decode(io.BytesIO(data), PurePosixPath(name).suffix, size, max_pixels)
    except DECODE_ERRORS as error:
        raise DataError(f"{name}: {_bad_image_reason(error, empty=not data)}") from error
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def unreadable_file(name: str, error: OSError) -> str:
    """The one-line message for a file that could not even be read (gone, no permission)."""
    return f"{name}: cannot read the file ({first_line(error)})"


def _bad_image_reason(error: Exception, empty: bool) -> str:
    """Why an image failed to decode, in words a user can act on."""
    if empty:
        return "image file is empty (0 bytes)"
    if isinstance(error, MislabelledImage):
        return f"{error}; rename it or pass --skip-bad-images"
    if isinstance(error, OVERSIZED):
        return f"image too large ({first_line(error)})"
    if isinstance(error, UnidentifiedImageError):  # its own message repeats the path
        return "not an image PIL can decode (corrupt or unknown format)"
    return f"unreadable or corrupt image ({first_line(error)})"
