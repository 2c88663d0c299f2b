"""`ar-ray predict` at scale: images/s with a pool of at most 1 and 2 actors, and driver memory.

    .venv/bin/python bench/predict_scale.py           # full: ~30 min on a busy 2-CPU machine
    .venv/bin/python bench/predict_scale.py --quick   # smoke check: ~2 min, tiny settings

A one-member ensemble (1-epoch weights of the default model, 28 px, tta "center") labels
synthetic 256 px JPEGs. The centre crop keeps the model's share small, so what is measured
is the pipeline: listing the files, Ray Data reading and decoding them, the actor pool, the
rows streaming back and the CSV being written; TenCrop compute is `tencrop_throughput.py`'s.

Every run is the real CLI, `ar_ray.cli.main(["predict", ...])`, in a fresh driver process
that joins a local 2-CPU Ray started once by this script, so the driver's peak RSS is that
command's alone. Runs alternate 1 and 2 actors (the order flips every round) and every
round visits every size, so drift of a shared, noisy machine falls on both sides of each
ratio; each ratio is reported as the median and range over rounds.

The images (deterministic, smooth colour fields saved as JPEG) are cached in the system's
temp folder in shards of 500, generated once and reused by later runs; a size is its first
shards, passed to `--images` as folders.

Writes bench/results/predict_scale.{csv,md} (with --quick: bench/results/quick/).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
from common import (
    bench_splits,
    machine_line,
    make_checkpoint,
    paired,
    parse_args,
    rss_mb,
    run_fresh,
    spread,
    start_peak_window,
    start_ray,
    synthetic_jpeg,
    write_results,
)

from ar_ray.config import RecipeConfig
from ar_ray.data.size import stored_size
from ar_ray.ensembling import EnsembleRequest
from ar_ray.labelling import pool_file
from ar_ray.members import member_dir
from ar_ray.outputs import environment_info
from ar_ray.recipe.checkpoint import CHECKPOINT_FILE
from ar_ray.saved_ensemble import ENSEMBLE_DIR, SavedEnsemble

IMAGE_CACHE = Path(tempfile.gettempdir()) / "ar-ray-bench-predict-images"
SHARD = 500  # images per cached folder; every size is a multiple of it
IMAGE_PX = 256
TTA = "center"
ACTORS = (1, 2)
# images -> rounds (each round one run per actor count)
FULL_PLAN = {1_000: 3, 10_000: 3, 40_000: 3}
QUICK_PLAN = {500: 1, 1_000: 1}


def image_shards(count: int) -> list[str]:
    """The first `count / SHARD` cached shard folders, generating any that are missing.

    A shard is complete once its marker exists (written last), so an interrupted generation
    is finished by the next run rather than leaving a short shard behind.
    """
    shards = []
    for shard in range(count // SHARD):
        folder = IMAGE_CACHE / f"shard_{shard:03d}"
        marker = folder / ".complete"
        if not marker.exists():
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(shard * SHARD, (shard + 1) * SHARD):
                synthetic_jpeg(index, folder / f"{index:06d}.jpg", (IMAGE_PX, IMAGE_PX))
            marker.touch()
        shards.append(str(folder))
    return shards


def build_ensemble(run: Path) -> None:
    """A saved one-member ensemble as `SavedEnsemble` records it, without Tune or Train:
    the benchmark needs real weights of the default model, not a tuned or accurate one."""
    member = "bench"
    make_checkpoint(Path(member_dir(str(run), member)) / CHECKPOINT_FILE)
    request = EnsembleRequest(run=str(run), members=1, epochs=1, tta=TTA)
    SavedEnsemble(
        members=[member],
        checkpoints=[f"members/{member}/{CHECKPOINT_FILE}"],
        method="uniform",
        weights=[1.0],
        temperature=1.0,
        tta=TTA,
        classes=list(bench_splits(5).classes),
        image_size=RecipeConfig().image_size,  # make_checkpoint's
        stored_size=stored_size(RecipeConfig().image_size),  # as `ensemble` records it
        request=asdict(request),
        env=environment_info(),
    ).save(run / ENSEMBLE_DIR)


def cli_driver(argv: list[str]) -> dict[str, Any]:
    """Runs in a fresh process: `ar-ray predict` as a user's shell runs it, plus when its
    first and last rows were written and the process's memory.

    Two wrappers observe the real command. Around `run_predict` (after imports, joining Ray
    and loading the ensemble): the RSS it starts from, and the high-water mark reset so the
    peak at the end is the streaming's own. Around `PredictionWriter.append`, the one place
    rows reach the output: the first and last rows' times. Both keep a few numbers, so they
    add nothing that grows with the images.
    """
    from ar_ray import cli, labelling

    started = time.perf_counter()
    seen: dict[str, Any] = {}
    real_run, real_append = labelling.run_predict, labelling.PredictionWriter.append

    def run_predict(*args: Any, **kwargs: Any) -> labelling.PredictResult:
        seen["rss_before_predict_mb"] = rss_mb("VmRSS")
        seen["peak_before_predict_mb"] = rss_mb("VmHWM")
        seen["windowed"] = start_peak_window()
        return real_run(*args, **kwargs)

    def append(writer: labelling.PredictionWriter, frame: pd.DataFrame) -> None:
        real_append(writer, frame)
        seen.setdefault("first_rows", len(frame))
        seen.setdefault("first_row_s", time.perf_counter() - started)
        seen["last_row_s"] = time.perf_counter() - started

    labelling.run_predict = run_predict
    labelling.PredictionWriter.append = append  # type: ignore[method-assign]
    code = cli.main(argv)
    seconds = time.perf_counter() - started
    return {"code": code, "main_s": seconds, "peak_during_predict_mb": rss_mb("VmHWM"), **seen}


def predict_run(run: Path, images: int, actors: int, address: str, folder: Path) -> dict[str, Any]:
    """One `ar-ray predict` over the first `images` cached images in a fresh driver; its
    clock, memory, which actors answered, and a check that every image got its row."""
    out = folder / "predictions.csv"
    argv = [
        "predict",
        "--ensemble",
        str(run),
        "--images",
        *image_shards(images),
        "--out",
        str(out),
        "--max-actors",
        str(actors),
        "--cpus-per-actor",
        "1",
        "--gpus-per-actor",
        "0",
        "--address",
        address,
    ]
    started = time.perf_counter()
    driver = run_fresh("predict_scale:cli_driver", {"argv": argv})
    wall = time.perf_counter() - started
    if driver["code"] != 0:
        raise RuntimeError(f"ar-ray predict exited with {driver['code']}: {argv}")
    if not driver["windowed"]:
        raise RuntimeError("cannot reset the peak RSS here (needs Linux >= 4.0 /proc)")
    written = pd.read_csv(out, usecols=["image_id", "error"], keep_default_na=False)
    pool = pd.read_csv(pool_file(out))
    out.unlink()
    pool_file(out).unlink()
    streamed = driver["last_row_s"] - driver["first_row_s"]
    return {
        "images": images,
        "actors": actors,
        "wall_s": wall,
        "images_per_s": images / wall,
        "first_row_s": driver["first_row_s"],
        "last_row_s": driver["last_row_s"],
        "streaming_images_per_s": (images - driver["first_rows"]) / streamed,
        "driver_peak_rss_mb": max(
            driver["peak_before_predict_mb"], driver["peak_during_predict_mb"]
        ),
        "rss_before_predict_mb": driver["rss_before_predict_mb"],
        "predict_growth_mb": driver["peak_during_predict_mb"] - driver["rss_before_predict_mb"],
        "actors_used": len(pool),
        "images_per_actor": "/".join(str(n) for n in sorted(pool["images"], reverse=True)),
        "not_busiest_share": 1 - pool["images"].max() / images,
        "rows_written": written["image_id"].nunique(),
        "decode_errors": int((written["error"] != "").sum()),
    }


def schedule(plan: dict[int, int]) -> list[tuple[int, int, int]]:
    """(round, images, actors) in run order: every round visits every size that still has
    rounds left, with 1 and 2 actors in an order that flips from one round to the next."""
    order = []
    for round_ in range(max(plan.values())):
        pair = ACTORS if round_ % 2 == 0 else ACTORS[::-1]
        for images, rounds in plan.items():
            if round_ < rounds:
                order += [(round_, images, actors) for actors in pair]
    return order


def scaling_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per size and clock: median images/s of each pool size, the 2-vs-1 ratio's spread, and
    the share of the images that the second actor scored (0 when the pool never grew)."""
    rows = []
    for images, at_size in runs.groupby("images"):
        for measure in ("images_per_s", "streaming_images_per_s"):
            medians = at_size.groupby("actors")[measure].median()
            ratio = paired(at_size, measure, "actors", *ACTORS)
            rows.append(
                {
                    "images": images,
                    "measure": measure,
                    "1 actor": medians[1],
                    "2 actors": medians[2],
                    **{f"ratio {k}": v for k, v in spread(ratio).items()},
                    "2nd actor's share": at_size.loc[
                        at_size["actors"] == 2, "not_busiest_share"
                    ].median(),
                }
            )
    return pd.DataFrame(rows)


def memory_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Driver peak RSS at the smallest and largest size and its growth per round; and how
    far above its starting RSS `run_predict` itself went (medians), and what that costs per
    image: anything above zero grows without bound with the number of images."""
    smallest, largest = runs["images"].min(), runs["images"].max()
    rows = []
    for actors, with_pool in runs.groupby("actors"):
        peaks = with_pool.groupby("images")["driver_peak_rss_mb"].median()
        streaming = with_pool.groupby("images")["predict_growth_mb"].median()
        growth = paired(with_pool, "driver_peak_rss_mb", "images", smallest, largest) - 1
        rows.append(
            {
                "actors": actors,
                f"peak MB at {smallest}": peaks[smallest],
                f"peak MB at {largest}": peaks[largest],
                **{f"growth % {k}": 100 * v for k, v in spread(growth).items() if k != "n"},
                "rounds": len(growth),
                f"run_predict +MB at {smallest}": streaming[smallest],
                f"run_predict +MB at {largest}": streaming[largest],
                "run_predict bytes per extra image": (streaming[largest] - streaming[smallest])
                * 2**20
                / (largest - smallest),
            }
        )
    return pd.DataFrame(rows)


def goals_table(scaling: pd.DataFrame, memory: pd.DataFrame) -> pd.DataFrame:
    """The issue's two goals against what was measured, judged on medians."""
    largest = scaling["images"].max()
    at_largest = scaling[scaling["images"] == largest].set_index("measure")
    rows = [
        {
            "goal": f"driver peak RSS grows < 10% up to {largest} images, {actors} actor(s)",
            "median": f"{row['growth % median']:+.1f}%",
            "range": f"{row['growth % min']:+.1f}% .. {row['growth % max']:+.1f}%",
            "met": bool(row["growth % median"] < 10),
        }
        for actors, row in memory.set_index("actors").iterrows()
    ]
    rows += [
        {
            "goal": f"2 actors >= 1.7x 1 actor, {measure} at {largest} images",
            "median": f"{row['ratio median']:.2f}x",
            "range": f"{row['ratio min']:.2f}x .. {row['ratio max']:.2f}x",
            "met": bool(row["ratio median"] >= 1.7),
        }
        for measure, row in at_largest.iterrows()
    ]
    return pd.DataFrame(rows)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    described = ", ".join(f"{images} images x {rounds}" for images, rounds in plan.items())
    machine = machine_line(
        f"One-member ensemble (default ResNet-18 model, 28 px, 1-epoch weights, tta "
        f"'{TTA}': the pipeline is measured, not TenCrop compute) over synthetic "
        f"{IMAGE_PX} px JPEGs; rounds of one run per pool size ({described}); a local "
        "Ray with 2 CPUs, actors of 1 CPU, `--max-actors` 1 or 2."
    )
    started = time.perf_counter()
    for images in plan:
        image_shards(images)
    generated = time.perf_counter() - started
    start_ray()
    import ray

    address = ray.get_runtime_context().gcs_address
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "ensemble-run"
        build_ensemble(run)
        for round_, images, actors in schedule(plan):
            row = {"round": round_, **predict_run(run, images, actors, address, Path(folder))}
            print({key: row[key] for key in ("round", "images", "actors", "wall_s")}, flush=True)
            rows.append(row)
    ray.shutdown()
    runs = pd.DataFrame(rows)
    scaling = scaling_table(runs)
    memory = memory_table(runs)
    notes = [
        machine,
        "images_per_s: images over the wall time of the whole command (a fresh interpreter, "
        "imports, joining Ray, listing, actor start-up, every row, the pool file). "
        "streaming_images_per_s: the images after the first batch over the time from the "
        "first to the last row written. Driver peak RSS: the CLI process's own high-water "
        "mark (VmHWM) over the whole command, imports of torch and Ray included (about 1 GB "
        "before any work); run_predict +MB: its peak while streaming (high-water mark reset "
        "as run_predict starts) over its RSS then. Ray's workers are in neither. "
        f"actors_used / images_per_actor: from the command's `_pool.csv`. Image cache "
        f"built in {generated:.0f} s (near 0 when it already existed); the whole run took "
        f"{(time.perf_counter() - started) / 60:.1f} min; load average {os.getloadavg()[0]:.2f} "
        "at the end.",
    ]
    tables = {
        "goals": goals_table(scaling, memory),
        "2 actors vs 1 (ratio per round, median and range)": scaling,
        "driver peak RSS, smallest vs largest size (growth per round)": memory,
        "every run": runs,
    }
    write_results("predict_scale", tables, notes, args.quick)


if __name__ == "__main__":
    main()
