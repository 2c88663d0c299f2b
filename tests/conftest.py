"""Shared fixtures: the built-in data, small subsets of it, and one Ray for the session."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray refuses to spill once its disk looks 95% full. Test machines share one large disk with
# a small quota, so capacity (252 GB) hides what is free (~10-25 GB) and spilling fails early;
# every Ray a test starts (here, in a subprocess, on a fake node) inherits this.
os.environ.setdefault("RAY_local_fs_capacity_threshold", "0.99")


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request) -> Iterator[Path]:
    """A module fixture's scratch folder, removed when the module's last test ends. pytest
    keeps factory folders until the session ends, and a trained run holds several 138 MB
    checkpoints: kept, they filled CI's disk (~6 GB) before the suite was done."""
    folder = tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def builtin_splits():
    from ar_ray.data import load_dataset

    return load_dataset(None, 28)


@pytest.fixture(scope="session")
def small_splits(builtin_splits):
    """10 images per class in every split: seconds per epoch on 2 CPUs."""
    return builtin_splits.limit_per_class(10)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray with 2 CPUs, shared by every test that needs one. It advertises one
    logical GPU (no CUDA behind it), so tests can hold a GPU as Ray assigns it."""
    import ray

    # address="local": never join a running one
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False)
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Any test that takes the session's Ray is a `ray` test, marked or not: `make
    test-fast` (`-m "not ray and not cluster and not slow"`) must never start one."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
