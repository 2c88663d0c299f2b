"""Tune trials shown as members are: one row per trial, one line per epoch in logs.

Tune's own reporter prints a config box when a trial starts and a 20-line result box for
every epoch of every trial; a 16-trial search buries everything else. ar-ray runs Tune with
its reporter silent (unless `--verbose`) and shows trials through `progress.MemberView`, the
view members use, fed from a Tune callback in the driver: the results already arrive there,
so no queue or actor is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray import tune

from ar_ray.progress import EpochUpdate, MemberView

ASHA_STOPPED = "stopped by ASHA"


class TrialProgress(tune.Callback):
    """Feeds each trial's epoch results to a `MemberView` and marks trials that end early.

    Tune pickles its callbacks into the experiment (`tuner.pkl`) and a resumed run brings
    them back, so the view (which holds the console stream) is made in `setup`, never
    pickled.

    `hours_line(epoch_seconds)` is the search plan priced at a measured epoch time
    (`SearchPlan.hours_line`): shown once, at the first epoch any trial reports.
    """

    def __init__(self, total_epochs: int, hours_line: Callable[[float], str] | None = None) -> None:
        self.total_epochs = total_epochs
        self.hours_line = hours_line
        self._view: MemberView | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_view": None}

    def setup(self, **info: Any) -> None:
        self._view = MemberView(kind="trial")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info):
        if self._view is None or "epoch" not in result:
            return
        node = str(result.get("node", ""))
        self._view.add(EpochUpdate.from_metrics(_row(trial), self.total_epochs, node, result))
        if self.hours_line is not None and "epoch_seconds" in result:
            self._view.note(self.hours_line(float(result["epoch_seconds"])))
            self.hours_line = None  # once: later epochs only refine what was said

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self._view is not None:  # a trial at its last epoch is already shown as done
            self._view.end(_row(trial), ASHA_STOPPED)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self._view is not None:
            self._view.end(_row(trial), "failed")

    def on_step(self, iteration: int, trials: list, **info: Any) -> None:
        if self._view is not None:  # a terminal's ETAs move between epochs
            self._view.refresh()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._view is not None:
            self._view.refresh(force=True)


def _row(trial: Any) -> str:
    """A trial's name in the view: its id as the leaderboard shows it."""
    return f"trial {trial.trial_id}"
