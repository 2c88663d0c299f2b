"""Images/s the training input delivers to the step, at 224 px, with no model behind it.

    .venv/bin/python bench/input_pipeline.py           # full: ~25 min on a 2-CPU machine at load 20
    .venv/bin/python bench/input_pipeline.py --quick   # smoke check: ~1 min, tiny settings

It iterates the engine's own train loader (`engine._train_loader`: the sampler, the dataset
with its per-sample seeding, the DataLoader with persistent workers and prefetch) over
synthetic random uint8 images stored at 256 px (round(224 / 0.875), as images are stored
for evaluation), for each policy of search_spaces/ar_default.yaml, 1 and 2 views (CR off
and on), with 1 and 2 loader workers, and the batched path (`BatchAugment`) run on the CPU
in the training process (one thread, like each loader worker), as it would run on a GPU.
Each run times one whole epoch after a warm-up epoch that starts the persistent workers,
so prefetch cannot carry batches over.

Rounds alternate the order of the cells (reversed every other round), so drift of a shared,
noisy machine falls on both sides of the 2-workers / 1-worker ratio, which is reported
per (policy, views) as the median and range over rounds.

Writes bench/results/input_pipeline.{csv,md} (with --quick: bench/results/quick/).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from common import machine_line, paired, parse_args, spread, write_results

from ar_ray.config import RunConfig
from ar_ray.data import ImageSplit
from ar_ray.data.size import stored_size
from ar_ray.recipe.engine import _train_loader
from ar_ray.recipe.sampling import BATCH, mixed_seed

IMAGE_SIZE = 224
STORED_PX = stored_size(IMAGE_SIZE)  # 256
POLICIES = ("randaugment", "trivialaugment", "autoaugment")  # ar_default.yaml's choices
VIEWS = (1, 2)
PATHS = (("per-image", 1), ("per-image", 2), ("batched (CPU)", 0))  # (path, loader workers)
FULL = {"images": 64, "batch": 16, "rounds": 3}
QUICK = {"images": 32, "batch": 8, "rounds": 1}


def config(policy: str, views: int, batch: int) -> RunConfig:
    """Mid-range values of ar_default.yaml's searched augmentation; CR on gives 2 views."""
    return RunConfig(
        image_size=IMAGE_SIZE,
        small_input=False,
        batch_size=batch,
        policy=policy,
        magnitude=9,
        num_ops=2,
        rrc_scale_min=0.25,
        erasing_p=0.25,
        cr_weight=0.1 if views == 2 else 0.0,
    )


def epoch_seconds(run: RunConfig, split: ImageSplit, workers: int, batched: bool) -> float:
    """One epoch through the loader (and the batched augmenter), after a warm-up epoch."""
    loader, augment = _train_loader(run, split, 0, 1, workers, batched)
    seconds = 0.0
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        started = time.perf_counter()
        for step, (inputs, _labels) in enumerate(loader):
            if augment is not None:
                generator = torch.Generator().manual_seed(mixed_seed(BATCH, 0, epoch, 0, step))
                augment(inputs, generator)
        seconds = time.perf_counter() - started
    del loader  # shuts the persistent workers down before the next cell starts its own
    return seconds


def main() -> None:
    args = parse_args("input pipeline images/s at 224 px")
    torch.set_num_threads(1)  # the batched path gets one core, as each loader worker has
    plan = QUICK if args.quick else FULL
    rng = np.random.default_rng(0)
    count = plan["images"]
    split = ImageSplit(
        rng.integers(0, 256, (count, 3, STORED_PX, STORED_PX), dtype=np.uint8),
        rng.integers(0, 10, count, dtype=np.int64),
        [str(i) for i in range(count)],
    )
    cells = [(p, v, path, w) for p in POLICIES for v in VIEWS for path, w in PATHS]
    rows: list[dict[str, Any]] = []
    for round_ in range(plan["rounds"]):
        for policy, views, path, workers in cells if round_ % 2 == 0 else cells[::-1]:
            run = config(policy, views, plan["batch"])
            delivered = count // plan["batch"] * plan["batch"]  # drop_last
            seconds = epoch_seconds(run, split, workers, path != "per-image")
            rows.append(
                {
                    "round": round_,
                    "policy": policy,
                    "views": views,
                    "path": path,
                    "workers": workers,
                    "images_per_s": delivered / seconds,
                    "views_per_s": delivered * views / seconds,
                }
            )
            print(rows[-1], flush=True)
    runs = pd.DataFrame(rows)
    runs["side"] = runs["path"] + " w" + runs["workers"].astype(str)
    summary = (
        runs.groupby(["policy", "views", "path", "workers"], sort=False)["images_per_s"]
        .agg(median="median", min="min", max="max", n="count")
        .reset_index()
    )
    ratios = []
    for (policy, views), group in runs.groupby(["policy", "views"], sort=False):
        ratio = paired(group, "images_per_s", "side", "per-image w1", "per-image w2")
        ratios.append({"policy": policy, "views": views, **spread(ratio)})
    every = paired(
        runs.assign(round=runs["round"].astype(str) + runs["policy"] + runs["views"].astype(str)),
        "images_per_s",
        "side",
        "per-image w1",
        "per-image w2",
    )
    ratios.append({"policy": "all", "views": "all", **spread(every)})
    notes = [
        machine_line(
            f"{count} random uint8 images stored at {STORED_PX} px, cropped to {IMAGE_SIZE}, "
            f"batch {plan['batch']}, {plan['rounds']} rounds; one timed epoch per run after a "
            "warm-up epoch; images/s counts images (each carrying its views)."
        ),
        "Goal: 2 loader workers deliver >= 1.8x the images/s of 1 worker.",
    ]
    write_results(
        "input_pipeline",
        {
            "images/s (median and range over rounds)": summary,
            "2 workers / 1 worker (paired per round)": pd.DataFrame(ratios),
            "runs": runs.drop(columns="side"),
        },
        notes,
        args.quick,
    )


if __name__ == "__main__":
    main()
