"""What an ensemble gains over its best member, by where the members come from and how many.

On the built-in data, per seed, member sources of up to `--k-max` members, each trained for
`--epochs` with the default recipe unless said otherwise:

- trials reused: configs drawn from search_spaces/quick.yaml's space (as a search's first,
  random, trials are), the best K by val; in `ar-ray tune` + `ensemble` they are finished
  trials, so they cost no epochs beyond the search;
- snapshots: one run with K cosine cycles (`lr_cycles`), a member at each cycle's end;
- independent seeds: the default config, K seeds;
- mixed architectures: member i on ARCHS[i % 4], its own seed;
- two mixes at K = k-max: half trials plus half snapshots, half trials plus half backbones.

Each K-member ensemble is weighted as `ar-ray ensemble` weights it (cross-fitted on val,
uniform unless a fitted method's out-of-fold gain is beyond noise) and compared on the whole
test set (centre crop) with the member best on val. Gains are paired over seeds and test
images: the mean over seeds and a bootstrap 95% interval resampling both.

    python bench/ensemble_gain.py                       # 3 seeds, report
    python bench/ensemble_gain.py --seeds 1 --no-report # one seed per process
    python bench/ensemble_gain.py --sources snapshots --no-report  # one source
    python bench/ensemble_gain.py --report-only
    python bench/ensemble_gain.py --quick

A finished run's val and test probabilities are kept under runs/bench/ensemble_gain/, so
seeds can train in separate processes (or sessions) and the report rebuilt without training.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from common import (
    bench_splits,
    machine_line,
    paired_bootstrap,
    parse_args,
    whole_split_probabilities,
    write_results,
)

from ar_ray.config import RecipeConfig, cycle_ends
from ar_ray.ensemble_weights import best_member, combine, cross_fit, stratified_folds
from ar_ray.metrics import top_k_correct
from ar_ray.recipe.checkpoint import inference_model
from ar_ray.recipe.engine import fit
from ar_ray.search_space import load_search_space

ARCHS = ("resnet18", "regnet_y_400mf", "shufflenet_v2_x1_0", "mobilenet_v3_small")
SPACE = Path(__file__).parent.parent / "search_spaces" / "quick.yaml"
RUNS = Path("runs/bench/ensemble_gain")


@dataclass(frozen=True)
class Settings:
    epochs: int
    k_values: tuple[int, ...]
    limit_per_class: int | None
    quick: bool
    sources: tuple[str, ...] = ()  # empty: all

    @property
    def k_max(self) -> int:
        return max(self.k_values)

    def folder(self, seed: int) -> Path:
        tag = "quick_" if self.quick else ""
        return RUNS / f"{tag}e{self.epochs}_l{self.limit_per_class}_s{seed}"


def member_seed(seed: int, index: int) -> int:
    """Every member of a bench seed its own training seed; the same index in every source."""
    return 1000 * seed + index


def trial_configs(settings: Settings, seed: int) -> list[RecipeConfig]:
    """k-max configs drawn from the quick space by Tune's own samplers, seeded per bench seed."""
    space = load_search_space(SPACE)
    rng = np.random.default_rng(seed)
    base = space.base_config().replace(epochs=settings.epochs)
    configs = []
    for index in range(settings.k_max):
        drawn = {
            key: domain.to_tune().sample(random_state=rng) for key, domain in space.searched.items()
        }
        configs.append(base.replace(**drawn, seed=member_seed(seed, index)))
    return configs


def default_config(settings: Settings, seed: int, index: int, **changes) -> RecipeConfig:
    return RecipeConfig(epochs=settings.epochs, seed=member_seed(seed, index), **changes)


@dataclass
class Run:
    """One training run's members: [M, N, K] val and test probabilities (M > 1 for snapshots)."""

    val: np.ndarray
    test: np.ndarray
    epochs: int
    seconds: float


def train(name: str, config: RecipeConfig, settings: Settings, seed: int, splits) -> Run:
    """Train `config` once, or load its saved run; snapshots: the model at each cycle's end."""
    path = settings.folder(seed) / f"{name}.npz"
    if not path.exists():
        ends = set(cycle_ends(config.epochs, config.lr_cycles))
        val, test = [], []

        def keep(metrics: dict, state: dict) -> None:
            if metrics["epoch"] in ends:
                model = inference_model(state)
                val.append(
                    whole_split_probabilities(model, splits.val, config.image_size, "center")
                )
                test.append(
                    whole_split_probabilities(model, splits.test, config.image_size, "center")
                )

        started = time.perf_counter()
        fit(config, splits, on_epoch=keep)
        seconds = time.perf_counter() - started
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp.npz")
        np.savez(
            temporary, val=np.stack(val), test=np.stack(test), epochs=config.epochs, seconds=seconds
        )
        temporary.rename(path)
        print(
            f"seed {seed} {name}: {len(val)} member(s), {config.epochs} epochs, {seconds:.0f} s",
            flush=True,
        )
    saved = np.load(path)
    return Run(saved["val"], saved["test"], int(saved["epochs"]), float(saved["seconds"]))


@dataclass
class Members:
    """A K-member ensemble to score, and the epochs it cost beyond a search."""

    val: np.ndarray
    test: np.ndarray
    extra_epochs: int


def stack(runs: list[Run], extra_epochs: int) -> Members:
    return Members(
        np.concatenate([r.val for r in runs]), np.concatenate([r.test for r in runs]), extra_epochs
    )


def best_trials(settings: Settings, seed: int, splits, k: int) -> Members:
    """The k best of the drawn trials on val, ranked as `best_member` ranks (top-1, then
    NLL), so the one-trial "ensemble" is the member every larger K compares with."""
    runs = [
        train(f"trial{i}", c, settings, seed, splits)
        for i, c in enumerate(trial_configs(settings, seed))
    ]
    left, order = list(range(len(runs))), []
    while len(order) < k:
        pick = left[best_member(np.stack([runs[i].val[0] for i in left]), splits.val.labels)]
        order.append(pick)
        left.remove(pick)
    return stack([runs[i] for i in order], 0)


def snapshots(settings: Settings, seed: int, splits, k: int) -> Members:
    first_cycle = cycle_ends(settings.epochs, k)[0]
    warmup = min(RecipeConfig.warmup_epochs, first_cycle / 2)  # over before the first snapshot
    config = default_config(settings, seed, 0, lr_cycles=k, warmup_epochs=warmup)
    name = "seed0" if k == 1 else f"snapshots{k}"  # one cycle is the plain run
    run = train(name, config, settings, seed, splits)
    return stack([run], run.epochs)


def independent(settings: Settings, seed: int, splits, k: int) -> Members:
    runs = [
        train(f"seed{i}", default_config(settings, seed, i), settings, seed, splits)
        for i in range(k)
    ]
    return stack(runs, sum(r.epochs for r in runs))


def architectures(settings: Settings, seed: int, splits, k: int) -> Members:
    runs = []
    for i in range(k):
        arch = ARCHS[i % len(ARCHS)]
        name = f"seed{i}" if arch == RecipeConfig.arch else f"{arch}{i}"  # resnet18: the seed run
        runs.append(
            train(name, default_config(settings, seed, i, arch=arch), settings, seed, splits)
        )
    return stack(runs, sum(r.epochs for r in runs))


def mix(first: Callable, second: Callable) -> Callable:
    def members(settings: Settings, seed: int, splits, k: int) -> Members:
        a, b = first(settings, seed, splits, k // 2), second(settings, seed, splits, k - k // 2)
        return Members(
            np.concatenate([a.val, b.val]),
            np.concatenate([a.test, b.test]),
            a.extra_epochs + b.extra_epochs,
        )

    return members


SOURCES: dict[str, Callable] = {
    "trials reused": best_trials,
    "snapshots": snapshots,
    "independent seeds": independent,
    "mixed architectures": architectures,
}
MIXES: dict[str, Callable] = {
    "trials + snapshots": mix(best_trials, snapshots),
    "trials + architectures": mix(best_trials, architectures),
}


def cells(settings: Settings) -> list[tuple[str, int, Callable]]:
    """(source, K, how to get its members): every source at every K, the mixes at k-max;
    only `settings.sources` where given."""
    plain = [(name, k, source) for name, source in SOURCES.items() for k in settings.k_values]
    every = plain + [(name, settings.k_max, source) for name, source in MIXES.items()]
    return [cell for cell in every if not settings.sources or cell[0] in settings.sources]


def score(members: Members, splits, seed: int) -> dict:
    """As `ar-ray ensemble` does: cross-fitted weights, the chosen method applied to test,
    against the member best on val; per-image correctness kept for the paired bootstrap."""
    val_labels, test_labels = splits.val.labels, splits.test.labels
    best = best_member(members.val, val_labels)
    if len(members.val) == 1:
        ensemble, chosen = members.test[0], "single"
    else:
        fit_ = cross_fit(members.val, val_labels, stratified_folds(val_labels, seed=seed))
        ensemble, chosen = combine(members.test, fit_.fitted[fit_.chosen]), fit_.chosen
    right = top_k_correct(ensemble, test_labels, 1)
    best_right = top_k_correct(members.test[best], test_labels, 1)
    return {
        "right": right,
        "best_right": best_right,
        "chosen": chosen,
        "extra_epochs": members.extra_epochs,
    }


def train_seed(settings: Settings, seed: int, splits) -> None:
    for _, k, source in cells(settings):
        source(settings, seed, splits, k)


def report(settings: Settings, seeds: list[int], splits) -> None:
    rows, per_seed = [], []
    for name, k, source in cells(settings):
        scored = [score(source(settings, seed, splits, k), splits, seed) for seed in seeds]
        diff = np.stack([s["right"].astype(float) - s["best_right"] for s in scored])
        low, high = paired_bootstrap(diff)
        gains = 100 * diff.mean(axis=1)
        rows.append(
            {
                "source": name,
                "K": k,
                "epochs beyond the search": scored[0]["extra_epochs"],
                "ensemble test top-1": 100 * np.mean([s["right"].mean() for s in scored]),
                "best member test top-1": 100 * np.mean([s["best_right"].mean() for s in scored]),
                "gain (points)": float(gains.mean()),
                "95% interval": f"[{low:+.2f}, {high:+.2f}]",
                "per seed": " / ".join(f"{g:+.2f}" for g in gains),
                "weights": " / ".join(s["chosen"] for s in scored),
            }
        )
        per_seed += [
            {"source": name, "K": k, "seed": seed, "gain": g}
            for seed, g in zip(seeds, gains, strict=True)
        ]
    notes = [
        machine_line(
            f"Built-in data ({len(splits.train)} train / {len(splits.val)} val / "
            f"{len(splits.test)} test images), default recipe, {settings.epochs} epochs per "
            f"member, seeds {seeds}; "
            "test top-1 (%) on the whole test set, centre crop; gain = ensemble minus the member "
            "best on val, paired over seeds and images (bootstrap 95% interval resampling both). "
            "'epochs beyond the search' counts one seed's training: trials cost nothing beyond the "
            f"search that trained them ({settings.k_max} x {settings.epochs} epochs there)."
        )
    ]
    write_results(
        "ensemble_gain", {"gain over the best member": pd.DataFrame(rows)}, notes, settings.quick
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--limit-per-class", type=int, default=None)
    parser.add_argument(
        "--sources", nargs="+", default=[], choices=[*SOURCES, *MIXES], help="default: all"
    )
    parser.add_argument("--no-report", action="store_true", help="train only")
    parser.add_argument("--report-only", action="store_true", help="report from saved runs")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], add_arguments)
    if args.quick:
        args.epochs, args.seeds, args.k, args.limit_per_class = 2, [0, 1], [1, 2], 5
    k_values = tuple(sorted(args.k))
    settings = Settings(
        args.epochs, k_values, args.limit_per_class, args.quick, tuple(args.sources)
    )
    splits = bench_splits(args.limit_per_class)
    if not args.report_only:
        for seed in args.seeds:
            train_seed(settings, seed, splits)
    if not args.no_report:
        report(settings, args.seeds, splits)


if __name__ == "__main__":
    main()
