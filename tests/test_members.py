"""Member selection: strong first, then different; a member keeps its trial's seed (so the
trial can be the member) and a repeat of a trial gets its own."""

import pandas as pd
import pytest

from ar_ray.config import RecipeConfig
from ar_ray.errors import UserError
from ar_ray.members import make_member_id, select_members


def _board():
    rows = [  # rank 2 is a near copy of rank 1; rank 3 differs in every hyperparameter
        ("a", 0.80, 0.10, 1.0, "none"),
        ("b", 0.79, 0.11, 1.1, "none"),
        ("c", 0.70, 0.50, 0.2, "trivialaugment"),
        ("d", 0.60, 0.30, 0.6, "none"),
        ("e", None, 0.20, 0.4, "none"),
    ]
    board = pd.DataFrame(rows, columns=["trial_id", "val_top1", "cr_weight", "lr", "policy"])
    board.insert(0, "rank", range(1, 6))
    board["status"] = ["COMPLETE"] * 4 + ["ERROR"]
    return board


def test_picks_the_best_then_skips_near_copies():
    members = select_members(_board(), RecipeConfig(epochs=3), count=2)
    assert [m.trial_id for m in members] == ["a", "c"]
    assert members[1].config.policy == "trivialaugment" and members[1].config.epochs == 3
    assert "distance" in members[1].reason and "best" in members[0].reason
    assert [m.config.seed for m in members] == [0, 0]  # the trials' seed: reusable
    retrained = select_members(_board(), RecipeConfig(epochs=3), 2, seed=4, keep_trial_seeds=False)
    assert [m.config.seed for m in retrained] == [4, 5]  # --retrain: each its own


def test_tops_up_by_rank_when_few_configs_are_far_apart():
    members = select_members(_board(), RecipeConfig(), count=4)
    assert [m.trial_id for m in members] == ["a", "c", "d", "b"]
    assert "topped up" in members[-1].reason


def test_archs_spread_members_over_backbones_even_beyond_the_trials():
    members = select_members(_board(), RecipeConfig(), count=6, archs=["resnet18", "resnet34"])
    assert [m.config.arch for m in members] == ["resnet18", "resnet34"] * 3
    assert len({m.member_id for m in members}) == 6
    # the four trials first keep their seed 0; the two picked again get seeds 4 and 5
    assert [m.config.seed for m in members] == [0, 0, 0, 0, 4, 5]


@pytest.mark.parametrize("count, message", [(0, "--members=0"), (5, "has 4 finished")])
def test_impossible_member_counts_are_user_errors(count, message):
    with pytest.raises(UserError, match=message):
        select_members(_board(), RecipeConfig(), count=count)


def test_member_id_covers_the_whole_config_epochs_and_seed_included():
    short, again = (select_members(_board(), RecipeConfig(epochs=3), count=2) for _ in range(2))
    longer = select_members(_board(), RecipeConfig(epochs=4), count=2)
    other_seed = select_members(_board(), RecipeConfig(epochs=3, seed=7), count=2)
    assert [m.member_id for m in short] == [m.member_id for m in again]  # stable: --resume
    assert short[0].member_id.startswith("m1-resnet18-a-s0-")
    for changed in (longer, other_seed):
        assert not {m.member_id for m in short} & {m.member_id for m in changed}
    assert make_member_id(0, "a", RecipeConfig(epochs=3)) != make_member_id(
        0, "a", RecipeConfig(epochs=3, lr=0.2)
    )
