"""TenCrop inference on Ray actors: images/s with 1 and 2 actors, and driver memory.

    python bench/tencrop_throughput.py [--quick]

Compares actor TenCrop with (a) the same model doing TenCrop in one local process and
(b) the bound of ten single-crop forwards (centre-crop images/s divided by 10), all with
one thread per process, the way an actor on one CPU runs. Driver peak RSS is measured in
a fresh process for 1x and 4x the images: chunks stream through the actor pool, so it
should stay flat. Writes bench/results/tencrop_throughput.{csv,md}.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from common import machine, parse_args, start_ray, write_results

from ar_ray.config import RunConfig
from ar_ray.data import load_dataset
from ar_ray.inference import run_predictors
from ar_ray.recipe.augment import predict_probabilities
from ar_ray.recipe.checkpoint import inference_model, save_checkpoint
from ar_ray.recipe.engine import fit


def images_per_second(run, count: int) -> float:
    started = time.perf_counter()
    run()
    return count / (time.perf_counter() - started)


def local(model, images, tta: str) -> None:
    for chunk in images.split(64):
        predict_probabilities(model, chunk, 28, tta)


def driver_peak_rss_mb(checkpoint: Path, count: int) -> float:
    """A fresh interpreter per size, so one measurement cannot inflate the other."""
    code = (
        "import json, resource, sys; sys.path.insert(0, 'bench');"
        "from common import start_ray; start_ray();"
        "from ar_ray.data import load_dataset; from ar_ray.inference import run_predictors;"
        f"images = load_dataset(None, 28).test.images[:{count}];"
        f"run_predictors([{str(checkpoint)!r}], images, tta='tencrop');"
        "print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    splits = load_dataset(None, 28)
    count = 200 if args.quick else 2000
    images = splits.test.images[:count]
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "member.pt"
        save_checkpoint(fit(RunConfig(epochs=1), splits.limit_per_class(5)).state, checkpoint)
        model = inference_model(torch.load(checkpoint, weights_only=True))
        torch.set_num_threads(1)
        centre = images_per_second(lambda: local(model, images, "center"), count)
        tencrop = images_per_second(lambda: local(model, images, "tencrop"), count)
        start_ray()
        rows = [
            {"setup": "bound: 10 single-crop forwards, 1 thread", "images_per_s": centre / 10},
            {"setup": "local TenCrop, 1 process, 1 thread", "images_per_s": tencrop},
        ]
        for actors in (1, 2):
            speed = images_per_second(
                lambda n=actors: run_predictors([str(checkpoint)], images, tta="tencrop", actors=n),
                count,
            )
            rows.append({"setup": f"Ray actors: {actors}", "images_per_s": speed})
        bound = rows[0]["images_per_s"]
        for row in rows:
            row["vs_bound"] = row["images_per_s"] / bound
        for scale in (1, 4):
            rows.append(
                {
                    "setup": f"driver peak RSS MB, {scale}x images ({scale * count})",
                    "images_per_s": float("nan"),
                    "vs_bound": driver_peak_rss_mb(checkpoint, scale * count),
                }
            )
    notes = [
        f"ResNet-18 (stride-2 stem) at 28 px, {count} test images, TenCrop of 10 crops as one "
        f"batch ({machine()}).",
        "Actor rows include starting the actors and loading the weights. The RSS rows put "
        "the megabytes in the last column.",
    ]
    write_results("tencrop_throughput", pd.DataFrame(rows), notes, args.quick)


if __name__ == "__main__":
    main()
