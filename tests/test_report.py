"""The report folder: a markdown file and three real PNGs, nothing half-written left behind."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ar_ray.metrics import classification_metrics, reliability_table
from ar_ray.report import markdown_table, write_report

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
                "kind": "ensemble" if name == "final" else "member",
                "split": split,
                **classification_metrics(probs, LABELS),
            }
            for name, probs in PROBS.items()
            for split in splits
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
    write_report(
        tmp_path,
        metrics=metrics_frame(),
        weights=WEIGHTS,
        reliability=reliability_table(PROBS["final"], LABELS),
        title="t",
    )
    assert (tmp_path / "reliability.png").read_bytes().startswith(PNG_SIGNATURE)


def test_markdown_table_formats_floats_escapes_pipes_and_blanks_nan():
    frame = pd.DataFrame({"name": ["a|b", "c"], "count": [3, 4], "nll": [0.123456, np.nan]})
    assert markdown_table(frame).splitlines() == [
        "| name | count | nll |",
        "|---|---|---|",
        "| a\\|b | 3 | 0.1235 |",
        "| c | 4 |  |",
    ]
