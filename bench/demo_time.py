"""How long `make demo` takes once the venv is installed: the figure the README promises.

Runs the Makefile's own `demo` target (so the commands timed are exactly the ones a
newcomer runs), times it, and records when the last line of each step appeared and the
ensemble's closing line. The install is not timed: it depends on the network and pip's
cache more than on ar-ray.

    python bench/demo_time.py          # writes bench/results/demo_time.md
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path

from common import RESULTS

from ar_ray.outputs import atomic_write_text, environment_info

ROOT = Path(__file__).parent.parent


def run_demo() -> tuple[float, float | None, str]:
    """(total seconds, seconds until the tune step ended, the ensemble's summary line)."""
    started = time.perf_counter()
    tune_done = None
    summary = ""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(
        ["make", "-s", "demo"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    ) as demo:
        for line in demo.stdout:
            if line.startswith("leaderboard:"):
                tune_done = time.perf_counter() - started
            if "vs best member" in line:
                summary = line.strip()
    if demo.returncode != 0:
        raise SystemExit(f"make demo failed with exit code {demo.returncode}")
    return time.perf_counter() - started, tune_done, summary


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    load_before = os.getloadavg()[0]
    total, tune, summary = run_demo()
    tune_text = "?" if tune is None else f"{tune / 60:.1f}"
    lines = [
        "# `make demo` wall time (venv already installed)",
        "",
        "| step | minutes |",
        "| --- | --- |",
        f"| tune (6 trials of 8 epochs, quick space) | {tune_text} |",
        f"| whole demo (tune + 4 members reused from it + TenCrop inference) | {total / 60:.1f} |",
        "",
        f"Closing line: `{summary}`",
        "",
        f"Load average (1 min) at start: {load_before:.1f}; at end: {os.getloadavg()[0]:.1f}",
        "",
        f"Environment: {environment_info()}",
        "",
    ]
    atomic_write_text(RESULTS / "demo_time.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
