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

REPORT_FILE = "report.md"
SPLIT_COLOURS = {"val": "tab:blue", "test": "tab:orange"}


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


def top1_axis_limits(values: np.ndarray) -> tuple[float, float]:
    """An axis around the scores, not 0-1, which hides a 0.4-point gain; the room on the
    right is for the value labels."""
    low, high = float(np.min(values)), float(np.max(values))
    spread = max(high - low, 0.01)
    return max(0.0, low - 0.3 * spread), high + 0.4 * spread


def members_vs_ensemble_figure(metrics: pd.DataFrame) -> plt.Figure:
    """Val (out of fold for ensembles) and test side by side, one pair of horizontal bars per
    member or ensemble: long names sit on the y axis, the legend above the plot."""
    table = metrics.pivot_table(index=["kind", "name"], columns="split", values="top1", sort=False)
    names = [name if kind == "member" else f"ensemble: {name}" for kind, name in table.index]
    splits = [split for split in SPLIT_COLOURS if split in table.columns]
    fig, ax = _grouped_barh(
        names,
        {_split_label(metrics, split): table[split].to_numpy() for split in splits},
        colours=[SPLIT_COLOURS[split] for split in splits],
    )
    for bars in ax.containers:
        labels = [f"{100 * v:.1f}%" for v in bars.datavalues]
        ax.bar_label(bars, labels=labels, padding=2, fontsize=8)
    ax.set_xlim(*top1_axis_limits(table[splits].to_numpy()))
    ax.set_xlabel("top-1")
    return fig


def _grouped_barh(
    names: list[str], groups: dict[str, np.ndarray], colours: list[str] | None = None
) -> tuple[plt.Figure, plt.Axes]:
    """One row of bars per name, first on top: long names sit on the y axis, where they
    cannot run into each other or into the legend, which goes above the plot."""
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.5 * len(names) * len(groups) + 1.2)))
    height = 0.8 / max(len(groups), 1)
    positions = np.arange(len(names))
    for i, (label, values) in enumerate(groups.items()):
        colour = None if colours is None else colours[i]
        ax.barh(positions + i * height, values, height, label=label, color=colour)
    ax.set_yticks(positions + 0.4 - height / 2, names)
    ax.invert_yaxis()
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.01), ncol=len(groups), frameon=False)
    return fig, ax


def _plot_members_vs_ensemble(metrics: pd.DataFrame, path: Path) -> None:
    _save(members_vs_ensemble_figure(metrics), path)


def _split_label(metrics: pd.DataFrame, split: str) -> str:
    """How that split's ensemble scores were estimated, e.g. `val (out-of-fold)`."""
    rows = metrics[(metrics["split"] == split) & (metrics["kind"] == "ensemble")]
    return f"{split} ({', '.join(dict.fromkeys(rows['estimate']))})"


def _plot_weights(weights: pd.DataFrame, path: Path) -> None:
    table = weights.pivot_table(
        index="member", columns="method", values="weight", fill_value=0.0, sort=False
    )
    fig, ax = _grouped_barh(
        list(table.index.astype(str)), {str(m): table[m].to_numpy() for m in table.columns}
    )
    ax.set_xlabel("weight")
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
    summary: list[str] | None = None,
) -> Path:
    """Plots first, then the markdown that links them, so a present report is a complete one.
    `summary`: lines under the title (the gain over the best member, with its interval)."""
    out_dir = Path(out_dir)
    plots = [
        (
            "members_vs_ensemble.png",
            "Top-1 of members and ensembles, val (ensembles out-of-fold) and test",
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
        *(["\n".join(f"- {line}" for line in summary)] if summary else []),
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
