"""A dataset folder at scale: decode images/s on 1 and 2 CPUs, driver and trial memory, and
the bytes each inference chunk pickles to.

    .venv/bin/python bench/data_scale.py             # 100 classes x 100 images, 3 rounds
    .venv/bin/python bench/data_scale.py --quick     # smoke check: 4 classes x 16 images
    .venv/bin/python bench/data_scale.py --per-class 20   # a smaller folder, same classes

The folder is VIPriors-shaped: `train/` and `val/` with one folder per class, half of each
class's images in each split, every image a JPEG of a random width and height in 300-500
px (deterministic seeds). It is generated once into the system's temp folder and reused.

1. Decode: the real `decode_folder` path (the driver reads the files, 64-file shards run as
   1-CPU Ray tasks, the driver copies each into preallocated arrays), each run in a fresh
   process that starts its own local Ray with 1 or 2 CPUs; runs alternate 1 and 2 (the order
   flips every round) so a shared machine's drift falls on both sides of each ratio.
2. The driver's peak RSS while decoding (high-water mark reset as decoding starts) over the
   decoded bytes.
3. The data footprint of concurrent trials: the training splits are put in the object store
   once, then 1 and then 2 actors each `ray.get` them and sum every image, as a Tune trial
   gets them through `tune.with_parameters`. Footprint = object-store bytes + what each
   trial process grew by (USS, its private memory: a copy of the data would show there).
4. `row_blocks([val images], 64)`: each block's `len(pickle.dumps(block))` over its rows'
   bytes, i.e. whether a chunk sent to an inference actor carries more than its own rows.

Writes bench/results/data_scale.{csv,md} (with --quick: bench/results/quick/).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
from common import (
    machine_line,
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

DATA_CACHE = Path(tempfile.gettempdir()) / "ar-ray-bench-data"
SOURCE_PX = (300, 500)  # random width and height of each source JPEG, inclusive
IMAGE_SIZE = 224  # training size, VIPriors' usual; images are stored at stored_size() of it
CPUS = (1, 2)
TRIALS = (1, 2)
BLOCK_ROWS = 64  # rows per inference chunk, as `ar-ray ensemble` cuts them
GIB = 2**30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", type=int, default=100, help="class folders (default 100)")
    parser.add_argument(
        "--per-class", type=int, default=100, help="images per class, half train, half val"
    )
    parser.add_argument("--rounds", type=int, default=3, help="decode rounds of 1 and 2 CPUs")


def dataset_folder(classes: int, per_class: int) -> Path:
    """The cached folder for this size, generated when missing.

    It is complete once its marker exists (written last), so an interrupted generation is
    redone by the next run rather than leaving a short folder behind. Image `index` is the
    same file at every size, so sizes differ only in how many images they hold.
    """
    root = DATA_CACHE / f"{classes}x{per_class}"
    marker = root / ".complete"
    if marker.exists():
        return root
    for label in range(classes):
        for position in range(per_class):
            split = "train" if position < per_class // 2 else "val"
            folder = root / split / f"class_{label:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            index = label * 1_000 + position
            width, height = np.random.default_rng([index, 1]).integers(
                SOURCE_PX[0], SOURCE_PX[1] + 1, 2
            )
            synthetic_jpeg(index, folder / f"{index:07d}.jpg", (int(width), int(height)))
    marker.touch()
    return root


def warm_up(cpus: int) -> float:
    """Start one worker per CPU and import the decoder there; return the seconds it took.

    A fresh worker imports `ar_ray.data` (torch with it) before its first shard, tens of
    seconds on a loaded machine: once per worker per cluster, not per image, so it is kept
    out of the decode rate. Tasks that overlap in time land on distinct workers.
    """
    import ray

    def imported(hold_s: float) -> None:
        import ar_ray.data.decode  # noqa: F401

        time.sleep(hold_s)

    started = time.perf_counter()
    ray.get([ray.remote(num_cpus=1)(imported).remote(1.0) for _ in range(cpus)])
    return time.perf_counter() - started


def decode_run(root: str, cpus: int) -> dict[str, Any]:
    """Runs in a fresh process: its own Ray with `cpus` CPUs, then `decode_folder` as `tune`
    runs it, timed, with this process's RSS before and its peak during the decode."""
    from ar_ray.data import list_folder
    from ar_ray.data.decode import decode_folder, run_on_ray
    from ar_ray.data.size import stored_size

    ray_init_s = start_ray(cpus)
    import ray

    warm_up_s = warm_up(cpus)
    listing = list_folder(root)
    rss_before = rss_mb("VmRSS")
    if not start_peak_window():
        raise RuntimeError("cannot reset the peak RSS here (needs Linux >= 4.0 /proc)")
    started, cpu_started = time.perf_counter(), time.process_time()
    decoded = decode_folder(listing, stored_size(IMAGE_SIZE), False, run_on_ray)
    seconds = time.perf_counter() - started
    driver_cpu_s = time.process_time() - cpu_started
    peak = rss_mb("VmHWM")
    ray.shutdown()
    images = sum(len(array) for array in decoded.images.values())
    decoded_mb = sum(array.nbytes for array in decoded.images.values()) / 2**20
    return {
        "cpus": cpus,
        "images": images,
        "decode_s": seconds,
        "images_per_s": images / seconds,
        "driver_cpu_share": driver_cpu_s / seconds,
        "ray_init_s": ray_init_s,
        "warm_up_s": warm_up_s,
        "decoded_mb": decoded_mb,
        "rss_before_mb": rss_before,
        "peak_rss_mb": peak,
        "peak_over_decoded": peak / decoded_mb,
        "growth_over_decoded": (peak - rss_before) / decoded_mb,
    }


class DataTrial:
    """A stand-in for a Tune trial's data use: get the shared splits, touch every pixel, hold
    them. No model, so what its process grows by is the data's cost alone."""

    def pid(self) -> int:
        from ar_ray.data import DatasetSplits  # noqa: F401  (torch too: the baseline's part)

        return os.getpid()

    def load(self, refs: list[Any]) -> int:
        import ray

        self.splits = ray.get(refs[0])
        return sum(
            int(split.images.sum(dtype=np.int64)) for split in (self.splits.train, self.splits.val)
        )


def object_store_mb() -> float:
    """Plasma bytes in use on the cluster, as `ray memory --stats-only` reports them (MiB)."""
    import ray
    from ray._private.internal_api import memory_summary

    # The address of this process's own Ray: other jobs' Ray instances may share the machine.
    summary = memory_summary(ray.get_runtime_context().gcs_address, stats_only=True)
    found = re.search(r"Plasma memory usage (\d+) MiB", summary)
    if found is None:
        raise RuntimeError("no plasma usage in Ray's memory summary")
    return float(found.group(1))


def memory_mb(pid: int) -> dict[str, float]:
    info = psutil.Process(pid).memory_full_info()
    return {name: getattr(info, name) / 2**20 for name in ("rss", "pss", "uss")}


def footprint_run(root: str) -> dict[str, Any]:
    """Runs in a fresh process with a 2-CPU Ray: decode once, measure the inference blocks,
    then the trials' footprint with 1 and then 2 concurrent trials."""
    from ar_ray.data import list_folder, load_listing
    from ar_ray.data.decode import run_on_ray
    from ar_ray.inference import row_blocks

    start_ray()
    import ray

    store_empty = object_store_mb()  # before decoding: its shards are freed by the trials
    splits = load_listing(list_folder(root), IMAGE_SIZE, runner=run_on_ray)
    val = splits.val.images
    blocks = [
        {
            "rows": len(block),
            "pickled_bytes": len(pickle.dumps(block)),
            "row_bytes": len(block) * val[0].nbytes,
        }
        for block in row_blocks([val], BLOCK_ROWS)
    ]
    training = splits.for_training()
    data_mb = (training.train.images.nbytes + training.val.images.nbytes) / 2**20
    ref = ray.put(training)
    del splits, training, val
    remote_trial = ray.remote(num_cpus=1)(DataTrial)
    rows = []
    for trials in TRIALS:
        actors = [remote_trial.remote() for _ in range(trials)]
        pids = ray.get([actor.pid.remote() for actor in actors])
        before = [memory_mb(pid) for pid in pids]
        sums = ray.get([actor.load.remote([ref]) for actor in actors])
        after = [memory_mb(pid) for pid in pids]
        store = object_store_mb() - store_empty
        grown = {
            name: sum(a[name] - b[name] for a, b in zip(after, before, strict=True))
            for name in ("rss", "pss", "uss")
        }
        rows.append(
            {
                "trials": trials,
                "data_mb": data_mb,
                "object_store_mb": store,
                "trials_uss_growth_mb": grown["uss"],
                "trials_pss_growth_mb": grown["pss"],
                "trials_rss_growth_mb": grown["rss"],
                "trials_pss_mb": sum(a["pss"] for a in after),
                "trials_uss_mb": sum(a["uss"] for a in after),
                "footprint_mb": store + grown["uss"],
                "same_sums": len(set(sums)) == 1,
            }
        )
        for actor in actors:
            ray.kill(actor)
    ray.shutdown()
    return {"blocks": blocks, "trials": rows}


def schedule(rounds: int) -> list[tuple[int, int]]:
    """(round, cpus) in run order: 1 and 2 CPUs, in an order that flips every round."""
    return [
        (round_, cpus)
        for round_ in range(rounds)
        for cpus in (CPUS if round_ % 2 == 0 else CPUS[::-1])
    ]


def goals_table(runs: pd.DataFrame, trials: pd.DataFrame, blocks: pd.DataFrame) -> pd.DataFrame:
    """The issue's goals against what was measured: decode on medians over rounds, the other
    two from the single trials run and the worst block."""
    ratio = spread(paired(runs, "images_per_s", "cpus", *CPUS))
    footprint = trials.set_index("trials")["footprint_mb"]
    block_ratio = blocks["pickled_bytes"] / blocks["row_bytes"]
    peak = spread(runs["growth_over_decoded"])
    return pd.DataFrame(
        [
            {
                "goal": "decode images/s, 2 CPUs >= 1.8x 1 CPU",
                "median": f"{ratio['median']:.2f}x",
                "range": f"{ratio['min']:.2f}x .. {ratio['max']:.2f}x ({ratio['n']} rounds)",
                "met": str(bool(ratio["median"] >= 1.8)),
            },
            {
                "goal": "driver peak RSS growth while decoding / decoded bytes (no goal set)",
                "median": f"{peak['median']:.2f}x",
                "range": f"{peak['min']:.2f}x .. {peak['max']:.2f}x ({peak['n']} runs)",
                "met": "",
            },
            {
                "goal": "data footprint, 2 trials <= 1.15x 1 trial",
                "median": f"{footprint[2] / footprint[1]:.2f}x",
                "range": f"{footprint[1]:.0f} MB -> {footprint[2]:.0f} MB (one run)",
                "met": str(bool(footprint[2] / footprint[1] <= 1.15)),
            },
            {
                "goal": f"pickled inference block / its rows' bytes <= 1.1x ({BLOCK_ROWS} rows)",
                "median": f"{block_ratio.median():.4f}x",
                "range": f"{block_ratio.min():.4f}x .. {block_ratio.max():.4f}x "
                f"({len(blocks)} blocks)",
                "met": str(bool(block_ratio.max() <= 1.1)),
            },
        ]
    )


def main() -> None:
    from ar_ray.data.size import stored_size

    args = parse_args(__doc__.splitlines()[0], add_arguments)
    classes, per_class, rounds = (
        (4, 16, 1) if args.quick else (args.classes, args.per_class, args.rounds)
    )
    machine = machine_line(
        f"Synthetic VIPriors-shaped folder: {classes} classes x {per_class} images "
        f"({per_class // 2} train, the rest val), JPEGs of {SOURCE_PX[0]}-{SOURCE_PX[1]} px "
        f"decoded to {stored_size(IMAGE_SIZE)} px; {rounds} decode round(s) of 1 and 2 CPUs."
    )
    started = time.perf_counter()
    root = dataset_folder(classes, per_class)
    generated = time.perf_counter() - started
    files = list(root.rglob("*.jpg"))
    mean_kb = sum(path.stat().st_size for path in files) / len(files) / 1024
    rows = []
    for round_, cpus in schedule(rounds):
        row = {
            "round": round_,
            **run_fresh("data_scale:decode_run", {"root": str(root), "cpus": cpus}),
        }
        print({key: row[key] for key in ("round", "cpus", "decode_s", "images_per_s")}, flush=True)
        rows.append(row)
    runs = pd.DataFrame(rows)
    measured = run_fresh("data_scale:footprint_run", {"root": str(root)})
    trials = pd.DataFrame(measured["trials"])
    blocks = pd.DataFrame(measured["blocks"])
    block_summary = pd.DataFrame(
        [
            {
                "blocks": len(blocks),
                "rows per block": f"{blocks['rows'].min()}..{blocks['rows'].max()}",
                "row bytes (sum)": int(blocks["row_bytes"].sum()),
                "pickled bytes (sum)": int(blocks["pickled_bytes"].sum()),
                "max extra bytes per block": int(
                    (blocks["pickled_bytes"] - blocks["row_bytes"]).max()
                ),
            }
        ]
    )
    notes = [
        machine,
        f"{len(files)} JPEGs, {mean_kb:.1f} kB on average (smooth colour fields: far smaller "
        "than photos of that size, so their entropy decoding is cheaper). images_per_s: images "
        "over `decode_folder`'s wall time (listing, Ray start-up and one worker per CPU "
        "started and importing the decoder beforehand excluded: warm_up_s). "
        "driver_cpu_share: the driver's own CPU seconds (reading the files, "
        "copying shards into the arrays) over the decode's wall time. Peak RSS: the "
        "fresh driver's VmHWM with the high-water mark reset as decoding starts; "
        "growth = peak - RSS before decoding. Footprint: "
        "object-store MiB in use (`ray memory --stats-only`) over its use before decoding, plus "
        "the trial processes' USS growth from before `ray.get` to after summing every image "
        "(PSS and RSS shown too: they count the shared object-store pages each trial maps). "
        f"Folder generated in {generated:.0f} s (near 0 when cached); the whole run took "
        f"{(time.perf_counter() - started) / 60:.1f} min; load average "
        f"{os.getloadavg()[0]:.2f} at the end.",
    ]
    tables = {
        "goals": goals_table(runs, trials, blocks),
        "decode runs (1 and 2 CPUs alternating)": runs,
        "data footprint of 1 and 2 concurrent trials": trials,
        f"inference blocks of {BLOCK_ROWS} val rows, pickled": block_summary,
    }
    write_results("data_scale", tables, notes, args.quick)


if __name__ == "__main__":
    main()
