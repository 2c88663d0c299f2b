"""What `--track mlflow` costs: a tracked search against the same search untracked, and
each tracking call's latency, against a real `mlflow server` on 127.0.0.1.

    .venv/bin/python bench/tracking_overhead.py           # full: ~4 min on a 2-CPU machine
    .venv/bin/python bench/tracking_overhead.py --quick   # smoke check: ~1 min

(a) `ar_ray.tune` over search_spaces/quick.yaml (built-in data, 10 images per class,
4 trials of 3 epochs, no early stop, seed 0), tracked and untracked, alternating for
`--rounds` rounds (the order flips every round); the table gives each round's wall-clock
ratio (tracked / untracked), median and range. The two sides train the very same trials.
(b) One client's calls, each timed `--calls` times: an epoch's metrics (`log_metrics`, what
rank 0 and the Tune callback send per epoch), opening a run with a whole config as params
(`open_run`), and uploading an ensemble's outputs as artifacts (`log_files`: the CSVs,
report and plots of `make demo`'s runs/demo, or `--run`).

The server is the tests' (`tests/mlflow_server.py`): SQLite backend, proxied artifacts.
Writes bench/results/tracking_overhead.{csv,md} (with --quick: bench/results/quick/).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from common import BENCH, machine_line, median, parse_args, spread, start_ray, write_results

import ar_ray
from ar_ray.config import RecipeConfig
from ar_ray.mlflow_tracking import (
    ARTIFACT_SUFFIXES,
    close_run,
    log_files,
    log_metrics,
    open_experiment,
    open_run,
)

sys.path.insert(0, str(BENCH.parent))  # the tests' server, one definition for both
from tests.mlflow_server import mlflow_server  # noqa: E402

QUICK_SPACE = BENCH.parent / "search_spaces" / "quick.yaml"
EPOCH = {"epoch": 1, "train_loss": 2.1, "val_top1": 0.31, "val_nll": 1.9, "lr": 0.002,
         "epoch_seconds": 4.2, "images_per_second": 310.0}  # fmt: skip


def arguments(parser) -> None:
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--run", default="runs/demo", help="a run whose ensemble outputs to upload")
    parser.add_argument("--calls", type=int, default=50, help="timed calls of each (default 50)")


def search_seconds(storage: Path, name: str, trials: int, epochs: int, uri: str | None) -> float:
    track = {"track": "mlflow", "tracking_uri": uri} if uri else {}
    started = time.perf_counter()
    ar_ray.tune(
        QUICK_SPACE, trials=trials, epochs=epochs, grace_period=epochs, limit_per_class=10,
        storage=str(storage), name=name, **track,
    )  # fmt: skip
    return time.perf_counter() - started


def searches(uri: str, rounds: int, trials: int, epochs: int) -> pd.DataFrame:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(rounds):
            sides = ["untracked", "tracked"] if round_ % 2 == 0 else ["tracked", "untracked"]
            for side in sides:
                seconds = search_seconds(
                    Path(folder), f"{side}{round_}", trials, epochs,
                    uri if side == "tracked" else None,
                )  # fmt: skip
                rows.append({"round": round_, "side": side, "seconds": seconds})
                print(f"round {round_}: {side} search {seconds:.1f} s", flush=True)
    runs = pd.DataFrame(rows)
    table = runs.pivot_table(index="round", columns="side", values="seconds")
    ratio = table["tracked"] / table["untracked"]
    summary = {
        "trials": trials,
        "epochs": epochs,
        "untracked_s_median": table["untracked"].median(),
        "tracked_s_median": table["tracked"].median(),
        **{f"ratio_{k}": v for k, v in spread(ratio).items()},
    }
    return pd.DataFrame([summary])


def timed(calls: int, action) -> list[float]:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        action()
        times.append(1000 * (time.perf_counter() - started))
    return times


def ensemble_outputs(run: Path) -> list[Path]:
    """What a tracked ensemble uploads: its outputs of the kinds ARTIFACT_SUFFIXES names."""
    files = sorted(p for p in (run / "ensemble").glob("*") if p.suffix in ARTIFACT_SUFFIXES)
    if not files:
        raise SystemExit(f"{run}/ensemble: no outputs; run `make demo` (or pass --run)")
    return files


def calls(uri: str, count: int, run: Path) -> pd.DataFrame:
    tracking = open_experiment(uri, "bench/tracking_overhead")
    config = RecipeConfig().to_dict()
    run_id = open_run(tracking, "bench", "bench", kind="bench", params=config)
    epoch = timed(count, lambda: log_metrics(tracking, run_id, EPOCH, step=1))
    opened = []
    opening = timed(
        count, lambda: opened.append(open_run(tracking, "b", "b", kind="bench", params=config))
    )
    for other in opened:
        close_run(tracking, other)
    files = ensemble_outputs(run)
    uploads = timed(max(3, count // 10), lambda: log_files(tracking, run_id, files))
    close_run(tracking, run_id)
    size = sum(p.stat().st_size for p in files) / 1e6
    return pd.DataFrame(
        [
            {"call": "log_metrics (one epoch, 7 numbers)", "ms_median": median(epoch),
             "ms_max": max(epoch), "n": len(epoch)},
            {"call": f"open_run ({len(config)} params)", "ms_median": median(opening),
             "ms_max": max(opening), "n": len(opening)},
            {"call": f"log_files ({len(files)} ensemble outputs, {size:.2f} MB)",
             "ms_median": median(uploads), "ms_max": max(uploads), "n": len(uploads)},
        ]
    )  # fmt: skip


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], arguments)
    trials, epochs = (2, 1) if args.quick else (4, 3)
    rounds = 1 if args.quick else args.rounds
    count = 5 if args.quick else args.calls
    start_ray()
    with mlflow_server() as uri:
        call_table = calls(uri, count, Path(args.run))
        search_table = searches(uri, rounds, trials, epochs)
    settings = (
        f"{trials} trials x {epochs} epochs of search_spaces/quick.yaml (10 images per class, "
        f"28 px), {rounds} alternating rounds; {count} timed calls of each."
    )
    write_results(
        "tracking_overhead",
        {"(a) a tracked search over the same search untracked": search_table,
         "(b) one tracking call, from the client's side": call_table},
        [machine_line(settings)],
        args.quick,
    )  # fmt: skip


if __name__ == "__main__":
    main()
