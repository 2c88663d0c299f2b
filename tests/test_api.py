"""The public Python API: what `import ar_ray` offers, and the README's example run as is."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import write_image

import ar_ray

ROOT = Path(__file__).resolve().parent.parent
QUICK = str(ROOT / "search_spaces" / "quick.yaml")
PYTHON_BLOCK = re.compile(r"## From Python\n.*?```python\n(.*?)```", re.DOTALL)
SCALED_DOWN = {  # the README's numbers -> seconds of work on 2 CPUs
    "trials=6": "trials=2, epochs=1",
    "limit_per_class=50": "limit_per_class=10",
    "epochs=8": "epochs=1",
    '"search_spaces/quick.yaml"': repr(QUICK),
}


def test_import_is_cheap_and_every_public_name_resolves():
    """`import ar_ray` loads neither torch nor Ray; each name in `__all__` then loads, and
    the six workflows stay functions even after their modules were imported."""
    probe = (
        "import sys, ar_ray\n"
        "print(sorted(m for m in ('torch', 'ray', 'pandas') if m in sys.modules))\n"
        "import ar_ray.search, ar_ray.ensembling, ar_ray.labelling, ar_ray.training\n"
        "import ar_ray.exporting, ar_ray.distilling\n"
        "names = ('tune', 'ensemble', 'predict', 'train', 'export', 'distill')\n"
        "print([callable(getattr(ar_ray, n)) for n in names])"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "[True, True, True, True, True, True]"]
    assert set(dir(ar_ray)) == set(ar_ray.__all__)
    for name in ar_ray.__all__:
        assert getattr(ar_ray, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ar_ray.nope  # noqa: B018


@pytest.mark.ray
def test_the_readme_example_runs_and_returns_what_it_says(ray_cluster, tmp_path, monkeypatch):
    """The README's snippet, scaled down, on the built-in data: the leaderboard is a
    DataFrame best first, the ensemble scores val and test, predict labels the photos."""
    (code,) = PYTHON_BLOCK.findall((ROOT / "README.md").read_text())
    for readme, scaled in SCALED_DOWN.items():
        assert code.count(readme) == 1, readme  # the README still says what is scaled
        code = code.replace(readme, scaled)
    for index in range(3):
        write_image(tmp_path / "photos" / f"{index}.png", (32, 32), seed=index)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    sigint_before = signal.getsignal(signal.SIGINT)
    exec(compile(code, "README.md", "exec"), scope)
    # Tune's handler does not outlive the search: Ctrl+C interrupts what runs next
    assert signal.getsignal(signal.SIGINT) is sigint_before

    searched, ensembled, labelled = scope["searched"], scope["ensembled"], scope["labelled"]
    board = searched.leaderboard
    assert isinstance(board, pd.DataFrame) and len(board) == 2
    assert board["val_top1"].is_monotonic_decreasing and list(board["rank"]) == [1, 2]
    assert Path(searched.leaderboard_path).is_file()
    assert searched.run == str(tmp_path / "runs" / "py")
    final = ensembled.metrics.query("name == 'final'")
    assert set(final["split"]) == {"val", "test"} and ensembled.run == searched.run
    assert Path(ensembled.folder, "ensemble.yaml").is_file()
    frame = labelled.frame()
    assert labelled.images == len(frame) == 3 and labelled.errors == 0
    assert set(frame["predicted"]) <= set(ar_ray.SavedEnsemble.load(ensembled.run).classes)

    # a stated option that differs from the record is refused; an unstated one is not
    with pytest.raises(ar_ray.UserError, match="--trials 3 differs from 2 recorded"):
        ar_ray.tune(QUICK, name="py", trials=3, resume=True)
