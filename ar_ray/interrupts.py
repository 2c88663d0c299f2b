"""Signals: a SIGTERM from a scheduler or `kill` is handled like Ctrl+C."""

from __future__ import annotations

import signal


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
