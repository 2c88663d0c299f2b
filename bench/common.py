"""What the benchmark scripts share: --quick, Ray start-up, fresh-process runs, results.

Also a tiny entry point, used by `run_fresh` only:

    python bench/common.py MODULE:FUNCTION KWARGS_JSON RESULT_PATH

runs `FUNCTION(**KWARGS)` from `bench/MODULE.py` and writes its JSON result to RESULT_PATH.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from PIL import Image

if TYPE_CHECKING:
    from ar_ray.config import RecipeConfig

from ar_ray.outputs import atomic_write_csv, atomic_write_text, environment_info

BENCH = Path(__file__).parent
RESULTS = BENCH / "results"
NUM_CPUS = 2  # the project's reference machine; every number in BENCHMARKS.md assumes it


def parse_args(
    description: str, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.Namespace:
    """`--quick` for every script, plus whatever sizes `add_arguments` lets a script take."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny settings to check the script end to end; results go to results/quick/",
    )
    if add_arguments is not None:
        add_arguments(parser)
    return parser.parse_args()


def synthetic_jpeg(index: int, path: Path, size: tuple[int, int]) -> None:
    """A smooth colour field (width, height) from an 8x8 seed (seeded by `index`): decodes
    like a photo of that size, but compresses to a few kB, so tens of thousands of them fit
    in a temp folder."""
    seed = np.random.default_rng(index).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(seed).resize(size, Image.Resampling.BILINEAR)
    image.save(path, quality=90)


def start_ray(num_cpus: int = NUM_CPUS) -> float:
    """Start a local Ray like the tests do; return the seconds it took (a real start-up cost).

    `address="local"` always starts a new instance: without it, ray.init joins a cluster
    that someone else's `ray start` left on this machine (and fails, as num_cpus is given).
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray  # deferred: fresh-process baselines must not pay for importing Ray

    started = time.perf_counter()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return time.perf_counter() - started


def bench_splits(limit_per_class: int | None):
    """The built-in split, optionally shrunk; a fresh process rebuilds exactly the same one."""
    from ar_ray.data import load_dataset

    return load_dataset(None, 28).limit_per_class(limit_per_class)


def whole_split_probabilities(model: Any, split: Any, size: int, tta: str) -> np.ndarray:
    """[N, K] probabilities of a whole split (an `ImageSplit`), as float64 for the ensemble
    fits."""
    import torch

    from ar_ray.recipe.engine import split_probabilities

    chunks = [probs for _, probs in split_probabilities(model, split, size, tta)]
    return torch.cat(chunks).numpy().astype(np.float64)


def make_checkpoint(path: Path) -> None:
    """A real member checkpoint of the default model (1 epoch on 50 images), saved the way
    the engine saves it: inference benchmarks need real weights, not good ones."""
    from ar_ray.config import RecipeConfig
    from ar_ray.recipe.checkpoint import save_checkpoint
    from ar_ray.recipe.engine import fit

    save_checkpoint(fit(RecipeConfig(epochs=1), bench_splits(5)).state, path)


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (high-water mark) of this process, from /proc (Linux).

    VmHWM belongs to the process's own address space, which `exec` replaces; getrusage's
    ru_maxrss is kept across `exec`, so in a child started by fork + exec it can report
    the parent's RSS at the fork.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def start_peak_window() -> bool:
    """Reset the high-water mark, so the next peak belongs to what runs from here on.

    Without it the peak of imports, loading data and starting Ray would hide any growth of
    the call measured below it. Needs Linux >= 4.0; False where it cannot be reset.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_fresh(target: str, kwargs: dict[str, Any], *, threads: int | None = None) -> Any:
    """Call `module:function(**kwargs)` in a new interpreter and return its JSON result.

    Ray runs a trial, a Train worker or an actor in its own process with OMP_NUM_THREADS
    set to its CPUs before torch loads. Running the baseline the same way keeps the
    comparison fair (no thread pool sized before `set_num_threads`, nothing else in
    memory), and a peak-RSS reading taken there belongs to that call alone.
    """
    env = dict(os.environ)
    # Ray workers inherit the environment of the Ray a fresh process starts: with bench/ on
    # their path they can unpickle the remote functions and actors defined in these scripts.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH), env.get("PYTHONPATH")]))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        command = [sys.executable, __file__, target, json.dumps(kwargs), str(result)]
        subprocess.run(command, env=env, check=True)
        return json.loads(result.read_text())


@dataclass
class Timing:
    """One training run's clock, measured the same way inside and outside Ray."""

    epoch_seconds: list[float]  # the engine's own timer: one epoch's training + validation
    intervals: list[float]  # between epoch reports from epoch 2 on: adds checkpoint + report
    wall: float  # the whole call: start-up, every epoch, and the wrap-up


def direct_fit(config: dict[str, Any], limit_per_class: int | None) -> dict[str, Any]:
    """`engine.fit` with no Ray at all: the baseline (run it through `run_fresh`)."""
    from ar_ray.config import RecipeConfig
    from ar_ray.recipe.engine import fit

    splits = bench_splits(limit_per_class)
    reported: list[float] = []
    started = time.perf_counter()
    result = fit(
        RecipeConfig.from_dict(config),
        splits,
        on_epoch=lambda metrics, state: reported.append(time.perf_counter()),
    )
    wall = time.perf_counter() - started
    epochs = [float(m["epoch_seconds"]) for m in result.history]
    return asdict(Timing(epochs, gaps(reported), wall))


def gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in zip(times[:-1], times[1:], strict=True)]


def paired(runs: pd.DataFrame, column: str, key: str, first: Any, second: Any) -> pd.Series:
    """Per round: `column` where `key` == second over where `key` == first (same round)."""
    table = runs.pivot_table(index="round", columns=key, values=column)
    return (table[second] / table[first]).dropna()


def spread(values: pd.Series) -> dict[str, float]:
    return {"median": values.median(), "min": values.min(), "max": values.max(), "n": len(values)}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def overhead_table(direct: Timing, ray_side: Timing, label: str, ray_init: float) -> pd.DataFrame:
    """Direct vs inside-Ray: per-epoch medians, whole wall-clock, and the fixed cost."""

    def row(measure: str, base: float, other: float, ratio: bool = True) -> dict[str, Any]:
        """A ratio of fixed costs (near zero directly) says nothing, so those rows get none."""
        value = other / base if ratio and base else float("nan")
        return {"measure": measure, "direct": base, label: other, "ratio": value}

    def fixed(timing: Timing) -> float:
        return timing.wall - sum(timing.epoch_seconds)

    return pd.DataFrame(
        [
            row("median epoch s", median(direct.epoch_seconds), median(ray_side.epoch_seconds)),
            row(
                "median s between epoch reports",
                median(direct.intervals),
                median(ray_side.intervals),
            ),
            row("wall s, start-up included", direct.wall, ray_side.wall),
            row("wall s - sum of epoch s", fixed(direct), fixed(ray_side), ratio=False),
            row("of which ray.init s", 0.0, ray_init, ratio=False),
        ]
    )


BOOTSTRAP = 10_000


def paired_bootstrap(diff: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of `diff` ([seeds, images]: one arm's per-image correctness
    minus another's, paired by seed and image), in points, resampling seeds and images.

    One resample draws as many seeds and images as there are, with replacement; the same
    images score both arms, so the interval carries the test set's sampling error and the
    seeds'.
    """
    rng = np.random.default_rng(seed)
    seeds, n = diff.shape
    means = np.empty(BOOTSTRAP)
    for b in range(BOOTSTRAP):
        picked = diff[rng.integers(0, seeds, seeds)]
        weights = np.bincount(rng.integers(0, n, n), minlength=n)
        means[b] = (picked @ weights).mean() / n
    low, high = np.percentile(100 * means, [2.5, 97.5])
    return float(low), float(high)


def machine_line(settings: str) -> str:
    """Settings plus the machine and versions, and how busy the machine was when it started."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    env = environment_info()
    versions = ", ".join(f"{key} {env[key]}" for key in ("python", "torch", "ray", "optuna"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{settings} Machine: {cpu}, {os.cpu_count()} CPUs, no GPU used; {versions}; "
        f"load average {load:.2f} at start."
    )


def markdown_table(frame: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "" if value != value else f"{value:.3f}"  # NaN -> empty
        return str(value)

    lines = [
        "| " + " | ".join(map(str, frame.columns)) + " |",
        "| " + " | ".join("---" for _ in frame.columns) + " |",
    ]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def write_results(
    name: str, tables: dict[str, pd.DataFrame], notes: list[str], quick: bool
) -> Path:
    """`<name>.csv` (every table, a `table` column tells them apart) and `<name>.md`.

    Quick runs go to results/quick/, which is not committed, so a smoke check can never
    overwrite a real measurement.
    """
    folder = RESULTS / "quick" if quick else RESULTS
    combined = pd.concat(
        [frame.assign(table=title)[["table", *frame.columns]] for title, frame in tables.items()],
        ignore_index=True,
    )
    atomic_write_csv(folder / f"{name}.csv", combined)
    sections = [f"### {title}\n\n{markdown_table(frame)}" for title, frame in tables.items()]
    text = "\n\n".join([f"# {name}" + (" (--quick)" if quick else ""), *notes, *sections]) + "\n"
    atomic_write_text(folder / f"{name}.md", text)
    print(text, flush=True)
    return folder


if __name__ == "__main__":
    module_name, function_name = sys.argv[1].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    Path(sys.argv[3]).write_text(json.dumps(function(**json.loads(sys.argv[2]))))


def direct_timing(config: RecipeConfig, limit_per_class: int | None) -> Timing:
    """The baseline of every overhead table: `engine.fit` in a fresh 1-thread process."""
    arguments = {"config": config.to_dict(), "limit_per_class": limit_per_class}
    return Timing(**run_fresh("common:direct_fit", arguments, threads=1))
