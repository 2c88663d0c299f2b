"""`SavedEnsemble`: what `ensemble` writes is what `predict` reads, old records included."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ar_ray.errors import UserError
from ar_ray.recipe.checkpoint import save_checkpoint
from ar_ray.saved_ensemble import SavedEnsemble


def saved(**changes) -> SavedEnsemble:
    values = dict(
        members=["m1", "m2"],
        checkpoints=["members/m1/checkpoint.pt", "members/m2/checkpoint.pt"],
        method="greedy",
        weights=[0.25, 0.75],
        temperature=1.5,
        tta="tencrop",
        classes=["Ankle boot", "cat"],
        image_size=28,
        stored_size=32,
        images_per_call=64,
        fold_methods=["nll", "greedy"],
        request={"cpus_per_actor": 2.0, "gpus_per_actor": 0.0, "max_actors": 3},
        env={"torch": "2.14.1"},
    )
    return SavedEnsemble(**(values | changes))


def run_with_checkpoints(root: Path) -> Path:
    for member in ("m1", "m2"):
        save_checkpoint({"model": {}, "config": {}}, root / "members" / member / "checkpoint.pt")
    return root


def test_a_saved_record_loads_back_equal_with_paths_resolved_against_the_run(tmp_path):
    run = run_with_checkpoints(tmp_path / "run")
    original = saved()
    original.save(run / "ensemble")
    loaded = SavedEnsemble.load(str(run))
    assert loaded.to_record() == original.to_record()
    assert loaded.locations() == [str(run / "members" / m / "checkpoint.pt") for m in ("m1", "m2")]
    assert np.array_equal(loaded.fitted_weights.weights, [0.25, 0.75])
    assert loaded.fitted_weights.temperature == 1.5
    assert not list((run / "ensemble").glob(".*"))  # no temp file left beside it


def test_a_record_from_before_stored_size_and_actor_batches_still_loads(tmp_path):
    run = run_with_checkpoints(tmp_path / "run")
    record = saved().to_record()
    for key in ("stored_size", "images_per_call", "fold_methods", "env"):
        del record[key]
    (run / "ensemble").mkdir()
    (run / "ensemble" / "ensemble.yaml").write_text(yaml.safe_dump(record))
    loaded = SavedEnsemble.load(str(run))
    assert loaded.stored_size == 28  # such runs stored their images at image_size
    assert loaded.images_per_call is None and loaded.fold_methods == []


@pytest.mark.parametrize(
    "text",
    [
        "members: [m1\n",  # not YAML
        "members: [m1]\n",  # keys missing
        yaml.safe_dump(saved().to_record() | {"weights": [0.5, 0.25, 0.25]}),  # 3 for 2
        yaml.safe_dump(saved().to_record() | {"weights": [-1.0, 2.0]}),  # not a distribution
    ],
)
def test_a_broken_record_is_one_line_naming_the_file(tmp_path, text):
    run = run_with_checkpoints(tmp_path / "run")
    (run / "ensemble").mkdir()
    (run / "ensemble" / "ensemble.yaml").write_text(text)
    with pytest.raises(UserError, match=r"ensemble\.yaml: corrupted ensemble record") as caught:
        SavedEnsemble.load(str(run))
    assert "\n" not in str(caught.value)


def test_a_missing_member_checkpoint_is_named_when_the_record_is_read(tmp_path):
    run = run_with_checkpoints(tmp_path / "run")
    saved().save(run / "ensemble")
    (run / "members" / "m2" / "checkpoint.pt").unlink()
    with pytest.raises(UserError, match=r"m2/checkpoint\.pt: checkpoint not found"):
        SavedEnsemble.load(str(run))
    torch.save(["not", "a", "checkpoint"], run / "members" / "m2" / "checkpoint.pt")
    with pytest.raises(UserError, match="m2/checkpoint.pt: not an ar-ray checkpoint"):
        SavedEnsemble.load(str(run))


def test_no_ensemble_in_the_run_says_which_command_makes_one(tmp_path):
    with pytest.raises(UserError, match="no saved ensemble; run `ar-ray ensemble` first"):
        SavedEnsemble.load(str(tmp_path))
