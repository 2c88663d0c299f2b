"""Signals: a SIGTERM from a scheduler or `kill` is handled like Ctrl+C."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


def treat_sigterm_as_interrupt() -> None:
    """SIGTERM (a scheduler, `kill`) takes the same clean path as Ctrl+C: Tune and the
    CLI stop at a checkpoint and print how to resume."""
    signal.signal(signal.SIGTERM, _forward_to_sigint_handler)


def _forward_to_sigint_handler(signum: int, frame: object) -> None:
    """Call whatever handles SIGINT now (Tune's graceful stop during a search), else raise
    KeyboardInterrupt; never rely on SIGINT itself, which background jobs may ignore."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


@contextmanager
def sigint_handler_restored() -> Iterator[None]:
    """Put back the SIGINT handler that was there before the body.

    `Tuner.fit` installs Tune's graceful-stop handler and leaves it installed when the
    experiment ends. After it, Ctrl+C (or the infeasible watch's interrupt) would only ask
    that finished experiment to stop, instead of raising KeyboardInterrupt in whatever runs
    next in the process: a later phase's wait, an ensemble, a notebook cell.
    """
    before = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        # None: set outside Python, nothing to put back; off the main thread Tune installs
        # nothing and signal.signal would raise
        if before is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, before)


def wait_until_interrupted() -> None:
    """Block the calling (main) thread until Ctrl+C, or SIGTERM once it is treated as one:
    how a foreground service (`ar-ray serve`) runs until it is told to stop."""
    while True:
        time.sleep(3600)
