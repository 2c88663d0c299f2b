"""Joining a Ray cluster or starting an embedded one: the same command on a laptop or 64 GPUs."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

import ray
import torch

from ar_ray.errors import UserError, first_line
from ar_ray.interrupts import treat_sigterm_as_interrupt
from ar_ray.resources import loader_workers_for


def connect(address: str | None) -> bool:
    """`--address`, else RAY_ADDRESS, else a local Ray whose dashboard only listens locally.

    An already initialised Ray (a notebook, a test session) is used as it is. True when
    ar-ray started Ray itself (embedded): then no autoscaler can ever add a node.
    """
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        return _init(address)
    finally:
        treat_sigterm_as_interrupt()  # ray.init installs a SIGTERM handler that aborts


def _init(address: str | None) -> bool:
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise UserError(f"--address {address}: cannot join Ray ({first_line(error)})") from None
        return False
    # "local": a Ray of its own, never one a `ray start` left running on this machine
    ray.init(address="local", dashboard_host="127.0.0.1")
    return True


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Probe host:port first: ray.init keeps retrying an unreachable GCS for minutes."""
    host_port = address.split("://", 1)[-1]
    if host_port == "auto" or ":" not in host_port:
        return
    host, _, port = host_port.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as error:
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        raise UserError(f"--address {address}: no Ray cluster reachable there ({reason})") from None


def placement_labels() -> dict[str, object]:
    """Where the calling trial or worker runs and what it holds, recorded with its epochs.

    Read inside the process, so the record shows what Ray actually granted, not what the
    driver asked for.
    """
    context = ray.get_runtime_context()
    held = context.get_assigned_resources()
    return {
        "node": context.get_node_id(),
        "cpus": float(held.get("CPU", 0.0)),
        "gpus": float(held.get("GPU", 0.0)),
    }


def assigned_loader_workers() -> int:
    """Loader workers for the calling trial or worker: the CPUs Ray granted it, minus one."""
    return loader_workers_for(placement_labels()["cpus"])


def choose_device(
    cuda_available: bool, in_ray_worker: bool, gpu_ids: Sequence[object]
) -> torch.device:
    """CUDA only for a process that may use it: outside Ray whenever CUDA exists; inside a
    Ray worker (trial, Train worker, inference actor) only when Ray assigned it GPUs.

    Ray 2.60 no longer clears CUDA_VISIBLE_DEVICES for a process holding 0 GPUs, so such a
    process still sees every GPU of its node: trusting CUDA there would put a CPU trial or
    actor on cuda:0, a GPU Ray reserved for someone else.
    """
    may_use_gpu = not in_ray_worker or bool(gpu_ids)
    return torch.device("cuda" if cuda_available and may_use_gpu else "cpu")


def ray_gpu_view() -> tuple[bool, list[str]]:
    """(is this process a Ray worker?, the GPU ids Ray assigned it): `choose_device`'s Ray
    inputs, read in the calling process."""
    in_worker = ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    return in_worker, [str(gpu) for gpu in ray.get_gpu_ids()] if in_worker else []


def assigned_device() -> torch.device:
    """The device the calling trial, member worker or inference actor computes on."""
    return choose_device(torch.cuda.is_available(), *ray_gpu_view())
