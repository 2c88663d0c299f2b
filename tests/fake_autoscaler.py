"""Ray's own autoscaler on one machine, started and stopped without touching any other Ray.

`ray.cluster_utils.AutoscalingCluster` runs the real autoscaler with the fake node provider
(nodes are local raylets). As shipped it reads a base config the pip wheel lacks, and its
start/stop run `ray stop --force`, which would kill every Ray on the machine, a developer's
or another test module's included. This one writes the base config itself, listens on a
free port, and on shutdown stops only the processes of its own session.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import free_port

HEAD_TYPE = "ray.head.default"


def cluster_config(
    worker_types: dict, head_resources: dict, idle_minutes: float, gcs_address: str
) -> dict:
    """The keys `ray start --autoscaling-config` needs for the fake multi-node provider."""
    empty_lists = [
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
        "cluster_synced_files",
        "rsync_exclude",
        "rsync_filter",
    ]
    return {
        "cluster_name": "fake-autoscaler",
        "max_workers": sum(t["max_workers"] for t in worker_types.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_minutes,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,  # where fake nodes join (default: port 6379)
        },
        "head_node_type": HEAD_TYPE,
        "available_node_types": {
            **worker_types,
            HEAD_TYPE: {"resources": head_resources, "node_config": {}, "max_workers": 0},
        },
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
        **{key: [] for key in empty_lists},
    }


class FakeAutoscalingCluster:
    """A head with `head_cpus` and autoscaled worker types; `.address` for `--address`."""

    def __init__(self, worker_types: dict, head_cpus: int = 0, idle_minutes: float = 1.0):
        self.address = f"127.0.0.1:{free_port()}"
        self.config = cluster_config(worker_types, {"CPU": head_cpus}, idle_minutes, self.address)
        self.head_cpus = head_cpus
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ar-ray-fake-"))

    def start(self) -> None:
        config = self.temp_dir / "cluster.json"
        config.write_text(json.dumps(self.config))
        ray_bin = Path(sys.executable).with_name("ray")
        env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"}
        env["RAY_AUTH_MODE"] = "disabled"  # a token left in ~/.ray by a local ray.init
        # Its processes find their own cluster, as on a real one (one Ray per machine):
        # Train's PlacementGroupCleaner asks the state API without an address and, with
        # the session's Ray also on this machine, fails with "multiple active Ray instances"
        env["RAY_ADDRESS"] = self.address
        env["PATH"] = (
            f"{ray_bin.parent}{os.pathsep}{env.get('PATH', '')}"  # the provider runs `ray`
        )
        subprocess.run(
            [
                str(ray_bin),
                "start",
                "--head",
                f"--port={self.address.rsplit(':', 1)[1]}",
                f"--num-cpus={self.head_cpus}",
                f"--autoscaling-config={config}",
                f"--temp-dir={self.temp_dir / 'ray'}",
                "--disable-usage-stats",
            ],
            env=env,
            check=True,
            capture_output=True,
        )

    def _processes(self) -> list[psutil.Process]:
        """Every process of this cluster: their command lines name its temp dir or port."""
        marks = (str(self.temp_dir), self.address)
        found = []
        for process in psutil.process_iter(["cmdline"]):
            command = " ".join(process.info["cmdline"] or [])
            if any(mark in command for mark in marks) and process.pid != os.getpid():
                found.append(process)
        return found

    def shutdown(self) -> None:
        for _ in range(3):  # workers spawned while stopping are caught by the next pass
            processes = self._processes()
            for process in processes:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.send_signal(signal.SIGKILL)
            psutil.wait_procs(processes, timeout=10)
            time.sleep(0.5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    @contextlib.contextmanager
    def running(self) -> Iterator[FakeAutoscalingCluster]:
        """Started, with this process's env pointing drivers at it, then stopped.

        RAY_ADDRESS: anything that looks for "the" cluster finds this one, even where another
        Ray runs on the machine. RAY_AUTH_MODE: drivers (the CLI's subprocesses inherit this
        env) speak its auth mode; the session Ray's `ray.init` set `token` here, and a driver
        inheriting that sees its trials' actors cancelled before they start."""
        self.start()
        try:
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("RAY_ADDRESS", self.address)
                patch.setenv("RAY_AUTH_MODE", "disabled")
                yield self
        finally:
            self.shutdown()
