"""`ar-ray tune` on a real local Ray: leaderboard, ASHA, best configs, resume, bad spaces."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
from helpers import assert_user_error, run_cli

from ar_ray.config import ConfigError, load_config
from ar_ray.search_space import load_search_space, parse_search_space
from ar_ray.tune import TuneRequest, run_tune

QUICK = Path(__file__).parent.parent / "search_spaces" / "quick.yaml"


def _request(tmp_path, **changes):
    values = {"space": str(QUICK), "trials": 4, "epochs": 2, "storage": str(tmp_path), "name": "t"}
    return TuneRequest(**{**values, **changes})


def test_quick_space_writes_leaderboard_and_trainable_best_configs(
    ray_cluster, small_splits, tmp_path
):
    space = load_search_space(QUICK)
    board = run_tune(_request(tmp_path), space, small_splits)
    saved = pd.read_csv(tmp_path / "t" / "tune" / "leaderboard.csv")
    assert len(board) == len(saved) == 4
    assert saved["trial_id"].is_unique and (saved["status"] != "ERROR").all()
    assert saved["val_top1"].between(0, 1).all() and (saved["val_nll"] > 0).all()
    assert saved["epochs_run"].between(1, 2).all() and (saved["wall_seconds"] > 0).all()
    assert saved["val_top1"].is_monotonic_decreasing and list(saved["rank"]) == [1, 2, 3, 4]
    assert set(space.searched) <= set(saved.columns) and saved["node"].str.len().gt(0).all()
    assert saved["sce_alpha"].nunique() == 4  # Optuna really sampled

    best = tmp_path / "t" / "tune" / "best_configs.yaml"
    top = load_config(best)
    assert (
        top.epochs == 2 and top.seed == 0 and top.sce_alpha == pytest.approx(saved["sce_alpha"][0])
    )
    trained = run_cli(
        "train",
        "--config",
        str(best),
        "--rank",
        "2",
        "--epochs",
        "1",
        "--limit-per-class",
        "4",
        "--out",
        str(tmp_path / "retrain"),
    )
    assert trained.returncode == 0, trained.stderr
    request = (tmp_path / "t" / "tune" / "request.yaml").read_text()
    assert "quick.yaml" in request and "torch" in request

    again = run_cli(
        "tune",
        "--space",
        str(QUICK),
        "--storage",
        str(tmp_path),
        "--name",
        "t",
        "--address",
        ray.get_runtime_context().gcs_address,
    )
    assert_user_error(again, str(tmp_path / "t" / "tune"))


def test_asha_stops_weak_trials_before_the_last_epoch(ray_cluster, small_splits, tmp_path):
    space = load_search_space(QUICK)
    request = _request(tmp_path, trials=6, epochs=4, grace_period=1, reduction_factor=2)
    board = run_tune(request, space, small_splits)
    assert len(board) == 6
    stopped = board[board["status"] == "STOPPED_EARLY"]
    assert len(stopped) >= 1 and (stopped["epochs_run"] < 4).all()
    assert (board["status"] == "COMPLETE").any()


def _terminated_trials(experiment: Path) -> set[str]:
    states = sorted(experiment.glob("experiment_state-*.json"))
    if not states:
        return set()
    try:
        trials = json.loads(states[-1].read_text())["trial_data"]
    except (json.JSONDecodeError, KeyError):
        return set()  # being rewritten
    metas = [json.loads(meta) for meta, _ in trials]
    return {meta["trial_id"] for meta in metas if meta["status"] == "TERMINATED"}


def test_resume_after_killed_driver_keeps_finished_trials(ray_cluster, tmp_path):
    address = ray.get_runtime_context().gcs_address
    args = [
        sys.executable,
        "-m",
        "ar_ray.cli",
        "tune",
        "--space",
        str(QUICK),
        "--trials",
        "4",
        "--epochs",
        "2",
        "--limit-per-class",
        "10",
        "--storage",
        str(tmp_path),
        "--name",
        "k",
        "--address",
        address,
        "--max-concurrent",
        "1",
    ]
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # save experiment state often
    driver = subprocess.Popen(
        args, start_new_session=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    experiment = tmp_path / "k" / "tune"
    deadline = time.monotonic() + 300
    while not _terminated_trials(experiment) and time.monotonic() < deadline:
        assert driver.poll() is None, "driver ended before it could be killed"
        time.sleep(0.5)
    finished = _terminated_trials(experiment)
    assert finished, "no trial finished in time"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not (experiment / "leaderboard.csv").exists()
    before = {t: _result_lines(experiment, t) for t in finished}

    resumed = subprocess.run(
        [*args, "--resume"], env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    board = pd.read_csv(experiment / "leaderboard.csv")
    assert len(board) == 4 and (board["status"] != "ERROR").all()
    for trial, lines in before.items():
        assert _result_lines(experiment, trial) == lines  # not run again
        row = board[board["trial_id"] == trial].iloc[0]
        assert row["val_top1"] == pytest.approx(json.loads(lines[-1])["val_top1"])


def _result_lines(experiment: Path, trial_id: str) -> list[str]:
    (result,) = [p for p in experiment.glob(f"*{trial_id}*/result.json")]
    return result.read_text().splitlines()


@pytest.mark.parametrize(
    "space, fragment",
    [
        ({"sce_alfa": {"uniform": [0.1, 1.0]}}, "unknown hyperparameter 'sce_alfa'"),
        ({"lr": {"uniform": [0.5, 0.1]}}, "lr: lo=0.5 must be < hi=0.1"),
        ({"lr": {"loguniform": [0.0, 0.1]}}, "lr: loguniform needs lo > 0"),
        ({"policy": {"uniform": [0, 1]}}, "policy: uniform does not fit a str"),
        ({"epochs": {"uniform": [1, 3]}}, "epochs: uniform does not fit a int"),
        ({"lr": {"uniform": ["a", 1]}}, "lr='a' must be a float"),
        ({"cr_variant": {"choice": ["ntxent", "simclr"]}}, "cr_variant='simclr'"),
        ({"cr_temperature": {"uniform": [-0.1, 0.5]}}, "cr_temperature=-0.1 must be > 0"),
        ({"mt_decay": {"uniform": [0.99, 1.0]}}, "mt_decay=1.0 must be in (0, 1)"),
        ({"lr": {"normal": [0, 1]}}, "lr: expected one of"),
        ({"image_size": {"choice": [28, 32]}}, "image_size cannot be searched"),
        ({"batch_size": "big"}, "batch_size='big' must be a int"),
    ],
)
def test_bad_search_spaces_name_file_and_key(space, fragment):
    with pytest.raises(ConfigError) as error:
        parse_search_space(space, "space.yaml")
    assert str(error.value).startswith("space.yaml: ") and fragment in str(error.value)


def test_bad_space_through_the_cli_exits_2_before_starting_ray(tmp_path):
    space = tmp_path / "bad.yaml"
    space.write_text("lr: {uniform: [0.5, 0.1]}\n")
    result = run_cli("tune", "--space", str(space), "--storage", str(tmp_path))
    assert_user_error(result, f"{space}: lr: lo=0.5 must be < hi=0.1")
    assert not (tmp_path / "ar").exists()
