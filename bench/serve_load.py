"""`ar-ray serve` under a bounded load on 127.0.0.1: requests/s and latency percentiles.

    .venv/bin/python bench/serve_load.py                 # full: ~22 min on a 2-CPU machine
    .venv/bin/python bench/serve_load.py --quick         # smoke check: ~3 min, tiny settings
    .venv/bin/python bench/serve_load.py --run runs/NAME # another saved ensemble

Serves `make demo`'s ensemble (runs/demo: 4 ResNet-18 members at 28 px, TenCrop) and its
distilled student, which the script distils first (`ar_ray.distill`, its defaults) when the
run has none. Every deployment is a real `ar_ray.serve(...)`: 1 or 2 replicas of 1 CPU each,
batching on (the default, batches of up to 16 within 10 ms) or off (`max_batch_size=1`).
For each, a client in this process (httpx, asyncio) sends built-in test images as PNG
bodies to POST /predict at concurrency 1, 8 and 32, a fixed number of requests each, after
a warm-up. Rounds go through every deployment, in reverse order every other round, so the
two sides of each comparison alternate; the tables give medians over rounds with their
range. Latency is the client's: from sending a request to reading its whole answer.

Writes bench/results/serve_load.{csv,md} (with --quick: bench/results/quick/).
"""

from __future__ import annotations

import asyncio
import io
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
from common import bench_splits, machine_line, parse_args, start_ray, write_results
from PIL import Image

import ar_ray

CONCURRENCY = (1, 8, 32)
REQUESTS = {1: 48, 8: 128, 32: 256}  # per cell: a bounded load
QUICK_REQUESTS = {1: 8, 8: 16, 32: 32}
BATCHING = {"on": 16, "off": 1}  # max_batch_size
DEFAULT_RUN = "runs/demo"


def arguments(parser) -> None:
    parser.add_argument("--run", default=DEFAULT_RUN, help="a run with a saved ensemble")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")


def png_bodies(count: int) -> list[bytes]:
    """The first `count` built-in test images (32 px, as the run stored them), as PNG."""
    images = bench_splits(None).test.images[:count]
    bodies = []
    for pixels in images:
        buffer = io.BytesIO()
        Image.fromarray(pixels.transpose(1, 2, 0)).save(buffer, "PNG")
        bodies.append(buffer.getvalue())
    return bodies


async def load(url: str, bodies: list[bytes], requests: int, concurrency: int) -> dict[str, Any]:
    """`requests` POSTs, `concurrency` in flight at once; requests/s and latency (ms)."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    failures = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def one(index: int) -> None:
            nonlocal failures
            async with gate:
                sent = time.perf_counter()
                try:
                    answer = await client.post(
                        "/predict",
                        content=bodies[index % len(bodies)],
                        headers={"content-type": "image/png"},
                    )
                    ok = answer.status_code == 200 and "predicted" in answer.json()
                except httpx.HTTPError:
                    ok = False
                latencies.append(1000 * (time.perf_counter() - sent))
                failures += not ok

        started = time.perf_counter()
        await asyncio.gather(*(one(index) for index in range(requests)))
        seconds = time.perf_counter() - started
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    return {
        "requests": requests,
        "failures": failures,
        "seconds": seconds,
        "requests_per_s": requests / seconds,
        "p50_ms": p50,
        "p95_ms": p95,
        "p99_ms": p99,
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ensure_student(run: str) -> None:
    """The run's distilled student, distilled with `ar_ray.distill`'s defaults if missing."""
    if not (Path(run) / "distilled" / "ensemble.yaml").exists():
        print(f"{run} has no distilled student: distilling one first", flush=True)
        ar_ray.distill(run)


def deployments(rounds: int) -> list[tuple[int, str, int, str]]:
    """(round, model, replicas, batching) in the order they run: each round reverses the
    previous one, so no side of a comparison always goes first."""
    order = [
        (model, replicas, batching)
        for model in ("ensemble", "distilled")
        for replicas in (1, 2)
        for batching in BATCHING
    ]
    return [
        (round_, *deployment)
        for round_ in range(1, rounds + 1)
        for deployment in (order if round_ % 2 else order[::-1])
    ]


def measure(run: str, rounds: int, requests: dict[int, int], port: int) -> pd.DataFrame:
    bodies = png_bodies(256)
    url = f"http://127.0.0.1:{port}"
    rows = []
    for round_, model, replicas, batching in deployments(rounds):
        ar_ray.serve(
            run,
            model=model,
            port=port,
            replicas=replicas,
            cpus_per_replica=1,
            gpus_per_replica=0,
            max_batch_size=BATCHING[batching],
        )
        asyncio.run(load(url, bodies, 4 * max(CONCURRENCY), max(CONCURRENCY)))  # warm-up
        for concurrency in CONCURRENCY:
            cell = asyncio.run(load(url, bodies, requests[concurrency], concurrency))
            row = {
                "round": round_,
                "model": model,
                "replicas": replicas,
                "batching": batching,
                "concurrency": concurrency,
                **cell,
            }
            print(row, flush=True)
            rows.append(row)
    ar_ray.stop_serving()
    return pd.DataFrame(rows)


def with_range(values: pd.Series, digits: int = 1) -> str:
    """median [min, max] over rounds."""
    return f"{values.median():.{digits}f} [{values.min():.{digits}f}, {values.max():.{digits}f}]"


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    keys = ["model", "replicas", "batching", "concurrency"]
    rows = []
    for key, cell in runs.groupby(keys, sort=False):
        rows.append(
            dict(zip(keys, key, strict=True))
            | {
                "requests/s": with_range(cell["requests_per_s"]),
                "p50 ms": with_range(cell["p50_ms"], 0),
                "p95 ms": with_range(cell["p95_ms"], 0),
                "p99 ms": with_range(cell["p99_ms"], 0),
                "failed": f"{int(cell['failures'].sum())}/{int(cell['requests'].sum())}",
            }
        )
    return pd.DataFrame(rows)


def batching_gain_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per round, requests/s with batching over without (same model, replicas, concurrency)."""
    keys = ["model", "replicas", "concurrency"]
    table = runs.pivot_table(index=[*keys, "round"], columns="batching", values="requests_per_s")
    ratios = (table["on"] / table["off"]).rename("ratio").reset_index()
    rows = [
        dict(zip(keys, key, strict=True)) | {"batching on / off, requests/s": with_range(r, 2)}
        for key, r in ratios.groupby(keys, sort=False)["ratio"]
    ]
    return pd.DataFrame(rows)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], arguments)
    run = str(Path(args.run).resolve())
    start_ray()
    ensure_student(run)
    requests = QUICK_REQUESTS if args.quick else REQUESTS
    rounds = 1 if args.quick else args.rounds
    runs = measure(run, rounds, requests, free_port())
    gains = batching_gain_table(runs)
    tables = {"load": summary_table(runs), "batching gain": gains, "every cell": runs}
    at_32 = runs[runs["concurrency"] == 32]
    ratios = at_32.pivot_table(
        index=["model", "replicas", "round"], columns="batching", values="requests_per_s"
    )
    worst = (ratios["on"] / ratios["off"]).groupby(level=[0, 1]).median().min()
    failed = int(runs["failures"].sum())
    notes = [
        machine_line(
            f"Run {args.run}; {rounds} alternating round(s); requests per cell "
            f"{requests}; replicas of 1 CPU; built-in test images as 32 px PNG bodies."
        ),
        f"Goals: at concurrency 32, batching >= 2x the requests/s of no batching (smallest "
        f"median ratio over model and replicas: {worst:.2f}x, "
        f"{'met' if worst >= 2 else 'NOT met'}); no failed request ({failed} failed, "
        f"{'met' if failed == 0 else 'NOT met'}).",
    ]
    write_results("serve_load", tables, notes, args.quick)


if __name__ == "__main__":
    main()
