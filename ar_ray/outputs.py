"""Run directories and files that are either complete or absent, never half-written."""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import pandas as pd

from ar_ray.errors import UserError


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Let `write` fill a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_csv(path: Path, frame: pd.DataFrame) -> None:
    _atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def atomic_save(path: Path, save: Callable[[str], None]) -> None:
    """For writers that take a path (torch.save, savefig)."""
    _atomic_write(path, save)


def prepare_run_dir(path: Path, *, resume: bool, overwrite: bool) -> Path:
    """Create the output folder, refusing to mix a new run into an old one by accident."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not resume:
        if not overwrite:
            raise UserError(f"{path}: already holds a run; pass --resume or --overwrite")
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{path}: cannot write there ({error.strerror})") from None
    return path


def environment_info() -> dict[str, str]:
    """Versions recorded next to results, so a number can be traced to its software."""
    info = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("ar-ray", "torch", "torchvision", "ray", "optuna", "pandas"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = "not installed"
    return info
