"""One storage root for every output: a local folder, or a URI (s3://, gs://) Ray can use.

Multi-node Ray needs shared storage for checkpoints; ar-ray's own small files (leaderboard,
configs, ensemble outputs) go to the same place so a run is one folder wherever it lives.

URIs go through pyarrow's filesystems, which find a custom endpoint (MinIO, a test server)
and credentials the way the AWS tools do: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... Ray's
workers read the same variables from the environment of the node they run on.
"""

from __future__ import annotations

import contextlib
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.fs

from ar_ray.errors import UserError
from ar_ray.outputs import atomic_save, atomic_write_text

DOWNLOAD_CHUNK = 16 * 2**20  # bytes per GET request when reading from an object store
BUCKET_STORES = frozenset({"s3", "gcs"})  # filesystems whose first path part is a bucket


def is_uri(location: str) -> bool:
    return "://" in location


def resolve(location: str | Path) -> str:
    """Absolute local paths (Ray rejects relative ones) or URIs untouched."""
    location = str(location)
    return location if is_uri(location) else str(Path(location).expanduser().resolve())


def join(location: str, *parts: str) -> str:
    return posixpath.join(location, *parts) if is_uri(location) else str(Path(location, *parts))


def filesystem(location: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The pyarrow filesystem and path of an absolute local path or a URI: one client for both,
    so code that lists or reads through it serves a folder and a bucket prefix alike."""
    try:
        return pyarrow.fs.FileSystem.from_uri(location)
    except (pyarrow.ArrowInvalid, OSError) as error:
        raise UserError(f"{location}: storage not usable ({error})") from None


@contextlib.contextmanager
def _reported(location: str, failure: str) -> Iterator[None]:
    """An object store's error (no network, bad credentials, access denied) as one line
    naming the URI, instead of a traceback from deep inside pyarrow."""
    try:
        yield
    except OSError as error:
        detail = " ".join(str(error).split())
        raise UserError(f"{location}: {failure} ({detail})") from None


def exists(location: str) -> bool:
    """A file, a folder, or (in a bucket) a prefix that holds at least one object."""
    if not is_uri(location):
        return Path(location).exists()
    fs, path = filesystem(location)
    with _reported(location, "storage not reachable"):
        return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def remove_tree(location: str) -> None:
    if not is_uri(location):
        shutil.rmtree(location)
        return
    fs, path = filesystem(location)
    with _reported(location, "cannot delete"):
        fs.delete_dir(path)


def ensure_writable(location: str) -> None:
    """Fail before any work starts, not after an hour of training, on a read-only --storage."""
    if is_uri(location):
        fs, path = filesystem(location)
        if fs.type_name != "local":
            _ensure_writable_store(location, fs, path)
            return
        location = path  # file:// is a local folder and is checked as one
    existing = Path(location)
    while not existing.exists():  # probe the nearest existing folder, creating nothing
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "a path component is a file")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UserError(f"{location}: storage is not writable ({error.strerror})") from None


def _ensure_writable_store(location: str, fs: pyarrow.fs.FileSystem, path: str) -> None:
    """The bucket must exist (ar-ray never creates one) and take a write with the driver's
    credentials. The probe object is deleted; pyarrow then keeps an empty marker for its
    folder, which is `location` itself: the run writes there next anyway."""
    with _reported(location, "storage not reachable"):
        bucket = path.split("/", 1)[0]
        if fs.type_name in BUCKET_STORES and (
            fs.get_file_info(bucket).type != pyarrow.fs.FileType.Directory
        ):
            raise UserError(f"{location}: bucket '{bucket}' does not exist; create it first")
    probe = posixpath.join(path, f".ar-ray-write-probe-{uuid.uuid4().hex}")
    with _reported(location, "storage is not writable"):
        with fs.open_output_stream(probe):
            pass
        fs.delete_file(probe)


def write_text(location: str, text: str) -> None:
    """Local: temp file + rename. Object stores publish an object only once it is complete."""
    if not is_uri(location):
        atomic_write_text(Path(location), text)
        return
    fs, path = filesystem(location)
    with _reported(location, "cannot write"):
        fs.create_dir(posixpath.dirname(path), recursive=True)
        with fs.open_output_stream(path) as stream:
            stream.write(text.encode())


def upload_file(source: Path, location: str) -> None:
    """Publish a local file (a checkpoint) at `location`, complete or not at all."""
    if not is_uri(location):
        atomic_save(Path(location), lambda tmp: shutil.copyfile(source, tmp))
        return
    fs, path = filesystem(location)
    with _reported(location, "cannot write"):
        fs.create_dir(posixpath.dirname(path), recursive=True)
        with open(source, "rb") as local, fs.open_output_stream(path) as stream:
            shutil.copyfileobj(local, stream)


def save_file(location: str, write: Callable[[str], None]) -> None:
    """Publish what `write(path)` writes to a local path, complete or not at all: straight into
    place locally (temp file + rename), through a temp file and one upload for a URI."""
    if not is_uri(location):
        atomic_save(Path(location), write)
        return
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder) / posixpath.basename(location)
        write(str(local))
        upload_file(local, location)


@contextlib.contextmanager
def staged_folder(location: str) -> Iterator[Path]:
    """A local folder to write a command's outputs into, published at `location`: the folder
    itself when local; for a URI, a temp folder whose files are uploaded when the block ends
    without error, and which is removed either way, so a failed run leaves nothing in /tmp."""
    if not is_uri(location):
        Path(location).mkdir(parents=True, exist_ok=True)
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="ar-ray-outputs-") as folder:
        yield Path(folder)
        for path in sorted(Path(folder).iterdir()):
            upload_file(path, join(location, path.name))


def remove_file(location: str) -> None:
    """Make sure `location` is gone; it need not exist."""
    if not is_uri(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path = filesystem(location)
    with _reported(location, "cannot delete"):
        if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
            fs.delete_file(path)


def read_text(location: str) -> str:
    if not is_uri(location):
        try:
            return Path(location).read_text()
        except OSError as error:
            raise UserError(f"{location}: cannot read ({error.strerror})") from None
    fs, path = filesystem(location)
    with _reported(location, "cannot read"), fs.open_input_file(path) as file:
        return file.read().decode()  # one GET; a stream reads 256 KiB per request


def download_file(location: str, local: Path) -> Path:
    """Bring one (checkpoint) file to this node; a local path is used where it is.

    Every read of an object-store stream is one ranged GET: shutil's 64 KiB default made a
    138 MB checkpoint 2,100 requests (an inference actor never got past loading its models
    on a test S3 server), hence big reads.
    """
    if not is_uri(location):
        return Path(location)
    fs, path = filesystem(location)
    local.parent.mkdir(parents=True, exist_ok=True)
    with (
        _reported(location, "cannot read"),
        fs.open_input_stream(path) as source,
        open(local, "wb") as target,
    ):
        shutil.copyfileobj(source, target, length=DOWNLOAD_CHUNK)
    return local
