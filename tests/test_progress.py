"""Progress views: a line per epoch in logs, a table redrawn in place on a terminal, and
members' epochs reaching the driver from a real Ray Train run with Train's own noise off."""

from __future__ import annotations

import io
import re
import time

import pytest

from ar_ray.interrupts import sigint_handler_restored
from ar_ray.progress import (
    EpochUpdate,
    InferenceProgress,
    MemberProgress,
    MemberView,
    eta_seconds,
    format_duration,
    quiet_train_reports,
)

CURSOR_UP = re.compile(r"\x1b\[(\d+)A\r")
NODE = "0123456789abcdef" * 3


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _update(member: str, epoch: int, seconds: float, total: int = 4, top1: float = 0.5):
    return EpochUpdate(member, epoch, total, top1, NODE, seconds)


def _last_block(terminal: Terminal) -> list[str]:
    """What the screen shows: the lines written after the last cursor-up."""
    text = CURSOR_UP.split(terminal.getvalue())[-1]
    return [line.replace("\x1b[2K", "") for line in text.splitlines()]


def test_eta_is_remaining_epochs_times_the_recent_mean():
    assert eta_seconds([100.0, 10.0, 20.0, 30.0], remaining=2) == 40.0  # last 3 epochs
    assert eta_seconds([12.0], remaining=3) == 36.0
    assert eta_seconds([], remaining=3) is None
    assert eta_seconds([12.0], remaining=0) == 0.0


@pytest.mark.parametrize(
    "seconds, text", [(None, "?"), (0, "0:00"), (65.4, "1:05"), (3725, "1:02:05")]
)
def test_durations_read_as_clock_times(seconds, text):
    assert format_duration(seconds) == text


def test_log_mode_prints_one_line_per_member_epoch_with_its_fields():
    stream, clock = io.StringIO(), FakeClock()
    view = MemberView(stream, clock)
    updates = [
        _update("m1", 1, 10.0, top1=0.25),
        _update("m2", 1, 30.0, total=2, top1=0.5),
        _update("m1", 2, 20.0, top1=0.375),
        _update("m2", 2, 30.0, total=2, top1=0.625),
    ]
    for update in updates:
        clock.now += 7.0
        view.add(update)
        view.refresh()  # a terminal's redraw: nothing in logs
    assert stream.getvalue().splitlines() == [
        "m1  epoch 1/4  val top-1 0.2500  node 01234567  elapsed 0:10  ETA 0:30",
        "m2  epoch 1/2  val top-1 0.5000  node 01234567  elapsed 0:30  ETA 0:30",
        "m1  epoch 2/4  val top-1 0.3750  node 01234567  elapsed 0:30  ETA 0:30",
        "m2  epoch 2/2  val top-1 0.6250  node 01234567  elapsed 1:00  ETA done",
    ]


def test_terminal_mode_redraws_the_table_in_place_at_most_every_refresh():
    terminal, clock = Terminal(), FakeClock()
    view = MemberView(terminal, clock, refresh_seconds=0.5)
    view.add(_update("m1", 1, 10.0))
    assert _last_block(terminal) == [
        "member  epoch  val top-1  node      elapsed  ETA ",
        "m1      1/4    0.5000     01234567  0:10     0:30",
    ]
    clock.now += 0.1
    view.add(_update("m2", 1, 20.0))
    drawn = terminal.getvalue()
    assert "m2" not in drawn  # within the refresh interval: not drawn yet

    clock.now += 4.0  # m1 and m2 run 4.1 s and 4.0 s into their next epochs
    view.refresh()
    assert CURSOR_UP.findall(terminal.getvalue()) == ["2"]  # up over header + m1, then redraw
    assert _last_block(terminal) == [
        "member  epoch  val top-1  node      elapsed  ETA ",
        "m1      1/4    0.5000     01234567  0:14     0:26",
        "m2      1/4    0.5000     01234567  0:24     0:56",
    ]
    view.refresh(force=True)
    assert CURSOR_UP.findall(terminal.getvalue()) == ["2", "3"]


def _screen(written: str) -> list[str]:
    """The rows a terminal shows after `written`: cursor-up-and-return moves to column 0 of
    an earlier row, clear-line empties the row, text overwrites from the cursor on."""
    rows, row, column = [""], 0, 0
    for token in re.split(r"(\x1b\[\d+A\r|\x1b\[2K|\n)", written):
        if match := CURSOR_UP.fullmatch(token):
            row, column = row - int(match.group(1)), 0
        elif token == "\x1b[2K":
            rows[row] = ""
        elif token == "\n":
            row, column = row + 1, 0
            rows.extend([""] * (row + 1 - len(rows)))
        elif token:
            line = rows[row].ljust(column)
            rows[row] = line[:column] + token + line[column + len(token) :]
            column += len(token)
    return rows[:-1] if rows[-1] == "" else rows


def test_a_note_stays_above_the_live_table_and_is_one_line_in_logs():
    terminal, clock = Terminal(), FakeClock()
    view = MemberView(terminal, clock, refresh_seconds=0.5, kind="trial")
    view.add(_update("t1", 1, 10.0))
    view.add(_update("t2", 1, 10.0))  # within the refresh interval: not drawn yet
    view.note("plan: at 10.0 s per epoch (measured)")
    clock.now += 1.0
    view.add(_update("t1", 2, 10.0))
    assert _screen(terminal.getvalue()) == [
        "plan: at 10.0 s per epoch (measured)",
        "trial  epoch  val top-1  node      elapsed  ETA ",
        "t1     2/4    0.5000     01234567  0:20     0:20",
        "t2     1/4    0.5000     01234567  0:11     0:29",
    ]
    logs = io.StringIO()
    view = MemberView(logs, clock, kind="trial")
    view.add(_update("t1", 1, 10.0))
    view.note("plan: measured")
    assert logs.getvalue().splitlines()[1:] == ["plan: measured"]


def test_inference_logs_a_line_per_tenth_and_the_last_count_once():
    stream, clock = io.StringIO(), FakeClock()
    with InferenceProgress(100, stream, clock) as progress:
        for _ in range(25):
            clock.now += 1.0
            progress.advance(4)  # 4 images/s
    lines = stream.getvalue().splitlines()
    assert [int(re.search(r"scored (\d+)/100", line)[1]) for line in lines] == [
        12, 20, 32, 40, 52, 60, 72, 80, 92, 100,
    ]  # fmt: skip
    assert lines[0] == "scored 12/100 images (12%)  4.0 images/s  ETA 0:22"
    assert lines[-1] == "scored 100/100 images (100%)  4.0 images/s  ETA 0:00"


def test_slow_inference_still_logs_every_so_often_and_closes_with_the_total():
    stream, clock = io.StringIO(), FakeClock()
    progress = InferenceProgress(1000, stream, clock, log_every_seconds=30.0)
    for _ in range(3):
        clock.now += 20.0
        progress.advance(1)
    progress.close()
    assert [line.split("  ")[0] for line in stream.getvalue().splitlines()] == [
        "scored 2/1000 images (0%)",  # 40 s after the start
        "scored 3/1000 images (0%)",  # close: the final count
    ]


def test_inference_on_a_terminal_redraws_one_line():
    terminal, clock = Terminal(), FakeClock()
    progress = InferenceProgress(10, terminal, clock, refresh_seconds=0.5)
    for _ in range(5):
        clock.now += 0.2
        progress.advance(2)
    progress.close()
    assert _last_block(terminal) == ["scored 10/10 images (100%)  10.0 images/s  ETA 0:00"]
    assert set(CURSOR_UP.findall(terminal.getvalue())) == {"1"}
    assert terminal.getvalue().count("scored") == 3  # at 0.2 s, 0.8 s (0.6 s later) and close


def test_member_epochs_reach_the_driver_from_a_train_worker(ray_cluster, tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer

    def loop(loop_config):
        quiet_train_reports()
        report = loop_config["progress"].reporter(loop_config["member_id"], 3)
        for epoch in (1, 2, 3):
            metrics = {"epoch": epoch, "val_top1": epoch / 8, "epoch_seconds": 1.0}
            report(metrics)
            ray.train.report(metrics)

    stream = io.StringIO()
    # fit() on the main thread installs Train's SIGINT handler and never removes it
    with MemberProgress(stream) as progress, sigint_handler_restored():
        TorchTrainer(
            loop,
            train_loop_config={"progress": progress.handle, "member_id": "m1-tiny"},
            scaling_config=ray.train.ScalingConfig(num_workers=1),
            run_config=ray.train.RunConfig(name="progress", storage_path=str(tmp_path)),
        ).fit()
    node = ray_cluster.get_runtime_context().get_node_id()[:8]
    assert stream.getvalue().splitlines() == [
        f"m1-tiny  epoch {epoch}/3  val top-1 {epoch / 8:.4f}  node {node}  "
        f"elapsed 0:0{epoch}  ETA {'done' if epoch == 3 else f'0:0{3 - epoch}'}"
        for epoch in (1, 2, 3)
    ]


def _train_output(tmp_path, capfd, name: str, quiet: bool) -> str:
    """Driver output of a 3-report Train run, up to the worker's last line."""
    import logging

    import ray.train
    from ray.train.torch import TorchTrainer

    marker = f"loop of {name} finished"

    def loop(_):
        if quiet:
            quiet_train_reports()
        for step in range(3):
            ray.train.report({"step": step})
        # After the reports and on their stream (stderr); a print would also go to stdout,
        # which may reach the driver before stderr does.
        logging.getLogger("progress-test").warning(marker)

    with sigint_handler_restored():  # as above: Train's handler must not outlive fit()
        TorchTrainer(
            loop,
            scaling_config=ray.train.ScalingConfig(num_workers=1),
            run_config=ray.train.RunConfig(name=name, storage_path=str(tmp_path)),
        ).fit()
    output = ""
    deadline = time.monotonic() + 60  # worker lines reach the driver asynchronously
    while marker not in output and time.monotonic() < deadline:
        time.sleep(0.2)
        captured = capfd.readouterr()
        output += captured.out + captured.err
    assert marker in output, "the worker's output never reached the driver"
    return output


def test_quiet_train_reports_drops_the_per_report_lines(ray_cluster, tmp_path, capfd):
    noisy = _train_output(tmp_path, capfd, "noisy", quiet=False)
    quiet = _train_output(tmp_path, capfd, "quiet", quiet=True)
    assert noisy.count("Reporting training result") == 3
    assert "Reporting training result" not in quiet
