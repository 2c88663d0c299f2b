"""Staged search: the epochs a two-phase search spends against one search, and what it finds.

A scaled copy of the paper's schedule on the built-in data: 16 epochs, Mean Teacher from
epoch 8 with a 2-epoch ramp-up, `mt_weight`/`mt_decay` searched with stage-one keys (SCE,
CR and augmentation weights, lr), 12 trials. Three arms on the same seeds (the search's TPE
seed and every trial's seed), in an order rotated per seed:

- one search, ASHA with its first rung raised to when Mean Teacher has acted (epoch 10);
- two phases (ar-ray's default here): 12 stage-one trials to epoch 8, then 6 trials of the
  Mean Teacher keys resuming the best 4 stage-one checkpoints;
- no early stopping (one search whose first rung is the last epoch).

Per arm: epochs spent (every trial's epochs in its phase), the best finished trial's val
top-1, the test top-1 of its final checkpoint (centre crop, the whole test set) and wall
time. Paired over seeds: the epoch ratio and the test top-1 difference with a bootstrap
interval over seeds and test images.

    python bench/staged_search.py            # 3 seeds
    python bench/staged_search.py --quick    # a smoke run into results/quick/
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from common import (
    bench_splits,
    machine_line,
    paired_bootstrap,
    parse_args,
    start_ray,
    write_results,
)

from ar_ray.data import DatasetSplits
from ar_ray.recipe.checkpoint import CHECKPOINT_FILE, inference_model, load_checkpoint
from ar_ray.recipe.engine import split_probabilities
from ar_ray.search import run_tune
from ar_ray.search_plan import PhaseBudget, flat_search, two_phase_search
from ar_ray.search_space import load_search_space
from ar_ray.tune_request import TuneRequest

RUNS = Path("runs/bench/staged_search")
ARMS = ("one search (raised rung)", "two phases", "no early stopping")


def space_file(args: argparse.Namespace) -> Path:
    """The scaled paper space: the quick space's stage-one keys plus Mean Teacher's."""
    space = {
        "image_size": 28,
        "epochs": args.epochs,
        "mt_start_epoch": args.mt_start,
        "mt_rampup_epochs": float(args.rampup),
        "mt_weight": {"loguniform": [0.3, 3.0]},
        "mt_decay": {"uniform": [0.9, 0.995]},
        "sce_alpha": {"loguniform": [0.1, 2.0]},
        "sce_beta": {"uniform": [0.1, 1.0]},
        "cr_weight": {"loguniform": [0.02, 0.5]},
        "lr": {"loguniform": [0.0005, 0.005]},
        "magnitude": {"int": [3, 12]},
    }
    path = RUNS / ("quick" if args.quick else "full") / "space.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def arm_request(arm: str, args: argparse.Namespace, seed: int, space: Path) -> TuneRequest:
    """One search or two phases, at the same trials, seed and concurrency."""
    stopping = {
        ARMS[0]: {"staged_search": "off"},
        ARMS[1]: {"staged_search": "auto"},
        ARMS[2]: {"staged_search": "off", "grace_period": args.epochs},
    }[arm]
    return TuneRequest(
        space=str(space),
        trials=args.trials,
        storage=str(RUNS / ("quick" if args.quick else "full")),
        name=f"s{seed}-{ARMS.index(arm)}",
        limit_per_class=args.limit,
        max_concurrent=2,
        seed=seed,
        **stopping,
    )


def test_correct(run: Path, checkpoint: str, splits: DatasetSplits) -> np.ndarray:
    """Per test image, whether the best trial's final checkpoint gets it right."""
    model = inference_model(load_checkpoint(run / checkpoint / CHECKPOINT_FILE))
    chunks = [
        (probs.argmax(1) == labels).numpy()
        for labels, probs in split_probabilities(model, splits.test, 28, "center")
    ]
    return np.concatenate(chunks)


def run_arm(arm: str, args, seed: int, space: Path, splits: DatasetSplits) -> dict:
    request = arm_request(arm, args, seed, space)
    run = Path(request.storage) / request.name
    shutil.rmtree(run, ignore_errors=True)
    started = time.perf_counter()
    board = run_tune(request, load_search_space(space), splits)
    wall = time.perf_counter() - started
    best = board.iloc[0]
    correct = test_correct(run, best["checkpoint"], splits)
    np.save(run / "test_correct.npy", correct)
    return {
        "arm": arm,
        "seed": seed,
        "trials": len(board),
        "epochs": int(board["epochs_run"].sum()),
        "best_trial": best["trial_id"],
        "best_phase": best["phase"],
        "best_val_top1": 100 * float(best["val_top1"]),
        "test_top1": 100 * float(correct.mean()),
        "wall_seconds": wall,
    }


def arms_in_order(seed: int) -> list[str]:
    """Rotated per seed, so no arm always runs first (on a warmer or quieter machine)."""
    shift = seed % len(ARMS)
    return list(ARMS[shift:] + ARMS[:shift])


def paired_rows(runs: pd.DataFrame, args) -> list[dict]:
    """Each arm against one search with the raised rung, paired by seed."""
    base = runs[runs["arm"] == ARMS[0]].set_index("seed")
    rows = []
    for arm in ARMS[1:]:
        other = runs[runs["arm"] == arm].set_index("seed")
        ratio = other["epochs"] / base["epochs"]
        diff = other["test_top1"] - base["test_top1"]
        correct = np.stack(
            [
                np.load(RUNS / args.folder / f"s{s}-{ARMS.index(arm)}" / "test_correct.npy").astype(
                    float
                )
                - np.load(RUNS / args.folder / f"s{s}-0" / "test_correct.npy")
                for s in args.seeds
            ]
        )
        low, high = paired_bootstrap(correct, seed=len(args.seeds))
        rows.append(
            {
                "arm vs one search": arm,
                "epochs ratio (median)": ratio.median(),
                "epochs ratio range": f"{ratio.min():.2f} to {ratio.max():.2f}",
                "test top-1 difference (mean, points)": diff.mean(),
                "per seed": " / ".join(f"{v:+.2f}" for v in diff),
                "95% bootstrap (seeds x test images)": f"{low:+.2f} to {high:+.2f}",
                "wall ratio (median)": (other["wall_seconds"] / base["wall_seconds"]).median(),
            }
        )
    return rows


VIPRIORS = {  # the paper's setting (search_spaces/ar_default.yaml), 64 trials, 5 members
    "trials": 64,
    "epochs": 100,
    "cut": 50,
    "ramp": 5,
    "members": 5,
    "epoch_seconds": 50.0,  # 50k images, two CR views at ~2,500 crops/s, teacher and val
    "usd_per_gpu_hour": 2.0,  # a spot GPU
    "gpus": 8,
}


def projection_rows() -> list[dict]:
    """The VIPriors projection on paper, from the same plan arithmetic `ar-ray tune` prints:
    expected search epochs under ASHA, plus the members an ensemble still has to train (the
    expected number of trials that ran to the end are reused, up to the members)."""
    v = VIPRIORS
    one = flat_search(v["trials"], v["epochs"], v["cut"] + v["ramp"], 3)
    two = two_phase_search(v["trials"], v["trials"] // 2, v["cut"], v["epochs"], 1, v["ramp"], 3)
    fifo = flat_search(v["trials"], v["epochs"], v["epochs"], 3)

    def finishing(phase: PhaseBudget) -> float:  # trials expected to reach the last epoch
        return phase.trials / phase.reduction_factor ** len(phase.rungs)

    arms = [
        ("one search, raised rung, members trained (before)", one, 0.0),
        ("one search, raised rung, members reused", one, finishing(one.phases[-1])),
        ("two phases, members reused", two, finishing(two.phases[-1])),
        ("no early stopping, members reused", fifo, finishing(fifo.phases[-1])),
    ]
    rows = []
    for name, plan, reusable in arms:
        trained = max(0.0, v["members"] - reusable) * v["epochs"]
        epochs = plan.expected_epochs + trained
        gpu_hours = epochs * v["epoch_seconds"] / 3600
        rows.append(
            {
                "VIPriors (64 trials, 5 members)": name,
                "search epochs (expected)": round(plan.expected_epochs),
                "member epochs": round(trained),
                "epoch-units": round(epochs),
                "GPU-hours": round(gpu_hours, 1),
                "hours on 8 GPUs": round(gpu_hours / v["gpus"], 1),
                "USD at $2/GPU-hour": round(gpu_hours * v["usd_per_gpu_hour"]),
            }
        )
    return rows


def report(runs: pd.DataFrame, args, splits: DatasetSplits) -> None:
    per_arm = [
        {
            "arm": arm,
            "epochs spent (mean)": rows["epochs"].mean(),
            "per seed": " / ".join(str(v) for v in rows["epochs"]),
            "best val top-1 (mean)": rows["best_val_top1"].mean(),
            "test top-1 of the best (mean)": rows["test_top1"].mean(),
            "test per seed": " / ".join(f"{v:.2f}" for v in rows["test_top1"]),
            "wall minutes (mean)": rows["wall_seconds"].mean() / 60,
        }
        for arm, rows in ((arm, runs[runs["arm"] == arm]) for arm in ARMS)
    ]
    notes = [
        machine_line(
            f"Built-in split: {len(splits.train)} train, {len(splits.val)} val, "
            f"{len(splits.test)} test images at 28 px; {args.trials} trials of {args.epochs} "
            f"epochs, Mean Teacher from epoch {args.mt_start} with a {args.rampup}-epoch "
            f"ramp-up; two trials at a time, 1 CPU each; seeds {args.seeds}, arms rotated "
            "per seed. Epochs count every trial's epochs in its phase."
        ),
        "Command: `python bench/staged_search.py"
        + (" --quick" if args.quick else "")
        + f" --seeds {' '.join(map(str, args.seeds))} --trials {args.trials} --epochs "
        f"{args.epochs} --mt-start {args.mt_start} --rampup {args.rampup}"
        + (f" --limit {args.limit}`" if args.limit else "`"),
    ]
    tables = {
        "Per arm": pd.DataFrame(per_arm),
        "Against one search with the raised rung (paired by seed)": pd.DataFrame(
            paired_rows(runs, args)
        ),
        "Runs": runs,
        "Projection: the paper's setting, on paper": pd.DataFrame(projection_rows()),
    }
    write_results("staged_search", tables, notes, args.quick)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--mt-start", type=int, default=8)
    parser.add_argument("--rampup", type=int, default=2)
    parser.add_argument("--limit", type=int, help="images per class (default: all 50)")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], add_arguments)
    if args.quick:
        args.seeds, args.trials, args.epochs, args.mt_start, args.rampup = [0, 1], 4, 4, 2, 1
        args.limit = 5
    args.folder = "quick" if args.quick else "full"
    whole = bench_splits(None)  # trials see `--limit` images a class; test is the whole set
    splits = replace(whole.limit_per_class(args.limit), test=whole.test)
    space = space_file(args)
    start_ray()
    rows = [
        run_arm(arm, args, seed, space, splits)
        for seed in args.seeds
        for arm in arms_in_order(seed)
    ]
    report(pd.DataFrame(rows), args, splits)


if __name__ == "__main__":
    main()
