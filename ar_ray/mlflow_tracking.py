"""`--track mlflow`: a run folder's trials, members, ensemble and student in MLflow.

One MLflow experiment per run folder (named by its resolved path or URI), so a tune run,
the members and ensemble built from it and their distilled student sit side by side:

- a run per trial, logged by a Tune callback on the driver (`TrialRuns`);
- a run per member and for the student, opened by the driver and fed each epoch by the
  Train worker of rank 0 (`EpochMetrics`), since Train V2 takes no Tune callbacks;
- a parent run for the ensemble, holding its members' runs, its metrics and its outputs
  (metrics table, weights, report and its plots) as artifacts.

Each run is tagged with what it is (`ar_ray.key`: `trial/<id>`, `member/<id>`, `ensemble`,
`distilled/<name>`), so a resumed command finds and continues its runs. The server is
checked once, before Ray starts: a wrong URI fails in seconds. Later, tracking is never
worth a run: a failed call (the server went down) prints a warning and the work goes on.

Calls go through `MlflowClient` with batched writes, not Ray's `MLflowLoggerCallback`,
which sends two requests per metric of every result and, when its run is missing, writes
into whatever fluent run the process holds.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from ray import tune

from ar_ray.errors import Interrupted, UserError, first_line
from ar_ray.extras import require_extra

if TYPE_CHECKING:
    from mlflow import MlflowClient

TRACKERS = ("mlflow",)
# a run's outputs that go to MLflow; the probabilities (.npz, GBs at full size) stay behind
ARTIFACT_SUFFIXES = (".csv", ".md", ".png", ".yaml")
URI_VARIABLE = "MLFLOW_TRACKING_URI"
KEY_TAG = "ar_ray.key"  # what a run is within its run folder, so a resumed command finds it
KIND_TAG = "ar_ray.kind"  # trial, member, ensemble, distilled
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests a member under its ensemble
# a failed request costs seconds, not MLflow's default of 7 retries backing off to minutes,
# and the client prints no "View run" line per run; a user's own settings win
QUICK_CLIENT = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


# how the driver reaches the server (auth, TLS), which a Train worker on another node, or
# started before the driver set them, does not have
CONNECTION_VARIABLES = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
)


@dataclass(frozen=True)
class Tracking:
    """Where a command's runs go: the tracking server and the run folder's experiment, and
    the driver's CONNECTION_VARIABLES, which travel with it to the Train workers (never
    printed: a password may be among them)."""

    uri: str
    experiment_id: str
    connection: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def client(self) -> MlflowClient:
        for variable, value in (*QUICK_CLIENT.items(), *self.connection):
            os.environ.setdefault(variable, value)
        from mlflow import MlflowClient

        return MlflowClient(self.uri)


def _described(error: BaseException) -> str:
    """The error's type and the first 200 characters of its first line."""
    line, name = first_line(error)[:200], type(error).__name__
    return name if line == name else f"{name}: {line}"


def tracking_uri(track: str | None, uri: str | None) -> str | None:
    """The server a command tracks to (`--tracking-uri`, else MLFLOW_TRACKING_URI), or None
    without `--track`; checked before anything starts: a missing extra or URI is one line."""
    if track is None:
        if uri is not None:
            raise UserError(f"--tracking-uri {uri} needs --track mlflow")
        return None
    if track not in TRACKERS:
        raise UserError(f"--track {track}: not a tracker; use --track mlflow")
    require_extra("mlflow")
    uri = uri or os.environ.get(URI_VARIABLE)
    if not uri:
        raise UserError(f"--track mlflow needs --tracking-uri URI or {URI_VARIABLE}")
    return uri


def open_experiment(uri: str, run_root: str) -> Tracking:
    """The run folder's experiment on the server, created the first time; before Ray starts,
    so a wrong URI or a server that is down fails in seconds, in one line."""
    connection = tuple(
        (name, os.environ[name]) for name in CONNECTION_VARIABLES if name in os.environ
    )
    try:
        client = Tracking(uri, "", connection).client()
        experiment = client.get_experiment_by_name(run_root)
        if experiment is None:
            return Tracking(uri, client.create_experiment(run_root), connection)
    except Exception as error:  # any failure to reach or use the server, told in one line
        raise UserError(
            f"--tracking-uri {uri}: no MLflow server answered: {_described(error)}"
        ) from None
    if experiment.lifecycle_stage == "deleted":
        raise UserError(f"--tracking-uri {uri}: experiment {run_root} was deleted; restore it")
    return Tracking(uri, experiment.experiment_id, connection)


def start_tracking(track: str | None, uri: str | None, run_root: str) -> Tracking | None:
    """`tracking_uri`, then `open_experiment`: a command's tracking, or None without it."""
    resolved = tracking_uri(track, uri)
    return None if resolved is None else open_experiment(resolved, run_root)


@contextmanager
def tolerated(what: str) -> Iterator[None]:
    """A tracking call that may fail: a warning on stderr, and the work goes on."""
    try:
        yield
    except Exception as error:  # tracking is never worth a run
        print(f"warning: MLflow {what} failed; the run goes on: {_described(error)}",
              file=sys.stderr, flush=True)  # fmt: skip


def _metrics(values: Mapping[str, Any], step: int) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [
        Metric(key, float(value), now, step)
        for key, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]


def _params(values: Mapping[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(key, str(value)[:6000]) for key, value in sorted(values.items())]


def _log_batch(client: MlflowClient, run_id: str, metrics: list = (), params: list = ()) -> None:
    """Requests of at most 100 of each: MLflow's limit for params (1,000 for metrics)."""
    for start in range(0, max(len(metrics), len(params)), 100):
        client.log_batch(
            run_id, metrics=metrics[start : start + 100], params=params[start : start + 100]
        )


def find_run(tracking: Tracking, key: str, parent: str | None = None) -> str | None:
    """The newest run tagged `key` (under `parent`, if given): what a resumed command continues."""
    query = f"tags.`{KEY_TAG}` = '{key}'"
    if parent is not None:
        query += f" and tags.`{PARENT_TAG}` = '{parent}'"
    runs = tracking.client().search_runs(
        [tracking.experiment_id], query, max_results=1, order_by=["attributes.start_time DESC"]
    )
    return runs[0].info.run_id if runs else None


def open_run(
    tracking: Tracking,
    key: str,
    name: str,
    *,
    kind: str,
    params: Mapping[str, Any] = {},
    tags: Mapping[str, str] = {},
    parent: str | None = None,
    resume: bool = False,
) -> str | None:
    """A run for `key` with `params` and `tags` (the one a resumed command left, running
    again); None where the server failed, which the caller's later calls then skip."""
    with tolerated(f"run {name}"):
        client = tracking.client()
        run_id = find_run(tracking, key, parent) if resume else None
        if run_id is None:
            all_tags = {KEY_TAG: key, KIND_TAG: kind, **tags}
            if parent is not None:
                all_tags[PARENT_TAG] = parent
            run_id = client.create_run(tracking.experiment_id, run_name=name, tags=all_tags)
            run_id = run_id.info.run_id
            _log_batch(client, run_id, params=_params(params))
        else:
            client.update_run(run_id, status="RUNNING")
        return run_id
    return None


def log_metrics(tracking: Tracking, run_id: str | None, values: Mapping[str, Any], step: int):
    """`values`' numbers at `step` (an epoch), in as few requests as MLflow allows."""
    if run_id is not None:
        with tolerated(f"metrics of run {run_id}"):
            _log_batch(tracking.client(), run_id, metrics=_metrics(values, step))


def log_history(tracking: Tracking, run_id: str | None, history: Sequence[Mapping[str, Any]]):
    """A finished fit's epochs (metrics.csv rows), each at its `epoch`."""
    rows = [_metrics(row, int(row["epoch"])) for row in history]
    if run_id is not None:
        with tolerated(f"history of run {run_id}"):
            _log_batch(tracking.client(), run_id, metrics=[m for row in rows for m in row])


def log_table(tracking: Tracking, run_id: str | None, frame: pd.DataFrame) -> None:
    """metrics.csv rows (ensemble's, distill's) as `<split>_<name>_<column>` at step 0."""
    named = {
        f"{row['split']}_{row['name']}_{column}": value
        for row in frame.to_dict("records")
        for column, value in row.items()
        if column not in ("split", "name")
    }
    log_metrics(tracking, run_id, named, step=0)


def log_files(tracking: Tracking, run_id: str | None, files: Sequence[Path]) -> None:
    if run_id is not None:
        with tolerated(f"artifacts of run {run_id}"):
            client = tracking.client()
            for path in files:
                client.log_artifact(run_id, str(path))


def close_run(tracking: Tracking, run_id: str | None, status: str = "FINISHED") -> None:
    """End the run as `status`: FINISHED, FAILED or KILLED."""
    if run_id is not None:
        with tolerated(f"end of run {run_id}"):
            tracking.client().set_terminated(run_id, status)


def record_fit(
    tracking: Tracking,
    key: str,
    name: str,
    history: Sequence[Mapping[str, Any]],
    *,
    parent: str,
    **run: Any,
) -> None:
    """A fit that ran untracked (a reused trial, a snapshot) as a finished run with its
    epochs, unless `parent` already holds one for `key`."""
    with tolerated(f"run {name}"):
        if find_run(tracking, key, parent) is not None:
            return
        run_id = open_run(tracking, key, name, parent=parent, **run)
        log_history(tracking, run_id, history)
        close_run(tracking, run_id)


@contextmanager
def tracked_run(tracking: Tracking | None, key: str, name: str, **run: Any) -> Iterator[str | None]:
    """`open_run` for a block: FINISHED when it ends, FAILED when it raises (and the error
    goes on), KILLED on Ctrl+C or SIGTERM. Yields None without tracking."""
    if tracking is None:
        yield None
        return
    run_id = open_run(tracking, key, name, **run)
    try:
        yield run_id
    except (KeyboardInterrupt, Interrupted):
        close_run(tracking, run_id, "KILLED")
        raise
    except BaseException:
        close_run(tracking, run_id, "FAILED")
        raise
    close_run(tracking, run_id)


class EpochMetrics:
    """`after_epoch` for a Train worker of rank 0: each epoch's metrics into the run the
    driver opened, and the node on its first epoch (a retried worker, which builds a new
    one, may land elsewhere)."""

    def __init__(self, tracking: Tracking, run_id: str) -> None:
        self.tracking, self.run_id, self.tagged = tracking, run_id, False

    def __call__(self, metrics: Mapping[str, Any]) -> None:
        if not self.tagged:
            self.tagged = True
            tag_node(self.tracking, self.run_id, metrics)
        log_metrics(self.tracking, self.run_id, metrics, int(metrics["epoch"]))


def tag_node(tracking: Tracking, run_id: str, metrics: Mapping[str, Any]) -> None:
    """The Ray node a fit runs on, as its metrics (and metrics.csv, the leaderboard) name it."""
    with tolerated(f"node of run {run_id}"):
        tracking.client().set_tag(run_id, "node", str(metrics.get("node", "")))


class TrialRuns(tune.Callback):
    """A run per Tune trial: its resolved config (`resolve(trial.config)`) and resources when
    it starts, each result's numbers at its epoch, and its end as FINISHED (ASHA-stopped
    ones too) or FAILED. It finds the experiment when the search starts (a server that is
    down then is a warning) and each trial's run by its Ray id, so a resumed search
    continues its runs."""

    def __init__(
        self,
        uri: str,
        run_root: str,
        resolve: Callable[[dict[str, Any]], dict[str, Any]],
        phase: str,
    ) -> None:
        self.uri, self.run_root, self.resolve, self.phase = uri, run_root, resolve, phase
        self.tracking: Tracking | None = None
        self.runs: dict[str, str | None] = {}

    def setup(self, **info: Any) -> None:
        with tolerated(f"experiment {self.run_root}"):
            self.tracking = open_experiment(self.uri, self.run_root)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.tracking is None or trial.trial_id in self.runs:
            return
        resources = trial.placement_group_factory.required_resources
        self.runs[trial.trial_id] = open_run(
            self.tracking,
            f"trial/{trial.trial_id}",
            f"{self.phase}/{trial.trial_id}",
            kind="trial",
            params=self.resolve(dict(trial.config)),
            tags={
                "phase": self.phase,
                "resources": ", ".join(f"{k}={v:g}" for k, v in sorted(resources.items())),
            },
            resume=True,  # trial ids are unique to a search: an old one is this trial's
        )

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info):
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        if result.get("iterations_since_restore") == 1:  # a retry may run on another node
            tag_node(self.tracking, run_id, result)
        log_metrics(self.tracking, run_id, result, int(result["epoch"]))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self.runs:
            close_run(self.tracking, self.runs[trial.trial_id])

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self.runs:
            close_run(self.tracking, self.runs[trial.trial_id], "FAILED")
