"""Ray Tune's cost: epoch time in a trial vs `engine.fit` directly, and ASHA+TPE vs FIFO.

    python bench/tune_overhead.py [--quick]

(a) One config, same data, same thread count (a 1-CPU trial runs torch on 1 thread, so the
direct run does too): median epoch seconds both ways and the ratio (goal <= 1.05), plus
whole wall-clock including Tune's start-up. (b) The same trial budget over
search_spaces/quick.yaml with Optuna TPE + ASHA and with random search + FIFO: best val
top-1 and epochs spent. Writes bench/results/tune_overhead_{epochs,search}.{csv,md}.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from common import machine, median, parse_args, start_ray, write_results
from ray import tune
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import BasicVariantGenerator

from ar_ray.config import RunConfig
from ar_ray.data import load_dataset
from ar_ray.recipe.engine import fit
from ar_ray.search_space import load_search_space, parse_search_space
from ar_ray.tune import TuneRequest, leaderboard, run_tune, trial_trainable

QUICK_SPACE = Path(__file__).parent.parent / "search_spaces" / "quick.yaml"


def trial_epoch_seconds(experiment: Path) -> list[float]:
    (result,) = experiment.glob("run_trial_*/result.json")
    return [json.loads(line)["epoch_seconds"] for line in result.read_text().splitlines()]


def overhead(splits, epochs: int, root: Path) -> pd.DataFrame:
    config = RunConfig(epochs=epochs)
    torch.set_num_threads(1)
    started = time.perf_counter()
    direct = [m["epoch_seconds"] for m in fit(config, splits).history]
    direct_wall = time.perf_counter() - started
    torch.set_num_threads(torch.get_num_interop_threads())

    space = parse_search_space({**config.to_dict(), "seed": {"choice": [0]}}, "overhead")
    request = TuneRequest(
        space="overhead",
        trials=1,
        epochs=epochs,
        storage=str(root),
        name="overhead",
        cpus_per_trial=1,
    )
    started = time.perf_counter()
    run_tune(request, space, splits)
    tune_wall = time.perf_counter() - started
    in_tune = trial_epoch_seconds(root / "overhead" / "tune")
    return pd.DataFrame(
        [
            {
                "measure": "median epoch s",
                "direct": median(direct),
                "tune": median(in_tune),
                "ratio": median(in_tune) / median(direct),
            },
            {
                "measure": "wall s (incl. start-up)",
                "direct": direct_wall,
                "tune": tune_wall,
                "ratio": tune_wall / direct_wall,
            },
        ]
    )


def random_fifo(splits, request: TuneRequest, root: Path) -> pd.DataFrame:
    """The baseline arm: Tune's random sampler and no early stopping, same trials."""
    space = load_search_space(QUICK_SPACE)
    base = space.base_config().replace(epochs=request.epochs, seed=request.seed)
    tuner = tune.Tuner(
        trial_trainable(splits, base, request),
        param_space=space.to_tune(),
        tune_config=tune.TuneConfig(
            metric="val_top1",
            mode="max",
            num_samples=request.trials,
            search_alg=BasicVariantGenerator(random_state=request.seed),
            scheduler=FIFOScheduler(),
        ),
        run_config=tune.RunConfig(name="fifo", storage_path=str(root)),
    )
    return leaderboard(tuner.fit(), space, base.epochs)


def search_comparison(splits, trials: int, epochs: int, root: Path) -> pd.DataFrame:
    request = TuneRequest(
        space=str(QUICK_SPACE), trials=trials, epochs=epochs, storage=str(root), name="asha", seed=0
    )
    arms = {
        "TPE + ASHA": run_tune(request, load_search_space(QUICK_SPACE), splits),
        "random + FIFO": random_fifo(splits, request, root),
    }
    return pd.DataFrame(
        [
            {
                "search": name,
                "trials": len(board),
                "best_val_top1": board["val_top1"].max(),
                "epochs_spent": int(board["epochs_run"].sum()),
                "stopped_early": int((board["status"] == "STOPPED_EARLY").sum()),
            }
            for name, board in arms.items()
        ]
    )


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    splits = load_dataset(None, 28)
    if args.quick:
        splits = splits.limit_per_class(10)
    epochs, trials, search_epochs = (2, 4, 2) if args.quick else (4, 12, 4)
    start_ray()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        frame = overhead(splits, epochs, root)
        notes = [
            f"Default RunConfig, {epochs} epochs, {len(splits.train)} train images, 1 thread "
            f"both ways ({machine()}).",
            "Ratio = Tune trial / direct `engine.fit`; the goal for epochs is <= 1.05.",
        ]
        write_results("tune_overhead_epochs", frame, notes, args.quick)
        frame = search_comparison(splits, trials, search_epochs, root)
        notes = [
            f"search_spaces/quick.yaml, {trials} trials x up to {search_epochs} epochs, seed 0, "
            f"2 trials at a time ({machine()}).",
        ]
        write_results("tune_overhead_search", frame, notes, args.quick)


if __name__ == "__main__":
    main()
