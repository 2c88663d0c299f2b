"""Ray Tune's cost: a trial's epochs vs `engine.fit` directly, and ASHA+TPE vs random+FIFO.

    .venv/bin/python bench/tune_overhead.py           # full: ~10 min on an idle 2-CPU machine
    .venv/bin/python bench/tune_overhead.py --quick   # smoke check: ~2 min, tiny settings

(a) One config on the same data, one CPU thread both ways: `engine.fit` in a fresh process
with OMP_NUM_THREADS=1 (how Ray starts a 1-CPU trial) against one 1-CPU Tune trial. Reports
median epoch seconds (the engine's timer; goal: ratio <= 1.05), median seconds between epoch
reports (adds Tune's per-epoch checkpoint and report), and whole wall-clock with ray.init
and Tune's start-up included, for honesty.
(b) The same trial budget over search_spaces/quick.yaml, same seed, 2 trials at a time:
the project's Optuna TPE + ASHA (`run_tune`) against random search + FIFO built from the
same trainable. Best val top-1, epochs spent (sum of `epochs_run`), wall seconds.

Writes bench/results/tune_overhead.{csv,md} (with --quick: bench/results/quick/).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pandas as pd
from common import (
    Timing,
    bench_splits,
    direct_timing,
    machine_line,
    overhead_table,
    parse_args,
    start_ray,
    write_results,
)
from ray import tune
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import BasicVariantGenerator

from ar_ray.config import RecipeConfig
from ar_ray.data import DatasetSplits
from ar_ray.leaderboard import leaderboard
from ar_ray.search import run_tune
from ar_ray.search_space import SearchSpace, load_search_space, parse_search_space
from ar_ray.tune_phase import METRIC, MODE, trial_trainable
from ar_ray.tune_request import TuneRequest, base_config, experiment_dir

QUICK_SPACE = Path(__file__).parent.parent / "search_spaces" / "quick.yaml"


def trial_timing(experiment: str, wall: float) -> Timing:
    """Read the one trial's reports back from its result.json under the experiment."""
    (results,) = Path(experiment).glob("*/result.json")
    reports = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    reports = [report for report in reports if "epoch_seconds" in report]
    epochs = [float(report["epoch_seconds"]) for report in reports]
    # time_this_iter_s is the time from one report to the next; the first includes start-up
    intervals = [float(report["time_this_iter_s"]) for report in reports[1:]]
    return Timing(epochs, intervals, wall)


def single_trial(
    config: RecipeConfig, splits: DatasetSplits, root: Path, ray_init: float
) -> Timing:
    """`config` as a one-trial Tune run on one CPU (a one-value `seed` is the only 'search')."""
    space = parse_search_space({**config.to_dict(), "seed": {"choice": [config.seed]}}, "bench")
    request = TuneRequest(
        space="bench",
        trials=1,
        epochs=config.epochs,
        storage=str(root),
        name="single",
        cpus_per_trial=1,
        seed=config.seed,
    )
    started = time.perf_counter()
    run_tune(request, space, splits)
    wall = time.perf_counter() - started + ray_init
    return trial_timing(experiment_dir(request), wall)


def random_fifo(request: TuneRequest, space: SearchSpace, splits: DatasetSplits) -> pd.DataFrame:
    """The baseline arm: the project's trainable, random sampling, no early stopping."""
    base = base_config(request, space)
    tuner = tune.Tuner(
        trial_trainable(splits, base, request),
        param_space=space.to_tune(),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            num_samples=request.trials,
            max_concurrent_trials=request.max_concurrent,
            search_alg=BasicVariantGenerator(random_state=request.seed),
            scheduler=FIFOScheduler(),
        ),
        run_config=tune.RunConfig(name=request.name, storage_path=request.storage),
    )
    return leaderboard(tuner.fit(), space, base.epochs)


def search_comparison(splits: DatasetSplits, trials: int, epochs: int, root: Path) -> pd.DataFrame:
    """Both arms on the same space, trials, epochs, seed and concurrency."""
    space = load_search_space(QUICK_SPACE)
    arms = {
        "Optuna TPE + ASHA": lambda request: run_tune(request, space, splits),
        "random + FIFO": lambda request: random_fifo(request, space, splits),
    }
    rows = []
    for number, (name, run) in enumerate(arms.items()):
        request = TuneRequest(
            space=str(QUICK_SPACE),
            trials=trials,
            epochs=epochs,
            storage=str(root),
            name=f"arm{number}",
            max_concurrent=2,
            seed=0,
        )
        started = time.perf_counter()
        board = run(request)
        rows.append(
            {
                "search": name,
                "trials": len(board),
                "best_val_top1": float(board["val_top1"].max()),
                "epochs_spent": int(board["epochs_run"].sum()),
                "stopped_early": int((board["status"] == "STOPPED_EARLY").sum()),
                "wall_s": time.perf_counter() - started,
            }
        )
    return pd.DataFrame(rows)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    limit, epochs, trials, search_epochs = (10, 2, 4, 2) if args.quick else (None, 4, 12, 4)
    splits = bench_splits(limit)
    config = RecipeConfig(epochs=epochs)
    direct = direct_timing(config, limit)
    ray_init = start_ray()
    with tempfile.TemporaryDirectory() as folder:
        in_tune = single_trial(config, splits, Path(folder), ray_init)
        search = search_comparison(splits, trials, search_epochs, Path(folder))
    tables = {
        "epoch time: engine.fit vs one Tune trial": overhead_table(
            direct, in_tune, "tune", ray_init
        ),
        "search on the same budget": search,
    }
    notes = [
        machine_line(
            f"(a) default RecipeConfig, {epochs} epochs, {len(splits.train)} train / "
            f"{len(splits.val)} val images, 1 thread both ways (direct: fresh process with "
            f"OMP_NUM_THREADS=1; Tune: one 1-CPU trial). (b) search_spaces/quick.yaml, "
            f"{trials} trials x up to {search_epochs} epochs, seed 0, 2 trials at a time."
        ),
        "Ratio = Tune / direct; goal for the median epoch is <= 1.05. 'Between epoch reports' "
        "adds the per-epoch checkpoint and report (epochs 2 on); the Tune wall includes "
        "ray.init. One seed per arm: a small difference in best val top-1 is noise.",
    ]
    write_results("tune_overhead", tables, notes, args.quick)


if __name__ == "__main__":
    main()
