"""Optuna's TPE under ASHA: what it is told about stopped trials, and reading back what
it recorded.
"""

from __future__ import annotations

import fnmatch
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch

from ar_ray import storage
from ar_ray.optuna_storage import RAY_TRIAL_ID


class EarlyStopAwareOptunaSearch(OptunaSearch):
    """Tells Optuna that ASHA-stopped trials were PRUNED rather than COMPLETE.

    Ray hands a stopped trial's last (early-epoch) score to Optuna as a finished result, so
    TPE would rank a 1-epoch score against 8-epoch scores. Dropping the final value makes
    Ray report PRUNED; TPE then orders pruned trials by their per-epoch values (which
    OptunaSearch already reports), below every trial that ran to the end.
    """

    def __init__(self, *args: Any, full_epochs: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.full_epochs = full_epochs

    def suggest(self, trial_id: str) -> dict | None:
        """Ray's suggestion, with the Ray trial id recorded on the study's trial, so a
        stored study says which Ray trial each of its trials ran as."""
        config = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr(RAY_TRIAL_ID, trial_id)
        return config

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        """The last epoch's value becomes an intermediate value too (Ray hands the final
        result to this method only, so a study's curves would end an epoch early), then
        ASHA-stopped trials go to Optuna without a final value: PRUNED."""
        if result and not error and self.metric in result and trial_id in self._ot_trials:
            self._ot_trials[trial_id].report(result[self.metric], result[TRAINING_ITERATION])
        if result and not error and result.get("epoch", 0) < self.full_epochs:
            result = {key: value for key, value in result.items() if key != self.metric}
        super().on_trial_complete(trial_id, result, error)


SEARCHER_STATE = OptunaSearch.CKPT_FILE_TMPL.format("*")


def optuna_states(path: str) -> dict[str, str]:
    """Each Ray trial's state as the Optuna study holds it (COMPLETE, PRUNED, FAIL), read
    back from the searcher state Tune saved in the experiment: what TPE really learned from,
    not what we meant to tell it. OptunaSearch keeps the study and Ray's trial ids only in
    its private attributes; this is the one place that reads them."""
    fs, folder = storage.filesystem(path)
    names = [
        info.base_name
        for info in fs.get_file_info(pyarrow.fs.FileSelector(folder))
        if fnmatch.fnmatch(info.base_name, SEARCHER_STATE)
    ]
    if not names:
        return {}
    searcher = OptunaSearch()
    with tempfile.TemporaryDirectory() as local:
        newest = max(names)  # session names are timestamps
        searcher.restore(
            str(storage.download_file(storage.join(path, newest), Path(local, newest)))
        )
    study = searcher._ot_study.trials
    return {
        trial_id: study[trial.number].state.name for trial_id, trial in searcher._ot_trials.items()
    }
