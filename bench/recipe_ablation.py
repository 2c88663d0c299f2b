"""Ablation of the recipe on the built-in split: CE vs SCE vs SCE+CR vs SCE+CR+MT.

Same epochs and seeds for every variant; test top-1 with centre crop and with TenCrop.

    python bench/recipe_ablation.py [--seeds 0 1 2] [--epochs 8]

Writes bench/results/recipe_ablation.csv (one row per run) and recipe_ablation.md (means).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from ar_ray.config import RunConfig
from ar_ray.data import load_dataset
from ar_ray.outputs import atomic_write_csv, atomic_write_text
from ar_ray.recipe.engine import evaluate, fit

VARIANTS = {
    "CE": {"sce_alpha": 1.0, "sce_beta": 0.0, "cr_weight": 0.0},
    "SCE": {"cr_weight": 0.0},
    "SCE+CR": {},
    "SCE+CR+MT": {"mt_weight": 1.0, "mt_start_epoch": 4},
}
RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=RunConfig().epochs)
    args = parser.parse_args()
    splits = load_dataset(None, 28)
    rows = []
    for seed in args.seeds:
        for name, changes in VARIANTS.items():
            config = RunConfig(**changes, epochs=args.epochs, seed=seed)
            started = time.perf_counter()
            result = fit(config, splits)
            seconds = time.perf_counter() - started
            scores = {
                tta: evaluate(result.model, splits.test, config.image_size, tta)["top1"]
                for tta in ("center", "tencrop")
            }
            rows.append(
                {
                    "variant": name,
                    "seed": seed,
                    "epochs": args.epochs,
                    "test_top1_center": scores["center"],
                    "test_top1_tencrop": scores["tencrop"],
                    "train_seconds": round(seconds, 1),
                }
            )
            print(rows[-1], flush=True)
            atomic_write_csv(RESULTS / "recipe_ablation.csv", pd.DataFrame(rows))
    frame = pd.DataFrame(rows)
    summary = frame.groupby("variant", sort=False).agg(
        center_mean=("test_top1_center", "mean"),
        center_std=("test_top1_center", "std"),
        tencrop_mean=("test_top1_tencrop", "mean"),
        tencrop_std=("test_top1_tencrop", "std"),
        train_seconds=("train_seconds", "mean"),
    )
    lines = [
        f"Built-in split (500 train images), {args.epochs} epochs, seeds {args.seeds}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, full 10,000-image test.",
        "",
        "| variant | test top-1 centre | test top-1 TenCrop | train s |",
        "| --- | --- | --- | --- |",
    ]
    for name, row in summary.iterrows():
        lines.append(
            f"| {name} | {100 * row.center_mean:.2f} ± {100 * row.center_std:.2f} "
            f"| {100 * row.tencrop_mean:.2f} ± {100 * row.tencrop_std:.2f} "
            f"| {row.train_seconds:.0f} |"
        )
    atomic_write_text(RESULTS / "recipe_ablation.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
