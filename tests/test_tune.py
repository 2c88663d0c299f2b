"""`ar-ray tune` on a real local Ray: leaderboard, ASHA, best configs, resume, bad spaces."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import ray
import yaml
from helpers import assert_user_error, run_cli
from ray import tune

from ar_ray.config import ConfigError, RecipeConfig, load_config
from ar_ray.optuna_search import optuna_states
from ar_ray.optuna_storage import RAY_TRIAL_ID
from ar_ray.recipe.checkpoint import CHECKPOINT_FILE, load_checkpoint
from ar_ray.search import run_tune
from ar_ray.search_space import load_search_space, parse_search_space
from ar_ray.staged import first_rung
from ar_ray.tune_phase import run_trial
from ar_ray.tune_request import TuneRequest
from tests.mlflow_server import mlflow_server

pytestmark = pytest.mark.ray

SPACES = Path(__file__).parent.parent / "search_spaces"
QUICK = SPACES / "quick.yaml"


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


def test_asha_judges_mean_teacher_only_after_it_acted_and_optuna_sees_pruned(
    ray_cluster, small_splits, tmp_path, capsys
):
    """One search (--staged-search off) with mt_weight searched and Mean Teacher from
    0-based epoch 2 (half an epoch of ramp-up): the teacher first trains in epoch 3, so
    grace 1 is raised to 3 and no trial stops before it; ASHA still stops some there, and
    Optuna's study records those as PRUNED."""
    space_file = tmp_path / "mt.yaml"
    space_file.write_text(
        QUICK.read_text().replace("mt_weight: 0.0", "mt_weight: {uniform: [0.1, 1.0]}")
        + "mt_start_epoch: 2\nmt_rampup_epochs: 0.5\n"
    )
    space = load_search_space(space_file)
    request = _request(
        tmp_path, space=str(space_file), trials=6, epochs=4, reduction_factor=2,
        staged_search="off",
    )  # fmt: skip
    run_tune(request, space, small_splits)
    out = capsys.readouterr().out
    assert "one search (--staged-search off): ASHA's first rung is epoch 3, not 1" in out
    board = pd.read_csv(tmp_path / "t" / "tune" / "leaderboard.csv")
    recorded = yaml.safe_load((tmp_path / "t" / "tune" / "request.yaml").read_text())
    assert recorded["request"]["first_rung"] == 3 and (board["first_rung"] == 3).all()
    assert len(board) == 6 and (board["epochs_run"] >= 3).all()
    stopped = board[board["status"] == "STOPPED_EARLY"]
    complete = board[board["status"] == "COMPLETE"]
    assert len(stopped) >= 1 and (stopped["epochs_run"] == 3).all() and len(complete) >= 1
    states = optuna_states(str(tmp_path / "t" / "tune"))  # the study itself, read back
    assert {states[t] for t in stopped["trial_id"]} == {"PRUNED"}
    assert {states[t] for t in complete["trial_id"]} == {"COMPLETE"}
    assert list(board["optuna_state"]) == [states[t] for t in board["trial_id"]]


@pytest.mark.parametrize("space", sorted(SPACES.glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_space_parses_and_its_mean_teacher_can_act(space):
    parsed = load_search_space(space)
    rung = first_rung(parsed, parsed.base_config(), grace_period=1)
    assert 1 <= rung.epoch <= parsed.base_config().epochs


@pytest.mark.parametrize(
    "lines, grace, expected",
    [
        ("mt_weight: {uniform: [0.0, 1.0]}\nmt_start_epoch: 5\nmt_rampup_epochs: 0", 1, 6),
        ("mt_weight: 1.0\nmt_decay: {uniform: [0.9, 0.99]}\nmt_start_epoch: 2", 1, 4),
        ("mt_weight: 1.0\nmt_start_epoch: {int: [2, 6]}\nmt_rampup_epochs: 1.5", 1, 8),
        ("mt_weight: 1.0\nmt_rampup_epochs: {uniform: [0.5, 3.5]}\nmt_start_epoch: 1", 1, 5),
        ("mt_weight: {uniform: [0.0, 1.0]}\nmt_start_epoch: 9", 1, 10),  # capped by epochs
        ("mt_weight: {uniform: [0.0, 1.0]}\nmt_start_epoch: 1", 7, 7),  # already late enough
        ("mt_weight: 1.0\nmt_start_epoch: 1\nlr: {uniform: [0.1, 0.2]}", 1, 1),  # none searched
    ],
)
def test_first_rung_waits_for_the_upper_end_of_mean_teacher(lines, grace, expected):
    space = parse_search_space(yaml.safe_load(f"epochs: 10\n{lines}"), "s.yaml")
    assert first_rung(space, space.base_config(), grace).epoch == expected


@pytest.mark.parametrize(
    "lines, fragment",
    [
        ("mt_weight: {uniform: [0.0, 1.0]}\nmt_start_epoch: 10", "mt_start_epoch=10 leaves"),
        ("mt_weight: 1.0\nmt_start_epoch: {int: [2, 12]}", "mt_start_epoch=12 leaves"),
        ("mt_decay: {uniform: [0.9, 0.99]}", "mt_decay is searched but mt_weight is 0"),
    ],
)
def test_a_searched_mean_teacher_key_that_never_acts_is_refused(lines, fragment):
    space = parse_search_space(yaml.safe_load(f"epochs: 10\n{lines}"), "s.yaml")
    with pytest.raises(ConfigError, match="^s.yaml: ") as error:
        first_rung(space, space.base_config(), 1)
    assert fragment in str(error.value)


def _trials(experiment: Path, status: str) -> set[str]:
    """The trials the experiment's last saved state (what a resume restores) has in `status`."""
    states = sorted(experiment.glob("experiment_state-*.json"))
    if not states:
        return set()
    try:
        trials = json.loads(states[-1].read_text())["trial_data"]
    except (json.JSONDecodeError, KeyError):
        return set()  # being rewritten
    metas = [json.loads(meta) for meta, _ in trials]
    return {meta["trial_id"] for meta in metas if meta["status"] == status}


def _running_trial_runs(uri: str, experiment: str) -> set[str]:
    """The trials whose MLflow run is open: a killed driver leaves them so."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return set()
    query = "tags.`ar_ray.kind` = 'trial' and attributes.status = 'RUNNING'"
    return {
        run.info.run_name.split("/")[-1] for run in client.search_runs([found.experiment_id], query)
    }


@pytest.fixture
def mlflow_uri():
    pytest.importorskip("mlflow", reason="the mlflow extra: pip install 'ar-ray[mlflow]'")
    with mlflow_server() as uri:
        yield uri


def test_resume_after_killed_driver_keeps_finished_trials(ray_cluster, tmp_path, mlflow_uri):
    """...and goes on in the same stored Optuna study and the same MLflow runs."""
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
        "--optuna-storage",
        f"sqlite:///{tmp_path}/study.db",
        "--track",
        "mlflow",
        "--tracking-uri",
        mlflow_uri,
    ]
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # save experiment state often
    driver = subprocess.Popen(
        args, start_new_session=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    experiment = tmp_path / "k" / "tune"
    deadline = time.monotonic() + 300
    # killed once a trial finished and another runs with its MLflow run open, both saved
    while time.monotonic() < deadline:
        assert driver.poll() is None, "driver ended before it could be killed"
        running = _trials(experiment, "RUNNING")
        if _trials(experiment, "TERMINATED") and running & _running_trial_runs(
            mlflow_uri, str(tmp_path / "k")
        ):
            break
        time.sleep(0.5)
    finished = _trials(experiment, "TERMINATED")
    assert finished and running, "no trial finished while another ran, in time"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not (experiment / "leaderboard.csv").exists()
    before = {t: _result_lines(experiment, t) for t in finished}
    request = (experiment / "request.yaml").read_text()

    resumed = subprocess.run(
        [*args, "--resume"], env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    board = pd.read_csv(experiment / "leaderboard.csv")
    assert len(board) == 4 and (board["status"] != "ERROR").all()
    assert (experiment / "request.yaml").read_text() == request  # the record holds
    for trial, lines in before.items():
        assert _result_lines(experiment, trial) == lines  # not run again
        row = board[board["trial_id"] == trial].iloc[0]
        assert row["val_top1"] == pytest.approx(json.loads(lines[-1])["val_top1"])
    # the resumed search went on in the same stored study: one finished trial per Ray trial
    study = optuna.load_study(study_name="k", storage=f"sqlite:///{tmp_path}/study.db")
    by_ray = {t.user_attrs[RAY_TRIAL_ID]: t.state.name for t in study.trials}
    assert sorted(by_ray) == sorted(board["trial_id"]) and len(study.trials) == 4
    assert list(board["optuna_state"]) == [by_ray[t] for t in board["trial_id"]]
    assert set(by_ray.values()) <= {"COMPLETE", "PRUNED"}
    # ... and in the same MLflow runs: one per Ray trial, the interrupted ones finished now
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    found = client.get_experiment_by_name(str(tmp_path / "k"))
    runs = client.search_runs([found.experiment_id], "tags.`ar_ray.kind` = 'trial'")
    by_name = {run.info.run_name.split("/")[-1]: run for run in runs}
    assert sorted(by_name) == sorted(board["trial_id"]) and len(runs) == 4
    for row in board.to_dict("records"):
        run = by_name[row["trial_id"]]
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "val_top1")
        assert {m.step for m in history} == set(range(1, row["epochs_run"] + 1))


def _result_lines(experiment: Path, trial_id: str) -> list[str]:
    (result,) = [p for p in experiment.glob(f"*{trial_id}*/result.json")]
    return result.read_text().splitlines()


def test_time_budget_ends_the_search_and_ranks_the_trials_that_ran(
    ray_cluster, small_splits, tmp_path, capsys
):
    """200 trials of 30 epochs cannot finish in 20 s on 2 CPUs: Tune stops at the
    budget, the trials that ran are ranked, none that never started is listed, and the
    plan was priced from the first measured epoch. ASHA rungs 1, 3, 9, 27 of 30: all
    trials to 1, a third to 3, a ninth to 9, 1/27 to 27, 1/81 to 30."""
    request = _request(tmp_path, trials=200, epochs=30, time_budget=20.0)
    board = run_tune(request, load_search_space(QUICK), small_splits)
    out = capsys.readouterr().out
    saved = pd.read_csv(tmp_path / "t" / "tune" / "leaderboard.csv")
    assert 1 <= len(saved) == len(board) < 200 and (saved["epochs_run"] >= 1).all()
    assert f"time budget of 0:20 reached: {len(saved)} of 200 trials ran" in out
    assert (tmp_path / "t" / "tune" / "time_budget_reached").exists()
    assert "s per epoch (measured), expected" in out and "CPU-hours" in out
    record = yaml.safe_load((tmp_path / "t" / "tune" / "request.yaml").read_text())
    assert record["request"]["time_budget"] == 20.0
    assert record["plan"] == {
        "expected_epochs": pytest.approx(200 * (1 + 2 / 3 + 6 / 9 + 18 / 27 + 3 / 81), abs=0.1),
        "worst_epochs": 6000,
    }


def test_a_retried_trial_continues_after_its_checkpoint(ray_cluster, small_splits, tmp_path):
    """The first attempt dies after epoch 1; Tune retries the trial, which must resume from
    epoch 1's checkpoint and report epoch 2 only, not train from scratch again."""

    def flaky_trial(params, *, splits, base):
        if tune.get_checkpoint() is None:
            run_trial(params, splits=splits, base={**base, "epochs": 1})
            raise RuntimeError("injected failure after epoch 1")
        run_trial(params, splits=splits, base=base)

    base = RecipeConfig(epochs=2, batch_size=16).to_dict()
    trainable = tune.with_parameters(flaky_trial, splits=small_splits.for_training(), base=base)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        run_config=tune.RunConfig(
            name="retry",
            storage_path=str(tmp_path),
            failure_config=tune.FailureConfig(max_failures=1),
        ),
    )
    (result,) = tuner.fit()
    assert result.error is None
    (trial,) = (tmp_path / "retry").glob("flaky_trial_*/result.json")
    epochs = [json.loads(line)["epoch"] for line in trial.read_text().splitlines()]
    assert epochs == [1, 2]
    with result.checkpoint.as_directory() as folder:
        history = load_checkpoint(Path(folder) / CHECKPOINT_FILE)["history"]
    assert [row["epoch"] for row in history] == [1, 2]


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
