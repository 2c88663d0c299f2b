"""The mutation score of the pure modules, per module, from mutmut's own records.

`make mutation` runs `mutmut run` (config: pyproject's `[tool.mutmut]`), then this script,
which reads the verdicts mutmut left under `mutants/` through mutmut's own loader (so a
status means exactly what mutmut means by it) and writes `bench/results/mutation.txt`:
mutants, killed, survived and timed out per module and in total, every survivor with the
reason it is equivalent (`bench/mutation_equivalent.txt`), and every `# pragma: no mutate`
exclusion with its reason. A survivor without a reason is listed as UNEXPLAINED and the
script exits 1: it needs a test or a reason, never silence.

    python bench/mutation_summary.py --seconds 812 --command "mutmut run --max-children 2"
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter
from pathlib import Path

from mutmut.configuration import config
from mutmut.mutation.data import SourceFileMutationData
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files

from ar_ray.outputs import atomic_write_text, environment_info

BENCH = Path(__file__).parent
RESULT = BENCH / "results" / "mutation.txt"
REASONS = BENCH / "mutation_equivalent.txt"
COUNTED = ("killed", "survived", "timeout")  # any other status (no tests, segfault...) is "other"
UNEXPLAINED = "UNEXPLAINED: needs a test or a reason"
PRAGMA = re.compile(r"#\s*pragma:\s*no mutate\b(.*)")


def module_statuses() -> dict[str, list[tuple[str, str]]]:
    """Each mutated file -> [(mutant name, mutmut's status)], in mutmut's order."""
    statuses = {}
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        statuses[str(path)] = [
            (k, status_by_exit_code[v]) for k, v in data.exit_code_by_key.items()
        ]
    return statuses


def read_reasons(path: Path) -> dict[str, str]:
    """`mutant-name  why it is equivalent` per line; blank lines and `#` comments skipped."""
    reasons = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, why = line.strip().partition(" ")
            reasons[name] = why.strip()
    return reasons


def pragma_exclusions(paths: list[str]) -> list[str]:
    """`path:line: reason` for every `# pragma: no mutate` in the mutated files."""
    found = []
    for path in paths:
        for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
            match = PRAGMA.search(line)
            if match:
                found.append(f"{path}:{number}: {match.group(1).strip(' ,:') or '(no reason)'}")
    return found


def score_table(statuses: dict[str, list[tuple[str, str]]]) -> list[str]:
    """One row per module and a total; the score is killed / mutants (timeouts not counted)."""
    header = ["module", "mutants", "killed", "survived", "timed out", "other", "killed %"]
    rows = [header, ["---"] * len(header)]
    total: Counter[str] = Counter()
    for path, mutants in [*statuses.items(), ("total", None)]:
        counts = total if mutants is None else Counter(status for _, status in mutants)
        if mutants is not None:
            total.update(counts)
        size = sum(counts.values())
        other = size - sum(counts[s] for s in COUNTED)
        score = f"{100 * counts['killed'] / size:.1f}" if size else "-"
        name = f"**{path}**" if mutants is None else path
        rows.append([name, size, *(counts[s] for s in COUNTED), other, score])
    return ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def survivors(statuses: dict[str, list[tuple[str, str]]]) -> list[str]:
    return [
        name for mutants in statuses.values() for name, status in mutants if status == "survived"
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, required=True, help="wall time of the run")
    parser.add_argument("--command", required=True, help="the mutmut command that ran")
    args = parser.parse_args()
    statuses = module_statuses()
    if not any(statuses.values()):
        raise SystemExit("no mutmut results under mutants/: run `make mutation`")
    reasons = read_reasons(REASONS)
    names = survivors(statuses)
    unexplained = sum(name not in reasons for name in names)
    stale = sorted(set(reasons) - set(names))
    judge = " ".join(config().pytest_add_cli_args + config().pytest_add_cli_args_test_selection)
    lines = [
        "# Mutation testing (`make mutation`)",
        "",
        f"command: {args.command}",
        f"judge: pytest {judge}",
        f"run time: {args.seconds:.0f} s ({args.seconds / 60:.1f} min) on {os.cpu_count()} CPUs",
        "",
        *score_table(statuses),
        "",
        "## Excluded from mutation (`# pragma: no mutate`)",
        "",
        *pragma_exclusions(list(statuses)),
        "",
        f"## Survivors ({len(names)}, {unexplained} unexplained): each with why it is equivalent",
        "",
        *(f"{name}  {reasons.get(name, UNEXPLAINED)}" for name in names),
        "",
        *([f"Stale reasons (no such survivor): {', '.join(stale)}", ""] if stale else []),
        f"Environment: {environment_info()}",
        "",
    ]
    atomic_write_text(RESULT, "\n".join(lines))
    print("\n".join(lines))
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
