"""tune -> ensemble -> predict with every input and output in an S3 bucket.

The bucket is on a real S3 HTTP API (moto's server) on 127.0.0.1, reached through
AWS_ENDPOINT_URL as users reach MinIO. The Ray cluster starts after those variables are set,
so its workers find the server through their node's environment, as cloud nodes find theirs;
the CLI joins it with `--address`, as it joins a cloud cluster.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import (
    assert_top5,
    assert_user_error,
    free_port,
    make_image_folder,
    run_cli,
    write_image,
)
from ray.cluster_utils import Cluster
from s3_server import S3Server, s3_server

from ar_ray import storage
from ar_ray.ensemble_weights import FittedWeights, combine
from ar_ray.errors import UserError
from ar_ray.recipe.checkpoint import load_checkpoint

pytestmark = [pytest.mark.cluster, pytest.mark.ray]

QUICK = str(Path(__file__).parent.parent / "search_spaces" / "quick.yaml")
RUN = "runs/b"  # the key of the run the CLI stores in the bucket


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def address(s3: S3Server) -> Iterator[str]:
    """A 2-CPU Ray started where AWS_* point at the server (so after `s3`)."""
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 2})
    yield cluster.address
    cluster.shutdown()


def test_a_bucket_prefix_behaves_like_a_folder(s3, tmp_path):
    """What the commands rely on: a prefix exists once it holds an object, goes away with
    remove_tree, and files round-trip; a missing bucket is refused before any work."""
    root = s3.uri("semantics/run")
    assert not storage.exists(root)
    storage.ensure_writable(root)
    storage.write_text(storage.join(root, "tune", "a.yaml"), "a: 1\n")
    assert storage.exists(root) and storage.exists(storage.join(root, "tune"))
    assert storage.read_text(storage.join(root, "tune", "a.yaml")) == "a: 1\n"
    weights = tmp_path / "weights.bin"
    weights.write_bytes(bytes(range(256)) * 4096)
    storage.upload_file(weights, storage.join(root, "m", "weights.bin"))
    copy = storage.download_file(storage.join(root, "m", "weights.bin"), tmp_path / "copy.bin")
    assert copy.read_bytes() == weights.read_bytes()
    storage.remove_tree(storage.join(root, "tune"))
    assert not storage.exists(storage.join(root, "tune", "a.yaml"))
    with pytest.raises(UserError, match="bucket 'no-such-bucket' does not exist"):
        storage.ensure_writable("s3://no-such-bucket/runs")


def test_outputs_staged_for_a_bucket_are_uploaded_only_whole_and_never_left_in_tmp(
    s3, tmp_path, monkeypatch
):
    """A command writes its outputs into a local stage that is uploaded when it ends: a
    failure part-way uploads nothing, and neither way leaves the stage behind."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    root = s3.uri("staged/ensemble")
    with pytest.raises(RuntimeError, match="interrupted"), storage.staged_folder(root) as stage:
        (stage / "metrics.csv").write_text("a\n1\n")
        raise RuntimeError("interrupted")
    assert not storage.exists(root)
    assert list(scratch.iterdir()) == []
    with storage.staged_folder(root) as stage:
        (stage / "metrics.csv").write_text("a\n1\n")
        (stage / "report.md").write_text("# report\n")
    assert sorted(s3.keys("staged/ensemble")) == ["metrics.csv", "report.md"]
    assert s3.read("staged/ensemble/metrics.csv") == b"a\n1\n"
    assert list(scratch.iterdir()) == []


def _cli_ok(*args: str) -> str:
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _tune_and_ensemble(s3: S3Server, address: str, key: str, *extra: str) -> None:
    """`ar-ray tune --storage s3://...` and `ar-ray ensemble --from s3://...`, 1 epoch each."""
    storage, name = key.rsplit("/", 1)
    _cli_ok(
        *("tune", "--space", QUICK, "--trials", "2", "--epochs", "1", "--limit-per-class", "10"),
        *("--storage", s3.uri(storage), "--name", name, "--address", address, *extra),
    )
    _cli_ok(
        *("ensemble", "--from", s3.uri(key), "--members", "2", "--epochs", "1"),
        *("--tta", "center", "--address", address),
    )


@pytest.fixture(scope="module")
def run(s3: S3Server, address: str) -> str:
    _tune_and_ensemble(s3, address, RUN)
    return RUN


def _csv(s3: S3Server, key: str) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(s3.read(key)), keep_default_na=False)


def test_tune_writes_its_experiment_to_the_bucket(s3, run):
    board = _csv(s3, f"{run}/tune/leaderboard.csv")
    assert len(board) == 2 and (board["status"] == "COMPLETE").all()
    request = yaml.safe_load(s3.read(f"{run}/tune/request.yaml"))["request"]
    assert request["storage"] == s3.uri("runs")
    checkpoints = [key for key in s3.keys(f"{run}/tune") if key.endswith("/checkpoint.pt")]
    assert len(checkpoints) == 2  # one per trial, written by the trials' Ray workers


def test_ensemble_writes_members_and_outputs_to_the_bucket(s3, run, tmp_path):
    metrics = _csv(s3, f"{run}/ensemble/metrics.csv")
    assert set(metrics["split"]) == {"val", "test"} and "final" in set(metrics["name"])
    saved = yaml.safe_load(s3.read(f"{run}/ensemble/ensemble.yaml"))
    assert saved["tta"] == "center" and len(saved["checkpoints"]) == 2
    for name in ("members.csv", "predictions.csv", "report.md", "weights.png"):
        assert s3.read(f"{run}/ensemble/{name}"), name
    for checkpoint in saved["checkpoints"]:  # members/<id>/checkpoint.pt, relative to the run
        local = tmp_path / "checkpoint.pt"
        local.write_bytes(s3.read(f"{run}/{checkpoint}"))
        assert load_checkpoint(local)["epoch"] == 1


def test_predict_labels_images_under_a_bucket_prefix(s3, run, address, tmp_path):
    photos = tmp_path / "photos"
    write_image(photos / "big.jpg", (320, 240))
    write_image(photos / "nested" / "grey.png", (30, 50), mode="L")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    s3.upload(photos, "photos")
    out = tmp_path / "labels.csv"
    stdout = _cli_ok(
        *("predict", "--ensemble", s3.uri(run), "--images", s3.uri("photos/")),
        *("--out", str(out), "--address", address),
    )
    assert "1 images could not be decoded" in stdout
    frame = pd.read_csv(out, keep_default_na=False).set_index("image_id")
    assert sorted(frame.index) == sorted(
        f"{s3.bucket}/photos/{name}" for name in ("big.jpg", "nested/grey.png", "broken.jpg")
    )
    good = frame[frame["error"] == ""]
    assert len(good) == 2 and good["confidence"].between(0, 1).all()
    assert frame.loc[f"{s3.bucket}/photos/broken.jpg", "predicted"] == ""


def test_a_second_tune_into_a_stored_run_must_be_asked_for(s3, run):
    result = run_cli("tune", "--space", QUICK, "--storage", s3.uri("runs"), "--name", "b")
    assert_user_error(result, f"{s3.uri(run)}/tune: holds an experiment")


def test_tune_and_ensemble_read_vipriors_from_the_bucket(s3, address, tmp_path):
    """`--data s3://...`: the tune run records the URI and `ensemble` reads it again; then
    `predict` on the val files gives the probabilities `ensemble` saved for them."""
    s3.upload(make_image_folder(tmp_path / "vipriors", per_class=4), "vipriors")
    _tune_and_ensemble(s3, address, "runs/vip", "--data", s3.uri("vipriors"))
    predictions = _csv(s3, "runs/vip/ensemble/predictions.csv")
    assert len(predictions) == 8 and set(predictions["label"]) == {"cat", "dog"}
    _predict_reproduces_the_saved_val_probabilities(s3, address, "runs/vip", tmp_path)


def _predict_reproduces_the_saved_val_probabilities(
    s3: S3Server, address: str, run: str, tmp_path: Path
) -> None:
    """Decoding, TTA, weights and temperature must agree between the two commands: predict's
    top-5 for each val file equals probs_val.npz combined with ensemble.yaml's weights,
    within the 4 decimals the CSV keeps."""
    out = tmp_path / "val_labels.csv"
    _cli_ok(
        *("predict", "--ensemble", s3.uri(run), "--images", s3.uri("vipriors/val/")),
        *("--out", str(out), "--address", address),
    )
    saved = np.load(io.BytesIO(s3.read(f"{run}/ensemble/probs_val.npz")))
    record = yaml.safe_load(s3.read(f"{run}/ensemble/ensemble.yaml"))
    weights = FittedWeights(record["method"], record["weights"], record["temperature"])
    expected = combine(saved["member_probs"], weights)
    frame = pd.read_csv(out, keep_default_na=False)
    frame.index = frame["image_id"].str.split("/vipriors/val/").str[1]
    assert sorted(frame.index) == sorted(saved["ids"])
    classes = np.array(record["classes"])
    rows = frame.loc[list(saved["ids"])]
    listed = np.array([[list(classes).index(c) for c in row.split("|")] for row in rows["top5"]])
    assert (rows["predicted"] == classes[listed[:, 0]]).all()
    shown = np.array([row.split() for row in rows["top5_probs"]], dtype=float)
    assert_top5(listed, shown, expected, atol=5e-5 + 1e-5)


@pytest.mark.parametrize("command", ["tune", "ensemble", "predict"])
def test_a_missing_bucket_is_named_in_one_line(s3, command, tmp_path):
    location = "s3://no-such-bucket/runs/b"
    args = {
        "tune": ["tune", "--space", QUICK, "--storage", "s3://no-such-bucket/runs", "--name", "b"],
        "ensemble": ["ensemble", "--from", location],
        "predict": ["predict", "--ensemble", location, "--images", str(tmp_path)],
    }[command]
    assert_user_error(run_cli(*args), location)


@pytest.mark.parametrize("command", ["tune", "predict"])
def test_an_unreachable_endpoint_is_named_in_one_line(s3, command, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    args = {
        "tune": ["tune", "--space", QUICK, "--storage", s3.uri("runs"), "--name", "b"],
        "predict": ["predict", "--ensemble", s3.uri(RUN), "--images", str(tmp_path)],
    }[command]
    result = run_cli(*args)
    assert_user_error(result, s3.uri(RUN))
    assert "storage not reachable" in result.stderr
