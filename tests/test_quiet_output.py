"""What a person sees: ar-ray's trial, member and inference lines, not Ray's routine chatter;
`--verbose` gives Ray's output back."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from helpers import run_cli

pytestmark = pytest.mark.ray

QUICK = str(Path(__file__).parent.parent / "search_spaces" / "quick.yaml")
SMALL = ("--epochs", "2", "--limit-per-class", "10")
HIDDEN = [
    "started with configuration",  # Tune's config box, one per trial
    "Trial run_trial_",  # Tune's result boxes and status rows
    "Checkpoint successfully created",  # one per report, from every trial and member
    "PreemptionWatcher",  # core_worker's constructor-argument error, from Train
    "Requesting resources",  # the Train controller's start-up notices
    "Started training worker group",
    "A new study created",  # Optuna
]


@pytest.fixture(scope="module")
def quiet_runs(module_tmp):
    storage = module_tmp
    where = ("--storage", str(storage), "--name", "q")
    tuned = run_cli("tune", "--space", QUICK, "--trials", "3", *SMALL, *where)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    run = storage / "q"
    # --retrain: at the trials' epochs, members would be the finished trials, untrained
    ensembled = run_cli(
        "ensemble", "--from", str(run), "--members", "2", "--epochs", "2", "--retrain"
    )
    assert ensembled.returncode == 0, ensembled.stderr[-3000:]
    return run, tuned, ensembled


def test_tune_shows_a_line_per_trial_epoch_and_none_of_rays_chatter(quiet_runs):
    run, tuned, _ = quiet_runs
    board = pd.read_csv(run / "tune" / "leaderboard.csv")
    for row in board.itertuples():  # each epoch a trial reported, its score as recorded
        last = f"trial {row.trial_id}  epoch {row.epochs_run}/2  val top-1 {row.val_top1:.4f}"
        assert last in tuned.stdout, last
    stopped = board[board["status"] == "STOPPED_EARLY"]
    for trial_id in stopped["trial_id"]:
        assert re.search(rf"trial {trial_id}  epoch 1/2 .* stopped by ASHA", tuned.stdout)
    assert "leaderboard:" in tuned.stdout
    output = tuned.stdout + tuned.stderr
    assert [line for line in HIDDEN if line in output] == []


def test_ensemble_shows_members_and_inference_and_none_of_rays_chatter(quiet_runs):
    run, _, ensembled = quiet_runs
    members = pd.read_csv(run / "ensemble" / "members.csv")
    assert "members: 2 to train (4 epochs in all)" in ensembled.stdout  # the plan, first
    for member in members["member"]:
        assert re.search(rf"^{member}  epoch 2/2  val top-1 .* ETA done$", ensembled.stdout, re.M)
    assert re.search(r"^scored (\d+)/\1 images \(100%\)", ensembled.stdout, re.M)
    output = ensembled.stdout + ensembled.stderr
    assert [line for line in HIDDEN if line in output] == []


def test_verbose_gives_rays_output_back(tmp_path):
    where = ("--storage", str(tmp_path), "--name", "v")
    tuned = run_cli("tune", "--space", QUICK, "--trials", "1", *SMALL, *where, "--verbose")
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert "started with configuration" in tuned.stdout  # Tune's own reporter is back
    assert re.search(r"trial \w+  epoch 2/2  val top-1", tuned.stdout)  # and ar-ray's lines
