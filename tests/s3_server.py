"""A real S3 HTTP API on 127.0.0.1 (moto's server mode), reached the way users reach MinIO
or any custom endpoint: through AWS_ENDPOINT_URL and the usual AWS_* variables.

The variables go into os.environ, so CLI subprocesses and any Ray started afterwards (with
its workers) find the server without any test-only code path in ar-ray.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs

REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    bucket: str
    filesystem: pyarrow.fs.S3FileSystem

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def upload(self, folder: Path, key: str) -> None:
        """Copy every file under `folder` to `key`/<its path relative to folder>."""
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            target = f"{self.bucket}/{key}/{path.relative_to(folder).as_posix()}"
            with self.filesystem.open_output_stream(target) as stream:
                stream.write(path.read_bytes())

    def keys(self, key: str) -> list[str]:
        """Every object under `key`, relative to it."""
        selector = pyarrow.fs.FileSelector(f"{self.bucket}/{key}", recursive=True)
        prefix = f"{self.bucket}/{key}/"
        return sorted(
            info.path.removeprefix(prefix)
            for info in self.filesystem.get_file_info(selector)
            if info.type == pyarrow.fs.FileType.File
        )

    def read(self, key: str) -> bytes:
        """One GET: a stream's read() would fetch the object 256 KiB per request."""
        with self.filesystem.open_input_file(f"{self.bucket}/{key}") as file:
            return file.read()


@contextmanager
def s3_server(bucket: str = "ar-ray-test") -> Iterator[S3Server]:
    """Start moto on a free port, create `bucket`, and point AWS_* at it until exit."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request else
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    variables = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
    }
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        filesystem = pyarrow.fs.S3FileSystem(
            endpoint_override=endpoint, region=REGION, allow_bucket_creation=True
        )
        filesystem.create_dir(bucket)
        yield S3Server(bucket=bucket, filesystem=filesystem)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()
