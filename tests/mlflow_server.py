"""A real MLflow tracking server on 127.0.0.1 for one test module, as the bucket tests run
moto's S3 server: `mlflow server` on a free port with a SQLite backend and artifacts proxied
into a temporary folder, stopped (its whole process group) at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.helpers import free_port

START_SECONDS = 180  # ~12 s here; a loaded CI machine is slower


ADMIN = "admin"  # the basic-auth app's first user


@contextmanager
def mlflow_server(password: str | None = None) -> Iterator[str]:
    """A running server; yields its URI (what --tracking-uri takes). With `password`, MLflow's
    basic-auth app (`mlflow[auth]`) answers only user ADMIN with that password (12+ chars)."""
    folder = Path(tempfile.mkdtemp(prefix="ar-ray-mlflow-"))
    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
        "--artifacts-destination", str(folder / "artifacts"),
    ]  # fmt: skip
    env = dict(os.environ)
    if password is not None:  # its user database goes in `folder`, the working directory
        command += ["--app-name", "basic-auth"]
        env |= {"MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": "test"}
    log = (folder / "server.log").open("w")
    server = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder, env=env
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(uri, server, folder / "server.log")
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def _wait_until_healthy(uri: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited {server.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{uri}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server not healthy after {START_SECONDS} s:\n{log.read_text()}")
