"""Progress a person can read: one row per training member, one line for inference.

Ray Train's own progress is a `Reporting training result N: TrainingReport(...)` line per
report and worker, which buries everything else; `quiet_train_reports` turns those off and
`MemberProgress` shows instead what a person asks of a run: how far each member is, how
good it is so far, where it runs and when it will be done.

Design, and why:

- Updates travel through a `ray.util.queue.Queue` (a 0-CPU actor) whose handle rides in
  `train_loop_config`. It is a public Ray API that reaches the driver from any node without
  ports, files or a second service, and gives one ordered stream for all members. The train
  loop pushes from the engine's `on_epoch` rather than from a Train controller callback:
  `ray.train.UserCallback` is only a DeveloperAPI, and the loop already holds the metrics.
- One driver thread pulls updates and renders, so the view has a single writer and needs no
  lock; the threads that run members never touch it.
- Elapsed and ETA come from the engine's measured `epoch_seconds` and the driver's clock,
  never from worker clocks, so a node with a skewed clock cannot make times run backwards.
  The ETA averages the last few epochs: members that share a node speed up when a neighbour
  finishes, and recent epochs show that sooner than the whole history does.
- A terminal gets a table redrawn in place (at most every `REFRESH_SECONDS`); logs, CI and
  pipes get exactly one line per member epoch, since cursor codes there are garbage.
- Progress is cosmetic: a push that fails (the view closed, its actor died) is dropped, so
  it can never fail a member's training.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, TextIO

import ray
from ray.exceptions import RayError
from ray.util.queue import Empty, Queue

REFRESH_SECONDS = 0.5
ETA_WINDOW = 3  # epochs averaged for the ETA
NODE_CHARS = 8  # a Ray node id is 56 hex digits; 8 tell the nodes of a cluster apart
LOG_STEPS = 10  # inference logs a line per tenth of the images...
LOG_EVERY_SECONDS = 30.0  # ...or this often, so a slow run still shows it is alive
_CURSOR_UP = "\x1b[{}A\r"
_CLEAR_LINE = "\x1b[2K"

Clock = Callable[[], float]


def quiet_train_reports() -> None:
    """Drop Ray Train's `Reporting training result N: TrainingReport(...)` lines.

    Call it at the top of the train loop: the line is logged by every worker process on
    every `ray.train.report`, so it must be set in each of them, and the loop is the code
    that runs in all of them. Train's documented knob,
    `ray.train.RunConfig(logging_config=LoggingConfig(log_level="WARNING"))`, misses this line
    (tried on Ray 2.60): Ray names that module's logger after its file path
    (`logging.getLogger(__file__)`), outside the `ray.train` hierarchy the knob filters, so
    the record goes to the root logger at INFO. Raising that one logger, found by the same
    expression, silences exactly this line; Train's other messages (worker group start, retry
    notices, warnings) and the loop's own output are left alone.
    """
    # Imported here: `predict` uses this module's inference line without Ray Train.
    import ray.train.v2._internal.execution.context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def format_duration(seconds: float | None) -> str:
    """`m:ss` or `h:mm:ss`; `?` while there is nothing to estimate from."""
    if seconds is None:
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def eta_seconds(durations: Sequence[float], remaining: int) -> float | None:
    """Remaining epochs times the mean of the last `ETA_WINDOW` epoch durations."""
    if remaining <= 0:
        return 0.0
    if not durations:
        return None
    recent = durations[-ETA_WINDOW:]
    return remaining * sum(recent) / len(recent)


class _Console:
    """One output stream: a block redrawn in place on a terminal, appended lines elsewhere."""

    def __init__(self, stream: TextIO, clock: Clock, refresh_seconds: float) -> None:
        self.stream, self.clock, self.refresh_seconds = stream, clock, refresh_seconds
        self.live = stream.isatty()
        self._drawn = 0
        self._drawn_at: float | None = None

    def redraw(self, lines: list[str], force: bool = False) -> None:
        """Replace the block drawn last; skipped if it was drawn under `refresh_seconds` ago."""
        now = self.clock()
        recent = self._drawn_at is not None and now - self._drawn_at < self.refresh_seconds
        if recent and not force:
            return
        up = _CURSOR_UP.format(self._drawn) if self._drawn else ""
        self._write(up + "".join(f"{_CLEAR_LINE}{line}\n" for line in lines))
        self._drawn, self._drawn_at = len(lines), now

    def line(self, text: str) -> None:
        """Append a line; on a terminal it replaces the block, to be drawn again below it."""
        up = _CURSOR_UP.format(self._drawn) if self._drawn else ""
        self._write(f"{up}{_CLEAR_LINE if up else ''}{text}\n")
        self._drawn = 0

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


@dataclass(frozen=True)
class EpochUpdate:
    """What a member's train loop sends after each epoch."""

    member_id: str
    epoch: int
    total_epochs: int
    val_top1: float
    node: str
    epoch_seconds: float

    @classmethod
    def from_metrics(
        cls, member_id: str, total_epochs: int, node: str, metrics: Mapping[str, Any]
    ) -> EpochUpdate:
        """From the engine's epoch metrics (`epoch`, `val_top1`, `epoch_seconds`), as a Train
        loop or a Tune result carries them."""
        return cls(
            member_id=member_id,
            epoch=int(metrics["epoch"]),
            total_epochs=total_epochs,
            val_top1=float(metrics["val_top1"]),
            node=node,
            epoch_seconds=float(metrics["epoch_seconds"]),
        )


@dataclass
class _Member:
    latest: EpochUpdate
    arrived_at: float  # driver clock
    durations: list[float] = field(default_factory=list)
    ended: str | None = None  # why it ended before its last epoch ("stopped by ASHA")

    @property
    def done(self) -> bool:
        return self.ended is not None or self.latest.epoch >= self.latest.total_epochs

    def times(self, now: float) -> tuple[str, str]:
        """Elapsed and ETA; on a terminal they keep moving between epochs."""
        if self.done:
            return format_duration(sum(self.durations)), self.ended or "done"
        running = max(0.0, now - self.arrived_at)
        eta = eta_seconds(self.durations, self.latest.total_epochs - self.latest.epoch)
        left = None if eta is None else max(0.0, eta - running)
        return format_duration(sum(self.durations) + running), format_duration(left)

    def cells(self, now: float) -> list[str]:
        update = self.latest
        return [
            update.member_id,
            f"{update.epoch}/{update.total_epochs}",
            f"{update.val_top1:.4f}",
            update.node[:NODE_CHARS],
            *self.times(now),
        ]

    def log_line(self, now: float) -> str:
        name, epoch, top1, node, elapsed, eta = self.cells(now)
        last = self.ended or f"ETA {eta}"
        return f"{name}  epoch {epoch}  val top-1 {top1}  node {node}  elapsed {elapsed}  {last}"


class MemberView:
    """Renders member (or trial) updates: a live table on a terminal, one line per epoch
    otherwise. `kind` heads the first column: the same view serves Tune's trials."""

    def __init__(
        self,
        stream: TextIO | None = None,
        clock: Clock = time.monotonic,
        refresh_seconds: float = REFRESH_SECONDS,
        kind: str = "member",
    ) -> None:
        self._console = _Console(stream or sys.stdout, clock, refresh_seconds)
        self._members: dict[str, _Member] = {}
        self._header = [kind, "epoch", "val top-1", "node", "elapsed", "ETA"]

    def add(self, update: EpochUpdate) -> None:
        now = self._console.clock()
        member = self._members.setdefault(update.member_id, _Member(update, now))
        member.latest, member.arrived_at = update, now
        member.durations.append(update.epoch_seconds)
        self._show(member)

    def end(self, member_id: str, reason: str) -> None:
        """It ended before its last epoch (a trial ASHA stopped, or one that failed)."""
        member = self._members.get(member_id)
        if member is not None and not member.done:
            member.ended = reason
            self._show(member)

    def note(self, text: str) -> None:
        """A line that is not a member's (the plan in hours): kept above a live table."""
        self._console.line(text)
        self.refresh(force=True)

    def _show(self, member: _Member) -> None:
        if self._console.live:
            self.refresh()
        else:
            self._console.line(member.log_line(self._console.clock()))

    def refresh(self, force: bool = False) -> None:
        """Redraw the table on a terminal (throttled unless `force`); logs need no refresh."""
        if self._console.live and self._members:
            self._console.redraw(self._table(), force=force)

    def _table(self) -> list[str]:
        now = self._console.clock()
        rows = [self._header] + [member.cells(now) for member in self._members.values()]
        widths = [max(len(row[column]) for row in rows) for column in range(len(self._header))]
        return [
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            for row in rows
        ]


@dataclass(frozen=True)
class ProgressHandle:
    """The picklable end of a `MemberProgress` that travels into train loops."""

    queue: Queue

    def reporter(self, member_id: str, total_epochs: int) -> Callable[[Mapping[str, Any]], None]:
        """A function of the engine's epoch metrics (`epoch`, `val_top1`, `epoch_seconds`).

        Call it in the train loop, where the node it reports is the one the loop runs on,
        and on one rank only (rank 0): every call is one epoch in the view.
        """
        node = ray.get_runtime_context().get_node_id()

        def report(metrics: Mapping[str, Any]) -> None:
            update = EpochUpdate.from_metrics(member_id, total_epochs, node, metrics)
            with suppress(RayError):  # the view is gone: training goes on without it
                self.queue.put_nowait(update)

        return report


class MemberProgress:
    """The driver's side: a queue for the members' updates and a thread that shows them.

    Create it after `ray.init`; use it as a context manager (or `start()` / `close()`)
    around the members' `fit()` calls and put `.handle` into their `train_loop_config`.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        clock: Clock = time.monotonic,
        refresh_seconds: float = REFRESH_SECONDS,
    ) -> None:
        self._view = MemberView(stream, clock, refresh_seconds)
        self._refresh_seconds = refresh_seconds
        self.handle = ProgressHandle(Queue(actor_options={"num_cpus": 0}))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="ar-ray-progress", daemon=True)

    def start(self) -> MemberProgress:
        self._thread.start()
        return self

    def close(self) -> None:
        """Show every update still queued, draw the final table, and remove the queue."""
        self._stop.set()
        self._thread.join()
        with suppress(RayError):  # Ray already down (Ctrl+C): nothing more can arrive
            queue = self.handle.queue
            for update in queue.get_nowait_batch(queue.qsize()):
                self._view.add(update)
            queue.shutdown(force=True)
        self._view.refresh(force=True)

    def __enter__(self) -> MemberProgress:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _pump(self) -> None:
        while not self._stop.is_set():
            try:
                self._view.add(self.handle.queue.get(timeout=self._refresh_seconds))
            except Empty:
                pass
            except RayError:  # the queue is gone with Ray; close() still draws what came
                return
            self._view.refresh()


class InferenceProgress:
    """Images done so far, images/s and ETA, for a driver loop that collects results.

    `verb` says what was done to them ("scored" by inference, "decoded" by data loading).
    Call `advance(n)` as each chunk of `n` images comes back, and `close()` (or use it as a
    context manager) at the end. A terminal gets one line redrawn in place; logs get a line
    per tenth of the images or every `log_every_seconds`, whichever comes first.
    """

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        clock: Clock = time.monotonic,
        refresh_seconds: float = REFRESH_SECONDS,
        log_every_seconds: float = LOG_EVERY_SECONDS,
        verb: str = "scored",
    ) -> None:
        self.total, self.done, self.verb = total, 0, verb
        self._console = _Console(stream or sys.stdout, clock, refresh_seconds)
        self._log_every_seconds = log_every_seconds
        self._started = self._logged_at = clock()
        self._logged_done: int | None = None  # images done at the last log line

    def advance(self, images: int) -> None:
        self.done += images
        if self._console.live:
            self._console.redraw([self.status()])
        elif self._log_due():
            self._log()

    def close(self) -> None:
        """The final count: always shown, once."""
        if self._console.live:
            self._console.redraw([self.status()], force=True)
        elif self._logged_done != self.done:
            self._log()

    def status(self) -> str:
        elapsed = self._console.clock() - self._started
        rate = self.done / elapsed if elapsed > 0 else None
        eta = (self.total - self.done) / rate if rate else None
        speed = "?" if rate is None else f"{rate:.1f}"
        percent = 100 * self.done / self.total if self.total else 100.0
        return (
            f"{self.verb} {self.done}/{self.total} images ({percent:.0f}%)  "
            f"{speed} images/s  ETA {format_duration(eta)}"
        )

    def __enter__(self) -> InferenceProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _step(self, done: int) -> int:
        """How many whole tenths (`LOG_STEPS`) of the images `done` makes."""
        return done * LOG_STEPS // max(self.total, 1)

    def _log_due(self) -> bool:
        waited = self._console.clock() - self._logged_at
        crossed = self._step(self.done) > self._step(self._logged_done or 0)
        return crossed or waited >= self._log_every_seconds

    def _log(self) -> None:
        self._console.line(self.status())
        self._logged_at, self._logged_done = self._console.clock(), self.done
