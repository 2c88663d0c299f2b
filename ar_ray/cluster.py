"""Joining a Ray cluster or starting an embedded one: the same command on a laptop or 64 GPUs."""

from __future__ import annotations

import os

import ray

from ar_ray.errors import UserError


def connect(address: str | None) -> None:
    """`--address`, else RAY_ADDRESS, else a local Ray whose dashboard only listens locally.

    An already initialised Ray (a notebook, a test session) is used as it is.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise UserError(f"--address {address}: cannot join Ray ({first_line})") from None
        return
    ray.init(dashboard_host="127.0.0.1")


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))
