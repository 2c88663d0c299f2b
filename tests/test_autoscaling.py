"""A cluster that starts empty, as the configs in `launch/` do: Ray's real autoscaler.

The head has no CPUs and the only worker type is `{"CPU": 1, "GPU": 1}` at `min_workers: 0`
(the GPU is a logical one: no CUDA here, so the code must still compute on the CPU). The
user states `--gpus-per-trial 1` once; everything after is read from the runs' own outputs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from fake_autoscaler import FakeAutoscalingCluster
from helpers import run_cli, write_image

pytestmark = [pytest.mark.cluster, pytest.mark.ray]

IMAGES = 600  # ten calls of 64 images: enough work for the pool to grow
BATCH = ("--images-per-call", "64")  # a GPU actor would take 256: too few calls to grow
QUICK = str(Path(__file__).parent.parent / "search_spaces" / "quick.yaml")
GPU_NODE = {
    "gpu_node": {
        "resources": {"CPU": 1, "GPU": 1},
        "node_config": {},
        "min_workers": 0,
        "max_workers": 2,
    }
}


@pytest.fixture(scope="module")
def cluster():
    with FakeAutoscalingCluster(GPU_NODE, head_cpus=0, idle_minutes=1).running() as cluster:
        yield cluster


def worker_nodes(address: str) -> int:
    """Alive nodes other than the head, asked from a separate driver as an operator would."""
    script = (
        f"import ray; ray.init(address={address!r}, log_to_driver=False); "
        "print(sum(1 for n in ray.nodes() if n['Alive'] and n['Resources'].get('GPU')))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.strip().splitlines()[-1])


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])


@pytest.fixture(scope="module")
def tuned(cluster, module_tmp):
    storage = module_tmp
    workers_before = worker_nodes(cluster.address)
    result = run_cli(
        *("tune", "--space", QUICK, "--trials", "2", "--epochs", "1"),
        *("--limit-per-class", "20", "--gpus-per-trial", "1"),
        *("--storage", str(storage), "--name", "cold", "--address", cluster.address),
    )
    assert_ok(result)
    errors = sorted((storage / "cold").rglob("error.txt"))  # a trial's traceback, if any
    assert not errors, (errors[0].read_text()[-1500:], result.stdout[-6000:])
    return storage / "cold", workers_before, result


def test_gpu_trials_grow_the_cluster_from_zero(cluster, tuned):
    run, workers_before, _ = tuned
    board = pd.read_csv(run / "tune" / "leaderboard.csv")
    assert workers_before == 0
    assert len(board) == 2 and (board["gpus"] == 1).all()
    assert board["node"].nunique() == 2  # one GPU node each: the autoscaler started two
    recorded = yaml.safe_load((run / "tune" / "request.yaml").read_text())["request"]
    assert recorded["gpus_per_trial"] == 1 and recorded["cpus_per_trial"] == 1


@pytest.fixture(scope="module")
def ensembled(cluster, tuned):
    run = tuned[0]
    result = run_cli(
        *("ensemble", "--from", str(run), "--members", "2", "--epochs", "3", *BATCH),
        *("--address", cluster.address),
    )
    assert_ok(result)
    return run, result


def test_members_inherit_the_gpu_and_train_side_by_side(ensembled):
    run, result = ensembled
    assert "each member worker requests 1 CPU + 1 GPU" in result.stdout
    members = pd.read_csv(run / "ensemble" / "members.csv")
    assert len(members) == 2 and (members["gpus"] == 1).all()
    started = pd.to_datetime(members["started"])
    finished = pd.to_datetime(members["finished"])
    assert started.max() < finished.min()  # both were training at the same moment
    assert "Reporting training result" not in result.stdout + result.stderr
    assert "epoch 3/3" in result.stdout  # the compact progress view, one line per epoch


def test_inference_pool_grew_to_gpu_actors(ensembled):
    run, _ = ensembled
    pool = pd.read_csv(run / "ensemble" / "inference_pool.csv")
    assert pool["actor"].nunique() >= 2 and (pool["gpus"] == 1).all()
    assert pool["images"].sum() == 2 * 20 * 10  # val and test, every image once


def test_predict_on_the_pool_labels_every_image_and_reports_bad_ones(cluster, ensembled, tmp_path):
    run, _ = ensembled
    images = tmp_path / "images"
    for index in range(IMAGES):
        write_image(images / f"{index:03d}.jpg", (48, 40), seed=index)
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "labels.parquet"
    # A fake node has one CPU, which the tasks that read and decode the files need; the
    # actors hold only the GPU, as on a real GPU node they would leave its CPUs to decoding.
    result = run_cli(
        *("predict", "--ensemble", str(run), "--images", str(images), "--cpus-per-actor", "0"),
        *("--out", str(out), "--address", cluster.address),
    )
    assert_ok(result)
    frame = pd.read_parquet(out)
    assert len(frame) == IMAGES + 1 and frame["image_id"].is_unique
    bad = frame[frame["error"] != ""]
    assert list(bad["image_id"].str.rsplit("/", n=1).str[-1]) == ["broken.jpg"]
    assert "1 images could not be decoded" in result.stdout
    pool = pd.read_csv(tmp_path / "labels_pool.csv")
    assert pool["actor"].nunique() >= 2 and (pool["gpus"] == 1).all()
