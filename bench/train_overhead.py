"""Ray Train's cost: a member's epoch time in `TorchTrainer` vs `engine.fit` directly.

    python bench/train_overhead.py [--quick]

Same config and data, one worker on one CPU against one thread in-process; median epoch
seconds and the ratio, plus wall-clock with Train's start-up (worker group, process group,
checkpoint upload per epoch). Writes bench/results/train_overhead.{csv,md}.
"""

from __future__ import annotations

import tempfile
import time

import pandas as pd
import ray
import torch
from common import machine, median, parse_args, start_ray, write_results

from ar_ray.config import RunConfig
from ar_ray.data import load_dataset
from ar_ray.members import MemberSpec, TrainOptions, train_member
from ar_ray.recipe.engine import fit


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    splits = load_dataset(None, 28)
    if args.quick:
        splits = splits.limit_per_class(10)
    config = RunConfig(epochs=1 if args.quick else 4)
    torch.set_num_threads(1)
    started = time.perf_counter()
    direct = [m["epoch_seconds"] for m in fit(config, splits).history]
    direct_wall = time.perf_counter() - started

    start_ray()
    with tempfile.TemporaryDirectory() as root:
        started = time.perf_counter()
        spec = MemberSpec("bench", config, "none", 1, "benchmark")
        train_member(spec, ray.put(splits), TrainOptions(root=root))
        train_wall = time.perf_counter() - started
        history = pd.read_csv(f"{root}/members/bench/metrics.csv")
    in_train = list(history["epoch_seconds"])
    frame = pd.DataFrame(
        [
            {
                "measure": "median epoch s",
                "direct": median(direct),
                "torch_trainer": median(in_train),
                "ratio": median(in_train) / median(direct),
            },
            {
                "measure": "wall s (incl. start-up)",
                "direct": direct_wall,
                "torch_trainer": train_wall,
                "ratio": train_wall / direct_wall,
            },
        ]
    )
    notes = [
        f"Default RunConfig, {config.epochs} epochs, {len(splits.train)} train images, "
        f"1 worker / 1 thread ({machine()})."
    ]
    write_results("train_overhead", frame, notes, args.quick)


if __name__ == "__main__":
    main()
