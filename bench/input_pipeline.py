"""Images/s the training input delivers to the step, at 224 px, with no model behind it.

    .venv/bin/python bench/input_pipeline.py           # full: ~30 min on a 2-CPU machine at load 20
    .venv/bin/python bench/input_pipeline.py --quick   # smoke check: ~2 min, tiny settings
    .venv/bin/python bench/input_pipeline.py --part loader    # the loader tables only: ~25 min
    .venv/bin/python bench/input_pipeline.py --part batched   # old vs new BatchAugment: ~3 min

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

The `batched` part compares `BatchAugment` with the implementation before issue 17 (loaded
from git at BEFORE_ISSUE_17 into a temporary module, so the package keeps no copy of it),
one view of a 128-image batch at a time on one CPU thread, sides alternating within every
round: policy op calls per view (the old path made one per distinct (op, magnitude) in the
batch, the new one one per op) and the images/s ratio new / old, paired per round.

Writes bench/results/input_pipeline.{csv,md} and input_pipeline_batched.{csv,md} (with
--quick: bench/results/quick/).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import torch
from common import BENCH, machine_line, paired, parse_args, spread, write_results

from ar_ray.config import RecipeConfig
from ar_ray.data import ImageSplit
from ar_ray.data.size import stored_size
from ar_ray.recipe.batch_augment import BatchAugment
from ar_ray.recipe.engine import _train_loader
from ar_ray.recipe.sampling import BATCH, mixed_seed

IMAGE_SIZE = 224
STORED_PX = stored_size(IMAGE_SIZE)  # 256
POLICIES = ("randaugment", "trivialaugment", "autoaugment")  # ar_default.yaml's choices
VIEWS = (1, 2)
PATHS = (("per-image", 1), ("per-image", 2), ("batched (CPU)", 0))  # (path, loader workers)
FULL = {"images": 64, "batch": 16, "rounds": 3}
QUICK = {"images": 32, "batch": 8, "rounds": 1}
BEFORE_ISSUE_17 = "5554c403d7c90c9f4e55d4317b828b8993c36e60"  # batch_augment.py grouping by key
COMPARE = {"batch": 128, "rounds": 7, "views": 3}  # views timed per side and round
COMPARE_QUICK = {"batch": 16, "rounds": 3, "views": 1}


def config(policy: str, views: int, batch: int) -> RecipeConfig:
    """Mid-range values of ar_default.yaml's searched augmentation; CR on gives 2 views."""
    return RecipeConfig(
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


def epoch_seconds(run: RecipeConfig, split: ImageSplit, workers: int, batched: bool) -> float:
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


def previous_batch_augment() -> ModuleType:
    """ar_ray/recipe/batch_augment.py as it was before issue 17, as a throwaway module."""
    source = subprocess.run(
        ["git", "show", f"{BEFORE_ISSUE_17}:ar_ray/recipe/batch_augment.py"],
        cwd=BENCH.parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "batch_augment_before_issue17.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def counted_previous(run: RecipeConfig, module: ModuleType) -> Any:
    """The old BatchAugment, its policy counting op calls in `op_calls` as the new one does
    (the old path made one v2 op call per group of images with the same (op, magnitude))."""
    augment = module.BatchAugment(run, views=1)
    batched = augment.policy
    batched.op_calls = 0
    apply = batched.policy._apply_image_or_video_transform

    def counting(*args: Any, **kwargs: Any) -> Any:
        batched.op_calls += 1
        return apply(*args, **kwargs)

    batched.policy._apply_image_or_video_transform = counting
    return augment


def policy_only(augment: Any, crops: torch.Tensor, generator: torch.Generator) -> None:
    """The policy step of one view on ready crops: the old policy's call, or the new one's
    draw, plan and apply (its parameters already on the CPU, where the crops are)."""
    policy = augment.policy
    if not hasattr(policy, "plan"):
        policy(crops, generator)
        return
    for draw in policy.draw(len(crops), crops.shape[-1], generator):
        plan = policy.plan(draw, crops.shape[-1])
        crops = policy.apply(crops, plan, plan.params)


def time_views(augment: Any, images: torch.Tensor, crops: torch.Tensor, views: int) -> dict:
    """Seconds per whole view and per policy step, and policy op calls per view, over
    `views` views with fixed seeds."""
    calls = augment.policy.op_calls
    started = time.perf_counter()
    for view in range(views):
        augment.view(images, torch.Generator().manual_seed(view))
    seconds = (time.perf_counter() - started) / views
    op_calls = (augment.policy.op_calls - calls) / views
    started = time.perf_counter()
    for view in range(views):
        policy_only(augment, crops, torch.Generator().manual_seed(view))
    policy_seconds = (time.perf_counter() - started) / views
    return {
        "s_per_view": seconds,
        "policy_s_per_view": policy_seconds,
        "op_calls_per_view": op_calls,
    }


def compare_batched(quick: bool) -> None:
    """Old vs new BatchAugment, one view of a batch at a time, sides alternating per round."""
    plan = COMPARE_QUICK if quick else COMPARE
    images = torch.randint(0, 256, (plan["batch"], 3, STORED_PX, STORED_PX), dtype=torch.uint8)
    crops = images[..., :IMAGE_SIZE, :IMAGE_SIZE].contiguous()
    previous = previous_batch_augment()
    sides = {}
    for policy in POLICIES:
        run = config(policy, 1, plan["batch"])
        sides[policy] = {"before": counted_previous(run, previous), "now": BatchAugment(run, 1)}
        for augment in sides[policy].values():
            time_views(augment, images, crops, 1)  # warm-up: magnitude tables, allocator
    rows = []
    for round_ in range(plan["rounds"]):
        order = ("before", "now") if round_ % 2 == 0 else ("now", "before")
        for policy in POLICIES:
            for side in order:
                timing = time_views(sides[policy][side], images, crops, plan["views"])
                rows.append({"round": round_, "policy": policy, "side": side, **timing})
                rows[-1]["images_per_s"] = plan["batch"] / timing["s_per_view"]
                rows[-1]["policy_images_per_s"] = plan["batch"] / timing["policy_s_per_view"]
                print(rows[-1], flush=True)
    runs = pd.DataFrame(rows)
    summary = (
        runs.groupby(["policy", "side"], sort=False)
        .agg(
            op_calls_per_view=("op_calls_per_view", "mean"),
            images_per_s=("images_per_s", "median"),
            min=("images_per_s", "min"),
            max=("images_per_s", "max"),
            policy_images_per_s=("policy_images_per_s", "median"),
        )
        .reset_index()
    )
    ratios = [
        {"policy": policy, "step": step, **spread(paired(group, column, "side", "before", "now"))}
        for policy, group in runs.groupby("policy", sort=False)
        for step, column in (("whole view", "images_per_s"), ("policy", "policy_images_per_s"))
    ]
    notes = [
        machine_line(
            f"{plan['batch']} random uint8 images stored at {STORED_PX} px, one view (crop to "
            f"{IMAGE_SIZE}, flip, policy, erasing) per call, torch on 1 thread; "
            f"{plan['views']} views per side and round, {plan['rounds']} rounds, the side "
            f"order reversed every other round. 'before' is batch_augment.py at "
            f"{BEFORE_ISSUE_17[:7]}."
        ),
        "Goal (issue 17): trivialaugment at batch 128 makes <= 16 policy op calls per view "
        "and runs >= 1.5x the images/s of 'before'. 'policy' times the policy step alone, "
        f"on {IMAGE_SIZE} px crops of the same images.",
    ]
    write_results(
        "input_pipeline_batched",
        {
            "op calls per view (mean) and images/s (median, range over rounds)": summary,
            "now / before images/s (paired per round)": pd.DataFrame(ratios),
            "runs": runs,
        },
        notes,
        quick,
    )


def add_part(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--part",
        choices=("all", "loader", "batched"),
        default="all",
        help="loader: the train loader's images/s; batched: old vs new BatchAugment",
    )


def main() -> None:
    args = parse_args("input pipeline images/s at 224 px", add_part)
    torch.set_num_threads(1)  # the batched path gets one core, as each loader worker has
    if args.part in ("all", "batched"):
        compare_batched(args.quick)
    if args.part in ("all", "loader"):
        measure_loader(args.quick)


def measure_loader(quick: bool) -> None:
    """Every (policy, views, path, workers) cell through the engine's loader, per round."""
    plan = QUICK if quick else FULL
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
        quick,
    )


if __name__ == "__main__":
    main()
