"""`ar-ray export`: one ONNX file that answers what `ar-ray predict` answers, checked by
onnxruntime against the PyTorch path worked out here, independently of the exporter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import yaml

import ar_ray
from ar_ray import exporting
from ar_ray.ensemble_weights import uniform
from ar_ray.errors import UserError
from tests.helpers import assert_user_error, run_cli
from tests.saved_runs import CLASSES, IMAGE_SIZE, STORED, images, predict_path, write_run

pytest.importorskip("onnxruntime", reason="the export extra: pip install 'ar-ray[export]'")

# each export traces whole members through torch.onnx's exporter: seconds apiece
pytestmark = pytest.mark.slow


def onnx_answer(path: Path, batch: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (answer,) = session.run(None, {"images": batch})
    return answer


@pytest.fixture(scope="module")
def tencrop_run(module_tmp):
    """A 2-member TenCrop ensemble with uneven weights and a temperature, exported."""
    run = write_run(module_tmp, weights=[0.3, 0.7], tta="tencrop")
    return run, ar_ray.export(str(run))


def test_tencrop_ensemble_answers_as_predict_does(tencrop_run):
    run, result = tencrop_run
    assert result.out == run / "export" / "ensemble.onnx" and result.out.is_file()
    batch = images(5, seed=11)
    expected = predict_path(run, batch)
    assert np.abs(onnx_answer(result.out, batch) - expected).max() <= 1e-4
    # the check is sharp enough to see the weights and the temperature
    assert np.abs(predict_path(run, batch, uniform(2)) - expected).max() > 1e-2
    assert result.max_abs_diff <= 1e-4 and result.checked_images == exporting.CHECK_IMAGES
    assert sorted(p.name for p in result.out.parent.iterdir()) == [
        "ensemble.json",
        "ensemble.onnx",
    ]  # no temp file left beside them
    assert result.out.stat().st_mode & 0o777 == result.sidecar.stat().st_mode & 0o777 == 0o644


def test_the_batch_axis_is_dynamic(tencrop_run):
    run, result = tencrop_run
    for count in (1, 7):
        batch = images(count, seed=count)
        answer = onnx_answer(result.out, batch)
        assert answer.shape == (count, len(CLASSES))
        assert np.abs(answer - predict_path(run, batch)).max() <= 1e-4


def test_the_sidecar_says_how_to_feed_the_file_and_what_it_holds(tencrop_run):
    run, result = tencrop_run
    side = json.loads(result.sidecar.read_text())
    assert result.sidecar == run / "export" / "ensemble.json"
    assert side["classes"] == CLASSES and side["opset"] == exporting.OPSET == 18
    assert side["input"] | {"how": None} == {
        "name": "images",
        "shape": ["batch", 3, STORED, STORED],
        "layout": "NCHW",
        "dtype": "uint8",
        "channels": "RGB",
        "range": [0, 255],
        "size": STORED,
        "how": None,
    }
    assert side["output"]["shape"] == ["batch", 4] and side["output"]["dtype"] == "float32"
    assert side["tta"] == "tencrop" and side["image_size"] == IMAGE_SIZE
    assert side["members"] == ["m0", "m1"] and side["weights"] == [0.3, 0.7]
    assert side["temperature"] == 1.7 and side["model"] == "ensemble"
    assert side["check"]["images"] == 32 and side["check"]["max_abs_diff"] <= 1e-4
    assert side["check"]["on"] == "deterministic images (seed 0)"
    for package in ("onnx", "onnxruntime", "onnxscript", "torch"):
        assert side["versions"][package] == metadata.version(package)


def test_a_centre_crop_ensemble_exports_from_the_cli(tmp_path):
    run = write_run(tmp_path / "run", weights=[0.6, 0.4], tta="center", temperature=0.8)
    out = tmp_path / "served" / "model.onnx"
    done = run_cli("export", "--from", str(run), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert f"to {out}" in done.stdout and f"sidecar: {out.with_suffix('.json')}" in done.stdout
    batch = images(6, seed=3)
    assert np.abs(onnx_answer(out, batch) - predict_path(run, batch)).max() <= 1e-4
    assert json.loads(out.with_suffix(".json").read_text())["tta"] == "center"


def test_one_model_takes_the_same_path_and_val_images_check_it(tmp_path):
    """A single model (one member, weight 1), as a distilled student will be; a run tuned on
    the built-in data is checked on its val images."""
    run = write_run(tmp_path / "run", weights=[1.0], tta="tencrop", temperature=1.0)
    (run / "tune").mkdir()
    (run / "tune" / "request.yaml").write_text(yaml.safe_dump({"request": {"data": None}}))
    result = ar_ray.export(str(run), out=tmp_path / "one.onnx")
    assert result.members == 1 and result.checked_on == "val images of the built-in data"
    batch = images(3, seed=5)
    assert np.abs(onnx_answer(result.out, batch) - predict_path(run, batch)).max() <= 1e-4


def test_a_failed_check_leaves_nothing_behind(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run", weights=[1.0], tta="center", temperature=1.0)
    monkeypatch.setattr(exporting, "TOLERANCE", -1.0)  # no difference passes
    with pytest.raises(UserError, match="ONNX probabilities differ from PyTorch's"):
        ar_ray.export(str(run))
    assert not (run / "export").exists() or not list((run / "export").iterdir())


@pytest.mark.parametrize(
    ("flags", "culprit"),
    [
        (["--model", "student"], "--model student"),
        (["--format", "tflite"], "--format tflite"),
        (["--model", "distilled"], "no saved distilled model; run `ar-ray distill` first"),
    ],
)
def test_an_unknown_model_or_format_is_one_line(tmp_path, flags, culprit):
    assert_user_error(run_cli("export", "--from", str(tmp_path), *flags), culprit)


def test_a_run_without_an_ensemble_is_one_line(tmp_path):
    result = run_cli("export", "--from", str(tmp_path))
    assert_user_error(result, str(tmp_path / "ensemble" / "ensemble.yaml"))


def test_an_unwritable_out_is_one_line(tencrop_run, tmp_path):
    run, _ = tencrop_run
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "model.onnx"
    assert_user_error(run_cli("export", "--from", str(run), "--out", str(out)), f"--out {out}")


def test_an_ensemble_scored_on_whole_images_is_one_line(tmp_path):
    run = write_run(tmp_path / "run", weights=[1.0], tta="none")
    assert_user_error(run_cli("export", "--from", str(run)), "tta 'none'")


def test_without_the_extra_the_command_says_which_to_install(tencrop_run, tmp_path):
    """onnxruntime shadowed by a package that cannot be imported, as if it were missing."""
    run, _ = tencrop_run
    (tmp_path / "onnxruntime").mkdir()
    (tmp_path / "onnxruntime" / "__init__.py").write_text("raise ImportError('not here')\n")
    paths = [str(tmp_path), str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
    done = subprocess.run(
        [sys.executable, "-m", "ar_ray.cli", "export", "--from", str(run)],
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": os.pathsep.join(p for p in paths if p)},
        timeout=300,
    )
    assert_user_error(done, "pip install 'ar-ray[export]'")
