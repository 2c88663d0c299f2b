"""The report folder: a markdown file and three real PNGs, nothing half-written left behind."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from ar_ray.ensembling import estimate
from ar_ray.metrics import classification_metrics, reliability_table
from ar_ray.report import markdown_table, members_vs_ensemble_figure, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = {"members_vs_ensemble.png", "weights.png", "reliability.png"}
RNG = np.random.default_rng(0)
LABELS = RNG.integers(0, 5, 120)
PROBS = {name: RNG.dirichlet(np.ones(5), size=120) for name in ("trial_7", "trial_12", "final")}


def metrics_frame(splits: tuple[str, ...] = ("val", "test")) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "name": name,
                "kind": kind,
                "split": split,
                "estimate": estimate(split, kind),
                **classification_metrics(probs, LABELS),
            }
            for name, probs in PROBS.items()
            for split in splits
            for kind in ["ensemble" if name == "final" else "member"]
        ]
    )


WEIGHTS = pd.DataFrame(
    {
        "member": ["trial_7", "trial_12"] * 3,
        "method": ["uniform"] * 2 + ["greedy"] * 2 + ["nll"] * 2,
        "weight": [0.5, 0.5, 0.75, 0.25, 0.6, 0.4],
    }
)
RELIABILITY = pd.concat(
    [reliability_table(probs, LABELS).assign(name=name) for name, probs in PROBS.items()]
)


@pytest.mark.parametrize("splits", [("val", "test"), ("val",)])
def test_report_writes_markdown_and_three_pngs_and_nothing_else(tmp_path, splits):
    report = write_report(
        tmp_path / "report",
        metrics=metrics_frame(splits),
        weights=WEIGHTS,
        reliability=RELIABILITY,
        title="Ensemble of 2 members",
    )
    assert report == tmp_path / "report" / "report.md"
    assert {p.name for p in report.parent.iterdir()} == PLOTS | {"report.md"}
    for name in PLOTS:
        data = (report.parent / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    text = report.read_text()
    assert text.startswith("# Ensemble of 2 members\n")
    for name in PLOTS:
        assert f"]({name})" in text
    assert "| trial_7 | member |" in text and "| final | ensemble |" in text
    assert "| trial_12 | greedy | 0.2500 |" in text


def test_reliability_without_a_name_column_still_plots(tmp_path):
    """The curve is drawn, not only the axes and the grey diagonal: the PNG, read back, holds
    pixels of the first line colour (tab:blue, the unnamed table's markers and line)."""
    write_report(
        tmp_path,
        metrics=metrics_frame(),
        weights=WEIGHTS,
        reliability=reliability_table(PROBS["final"], LABELS),
        title="t",
    )
    path = tmp_path / "reliability.png"
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    pixels = matplotlib.image.imread(path)[..., :3]  # floats in [0, 1]
    assert pixels.std() > 0.05  # not a blank canvas
    tab_blue = np.array([0x1F, 0x77, 0xB4]) / 255
    curve = np.abs(pixels - tab_blue).max(axis=-1) < 0.02
    assert curve.sum() > 500, curve.sum()  # markers and line (a legend swatch alone: ~110)


def test_markdown_table_formats_floats_escapes_pipes_and_blanks_nan():
    frame = pd.DataFrame({"name": ["a|b", "c"], "count": [3, 4], "nll": [0.123456, np.nan]})
    assert markdown_table(frame).splitlines() == [
        "| name | count | nll |",
        "|---|---|---|",
        "| a\\|b | 3 | 0.1235 |",
        "| c | 4 |  |",
    ]


def test_top1_plot_labels_every_bar_shows_small_gaps_and_keeps_long_names_off_the_legend():
    long_name = "trial_0042_resnet50_seed7_sce_cr_mt_tencrop"
    metrics = pd.DataFrame(
        [
            {
                "name": name,
                "kind": kind,
                "split": split,
                "estimate": estimate(split, kind),
                "top1": top1,
            }
            for name, kind, val, test in [
                (long_name, "member", 0.800, 0.790),
                ("trial_7", "member", 0.780, 0.785),
                ("final", "ensemble", 0.804, 0.794),  # a 0.4-point gain on each split
            ]
            for split, top1 in (("val", val), ("test", test))
        ]
    )
    fig = members_vs_ensemble_figure(metrics)
    fig.canvas.draw()
    (ax,) = fig.axes
    texts = {t.get_text() for t in ax.texts}
    assert {"80.0%", "79.0%", "78.0%", "78.5%", "80.4%", "79.4%"} <= texts
    low, high = ax.get_xlim()
    assert (0.804 - 0.800) / (high - low) > 0.03  # a 0-1 axis would give 0.004
    assert low <= 0.78 and high >= 0.804
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["val (out-of-fold)", "test (held-out)"]
    renderer = fig.canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    for tick in ax.get_yticklabels():
        assert not box.overlaps(tick.get_window_extent(renderer)), tick.get_text()
    assert long_name in [t.get_text() for t in ax.get_yticklabels()]
    assert "ensemble: final" in [t.get_text() for t in ax.get_yticklabels()]
