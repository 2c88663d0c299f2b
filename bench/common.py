"""What the benchmark scripts share: the --quick switch, where results go, the machine line."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from pathlib import Path

import pandas as pd
import ray
import torch

from ar_ray.outputs import atomic_write_csv, atomic_write_text

RESULTS = Path(__file__).parent / "results"


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="tiny settings, results under results/quick/"
    )
    return parser.parse_args()


def start_ray() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, ray {ray.__version__}"
    )


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_results(name: str, frame: pd.DataFrame, notes: list[str], quick: bool) -> None:
    """CSV with every number, and a markdown table with the notes that explain them."""
    folder = RESULTS / "quick" if quick else RESULTS
    atomic_write_csv(folder / f"{name}.csv", frame)
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = [
        "| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |"
        for row in frame.itertuples(index=False)
    ]
    text = "\n".join([*notes, "", header, rule, *body]) + "\n"
    atomic_write_text(folder / f"{name}.md", text)
    print(text)
