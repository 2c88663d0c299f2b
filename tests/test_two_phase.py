"""The two-phase staged search: when it applies, both phases on a real local Ray, the
leaderboard and parents they leave, and a search killed in phase 2 resumed there."""

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
import yaml

from ar_ray import staged
from ar_ray.config import RecipeConfig, load_config
from ar_ray.ensembling import EnsembleRequest, plan_members
from ar_ray.leaderboard import load_tune_record
from ar_ray.search import run_tune
from ar_ray.search_space import load_search_space, parse_search_space
from ar_ray.tune_request import TuneRequest

SPACES = Path(__file__).parent.parent / "search_spaces"
STAGED = {
    "image_size": 28, "epochs": 4, "batch_size": 16, "cr_weight": 0.0,
    "mt_start_epoch": 2, "mt_rampup_epochs": 1.0,
    "mt_weight": {"loguniform": [0.3, 3.0]}, "mt_decay": {"uniform": [0.9, 0.99]},
    "sce_alpha": {"loguniform": [0.1, 2.0]},
}  # fmt: skip


def _space(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "staged.yaml"
    path.write_text(yaml.safe_dump({**STAGED, **changes}))
    return path


def test_the_paper_space_is_staged_at_mean_teachers_start():
    space = load_search_space(SPACES / "ar_default.yaml")
    stages = staged.staging(space, space.base_config(), "auto").stages
    # Mean Teacher from epoch 50 of 100 with a 5-epoch ramp-up: phase 2 judges at +5
    assert stages == staged.Stages(cut=50, stage_two_keys=("mt_weight", "mt_decay"), first_rung=5)
    assert staged.staging(space, space.base_config(), "off").stages is None


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"mt_weight": 1.0, "mt_decay": 0.99}, "no mt_* key is searched"),
        ({"mt_start_epoch": {"int": [1, 2]}}, "mt_start_epoch is searched"),
        ({"mt_weight": {"choice": [0.0, 2.0]}}, "mt_weight may be 0"),
        ({"mt_start_epoch": 0}, "Mean Teacher starts at epoch 0 of 4"),
    ],
)
def test_a_search_that_cannot_be_staged_stays_one_search(changes, reason):
    space = parse_search_space({**STAGED, **changes}, "s.yaml")
    staging = staged.staging(space, space.base_config(), "auto")
    assert staging.stages is None and staging.reason.startswith(reason)


def test_stage_one_runs_mean_teacher_when_phase_two_will():
    """A searched mt_weight over a base of 0: stage one runs with Mean Teacher on (its view
    count), any weight will do as none acts before the cut."""
    space = parse_search_space({**STAGED, "mt_weight": {"loguniform": [0.3, 3.0]}}, "s.yaml")
    assert space.base_config().mt_weight == 0
    assert staged.stage_one_base(space, space.base_config()).mt_weight == 3.0
    fixed = parse_search_space({**STAGED, "mt_weight": 0.5}, "s.yaml")
    assert staged.stage_one_base(fixed, fixed.base_config()).mt_weight == 0.5


def test_both_phases_rank_finished_runs_first(ray_cluster, small_splits, tmp_path):
    space = load_search_space(_space(tmp_path))
    request = TuneRequest(
        space=str(tmp_path / "staged.yaml"), trials=4, stage2_trials=3, stage2_from=2,
        storage=str(tmp_path), name="s",
    )  # fmt: skip
    board = run_tune(request, space, small_splits)
    tune_dir = tmp_path / "s" / "tune"
    saved = pd.read_csv(tune_dir / "leaderboard.csv")
    assert len(board) == len(saved) == 7 and (saved["status"] != "ERROR").all()
    assert list(saved["phase"]) == ["stage2"] * 3 + ["stage1"] * 4
    assert saved["val_top1"][:3].is_monotonic_decreasing
    one, two = saved[saved["phase"] == "stage1"], saved[saved["phase"] == "stage2"]
    assert one["epochs_run"].between(1, 2).all() and two["epochs_run"].between(1, 2).all()
    assert one["mt_weight"].isna().all() and two["mt_weight"].notna().all()

    # phase 2 started from the best two stage-one trials that reached the cut
    parents = yaml.safe_load((tune_dir / "stage2_parents.yaml").read_text())
    reached = one[one["epochs_run"] == 2].sort_values("val_top1", ascending=False)
    assert list(parents) == list(reached["trial_id"][:2])
    for row in two.to_dict("records"):
        assert row["stage1_trial"] in parents
        assert row["sce_alpha"] == pytest.approx(
            parents[row["stage1_trial"]]["params"]["sce_alpha"]
        )
        reports = _reports(tune_dir / "phase2", row["trial_id"])
        assert reports[0]["epoch"] == 3 and reports[0]["phase_epoch"] == 1  # resumed at the cut
    for row in one.to_dict("records"):
        assert [r["epoch"] for r in _reports(tune_dir / "phase1", row["trial_id"])] == list(
            range(1, row["epochs_run"] + 1)
        )

    # the best config is complete: its parent's stage-one values and its own teacher's
    best = load_config(tune_dir / "best_configs.yaml")
    top = two.iloc[0]
    assert best.mt_weight == pytest.approx(top["mt_weight"]) and best.epochs == 4
    assert best.sce_alpha == pytest.approx(parents[top["stage1_trial"]]["params"]["sce_alpha"])
    assert best == RecipeConfig.from_dict(best.to_dict())
    record = yaml.safe_load((tune_dir / "request.yaml").read_text())
    assert record["request"]["staged"] is True and record["request"]["stage2_trials"] == 3

    # phase-2 trials that ran to the end are full runs: an ensemble reuses them as members
    # (the first trial at ASHA's one rung always goes on, so at least one did)
    run = load_tune_record(str(tmp_path / "s"))
    specs = plan_members(EnsembleRequest(run=str(tmp_path / "s"), members=3), run)
    assert {s.trial_id for s in specs} == set(two["trial_id"])  # never a stage-one trial
    by_trial = two.set_index("trial_id")
    for spec in specs:
        row = by_trial.loc[spec.trial_id]
        assert spec.reuse == (row["checkpoint"] if row["status"] == "COMPLETE" else "")
    reused = [s.reuse for s in specs if s.reuse]
    assert reused and all(r.startswith("tune/phase2/") for r in reused)
    assert all((tmp_path / "s" / r / "checkpoint.pt").exists() for r in reused)


def _reports(experiment: Path, trial_id: str) -> list[dict]:
    (result,) = experiment.glob(f"*{trial_id}*/result.json")
    return [json.loads(line) for line in result.read_text().splitlines()]


def test_a_search_killed_in_phase_two_resumes_there(ray_cluster, tmp_path):
    args = [
        sys.executable, "-m", "ar_ray.cli", "tune", "--space", str(_space(tmp_path)),
        "--trials", "3", "--stage2-trials", "3", "--stage2-from", "2", "--limit-per-class", "5",
        "--storage", str(tmp_path), "--name", "k", "--max-concurrent", "1",
        "--address", ray.get_runtime_context().gcs_address,
    ]  # fmt: skip
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # save experiment state often
    driver = subprocess.Popen(
        args, start_new_session=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    tune_dir = tmp_path / "k" / "tune"
    deadline = time.monotonic() + 400
    while not list((tune_dir / "phase2").glob("*/result.json")) and time.monotonic() < deadline:
        assert driver.poll() is None, "driver ended before it could be killed"
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not (tune_dir / "leaderboard.csv").exists()
    stage_one = {p: p.read_text() for p in (tune_dir / "phase1").glob("*/result.json")}
    assert len(stage_one) == 3

    resumed = subprocess.run(
        [*args, "--resume"], env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {p: p.read_text() for p in (tune_dir / "phase1").glob("*/result.json")} == stage_one
    board = pd.read_csv(tune_dir / "leaderboard.csv")
    assert list(board["phase"]).count("stage2") == 3 and list(board["phase"]).count("stage1") == 3
    assert (board["status"] != "ERROR").all()
