"""Snapshot members (`ensemble --snapshots N`): each trained member runs N lr cycles and the
model at the end of each earlier cycle is published as a member of its own, at no extra
epochs; planned, described, trained on a real local Ray, and resumed."""

import shutil

import pandas as pd
import pytest
import torch
import yaml
from helpers import assert_user_error, run_cli

from ar_ray.config import ConfigError, RecipeConfig
from ar_ray.ensembling import EnsembleRequest, describe_members, plan_members
from ar_ray.errors import UserError
from ar_ray.leaderboard import TuneRecord
from ar_ray.members import (
    MemberSpec,
    TrainOptions,
    make_member_id,
    train_members,
    with_cycles,
    with_snapshots,
)
from ar_ray.recipe.checkpoint import load_checkpoint
from ar_ray.recipe.engine import fit

MEMBER_FILES = ["checkpoint.pt", "config.yaml", "metrics.csv"]


def _record(base):
    """A finished tune run's leaderboard: trial b ran two lr cycles, trial a one."""
    board = pd.DataFrame(
        {
            "rank": [1, 2],
            "trial_id": ["a", "b"],
            "val_top1": [0.8, 0.7],
            "status": ["COMPLETE", "COMPLETE"],
            "checkpoint": ["tune/a/checkpoint_000003", "tune/b/checkpoint_000003"],
            "lr": [0.002, 0.02],
            "lr_cycles": [1, 2],
        }
    )
    return TuneRecord(request={}, base=base, board=board)


def test_plan_adds_snapshots_of_the_members_that_train_and_the_line_says_they_are_free(
    tmp_path,
):
    record = _record(RecipeConfig(epochs=4, warmup_epochs=0.5))
    run = str(tmp_path)
    retrained = plan_members(EnsembleRequest(run=run, members=2, snapshots=2, retrain=True), record)
    parents = [s for s in retrained if not s.snapshot_of]
    assert [s.member_id for s in retrained] == [
        parents[0].member_id,
        f"{parents[0].member_id}-c1",
        parents[1].member_id,
        f"{parents[1].member_id}-c1",
    ]
    assert all(s.config.lr_cycles == 2 for s in retrained)
    assert [s.snapshot_epoch for s in retrained if s.snapshot_of] == [2, 2]
    assert (
        describe_members(retrained, run)
        == "members: 2 to train (8 epochs in all), 2 snapshots of them (no extra epochs)"
    )
    # a trial that ran the cycles is reused as the member, without snapshots (none were kept)
    specs = plan_members(EnsembleRequest(run=run, members=2, snapshots=2), record)
    assert [(s.trial_id, bool(s.reuse), bool(s.snapshot_of)) for s in specs] == [
        ("a", False, False),
        ("a", False, True),
        ("b", True, False),
    ]
    assert describe_members(specs, run) == (
        "members: 1 reused from finished tune trials, 1 to train (4 epochs in all), "
        "1 snapshots of them (no extra epochs)"
    )
    # another schedule is another member: ids hash the config, so --resume keeps them apart
    plain = plan_members(EnsembleRequest(run=run, members=2), record)
    assert [s.reuse for s in plain] == ["tune/a/checkpoint_000003", "tune/b/checkpoint_000003"]
    assert plain[0].member_id != specs[0].member_id
    assert plan_members(EnsembleRequest(run=run, members=2, snapshots=2), record) == specs


def test_impossible_snapshot_counts_name_the_flag():
    record = _record(RecipeConfig(epochs=4, warmup_epochs=0.5))
    with pytest.raises(ConfigError, match="--snapshots: lr_cycles.*lr_cycles=5 must be in"):
        plan_members(EnsembleRequest(run="r", members=1, snapshots=5), record)
    with pytest.raises(ConfigError, match="--snapshots.*warmup_epochs=1.0 must be shorter"):
        plan_members(
            EnsembleRequest(run="r", members=1, snapshots=4),
            _record(RecipeConfig(epochs=4, warmup_epochs=1.0)),
        )


def test_the_cli_flag_reaches_the_api(tmp_path):
    """`--snapshots` is checked by `api.ensemble` before anything is read: a flag the API
    did not take would be dropped silently and the missing run reported instead."""
    result = run_cli("ensemble", "--from", str(tmp_path / "none"), "--snapshots", "0")
    assert_user_error(result, "--snapshots=0 must be >= 1")


@pytest.fixture(scope="module")
def snapshot_run(ray_cluster, small_splits, module_tmp):
    """One member of 2 epochs in 2 cycles, trained through `train_members` on Ray."""
    tiny = small_splits.limit_per_class(3)
    config = RecipeConfig(epochs=2, batch_size=8, warmup_epochs=0.5, mixup_alpha=0.4, seed=4)
    plain = MemberSpec(make_member_id(0, "t0", config), config, "t0", 1, "test")
    specs = with_snapshots([with_cycles(0, plain, 2)])
    root = module_tmp
    options = TrainOptions(root=str(root))
    status = train_members(specs, tiny, options)
    return specs, tiny, root, options, status


def test_the_snapshot_is_the_model_at_the_end_of_cycle_one(snapshot_run):
    (parent, snapshot), tiny, root, _, status = snapshot_run
    assert snapshot.member_id == f"{parent.member_id}-c1" and snapshot.snapshot_epoch == 1
    assert status == {
        parent.member_id: "trained",
        snapshot.member_id: f"snapshot of {parent.member_id}",
    }
    folders = {s.member_id: root / "members" / s.member_id for s in (parent, snapshot)}
    assert set(MEMBER_FILES) <= {p.name for p in folders[parent.member_id].iterdir()}
    assert sorted(p.name for p in folders[snapshot.member_id].iterdir()) == MEMBER_FILES
    final, snap = (
        load_checkpoint(folders[s.member_id] / "checkpoint.pt") for s in (parent, snapshot)
    )
    assert final["epoch"] == 2 and snap["epoch"] == 1
    assert snap["history"] == final["history"][:1]  # the same run, stopped at cycle 1's end
    assert list(pd.read_csv(folders[snapshot.member_id] / "metrics.csv")["epoch"]) == [1]
    config = yaml.safe_load((folders[snapshot.member_id] / "config.yaml").read_text())
    assert config == parent.config.to_dict() and config["lr_cycles"] == 2
    assert any(not torch.equal(v, final["model"][k]) for k, v in snap["model"].items())
    # the model this config has after its first epoch, trained here without Ray on one
    # thread as the 1-CPU worker (float sums over other thread counts differ in the last bit)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = fit(parent.config, tiny, until_epoch=1).state["model"]
    finally:
        torch.set_num_threads(threads)
    for key, value in local.items():
        assert torch.equal(snap["model"][key], value), key
    assert snap["history"][0]["lr"] == pytest.approx(parent.config.lr)  # restarted after it


def test_resume_counts_a_published_snapshot_as_done_and_a_lost_one_is_an_error(snapshot_run):
    specs, tiny, root, options, _ = snapshot_run
    assert train_members(specs, tiny, options) == {s.member_id: "reused" for s in specs}
    assert describe_members(specs, str(root)) == (
        "members: 2 finished in an earlier run, 0 to train (0 epochs in all)"
    )
    lost = root / "members" / specs[1].member_id
    shutil.rmtree(lost)
    with pytest.raises(
        UserError, match=f"{specs[1].member_id} is missing but {specs[0].member_id}"
    ):
        train_members(specs, tiny, options)
