"""Trials on one node read one copy of the training data from Ray's object store.

The probe asks the kernel (/proc/self/maps) where an array's bytes live in the reading process:
two processes hold one copy exactly when both see it in a shared mapping of the same file at
the same offset. A private copy lives in the process's own (private, anonymous) memory.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/self/maps"
)


def _where(array: np.ndarray) -> dict[str, Any]:
    """The memory mapping holding the array's first byte, as the kernel reports it."""
    address = array.__array_interface__["data"][0]
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, perms, offset, device, inode = line.split()[:5]
        start, end = (int(bound, 16) for bound in span.split("-"))
        if start <= address < end:
            return {
                "shared_file": perms.endswith("s") and inode != "0",
                "file": (device, inode),
                "file_offset": int(offset, 16) + address - start,
            }
    raise AssertionError(f"address {address:#x} is in no mapping")


class Reader:
    """A process that gets an object from the store and keeps it, as a trial keeps its data."""

    def read(self, refs: list, pick: Callable[[Any], Any]) -> dict[str, Any]:
        self.kept = ray.get(refs[0])  # nested in a list, so the actor itself calls ray.get
        array = np.asarray(pick(self.kept))
        return {"pid": os.getpid(), "writeable": array.flags.writeable, **_where(array)}


@pytest.fixture(scope="module")
def readers(ray_cluster):
    # Workers cannot import this test module: ship Reader and the probe by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    actors = [ray.remote(num_cpus=1)(Reader).remote() for _ in range(2)]
    yield actors
    for actor in actors:
        ray.kill(actor)
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _read_in_both(readers, value: Any, pick: Callable[[Any], Any]) -> list[dict[str, Any]]:
    ref = ray.put(value)
    reports = ray.get([reader.read.remote([ref], pick) for reader in readers])
    assert len({report["pid"] for report in reports} | {os.getpid()}) == 3  # three processes
    return reports


def test_two_readers_map_one_read_only_copy_of_the_training_splits(readers, builtin_splits):
    training = builtin_splits.for_training()
    assert training.train.images.nbytes > 1_000_000  # large objects go to the shared store
    first, second = _read_in_both(readers, training, lambda splits: splits.train.images)
    for report in (first, second):
        assert not report["writeable"] and report["shared_file"]
    assert first["file"] == second["file"] and first["file_offset"] == second["file_offset"]


def test_the_probe_sees_private_copies_of_torch_tensors(readers, builtin_splits):
    """The control: torch tensors (the splits' old type) are copied into every reader."""
    tensor = torch.from_numpy(builtin_splits.train.images.copy())
    for report in _read_in_both(readers, tensor, lambda tensor: tensor):
        assert report["writeable"] and not report["shared_file"]
