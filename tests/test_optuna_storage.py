"""`tune --optuna-storage`: the search's Optuna study in a real database, read back through
Optuna's public API (what optuna-dashboard reads), never through Ray's searcher."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
import pytest

from ar_ray.errors import UserError
from ar_ray.optuna_storage import RAY_TRIAL_ID, check_url, shown, study_name
from ar_ray.search import run_tune
from ar_ray.search_space import load_search_space
from ar_ray.tune_request import TuneRequest
from tests.postgres_server import postgres_server

QUICK = Path(__file__).parent.parent / "search_spaces" / "quick.yaml"


def test_a_url_that_is_not_a_database_or_cannot_open_is_one_line(tmp_path):
    with pytest.raises(UserError, match="not a database URL"):
        check_url(str(tmp_path / "study.db"))
    with pytest.raises(UserError, match="cannot open"):
        check_url(f"sqlite:///{tmp_path}/missing/folder/study.db")
    with pytest.raises(UserError, match=r"postgresql://ar:\*\*\*@127.0.0.1:1/db: cannot open"):
        check_url("postgresql://ar:secret@127.0.0.1:1/db")
    url = f"sqlite:///{tmp_path}/study.db"
    assert check_url(url) == url and (tmp_path / "study.db").is_file()


def test_passwords_are_hidden_and_studies_named_after_the_run():
    assert shown("postgresql://ar:pw@db:5432/x") == "postgresql://ar:***@db:5432/x"
    assert shown("sqlite:///a.db") == "sqlite:///a.db"
    assert study_name("vip", "s3://b/ar-ray/vip/tune") == "vip"
    assert study_name("vip", "s3://b/ar-ray/vip/tune/phase2/") == "vip/phase2"


@pytest.fixture(scope="module")
def postgres_url():
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/study.db"
    return request.getfixturevalue("postgres_url")


def test_the_stored_study_records_every_trial_its_epochs_and_asha_stops(
    ray_cluster, small_splits, tmp_path, database
):
    """4 trials of 2 epochs, ASHA's rung at epoch 1 with reduction factor 2: some trials stop
    there. The study, in SQLite or on a PostgreSQL server, holds one trial per Ray trial,
    each epoch's value, PRUNED for the stopped and COMPLETE for the finished, as the
    leaderboard says."""
    url = database
    request = TuneRequest(
        space=str(QUICK), trials=4, epochs=2, storage=str(tmp_path), name="t",
        reduction_factor=2, optuna_storage=url,
    )  # fmt: skip
    run_tune(request, load_search_space(QUICK), small_splits)
    board = pd.read_csv(tmp_path / "t" / "tune" / "leaderboard.csv")
    study = optuna.load_study(study_name="t", storage=url)
    trials = {trial.user_attrs[RAY_TRIAL_ID]: trial for trial in study.trials}
    assert sorted(trials) == sorted(board["trial_id"])
    for row in board.itertuples():
        trial = trials[row.trial_id]
        assert trial.state.name == row.optuna_state
        assert trial.state.name == ("COMPLETE" if row.epochs_run == 2 else "PRUNED")
        assert sorted(trial.intermediate_values) == list(range(1, row.epochs_run + 1))
        assert trial.params["sce_alpha"] == pytest.approx(row.sce_alpha)
    assert set(board["optuna_state"]) == {"COMPLETE", "PRUNED"}
