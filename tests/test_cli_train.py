"""`ar-ray train` end to end, and its one-line errors for bad data and configs."""

import shutil

import pandas as pd
import pytest
import torch
import yaml
from helpers import assert_user_error, make_image_folder, run_cli, write_image

from ar_ray.recipe.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


def test_train_writes_outputs_and_its_config_trains_again(tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        "train", "--epochs", "2", "--limit-per-class", "8", "--seed", "5", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert "epoch   2/2" in result.stdout and "test top-1" in result.stdout
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["epochs"] == 2 and config["seed"] == 5
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2]
    assert metrics["val_top1"].between(0, 1).all() and (metrics["val_nll"] > 0).all()
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 2 and isinstance(state["model"]["classifier.weight"], torch.Tensor)
    assert torch.__version__.startswith(
        yaml.safe_load((out / "environment.yaml").read_text())["torch"]
    )

    assert "loader_workers" not in config  # an execution setting, not a hyperparameter
    with (out / "config.yaml").open("a") as record:
        record.write("loader_workers: 0\n")  # what records written before it left carry
    again = run_cli(
        "train",
        "--config",
        str(out / "config.yaml"),
        "--epochs",
        "1",
        "--limit-per-class",
        "4",
        "--loader-workers",
        "1",
        "--out",
        str(tmp_path / "again"),
    )
    assert again.returncode == 0, again.stderr

    refused = run_cli("train", "--epochs", "1", "--out", str(out))
    assert_user_error(refused, str(out))


def test_train_on_an_image_folder(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=4)
    out = tmp_path / "run"
    config = tmp_path / "small.yaml"
    config.write_text("image_size: 24\nbatch_size: 4\nepochs: 1\n")
    result = run_cli("train", "--config", str(config), "--data", str(data), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(out / "checkpoint.pt")["classes"] == ["cat", "dog"]


def _corrupt(root):
    (root / "train" / "cat" / "0.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    return root / "train" / "cat" / "0.jpg"


def _zero_bytes(root):
    (root / "val" / "dog" / "1.png").write_bytes(b"")
    return root / "val" / "dog" / "1.png"


def _empty_class(root):
    shutil.rmtree(root / "train" / "dog")
    (root / "train" / "dog").mkdir()
    return root / "train" / "dog"


def _class_only_in_val(root):
    write_image(root / "val" / "bird" / "0.jpg")
    return "bird"


def _missing_train(root):
    shutil.rmtree(root / "train")
    return root / "train"


def _data_is_a_file(root):
    shutil.rmtree(root)
    root.write_text("not a folder")
    return root


@pytest.mark.parametrize(
    "damage",
    [_corrupt, _zero_bytes, _empty_class, _class_only_in_val, _missing_train, _data_is_a_file],
)
def test_bad_layouts_fail_with_one_line_naming_the_culprit(tmp_path, damage):
    root = make_image_folder(tmp_path / "data")
    culprit = damage(root)
    out = tmp_path / "out"
    result = run_cli("train", "--data", str(root), "--epochs", "1", "--out", str(out))
    assert_user_error(result, str(culprit))
    assert not out.exists()


def test_skip_bad_images_trains_and_lists_them(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=4)
    bad = _corrupt(root)
    config = tmp_path / "c.yaml"
    config.write_text("image_size: 24\nbatch_size: 4\nepochs: 1\n")
    result = run_cli(
        "train",
        "--data",
        str(root),
        "--config",
        str(config),
        "--skip-bad-images",
        "--out",
        str(tmp_path / "out"),
    )
    assert result.returncode == 0, result.stderr
    assert f"skipped unreadable image: {bad}" in result.stderr


def test_bad_config_file_fails_naming_file_and_key(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("sce_alpha: 1.0\ncr_temprature: 0.1\n")
    assert_user_error(run_cli("train", "--config", str(config)), "cr_temprature")
    assert_user_error(run_cli("train", "--loader-workers", "-1"), "--loader-workers=-1")
