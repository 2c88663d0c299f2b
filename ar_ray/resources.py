"""What each unit of work asks the cluster for: stated once, recorded, inherited.

An autoscaling cluster holds no worker when a command starts, so nothing here is read off
the cluster. Every value is what the user stated, what the previous command of the chain
recorded (tune -> ensemble -> predict), or a default that fits a laptop's CPUs. The
autoscaler then sees the real demand and starts the nodes that fit it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ar_ray.errors import UserError

DEFAULT_MAX_ACTORS = 4


def loader_workers_for(cpus: float) -> int:
    """Data-loader processes for a process holding `cpus`: all but the training loop's one.

    An execution setting, never a hyperparameter: training results do not depend on it.
    """
    return max(0, int(cpus) - 1)


def local_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. a container's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Resources:
    """One process's request: a trial, a member's DDP worker or an inference actor."""

    cpus: float = 1.0
    gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.cpus < 0 or self.gpus < 0:
            raise UserError(f"resources cpus={self.cpus:g}, gpus={self.gpus:g} must be >= 0")

    def ray_options(self) -> dict[str, float]:
        """As `num_cpus`/`num_gpus` keyword arguments of tasks, actors and map_batches."""
        return {"num_cpus": self.cpus, "num_gpus": self.gpus}

    def describe(self) -> str:
        return f"{_amount(self.cpus)} CPU + {_amount(self.gpus)} GPU"

    @classmethod
    def from_record(cls, record: dict[str, Any], cpus_key: str, gpus_key: str) -> Resources:
        """A recorded pair of keys; a missing or null key (an older run) takes the default."""
        default = cls()
        cpus, gpus = record.get(cpus_key), record.get(gpus_key)
        return cls(
            cpus=default.cpus if cpus is None else float(cpus),
            gpus=default.gpus if gpus is None else float(gpus),
        )


def _amount(value: float) -> str:
    return f"{value:g}"


def stated(cpus: float | None, gpus: float | None, inherited: Resources) -> Resources:
    """Each flag the user gave wins; the others keep the inherited value."""
    return Resources(
        cpus=inherited.cpus if cpus is None else cpus,
        gpus=inherited.gpus if gpus is None else gpus,
    )


def actor_default(worker: Resources) -> Resources:
    """Inference follows training's hardware: a GPU (at most one) where members had one."""
    return Resources(cpus=worker.cpus, gpus=min(worker.gpus, 1.0))


def announce(unit: str, request: str, origin: str, flags: str) -> str:
    """The one line a command prints about what each unit of its work will request."""
    return f"each {unit} requests {request} ({origin}; change with {flags})"
