"""What a request to `ar-ray serve` may carry, and the 4xx answer for what it may not.

A service takes input from anyone who can reach it, so every way a request can be wrong
ends here as a `RequestError` with an HTTP status and a one-line message, before any model
sees it: the replica answers it and goes on serving. The images themselves go through the
one decoder (`decode_image_bytes`), so a served image is preprocessed exactly as `ar-ray
predict` preprocesses a file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from ar_ray.data import DataError
from ar_ray.data.image import OVERSIZED, decode_image_bytes

RAW_TYPES = ("application/octet-stream", "image/")  # a body that is one image's bytes
MULTIPART = "multipart/form-data"
PAYLOAD_TOO_LARGE = 413


class RequestError(Exception):
    """A request the service refuses: `status` (4xx) and a message that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RequestLimits:
    """What one request may hold: its body's bytes and each image's pixels."""

    max_request_bytes: int
    max_pixels: int


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it passes `limit` bytes: a declared length is
    checked before anything is read, and a chunked body is counted as it arrives."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, received = [], 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise _too_large(received, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> RequestError:
    return RequestError(
        PAYLOAD_TOO_LARGE,
        f"request body over {size:,} bytes: the limit is {limit:,} (--max-request-mb)",
    )


async def uploaded_files(request: Request, limits: RequestLimits) -> list[tuple[str, bytes]]:
    """(name, bytes) of each image the request carries: the raw body (image/* or
    application/octet-stream, or no content type) is one image; multipart/form-data holds
    one per file part. Any other content type is a 415."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, limits.max_request_bytes)
    if media == MULTIPART:
        files = await _multipart_files(request.headers, body)
    elif not media or media.startswith(RAW_TYPES):
        files = [("request body", body)]
    else:
        raise RequestError(
            415,
            f"content type {media!r}: send an image's bytes (image/* or "
            f"application/octet-stream) or {MULTIPART}",
        )
    if not files:
        raise RequestError(400, f"{MULTIPART} request holds no file part")
    return files


async def _multipart_files(headers: Headers, body: bytes) -> list[tuple[str, bytes]]:
    """The file parts of a multipart body already read (and size-checked) in full."""

    async def stream() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(headers, stream()).parse()
    except MultiPartException as error:
        raise RequestError(400, f"malformed {MULTIPART} body ({error.message})") from None
    files = []
    for field, value in form.multi_items():
        if isinstance(value, UploadFile):
            files.append((f"part {field!r} ({value.filename})", await value.read()))
            await value.close()
    return files


def decode_upload(name: str, data: bytes, stored_size: int, max_pixels: int) -> np.ndarray:
    """One uploaded image as `predict` decodes a file: uint8 CHW at the stored size.

    `name` never ends in a bare image suffix ("part 'x' (cat.jpg)"), so the decoder's
    check that a file's name matches its content, a folder's hygiene, does not apply to a
    client's file name. Too many pixels (a decompression bomb) is a 413, any other
    undecodable body (empty, not an image, truncated, an unsupported mode) a 400.
    """
    try:
        return decode_image_bytes(data, name, stored_size, max_pixels)
    except DataError as error:
        oversized = isinstance(error.__cause__, OVERSIZED)
        raise RequestError(PAYLOAD_TOO_LARGE if oversized else 400, str(error)) from None
