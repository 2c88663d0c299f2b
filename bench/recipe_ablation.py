"""Ablation of the recipe on the built-in split: what each part adds, seed by seed.

Rows: CE; SCE; SCE+CR; SCE+CR+MT (Mean Teacher as a second stage from mid-schedule); the
last with TenCrop; a 3-member ensemble of the SCE, SCE+CR and SCE+CR+MT runs (diverse
configs, weights fitted on validation as `ar-ray ensemble` fits them). Rows are centre crop
unless they say TenCrop (TenCrop of the 10,000 test images costs minutes per run on two
cores, so only the row that measures it pays for it). Every variant runs the same epochs
and seeds, so per-seed differences are paired.

    python bench/recipe_ablation.py --epochs 40 --seeds 0 1 2     # train, then report
    python bench/recipe_ablation.py --epochs 40 --seeds 1 --no-report   # one seed per process
    python bench/recipe_ablation.py --epochs 40 --seeds 0 1 2 --report-only

Each run's validation and test probabilities are kept under `runs/bench/recipe_ablation/`
(a finished run is not trained again), so seeds can train in separate processes and the
report can be rebuilt without training. Writes bench/results/recipe_ablation_e<epochs>.csv
(one row per run and row) and .md (mean ± std, paired differences).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from common import whole_split_probabilities

from ar_ray.config import RecipeConfig
from ar_ray.data import load_dataset
from ar_ray.ensemble_weights import combine, cross_fit, stratified_folds
from ar_ray.metrics import top_k_accuracy
from ar_ray.outputs import atomic_write_csv, atomic_write_text
from ar_ray.recipe.engine import fit

VARIANTS = ("CE", "SCE", "SCE+CR", "SCE+CR+MT")
ENSEMBLE_MEMBERS = ("SCE", "SCE+CR", "SCE+CR+MT")
MT_ROW, TENCROP_ROW, ENSEMBLE_ROW = "SCE+CR+MT", "SCE+CR+MT + TenCrop", "3-member ensemble"
BEST_MEMBER_ROW = "its best member (by val)"
RESULTS = Path(__file__).parent / "results"
RUNS = Path("runs/bench/recipe_ablation")


def variant_config(name: str, epochs: int, seed: int) -> RecipeConfig:
    """The default config with one part switched on at a time; MT starts mid-schedule."""
    changes = {
        "CE": {"sce_alpha": 1.0, "sce_beta": 0.0, "cr_weight": 0.0},
        "SCE": {"cr_weight": 0.0},
        "SCE+CR": {},
        "SCE+CR+MT": {"mt_weight": 1.0, "mt_start_epoch": epochs // 2},
    }[name]
    return RecipeConfig(**changes, epochs=epochs, seed=seed)


def run_path(epochs: int, seed: int, name: str) -> Path:
    return RUNS / f"e{epochs}_s{seed}_{name.replace('+', '_')}.npz"


def train_variant(name: str, epochs: int, seed: int, splits) -> None:
    path = run_path(epochs, seed, name)
    if path.exists():
        return
    config = variant_config(name, epochs, seed)
    started = time.perf_counter()
    result = fit(config, splits)
    seconds = time.perf_counter() - started
    evaluated = [("val", "center"), ("test", "center")]
    if name == MT_ROW:
        evaluated.append(("test", "tencrop"))
    probs = {
        f"{split}_{tta}": whole_split_probabilities(
            result.model, getattr(splits, split), config.image_size, tta
        )
        for split, tta in evaluated
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp.npz")
    np.savez(temporary, train_seconds=seconds, **probs)
    temporary.rename(path)
    test = top_k_accuracy(probs["test_center"], splits.test.labels, 1)
    print(f"seed {seed} {name}: test top-1 {100 * test:.2f} (centre), {seconds:.0f} s", flush=True)


def seed_rows(epochs: int, seed: int, splits) -> list[dict]:
    """One seed's table rows, from the saved probabilities of its four runs."""
    runs = {name: np.load(run_path(epochs, seed, name)) for name in VARIANTS}
    test_labels, val_labels = splits.test.labels, splits.val.labels

    def row(name: str, test_probs: np.ndarray, seconds: float = np.nan) -> dict:
        top1 = top_k_accuracy(test_probs, test_labels, 1)
        return {
            "row": name,
            "seed": seed,
            "epochs": epochs,
            "test_top1": top1,
            "train_seconds": seconds,
        }

    rows = [row(n, runs[n]["test_center"], float(runs[n]["train_seconds"])) for n in VARIANTS]
    rows.append(row(TENCROP_ROW, runs[MT_ROW]["test_tencrop"]))
    val = np.stack([runs[n]["val_center"] for n in ENSEMBLE_MEMBERS])
    test = np.stack([runs[n]["test_center"] for n in ENSEMBLE_MEMBERS])
    fit = cross_fit(val, val_labels, stratified_folds(val_labels, seed=seed))
    rows.append(row(ENSEMBLE_ROW, combine(test, fit.fitted[fit.chosen])))
    best = max(range(len(val)), key=lambda m: top_k_accuracy(val[m], val_labels, 1))
    rows.append(row(BEST_MEMBER_ROW, test[best]))
    return rows


def paired_differences(frame: pd.DataFrame) -> pd.DataFrame:
    """Each step's gain over the row it builds on, per seed (points of test top-1)."""
    steps = [
        ("SCE", "CE"),
        ("SCE+CR", "SCE"),
        (MT_ROW, "SCE+CR"),
        (TENCROP_ROW, MT_ROW),
        (ENSEMBLE_ROW, BEST_MEMBER_ROW),
    ]
    wide = frame.pivot(index="seed", columns="row", values="test_top1")
    return pd.DataFrame({f"{new} − {old}": 100 * (wide[new] - wide[old]) for new, old in steps})


def write_report(epochs: int, seeds: list[int], splits) -> str:
    frame = pd.DataFrame([r for seed in seeds for r in seed_rows(epochs, seed, splits)])
    atomic_write_csv(RESULTS / f"recipe_ablation_e{epochs}.csv", frame)
    summary = frame.groupby("row", sort=False)["test_top1"].agg(["mean", "std"])
    differences = paired_differences(frame)
    lines = [
        f"Built-in split (500 train / 500 val images, 10 classes), default config, {epochs} "
        f"epochs, seeds {seeds}, torch {torch.__version__}; test top-1 (%) on the full "
        "10,000-image test set, centre crop unless the row says TenCrop.",
        "",
        "| row | test top-1, mean ± std | per seed |",
        "| --- | --- | --- |",
    ]
    for name, stats in summary.iterrows():
        per_seed = frame[frame["row"] == name]["test_top1"].map(lambda v: f"{100 * v:.2f}")
        lines.append(
            f"| {name} | {100 * stats['mean']:.2f} ± {100 * stats['std']:.2f} "
            f"| {' / '.join(per_seed)} |"
        )
    lines += [
        "",
        "Paired per-seed differences (points):",
        "",
        "| step | mean | per seed |",
        "| --- | --- | --- |",
    ]
    for step, values in differences.items():
        lines.append(
            f"| {step} | {values.mean():+.2f} | {' / '.join(f'{v:+.2f}' for v in values)} |"
        )
    text = "\n".join(lines) + "\n"
    atomic_write_text(RESULTS / f"recipe_ablation_e{epochs}.md", text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--no-report", action="store_true", help="train only")
    parser.add_argument("--report-only", action="store_true", help="use saved runs only")
    args = parser.parse_args()
    splits = load_dataset(None, RecipeConfig().image_size)
    if not args.report_only:
        for seed in args.seeds:
            for name in VARIANTS:
                train_variant(name, args.epochs, seed, splits)
    if not args.no_report:
        print(write_report(args.epochs, args.seeds, splits))


if __name__ == "__main__":
    main()
