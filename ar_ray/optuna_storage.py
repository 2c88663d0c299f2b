"""`tune --optuna-storage URL`: the search's Optuna study in a database that outlives it.

Without it the study lives only in memory, inside Ray's `OptunaSearch`. With a
`sqlite:///...` or `postgresql://...` URL, each phase's study is an `RDBStorage` study
named after the run, which `optuna-dashboard URL` opens while the search runs and after:
each trial's sampled config, per-epoch values and final state (COMPLETE, PRUNED for an
ASHA-stopped trial, FAIL), and the Ray trial it ran as.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import optuna

from ar_ray.errors import UserError, first_line
from ar_ray.leaderboard import TUNE_DIR

SCHEMES = ("sqlite", "postgresql", "mysql")
RAY_TRIAL_ID = "ray_trial_id"  # the user attribute that names a study trial's Ray trial


def shown(url: str) -> str:
    """`url` with any password hidden: what messages and the dashboard hint print."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def check_url(url: str) -> str:
    """A database URL Optuna can store studies in, checked by opening it (which creates
    SQLite's file and Optuna's tables), before Ray starts: a typo fails in a second."""
    scheme = urlsplit(url).scheme.split("+")[0]
    if scheme not in SCHEMES:
        raise UserError(
            f"--optuna-storage {shown(url)}: not a database URL; use sqlite:///PATH.db or "
            "postgresql://USER@HOST/DB"
        )
    try:
        optuna.storages.RDBStorage(url)
    except Exception as error:  # SQLAlchemy's and the drivers' errors have no common base
        raise UserError(
            f"--optuna-storage {shown(url)}: cannot open ({first_line(error)})"
        ) from None
    return url


def study_name(run_name: str, phase_folder: str) -> str:
    """The run's name; in a two-phase search, with the phase's folder (each phase samples
    other keys, so each is a study of its own)."""
    phase = phase_folder.rstrip("/").rsplit("/", 1)[-1]
    return run_name if phase == TUNE_DIR else f"{run_name}/{phase}"


def study_states(url: str, name: str) -> dict[str, str]:
    """Each Ray trial's state as the stored study holds it, through Optuna's public API."""
    try:
        study = optuna.load_study(study_name=name, storage=url)
    except KeyError:  # no such study: the phase never started
        return {}
    return {
        trial.user_attrs[RAY_TRIAL_ID]: trial.state.name
        for trial in study.get_trials(deepcopy=False)
        if RAY_TRIAL_ID in trial.user_attrs
    }
