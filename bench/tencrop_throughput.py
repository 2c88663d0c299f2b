"""TenCrop inference on Ray actors: images/s with 1 and 2 actors, and the driver's memory.

    .venv/bin/python bench/tencrop_throughput.py           # full: ~4 min on an idle 2-CPU machine
    .venv/bin/python bench/tencrop_throughput.py --quick   # smoke check: ~1 min, tiny settings

Nothing is trained for accuracy: a 1-epoch member gives real weights of the default model.
Throughput of `ar_ray.inference.member_probabilities(..., tta="tencrop")` with a pool of at
most 1 and 2 actors (as a user calls it: actor start-up and weight loading included) is
compared with the bound of ten single-crop forwards (centre-crop images/s / 10) and with
TenCrop in one local process (one forward of 10B crops), both in a fresh process on one
thread, as an actor runs. A run on 4x the images gives the 2-actor steady rate (start-up
cancels out of the difference).

Driver memory: every actor run happens in a fresh driver process whose peak RSS is read
before and after `member_probabilities`; from 1x to 4x images it should stay flat, because
chunks stream through the pool and only probabilities come back.

Writes bench/results/tencrop_throughput.{csv,md} (with --quick: bench/results/quick/).
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
from common import (
    bench_splits,
    machine_line,
    make_checkpoint,
    parse_args,
    rss_mb,
    run_fresh,
    start_peak_window,
    start_ray,
    write_results,
)


def lifetime_peak_mb() -> float:
    """Fallback peak where /proc is missing (Linux reports kB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def local_seconds(checkpoint: str, count: int) -> dict[str, float]:
    """Seconds for centre crop and for TenCrop over `count` test images, in this process."""
    import torch

    from ar_ray.inference import IMAGES_PER_CALL
    from ar_ray.recipe.augment import predict_probabilities
    from ar_ray.recipe.checkpoint import inference_model, load_checkpoint

    state = load_checkpoint(Path(checkpoint))
    model = inference_model(state)
    size = int(state["config"]["image_size"])
    images = torch.from_numpy(bench_splits(None).test.rows(0, count).images)
    batch = IMAGES_PER_CALL["cpu"]  # what a CPU inference actor answers per call
    seconds = {}
    for tta in ("center", "tencrop"):
        predict_probabilities(model, images[:batch], size, tta)  # warm-up: first allocations
        started = time.perf_counter()
        for chunk in images.split(batch):
            predict_probabilities(model, chunk, size, tta)
        seconds[tta] = time.perf_counter() - started
    return seconds


def driver_run(checkpoint: str, count: int, actors: int) -> dict[str, float]:
    """One `member_probabilities` call as a user's driver makes it; its time and the driver's
    RSS. The pool starts with one actor and may grow to `actors`."""
    start_ray()
    import ray

    from ar_ray.inference import InferenceOptions, member_probabilities

    images = bench_splits(None).test.images[:count]
    windowed = start_peak_window()
    before = rss_mb("VmRSS") if windowed else lifetime_peak_mb()
    started = time.perf_counter()
    options = InferenceOptions(max_actors=actors)
    member_probabilities([checkpoint], [images], tta="tencrop", options=options)
    seconds = time.perf_counter() - started
    peak = rss_mb("VmHWM") if windowed else lifetime_peak_mb()
    ray.shutdown()
    return {"seconds": seconds, "rss_before_mb": before, "peak_rss_mb": peak, "windowed": windowed}


def throughput_table(
    count: int, local: dict[str, float], runs: dict[tuple[int, int], dict[str, float]]
) -> pd.DataFrame:
    """images/s per setup, against the ten-forwards bound for one process and per process."""
    one, two, two_big = runs[(count, 1)], runs[(count, 2)], runs[(4 * count, 2)]
    rows = [
        ("bound: 10 single-crop forwards, local", 1, count, local["center"] * 10),
        ("TenCrop (one 10B forward), local", 1, count, local["tencrop"]),
        ("1 actor, start-up included", 1, count, one["seconds"]),
        ("2 actors, start-up included", 2, count, two["seconds"]),
        ("2 actors, steady (4x minus 1x run)", 2, 3 * count, two_big["seconds"] - two["seconds"]),
    ]
    frame = pd.DataFrame(rows, columns=["setup", "processes", "images", "seconds"])
    frame["images_per_s"] = frame["images"] / frame["seconds"]
    bound = frame["images_per_s"].iloc[0]
    frame["vs_bound"] = frame["images_per_s"] / bound
    frame["per_process_vs_bound"] = frame["vs_bound"] / frame["processes"]
    return frame


def memory_table(runs: dict[tuple[int, int], dict[str, float]], actors: int) -> pd.DataFrame:
    rows = [
        {
            "images": images,
            "actors": actors,
            "driver_rss_before_mb": run["rss_before_mb"],
            "driver_peak_rss_during_mb": run["peak_rss_mb"],
            "growth_mb": run["peak_rss_mb"] - run["rss_before_mb"],
        }
        for (images, used), run in sorted(runs.items())
        if used == actors
    ]
    return pd.DataFrame(rows)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    count = 200 if args.quick else 2000
    runs: dict[tuple[int, int], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = str(Path(folder) / "member.pt")
        make_checkpoint(Path(checkpoint))
        local = run_fresh(
            "tencrop_throughput:local_seconds",
            {"checkpoint": checkpoint, "count": count},
            threads=1,
        )
        for images, actors in ((count, 1), (count, 2), (4 * count, 2)):
            runs[(images, actors)] = run_fresh(
                "tencrop_throughput:driver_run",
                {"checkpoint": checkpoint, "count": images, "actors": actors},
            )
    tables = {
        "throughput": throughput_table(count, local, runs),
        "driver memory (fresh driver per run)": memory_table(runs, actors=2),
    }
    notes = [
        machine_line(
            f"Default RecipeConfig model (ResNet-18, stride-2 stem, 28 px), 1-epoch weights, "
            f"{count} and {4 * count} built-in test images, chunks of 64, one thread per "
            "process (local runs: fresh process with OMP_NUM_THREADS=1; actors: 1 CPU each)."
        ),
        "The steady row divides the extra 3x images by the extra seconds of the 4x run, so "
        "actor start-up and weight loading cancel out. Driver memory: RSS just before "
        "member_probabilities and its peak during the call (high-water mark reset first"
        + (
            ""
            if all(run["windowed"] for run in runs.values())
            else "; NOT possible here, so these are lifetime peaks"
        )
        + "); the whole 10,000-image test set is loaded either way.",
    ]
    write_results("tencrop_throughput", tables, notes, args.quick)


if __name__ == "__main__":
    main()
