"""Ray Train's cost: a member's epochs in a 1-worker `TorchTrainer` vs `engine.fit` directly.

    .venv/bin/python bench/train_overhead.py           # full: ~2 min on an idle 2-CPU machine
    .venv/bin/python bench/train_overhead.py --quick   # smoke check: ~1 min, tiny settings

Same config and data, one CPU thread both ways: `engine.fit` in a fresh process with
OMP_NUM_THREADS=1 (how Ray starts a 1-CPU worker) against `ar_ray.members.train_member`
with one worker on one CPU. Reports median epoch seconds (the engine's timer), median
seconds between epoch reports (adds Train's rank-0 checkpoint upload and report), and
whole wall-clock with ray.init and Train's start-up (worker group, process group, final
checkpoint publish) included.

Writes bench/results/train_overhead.{csv,md} (with --quick: bench/results/quick/).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from common import (
    Timing,
    bench_splits,
    direct_timing,
    gaps,
    machine_line,
    overhead_table,
    parse_args,
    start_ray,
    write_results,
)

from ar_ray.config import RecipeConfig
from ar_ray.data import DatasetSplits
from ar_ray.members import MemberSpec, TrainOptions, member_dir, train_member


def timed_member_loop(stamps_file: str) -> Callable[[dict[str, Any]], None]:
    """The project's member loop, noting when each epoch's report returns.

    The engine's history does not say when Train's report finished, so the worker wraps the
    `fit` the loop calls and writes the times to `stamps_file` (same machine) at the end.
    """

    def loop(loop_config: dict[str, Any]) -> None:
        import ar_ray.checkpointed_fit as checkpointed
        import ar_ray.members as members

        real_fit, stamps = checkpointed.fit, []

        def timed_fit(*args: Any, on_epoch: Callable, **kwargs: Any) -> Any:
            def timed(metrics: dict[str, Any], state: dict[str, Any]) -> None:
                on_epoch(metrics, state)
                stamps.append(time.perf_counter())

            return real_fit(*args, on_epoch=timed, **kwargs)

        checkpointed.fit = timed_fit
        try:
            members.member_train_loop(loop_config)
        finally:
            checkpointed.fit = real_fit
            Path(stamps_file).write_text(json.dumps(stamps))

    return loop


def member_timing(
    config: RecipeConfig, splits: DatasetSplits, root: str, ray_init: float
) -> Timing:
    spec = MemberSpec("bench", config, trial_id="none", tune_rank=1, reason="benchmark")
    stamps = Path(root) / "stamps.json"
    started = time.perf_counter()
    train_member(spec, ray.put(splits), TrainOptions(root=root), timed_member_loop(str(stamps)))
    wall = time.perf_counter() - started + ray_init
    history = pd.read_csv(Path(member_dir(root, spec.member_id)) / "metrics.csv")
    intervals = gaps(json.loads(stamps.read_text()))
    return Timing([float(s) for s in history["epoch_seconds"]], intervals, wall)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    limit, epochs = (10, 2) if args.quick else (None, 4)
    splits = bench_splits(limit)
    config = RecipeConfig(epochs=epochs)
    direct = direct_timing(config, limit)
    ray_init = start_ray()
    with tempfile.TemporaryDirectory() as root:
        in_train = member_timing(config, splits, root, ray_init)
    table = overhead_table(direct, in_train, "torch_trainer", ray_init)
    notes = [
        machine_line(
            f"Default RecipeConfig, {epochs} epochs, {len(splits.train)} train / "
            f"{len(splits.val)} val images, 1 thread both ways (direct: fresh process with "
            "OMP_NUM_THREADS=1; Train: 1 worker, 1 CPU)."
        ),
        "Ratio = TorchTrainer / direct. 'Between epoch reports' adds the rank-0 checkpoint "
        "upload and report (epochs 2 on); the TorchTrainer wall includes ray.init.",
    ]
    write_results(
        "train_overhead", {"epoch time: engine.fit vs TorchTrainer": table}, notes, args.quick
    )


if __name__ == "__main__":
    main()
