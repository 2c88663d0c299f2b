"""The tune run's record: the leaderboard's format, its best configs, and reading it back.

`ensemble` and every later reader of a tune run depend on this module, never on the search
itself (`ar_ray.search`), so reading a leaderboard does not import Ray Tune or Optuna.
"""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
import yaml

from ar_ray import storage
from ar_ray.config import RecipeConfig, hyperparameter_types
from ar_ray.errors import UserError
from ar_ray.resources import Resources
from ar_ray.search_space import SearchSpace

TUNE_DIR = "tune"
LEADERBOARD = "leaderboard.csv"
BEST_CONFIGS = "best_configs.yaml"
MAX_BEST_CONFIGS = 20


STAGE_ONE = "stage1"
"""The phase of a staged search's first trials: cut at Mean Teacher's start, so their score
is a stage-one score and their config not a finished run; never a member."""
STAGE_TWO = "stage2"  # the trials that resumed them at the cut: finished runs


def _status(result: Any, epochs_run: int, full_epochs: int) -> str:
    if result.error is not None:
        return "ERROR"
    return "COMPLETE" if epochs_run >= full_epochs else "STOPPED_EARLY"


@dataclass(frozen=True)
class PhaseRecord:
    """How to read one Tune experiment of a search into leaderboard rows.

    `epochs` is what a trial runs in the phase, after `start` epochs it resumed from;
    `parents` maps a stage-two trial's `stage1_trial` to the stage-one trial's sampled
    values, which its row repeats so that the row is a complete config."""

    phase: str = "search"
    folder: str = TUNE_DIR  # the experiment, relative to the run: where checkpoints lie
    epochs: int = 0
    start: int = 0
    first_rung: int | None = None
    optuna_states: dict[str, str] | None = None
    parents: dict[str, dict[str, Any]] | None = None


def trial_rows(grid: Iterable[Any], keys: Iterable[str], record: PhaseRecord) -> list[dict]:
    """One row per trial of a Tune `ResultGrid` that ran; `optuna_state` is what the Optuna
    study recorded for it, `first_rung` the earliest epoch of the phase ASHA could stop it
    at, `epochs_run` the epochs it ran in the phase."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        epochs_run = int(metrics.get("epoch", record.start)) - record.start
        if epochs_run <= 0 and result.error is None:
            continue  # never started: a search stopped by its time budget had it queued
        trial_id = metrics.get("trial_id") or Path(result.path).name
        config = dict(result.config or {})  # None for a trial that never started
        parent = config.pop("stage1_trial", "")
        config = {**(record.parents or {}).get(parent, {}), **config}
        row = {
            "trial_id": trial_id,
            "phase": record.phase,
            "stage1_trial": parent,
            "status": _status(result, epochs_run, record.epochs),
            "optuna_state": (record.optuna_states or {}).get(trial_id, ""),
            "epochs_run": epochs_run,
            "first_rung": record.first_rung,
            "val_top1": metrics.get("val_top1", math.nan),
            "val_nll": metrics.get("val_nll", math.nan),
        }
        row.update({key: config.get(key) for key in keys})
        row["wall_seconds"] = metrics.get("time_total_s", math.nan)
        row["checkpoint"] = checkpoint_dir(result, record.folder)
        for label in ("node", "cpus", "gpus"):  # where the trial ran and what it held
            row[label] = metrics.get(label, "")
        rows.append(row)
    return rows


def checkpoint_dir(result: Any, folder: str) -> str:
    """The trial's last checkpoint folder, relative to the run (a run moved to another
    place or bucket keeps it): a finished trial's is its final model, which `ensemble`
    reuses as a member."""
    if result.checkpoint is None:
        return ""
    trial, checkpoint = (PurePosixPath(p).name for p in (result.path, result.checkpoint.path))
    return f"{folder}/{trial}/{checkpoint}"


def ranked(rows: list[dict]) -> pd.DataFrame:
    """The leaderboard: finished runs best validation top-1 first, then a staged search's
    stage-one trials (their scores are from before Mean Teacher, not comparable)."""
    board = pd.DataFrame(rows)
    board["_stage_one"] = board["phase"] == STAGE_ONE
    board = board.sort_values(
        ["_stage_one", "val_top1"], ascending=[True, False], na_position="last", kind="stable"
    ).drop(columns="_stage_one")
    board.insert(0, "rank", range(1, len(board) + 1))
    return board.reset_index(drop=True)


def leaderboard(
    grid: Iterable[Any],
    space: SearchSpace,
    full_epochs: int,
    first_rung: int | None = None,
    optuna_states: dict[str, str] | None = None,
) -> pd.DataFrame:
    """The leaderboard of a one-phase search."""
    record = PhaseRecord(epochs=full_epochs, first_rung=first_rung, optuna_states=optuna_states)
    return ranked(trial_rows(grid, space.searched, record))


def finished_trials(board: pd.DataFrame) -> pd.DataFrame:
    """Trials with a score that ran whole configs, best first: the ones worth re-running as
    members (a leaderboard from before staged searches has no `phase`)."""
    kept = board[board["status"] != "ERROR"].dropna(subset=["val_top1"])
    if "phase" in kept:
        kept = kept[kept["phase"] != STAGE_ONE]
    return kept.reset_index(drop=True)


def searched_columns(board: pd.DataFrame) -> list[str]:
    return [column for column in board.columns if column in hyperparameter_types()]


def config_for_row(base: RecipeConfig, row: dict[str, Any], searched: list[str]) -> RecipeConfig:
    """A leaderboard row back to the complete run config its trial ran."""
    return base.replace(**{key: _plain(row[key]) for key in searched})


def best_configs_yaml(board: pd.DataFrame, space: SearchSpace, base: RecipeConfig) -> str:
    """The ranked trials as complete run configs; `ar-ray train --config` takes any of them."""
    chunks = []
    for row in finished_trials(board).head(MAX_BEST_CONFIGS).to_dict("records"):
        config = config_for_row(base, row, list(space.searched))
        header = (
            f"# rank {row['rank']}: trial {row['trial_id']}, {row['status']} after "
            f"{row['epochs_run']} epochs, val top-1 {row['val_top1']:.4f}\n"
        )
        chunks.append(header + yaml.safe_dump([config.to_dict()], sort_keys=False))
    return "".join(chunks)


@dataclass
class TuneRecord:
    """What `ar-ray ensemble` needs from a finished tune run."""

    request: dict[str, Any]
    base: RecipeConfig
    board: pd.DataFrame

    @property
    def data(self) -> str | None:
        """Where the trials' images came from, absolute (`ensemble` may run from another
        folder); runs recorded before `data_resolved` existed only have the form given."""
        return self.request.get("data_resolved") or self.request.get("data")

    @property
    def skip_bad_images(self) -> bool:
        return bool(self.request.get("skip_bad_images", False))

    @property
    def limit_per_class(self) -> int | None:
        return self.request.get("limit_per_class")

    @property
    def trial_resources(self) -> Resources:
        """What each trial held: `ensemble` inherits it for its members' workers."""
        return Resources.from_record(self.request, "cpus_per_trial", "gpus_per_trial")


def load_tune_record(run: str) -> TuneRecord:
    """Read `<run>/tune/` back; a missing or unfinished experiment is a one-line error."""
    folder = storage.join(storage.resolve(run), TUNE_DIR)
    if not storage.exists(storage.join(folder, LEADERBOARD)):
        raise UserError(f"{folder}: no {LEADERBOARD}; run `ar-ray tune` first (or --resume it)")
    record = yaml.safe_load(storage.read_text(storage.join(folder, "request.yaml")))
    board = pd.read_csv(io.StringIO(storage.read_text(storage.join(folder, LEADERBOARD))))
    base = RecipeConfig.from_dict(record["base_config"], source=f"{folder}/request.yaml")
    return TuneRecord(request=record["request"], base=base, board=board)


def _plain(value: Any) -> Any:
    """numpy scalars from pandas back to Python ones for YAML and the config types."""
    return value.item() if hasattr(value, "item") else value


def print_leaderboard(board: pd.DataFrame, space: SearchSpace, rows: int = 10) -> None:
    staged = "phase" in board and (board["phase"] == STAGE_ONE).any()
    columns = ["rank", "trial_id", *(["phase"] if staged else []), "status", "epochs_run"]
    columns += ["val_top1", "val_nll"]
    columns += list(space.searched)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(board[columns].head(rows).to_string(index=False, float_format="%.4g"))
    sys.stdout.flush()
