"""What a run prints: ar-ray's own lines and Ray's warnings; everything else under --verbose.

Ray's routine chatter buries ar-ray's trial, member and inference lines. Each source is
handled where it starts:

- Tune's config and result boxes: Tune runs with its reporter silent and `TrialProgress`
  shows the trials (search.py).
- Lines of Ray's worker processes: the Train controller's and workers' start-up notices, a
  `Checkpoint successfully created` line per report, and the core worker's "has constructor
  arguments in the object store" error that every fault-tolerant actor with object-store
  arguments logs (Train's PreemptionWatcher, Ray Data's map workers), which looks like a
  failure and is not. They reach the driver on Ray's log stream, where `NOISE` drops them
  before Ray prints them. Ray offers no public hook on that stream: its dispatcher is private
  API, used here and in feasibility.py only.
- Driver-side loggers (Optuna's study line, Tune's result-file notice, Ray Data's execution
  notices and the progress-bar warning ar-ray causes by drawing its own): raised for the
  run and put back after, so a notebook's logging is left as it was.

Left alone: the lines the driver's own core worker writes to stderr from C++ (Ray Data's
map-worker variant of the constructor-argument line). Only RAY_BACKEND_LOG_LEVEL reaches
them, and an embedded Ray's raylet inherits it: it would empty Ray's log files too.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ray._private.ray_logging import global_worker_stdstream_dispatcher

NOISE = re.compile(
    "|".join(
        [
            r"Checkpoint successfully created at: ",
            r"has constructor arguments in the object store and max_restarts > 0",
            r"^Requesting resources: ",
            r"^Attempting to start training worker group",
            r"^Started training worker group",
            r"^- \(ip=\S+, pid=\d+\) world_rank=",
            r"^Setting up process group for: ",
            r"Task ServeController.graceful_shutdown failed",  # serve.shutdown killing it
        ]
    )
)
QUIET_LOGGERS = {
    "optuna": logging.WARNING,
    "ray.tune": logging.WARNING,
    "ray.data": logging.WARNING,
    "ray.data._internal.progress": logging.ERROR,  # "Progress bars disabled"
    "ray.serve": logging.WARNING,  # "Started Serve", "Application ... is ready"
}
PRINT_HANDLER = "ray_print_logs"  # the name Ray's worker.connect gives its printer


def tune_verbosity(verbose: bool) -> int:
    """Tune's reporter: silent (TrialProgress shows trials), or Ray's most detailed."""
    return 3 if verbose else 0


@contextmanager
def ray_output(verbose: bool) -> Iterator[None]:
    """Around a run on a connected Ray: quiet unless `verbose`.

    The worker-line filter stays on after the run, for this Ray connection (the next call
    sets it again): workers' lines reach the driver late, and a checkpoint line of the last
    epoch would otherwise slip out after the run returned.
    """
    filter_worker_lines(None if verbose else NOISE)
    if verbose:
        yield
        return
    with _loggers_raised(QUIET_LOGGERS):
        yield


@contextmanager
def _loggers_raised(levels: dict[str, int]) -> Iterator[None]:
    loggers = {name: logging.getLogger(name) for name in levels}
    before = {name: logger.level for name, logger in loggers.items()}
    for name, logger in loggers.items():
        logger.setLevel(max(levels[name], logger.getEffectiveLevel()))
    try:
        yield
    finally:
        for name, logger in loggers.items():
            logger.setLevel(before[name])


def filter_worker_lines(noise: re.Pattern[str] | None) -> None:
    """Ray's printer of worker lines, made to drop the lines `noise` matches (None: to print
    all). A driver without the printer (`ray.init(log_to_driver=False)`) has nothing to
    filter; `ray.shutdown` removes the printer, filter and all."""
    printers = [
        handler for name, handler in global_worker_stdstream_dispatcher.handlers
        if name == PRINT_HANDLER
    ]  # fmt: skip
    if not printers:
        return
    printer = getattr(printers[0], "unfiltered", printers[0])
    global_worker_stdstream_dispatcher.remove_handler(PRINT_HANDLER)
    kept = printer if noise is None else _dropping(noise, printer)
    global_worker_stdstream_dispatcher.add_handler(PRINT_HANDLER, kept)


def _dropping(
    noise: re.Pattern[str], printer: Callable[[dict[str, Any]], None]
) -> Callable[[dict[str, Any]], None]:
    def print_kept(batch: dict[str, Any]) -> None:
        kept = [line for line in batch["lines"] if not noise.search(line)]
        if kept:
            printer({**batch, "lines": kept})

    print_kept.unfiltered = printer  # type: ignore[attr-defined]
    return print_kept
