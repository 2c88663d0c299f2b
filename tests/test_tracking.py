"""`--track mlflow`: a real tune -> ensemble -> distill on the session's Ray, tracked to a
real `mlflow server` on 127.0.0.1, read back through MLflow's client and compared with the
run folder's own files; a server that is down, before and during a run; the one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

import ar_ray
from ar_ray.errors import UserError
from ar_ray.mlflow_tracking import (
    KIND_TAG,
    PARENT_TAG,
    EpochMetrics,
    Tracking,
    close_run,
    log_metrics,
    open_experiment,
    open_run,
    tracked_run,
    tracking_uri,
)
from tests.helpers import assert_user_error, free_port
from tests.mlflow_server import ADMIN, mlflow_server

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra: pip install 'ar-ray[mlflow]'")

QUICK = Path(__file__).parent.parent / "search_spaces" / "quick.yaml"
WARNING = "failed; the run goes on"


@pytest.fixture
def no_retries(monkeypatch):
    """A refused connection fails at once, not after ar-ray's two retries' back-off."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


@pytest.fixture(scope="module")
def server():
    with mlflow_server() as uri:
        yield uri


@pytest.fixture(scope="module")
def tracked(ray_cluster, server, module_tmp):
    """tune (2 trials of 2 epochs, none stopped), an ensemble of both (reused trials), and
    a 1-epoch student, each tracked; returns the run folder and a client of the server."""
    root = module_tmp
    track = {"track": "mlflow", "tracking_uri": server}
    tuned = ar_ray.tune(
        QUICK, trials=2, epochs=2, grace_period=2, limit_per_class=10, storage=str(root),
        name="t", **track,
    )  # fmt: skip
    ar_ray.ensemble(tuned, members=2, **track)
    ar_ray.distill(tuned.run, epochs=1, **track)
    return Path(tuned.run), mlflow.MlflowClient(server)


def _runs(client, run: Path, kind: str) -> list:
    (experiment,) = [e for e in client.search_experiments() if e.name == str(run)]
    return client.search_runs([experiment.experiment_id], f"tags.`{KIND_TAG}` = '{kind}'")


def _history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path)


def test_a_run_per_trial_with_its_whole_config_epochs_and_node(tracked):
    run, client = tracked
    board = _csv(run / "tune" / "leaderboard.csv")
    base = yaml.safe_load((run / "tune" / "request.yaml").read_text())["base_config"]
    trials = {r.data.tags["mlflow.runName"].split("/")[-1]: r for r in _runs(client, run, "trial")}
    assert sorted(trials) == sorted(board["trial_id"])
    for row in board.to_dict("records"):
        trial = trials[row["trial_id"]]
        assert trial.info.status == "FINISHED"
        assert set(trial.data.params) == set(base)  # the resolved config, not the sample
        for key, value in base.items():
            if key not in ("sce_alpha", "sce_beta", "cr_weight", "policy", "lr"):
                assert trial.data.params[key] == str(value), key
        assert float(trial.data.params["sce_alpha"]) == pytest.approx(row["sce_alpha"])
        assert trial.data.params["policy"] == row["policy"]
        history = _history(client, trial.info.run_id, "val_top1")
        assert sorted(history) == [1, 2] and history[2] == pytest.approx(row["val_top1"])
        assert trial.data.tags["node"] == row["node"]
        assert "CPU=1" in trial.data.tags["resources"]


def test_the_ensemble_is_a_parent_run_of_its_members_with_its_outputs(tracked, tmp_path):
    run, client = tracked
    (parent,) = _runs(client, run, "ensemble")
    assert parent.info.status == "FINISHED"
    members = _csv(run / "ensemble" / "members.csv")
    runs = {r.data.tags["mlflow.runName"]: r for r in _runs(client, run, "member")}
    assert sorted(runs) == sorted(members["member"])
    for member in members.to_dict("records"):
        tracked_member = runs[member["member"]]
        assert tracked_member.data.tags[PARENT_TAG] == parent.info.run_id
        assert tracked_member.data.tags["status"] == member["status"]  # reused from trial ...
        config = yaml.safe_load((run / "members" / member["member"] / "config.yaml").read_text())
        assert tracked_member.data.params == {key: str(value) for key, value in config.items()}
        epochs = _csv(run / "members" / member["member"] / "metrics.csv")
        history = _history(client, tracked_member.info.run_id, "val_nll")
        assert history == pytest.approx(dict(zip(epochs["epoch"], epochs["val_nll"], strict=True)))
    metrics = _csv(run / "ensemble" / "metrics.csv")
    final = metrics[(metrics["split"] == "val") & (metrics["name"] == "final")].iloc[0]
    assert parent.data.metrics["val_final_top1"] == pytest.approx(final["top1"])
    assert parent.data.metrics["test_final_vs_best_member"] == pytest.approx(
        metrics[(metrics["split"] == "test") & (metrics["name"] == "final")].iloc[0][
            "vs_best_member"
        ]
    )
    stored = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"metrics.csv", "weights.csv", "members.csv", "report.md", "weights.png"} <= stored
    assert not any(name.endswith(".npz") for name in stored)  # probabilities stay behind
    local = client.download_artifacts(parent.info.run_id, "weights.csv", str(tmp_path))
    assert Path(local).read_bytes() == (run / "ensemble" / "weights.csv").read_bytes()


def test_the_student_logs_each_epoch_from_its_train_worker(tracked):
    run, client = tracked
    (student,) = _runs(client, run, "distilled")
    assert student.info.status == "FINISHED" and student.data.params["temperature"] == "4.0"
    history = _csv(run / "distilled" / "history.csv")
    logged = _history(client, student.info.run_id, "train_loss")
    assert logged == pytest.approx(dict(zip(history["epoch"], history["train_loss"], strict=True)))
    assert student.data.tags["node"] == str(history["node"].iloc[0])
    metrics = _csv(run / "distilled" / "metrics.csv")
    row = metrics[(metrics["split"] == "val") & (metrics["name"] == "distilled")].iloc[0]
    assert student.data.metrics["val_distilled_top1"] == pytest.approx(row["top1"])
    assert "report.md" in {f.path for f in client.list_artifacts(student.info.run_id)}


def test_a_resumed_ensemble_continues_its_runs(tracked, server):
    run, client = tracked
    before = {kind: len(_runs(client, run, kind)) for kind in ("ensemble", "member")}
    ar_ray.ensemble(str(run), resume=True, track="mlflow", tracking_uri=server)
    after = {kind: len(_runs(client, run, kind)) for kind in ("ensemble", "member")}
    assert after == before == {"ensemble": 1, "member": 2}
    (parent,) = _runs(client, run, "ensemble")
    assert parent.info.status == "FINISHED"


def test_train_workers_reach_a_server_that_asks_for_a_password(ray_cluster, tmp_path, monkeypatch):
    """The password is set in the driver only, after Ray started its workers: a member's
    epochs reach the server from its Train worker because the run's tracking carries it."""
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app: pip install 'mlflow[auth]'")
    password = "ar-ray-test-password"
    tuned = ar_ray.tune(
        QUICK, trials=1, epochs=1, limit_per_class=10, storage=str(tmp_path), name="a"
    )
    with mlflow_server(password=password) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        assert password not in repr(open_experiment(uri, tuned.run))
        ar_ray.ensemble(tuned, members=1, epochs=1, retrain=True, track="mlflow", tracking_uri=uri)
        client = mlflow.MlflowClient(uri)
        (member,) = _runs(client, Path(tuned.run), "member")
        history = _history(client, member.info.run_id, "val_top1")
    epochs = _csv(tmp_path / "a" / "members" / member.info.run_name / "metrics.csv")
    assert history == pytest.approx(dict(zip(epochs["epoch"], epochs["val_top1"], strict=True)))


def test_a_resumed_search_whose_server_is_gone_still_finishes(
    ray_cluster, tmp_path, no_retries, capfd
):
    """The URI is recorded, so `--resume` tracks again; a server gone by then is a warning."""
    options = {"trials": 1, "epochs": 1, "limit_per_class": 10, "storage": str(tmp_path)}
    with mlflow_server() as uri:
        ar_ray.tune(QUICK, name="g", track="mlflow", tracking_uri=uri, **options)
    resumed = ar_ray.tune(QUICK, name="g", resume=True, **options)
    assert len(resumed.leaderboard) == 1
    assert f"warning: MLflow tracking to {uri} failed; the run goes on" in capfd.readouterr().err


def test_a_server_that_goes_down_costs_warnings_never_the_run(no_retries, capsys):
    """Every tracking call against a refused port: each warns and returns."""
    down = Tracking(f"http://127.0.0.1:{free_port()}", "1")
    assert open_run(down, "member/m1", "m1", kind="member", params={"lr": 0.1}) is None
    log_metrics(down, "0123", {"val_top1": 0.5}, step=1)
    EpochMetrics(down, "0123")({"epoch": 1, "val_top1": 0.5, "node": "n"})
    close_run(down, "0123")
    ran = []
    with tracked_run(down, "ensemble", "ensemble", kind="ensemble") as run_id:
        ran.append(run_id)
    assert ran == [None]
    warnings = [line for line in capsys.readouterr().err.splitlines() if WARNING in line]
    assert len(warnings) == 6, warnings  # open, metrics, node, metrics, close, open


def test_tracking_options_and_an_unreachable_server_are_one_line(no_retries, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(None, None) is None
    with pytest.raises(UserError, match="--tracking-uri http://x needs --track mlflow"):
        tracking_uri(None, "http://x")
    with pytest.raises(UserError, match="--track wandb: not a tracker"):
        tracking_uri("wandb", None)
    with pytest.raises(UserError, match="MLFLOW_TRACKING_URI"):
        tracking_uri("mlflow", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking_uri("mlflow", None) == "http://env:5000"
    assert tracking_uri("mlflow", "http://given:5000") == "http://given:5000"
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(
        UserError, match=f"--tracking-uri {down}: no MLflow server answered"
    ) as raised:
        open_experiment(down, "/runs/x")
    assert "\n" not in str(raised.value)


@pytest.mark.slow
def test_without_the_extra_the_command_says_which_to_install(tmp_path):
    """mlflow shadowed by a package that cannot be imported, as if it were missing."""
    (tmp_path / "mlflow").mkdir()
    (tmp_path / "mlflow" / "__init__.py").write_text("raise ImportError('not here')\n")
    paths = [str(tmp_path), str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
    done = subprocess.run(
        [
            sys.executable, "-m", "ar_ray.cli", "tune", "--space", str(QUICK),
            "--storage", str(tmp_path / "runs"), "--track", "mlflow",
            "--tracking-uri", "http://127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": os.pathsep.join(p for p in paths if p)},
        timeout=300,
    )  # fmt: skip
    assert_user_error(done, "pip install 'ar-ray[mlflow]'")
    assert not (tmp_path / "runs").exists()  # refused before anything was written
