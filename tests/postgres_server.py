"""A real PostgreSQL server on 127.0.0.1 for one test module, as the bucket tests run
moto's S3 server: initdb into a temporary folder, `pg_ctl start` on a free port, trust
authentication for one role, `pg_ctl stop` at the end.

Debian's `postgresql` package provides the binaries (`.ci/run` installs it); where they
are missing the tests that need the server are skipped, saying so. PostgreSQL refuses to
run as root, so under root (CI containers) the server runs as the `postgres` user.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import free_port

ROLE = "ar"


def pg_bin(tool: str) -> str | None:
    """`tool` on PATH, else in Debian's versioned folder (newest first)."""
    found = shutil.which(tool)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"), reverse=True)
    return candidates[0] if candidates else None


def _as_server_user() -> list[str]:
    """The prefix that runs a command as a user PostgreSQL accepts."""
    if os.geteuid() != 0:
        return []
    if shutil.which("runuser") is None:
        pytest.skip("PostgreSQL cannot run as root and runuser is missing")
    return ["runuser", "-u", "postgres", "--"]


@contextmanager
def postgres_server() -> Iterator[str]:
    """A running server; yields the URL of its `postgres` database for role `ar`."""
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    prefix = _as_server_user()
    folder = Path(tempfile.mkdtemp(prefix="ar-ray-pg-", dir="/tmp"))
    data = folder / "data"
    if prefix:
        shutil.chown(folder, "postgres")
    port = free_port()
    run = {"check": True, "capture_output": True, "text": True, "timeout": 120}
    subprocess.run([*prefix, initdb, "-D", str(data), "-U", ROLE, "--auth=trust"], **run)
    options = f"-p {port} -h 127.0.0.1 -k {folder}"
    log = str(folder / "server.log")
    start = [*prefix, pg_ctl, "-D", str(data), "-o", options, "-l", log, "-w", "start"]
    subprocess.run(start, **run)
    try:
        yield f"postgresql://{ROLE}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], **run)
        shutil.rmtree(folder, ignore_errors=True)
