"""What a full `make test` costs the machine: wall time, disk at its peak, what it leaves.

CI's machines share one disk and a whole run once died of `No space left on device`
(stop 31: a suite that kept every module's checkpoints, 138 MB each, until it ended, and a
distill that left a copy of its student in /tmp). This runs the suite the way `make test`
does, samples the disk while it runs, and says:

- the peak size of pytest's temp folders (/tmp/pytest-of-USER) and of /tmp as a whole,
  above what they held before, and the least free space seen on /tmp's filesystem;
- what the run left in /tmp that was not there before (a leak, or a failed test's folder);
- the wall time, pytest's summary line and the slowest tests (`--durations`).

    .venv/bin/python bench/suite_footprint.py                      # the whole suite, ~42 min
    .venv/bin/python bench/suite_footprint.py tests/test_distill.py   # one module
    .venv/bin/python bench/suite_footprint.py --quick                 # smoke check: seconds

Writes bench/results/suite_footprint.md (a partial run: bench/results/quick/).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import RESULTS, machine_line

from ar_ray.outputs import atomic_write_text

ROOT = Path(__file__).parent.parent
SAMPLE_SECONDS = 10.0
SLOWEST = 25
QUICK_PATH = "tests/test_losses.py"  # seconds, no Ray
SUMMARY = re.compile(r"\d+ (passed|failed|error)")  # pytest's last line


def tree_bytes(path: Path) -> int:
    """Bytes on disk under `path` (blocks, as du counts them); files that vanish mid-walk,
    as a test's folder does, are skipped."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
    return total


class DiskSampler(threading.Thread):
    """Every SAMPLE_SECONDS: the size of pytest's temp root and of /tmp, and the free space."""

    def __init__(self, tmp: Path, pytest_root: Path) -> None:
        super().__init__(daemon=True)
        self.tmp, self.pytest_root = tmp, pytest_root
        self.samples: list[tuple[int, int, int]] = []
        self.stopped = threading.Event()

    def sample(self) -> None:
        free = shutil.disk_usage(self.tmp).free
        self.samples.append((tree_bytes(self.pytest_root), tree_bytes(self.tmp), free))

    def run(self) -> None:
        while not self.stopped.wait(SAMPLE_SECONDS):
            self.sample()


def slowest_tests(output: str) -> list[str]:
    """pytest's `--durations` lines ("12.34s call tests/...::test")."""
    return [
        line.strip()
        for line in output.splitlines()
        if re.match(r"^\d+\.\d+s (call|setup|teardown)\s", line.strip())
    ][:SLOWEST]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", help="test paths (default: the whole suite)")
    parser.add_argument("--quick", action="store_true", help=f"smoke check: {QUICK_PATH}")
    args = parser.parse_args()
    if args.quick and not args.paths:
        args.paths = [QUICK_PATH]
    tmp = Path(tempfile.gettempdir())
    pytest_root = tmp / f"pytest-of-{getpass.getuser()}"
    before = set(tmp.iterdir())
    base_pytest, base_tmp = tree_bytes(pytest_root), tree_bytes(tmp)
    sampler = DiskSampler(tmp, pytest_root)
    sampler.sample()
    sampler.start()
    command = [sys.executable, "-m", "pytest", "-q", f"--durations={SLOWEST}", *args.paths]
    started = time.perf_counter()
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    sampler.stopped.set()
    sampler.join()
    sampler.sample()
    left = sorted(set(tmp.iterdir()) - before)
    summary = next(
        (line for line in reversed(run.stdout.splitlines()) if SUMMARY.search(line)),
        f"pytest exited {run.returncode}",
    ).strip("= ")
    mib = 2**20
    peak_pytest = max(s[0] for s in sampler.samples) - base_pytest
    peak_tmp = max(s[1] for s in sampler.samples) - base_tmp
    least_free = min(s[2] for s in sampler.samples)
    lines = [
        "# The test suite's cost: time and disk",
        "",
        machine_line(f"`pytest {' '.join(args.paths) or '(whole suite)'}`"),
        "",
        f"- result: {summary} (exit {run.returncode})",
        f"- wall time: {seconds / 60:.1f} min",
        f"- peak of pytest's temp folders above the start: {peak_pytest / mib:,.0f} MiB",
        f"- peak of /tmp above the start: {peak_tmp / mib:,.0f} MiB",
        f"- least free space on /tmp's filesystem: {least_free / 2**30:,.1f} GiB",
        f"- samples: {len(sampler.samples)}, every {SAMPLE_SECONDS:g} s",
        "",
        "## Left in /tmp after the run",
        "",
        *(
            [f"- `{path.name}`: {tree_bytes(path) / mib:,.1f} MiB" for path in left]
            or ["- nothing"]
        ),
        "",
        f"## The {SLOWEST} slowest test phases",
        "",
        "```",
        *slowest_tests(run.stdout),
        "```",
        "",
    ]
    folder = RESULTS if not args.paths else RESULTS / "quick"
    atomic_write_text(folder / "suite_footprint.md", "\n".join(lines))
    print("\n".join(lines))
    if run.returncode != 0:
        print(run.stdout[-6000:], file=sys.stderr)
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
