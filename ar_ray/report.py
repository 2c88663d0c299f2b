"""A human-readable summary of an ensemble run: one markdown file and three plots.

Everything is written atomically, so a folder never holds a report that points at a plot
that is still being drawn.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

from ar_ray.outputs import atomic_save, atomic_write_text

matplotlib.use("Agg")  # no display on cluster nodes; must precede the pyplot import

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

REPORT_FILE = "report.md"
KIND_COLOURS = {"member": "tab:blue", "ensemble": "tab:orange"}


def markdown_table(frame: pd.DataFrame) -> str:
    """A pipe table without `tabulate`, which pandas needs for `to_markdown` and we do not ship."""

    def cell(value: object) -> str:
        if isinstance(value, float | np.floating):
            return "" if np.isnan(value) else f"{value:.4f}"
        return str(value).replace("|", "\\|")

    lines = [
        "| " + " | ".join(cell(c) for c in frame.columns) + " |",
        "|" + "---|" * len(frame.columns),
        *("| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(False)),
    ]
    return "\n".join(lines)


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def _plot_members_vs_ensemble(metrics: pd.DataFrame, path: Path) -> None:
    """Test numbers are the ones that matter; val stands in when a run has no test split."""
    split = "test" if (metrics["split"] == "test").any() else "val"
    rows = metrics[metrics["split"] == split]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(rows) + 2), 4))
    ax.bar(
        rows["name"].astype(str),
        rows["top1"],
        color=[KIND_COLOURS.get(kind, "tab:gray") for kind in rows["kind"]],
    )
    ax.set_ylabel(f"{split} top-1")
    ax.set_ylim(0, 1)
    ax.legend(handles=[Patch(color=colour, label=kind) for kind, colour in KIND_COLOURS.items()])
    ax.tick_params(axis="x", labelrotation=45)
    _save(fig, path)


def _plot_weights(weights: pd.DataFrame, path: Path) -> None:
    table = weights.pivot_table(
        index="member", columns="method", values="weight", fill_value=0.0, sort=False
    )
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(table) + 2), 4))
    width = 0.8 / max(len(table.columns), 1)
    positions = np.arange(len(table))
    for i, method in enumerate(table.columns):
        ax.bar(positions + i * width, table[method], width, label=str(method))
    ax.set_xticks(positions + 0.4 - width / 2, table.index.astype(str), rotation=45)
    ax.set_ylabel("weight")
    ax.legend()
    _save(fig, path)


def _plot_reliability(reliability: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfectly calibrated")
    groups = (
        reliability.groupby("name", sort=False)
        if "name" in reliability
        else [("model", reliability)]
    )
    for name, table in groups:
        ax.plot(table["confidence"], table["accuracy"], marker="o", label=str(name))
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend()
    _save(fig, path)


def write_report(
    out_dir: Path,
    *,
    metrics: pd.DataFrame,
    weights: pd.DataFrame,
    reliability: pd.DataFrame,
    title: str,
) -> Path:
    """Plots first, then the markdown that links them, so a present report is a complete one."""
    out_dir = Path(out_dir)
    plots = [
        (
            "members_vs_ensemble.png",
            "Top-1 of members and ensembles",
            _plot_members_vs_ensemble,
            metrics,
        ),
        ("weights.png", "Ensemble weights per member", _plot_weights, weights),
        ("reliability.png", "Reliability diagram", _plot_reliability, reliability),
    ]
    for name, _, draw, frame in plots:
        draw(frame, out_dir / name)
    sections = [
        f"# {title}",
        "## Metrics",
        markdown_table(metrics),
        "## Ensemble weights",
        markdown_table(weights),
        "## Plots",
        *(f"![{caption}]({name})" for name, caption, _, _ in plots),
    ]
    report = out_dir / REPORT_FILE
    atomic_write_text(report, "\n\n".join(sections) + "\n")
    return report
