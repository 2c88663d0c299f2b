"""A real multi-node Ray cluster on one machine: work spreads over nodes and survives node loss.

`ray.cluster_utils.Cluster` starts a head with no CPUs and two 1-CPU worker nodes as
separate raylets; `ar-ray` joins it with `--address`, as it would join a cloud cluster.
"""

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import run_cli, write_image
from ray.cluster_utils import Cluster

from ar_ray.recipe.checkpoint import load_checkpoint

pytestmark = [pytest.mark.cluster, pytest.mark.ray]

QUICK = str(Path(__file__).parent.parent / "search_spaces" / "quick.yaml")
DEADLINE = 420


@pytest.fixture
def cluster():
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def _tune_args(storage: Path, name: str, address: str, trials: int, epochs: int) -> list[str]:
    return [
        "tune",
        "--space",
        QUICK,
        "--trials",
        str(trials),
        "--epochs",
        str(epochs),
        "--limit-per-class",
        "10",
        "--storage",
        str(storage),
        "--name",
        name,
        "--address",
        address,
    ]


def _worker_nodes(cluster: Cluster) -> dict[str, object]:
    return {node.node_id: node for node in cluster.worker_nodes}


def _wait_for(condition, what: str, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the command ended before {what}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_trials_and_members_run_on_both_worker_nodes(cluster, tmp_path):
    tune = run_cli(*_tune_args(tmp_path, "mn", cluster.address, trials=4, epochs=1))
    assert tune.returncode == 0, tune.stderr[-3000:]
    board = pd.read_csv(tmp_path / "mn" / "tune" / "leaderboard.csv")
    workers = set(_worker_nodes(cluster))
    assert set(board["node"]) == workers  # the head (0 CPUs) ran nothing

    ensemble = run_cli(
        "ensemble",
        "--from",
        str(tmp_path / "mn"),
        "--members",
        "2",
        "--epochs",
        "1",
        "--retrain",  # the trials' epochs: without it, the members would be those trials
        "--address",
        cluster.address,
    )
    assert ensemble.returncode == 0, ensemble.stderr[-3000:]
    assert "vs best member" in ensemble.stdout
    members = pd.read_csv(tmp_path / "mn" / "ensemble" / "members.csv")
    assert (members["status"] == "trained").all() and set(members["node"]) == workers


def _trial_nodes(experiment: Path) -> set[str]:
    nodes = set()
    for result in experiment.glob("*/result.json"):
        for line in result.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError, KeyError):  # a line being written
                nodes.add(json.loads(line)["node"])
    return nodes


def test_tune_survives_losing_a_worker_node(cluster, tmp_path):
    args = _tune_args(tmp_path, "loss", cluster.address, trials=4, epochs=3)
    driver = subprocess.Popen(
        [sys.executable, "-m", "ar_ray.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    experiment = tmp_path / "loss" / "tune"
    workers = _worker_nodes(cluster)
    _wait_for(lambda: _trial_nodes(experiment) == set(workers), "trials on both nodes", driver)
    victim = next(iter(workers))
    cluster.remove_node(workers[victim], allow_graceful=False)
    cluster.add_node(num_cpus=1)
    output, _ = driver.communicate(timeout=DEADLINE)
    assert driver.returncode == 0, output[-3000:]
    board = pd.read_csv(experiment / "leaderboard.csv")
    assert len(board) == 4 and (board["status"] != "ERROR").all()
    assert _trial_nodes(experiment) - set(workers)  # some epochs ran on the new node


def test_member_then_predict_carry_on_after_losing_nodes(cluster, tmp_path):
    tune = run_cli(*_tune_args(tmp_path, "m", cluster.address, trials=1, epochs=1))
    assert tune.returncode == 0, tune.stderr[-3000:]
    epochs = 4
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ar_ray.cli",
            "ensemble",
            "--from",
            str(tmp_path / "m"),
            "--members",
            "1",
            "--epochs",
            str(epochs),
            "--address",
            cluster.address,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    members = tmp_path / "m" / "members"

    def registered_checkpoint():
        """The first checkpoint, once a second one shows Train has registered the first."""
        found = sorted(members.glob("*/checkpoint_*/checkpoint.pt"))
        return found[0] if len(found) >= 2 else None

    checkpoint = _wait_for(registered_checkpoint, "the member's checkpoints", driver)
    node = load_checkpoint(checkpoint)["history"][-1]["node"]
    cluster.remove_node(_worker_nodes(cluster)[node], allow_graceful=False)
    cluster.add_node(num_cpus=1)
    output, _ = driver.communicate(timeout=DEADLINE)
    assert driver.returncode == 0, output[-3000:]
    (member,) = [p for p in members.iterdir() if p.is_dir()]
    history = load_checkpoint(member / "checkpoint.pt")["history"]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert history[0]["node"] == node and history[-1]["node"] != node
    row = pd.read_csv(tmp_path / "m" / "ensemble" / "members.csv").iloc[0]
    assert row["epochs_trained"] == epochs and len(row["node"].split()) >= 2

    _predict_survives_losing_every_node_it_started_on(cluster, tmp_path / "m", tmp_path)


def _predict_survives_losing_every_node_it_started_on(cluster, run: Path, tmp_path: Path):
    """Both worker nodes die mid-predict; Ray Data retries their batches on new nodes, and
    the output still has every image exactly once."""
    images = tmp_path / "photos"
    count = 400
    for index in range(count):
        write_image(images / f"{index:03d}.jpg", (36, 36), seed=index)
    out = tmp_path / "labels.csv"
    driver = subprocess.Popen(
        [sys.executable, "-m", "ar_ray.cli", "predict", "--ensemble", str(run)]
        + ["--images", str(images), "--out", str(out), "--address", cluster.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    seen = []
    for line in driver.stdout:  # the first progress line: the pool is at work
        seen.append(line)
        if line.startswith("scored"):
            break
    else:
        raise AssertionError(f"predict ended before scoring: {''.join(seen)[-3000:]}")
    old = _worker_nodes(cluster)
    for _ in old:
        cluster.add_node(num_cpus=1)
    for node in old.values():
        cluster.remove_node(node, allow_graceful=False)
    output, _ = driver.communicate(timeout=DEADLINE)
    assert driver.returncode == 0, "".join(seen) + output[-3000:]
    frame = pd.read_csv(out, keep_default_na=False)
    assert len(frame) == count and frame["image_id"].is_unique and (frame["error"] == "").all()
    pool = pd.read_csv(tmp_path / "labels_pool.csv")
    assert set(pool["node"]) - set(old)  # work went on on the nodes that replaced them
