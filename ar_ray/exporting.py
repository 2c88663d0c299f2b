"""`ar-ray export`: a saved ensemble as one ONNX file that needs neither PyTorch nor Ray.

The graph holds everything `ar-ray predict` does to an image after decoding it: uint8 to
float, each member's own normalisation (buffers inside `ARNet`), the centre crop or TenCrop
the ensemble was scored with, every member, the weighted mean of their probabilities and
the temperature. A serving stack then only decodes images to the stored size and feeds them.

The file is trusted only once onnxruntime has reproduced the PyTorch path on real (or, where
none are at hand, deterministic) images; until then it is a temp file, removed on a mismatch.
A single model (one member, weight 1) takes the same path, so a distilled student needs no
second exporter.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from ar_ray import storage
from ar_ray.data.size import stored_size
from ar_ray.ensemble_weights import combine, log_combine
from ar_ray.errors import UserError
from ar_ray.extras import EXTRA_PACKAGES, require_extra
from ar_ray.outputs import atomic_save, atomic_write_text
from ar_ray.recipe.augment import (
    CROPS_PER_IMAGE,
    EVAL_VIEWS,
    predict_probabilities,
    to_unit_float,
)
from ar_ray.recipe.checkpoint import inference_model, load_checkpoint
from ar_ray.recipe.models import ARNet
from ar_ray.saved_ensemble import SavedEnsemble, load_model

OPSET = 18  # Resize/Pad as opset 18 defines them; onnxruntime >= 1.14 runs it
TOLERANCE = 1e-4  # max abs difference in probability allowed between onnxruntime and PyTorch
CHECK_IMAGES = 32
SHARED_MODE = 0o644  # files meant to be copied to a serving stack; temp files start at 0o600
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
FORMATS = ("onnx",)
MODELS: dict[str, Callable[[str], SavedEnsemble]] = {
    "ensemble": SavedEnsemble.load,
    "distilled": lambda run: load_model(run, "distilled"),
}
"""What `--model` names, each read as a `SavedEnsemble`: the distilled student is one member
of weight 1, so it takes the ensemble's path."""
CROPPING_TTA = ("center", "tencrop")
"""TTA modes whose graph only slices the stored image. `none` (and records older than
`stored_size`) resize uint8 images with torchvision's fixed-point kernel, which ONNX's Resize
rounds differently (measured: 1 grey level on a fifth of the pixels, 3e-4 in probability)."""


class ExportError(UserError):
    """An ensemble that cannot be exported faithfully, or an export that did not check out."""


@dataclass(frozen=True)
class ExportResult:
    """Where the file and its sidecar went, and how closely onnxruntime matched PyTorch."""

    out: Path  # the .onnx file
    sidecar: Path  # the .json beside it
    model: str
    format: str
    opset: int
    members: int
    tta: str
    checked_images: int
    checked_on: str  # which images the onnxruntime check used
    max_abs_diff: float


class ExportedEnsemble(nn.Module):
    """uint8 images [B, 3, S, S] (NCHW, RGB, S the stored size) -> probabilities [B, K].

    It calls the same crop functions as `predict_probabilities` and combines as
    `ensemble_weights.combine` does (weighted mean, floor, log, divide by the temperature,
    softmax), so the graph is that path, not a copy of it that could drift.
    """

    def __init__(
        self,
        members: Sequence[ARNet],
        weights: Sequence[float],
        temperature: float,
        tta: str,
        image_size: int,
    ) -> None:
        super().__init__()
        if tta not in CROPPING_TTA:
            raise ValueError(f"tta {tta!r} cannot be exported; one of {CROPPING_TTA}")
        self.members = nn.ModuleList(members)
        self.register_buffer("weights", torch.tensor(list(weights), dtype=torch.float32))
        self.temperature, self.tta, self.image_size = float(temperature), tta, image_size

    def forward(self, images: Tensor) -> Tensor:
        crops = to_unit_float(EVAL_VIEWS[self.tta](images, self.image_size))
        views = CROPS_PER_IMAGE[self.tta]
        member_probs = []
        for member in self.members:
            probs = torch.softmax(member(crops), dim=1)
            member_probs.append(probs.view(views, -1, probs.shape[1]).mean(dim=0))
        return log_combine(torch.stack(member_probs), self.weights, self.temperature).exp()


def check_choices(model: str, format: str) -> None:
    if model not in MODELS:
        raise UserError(f"--model {model}: unknown; one of {', '.join(MODELS)}")
    if format not in FORMATS:
        raise UserError(f"--format {format}: unknown; one of {', '.join(FORMATS)}")


def output_path(run: str, model: str, out: str | Path | None) -> Path:
    """`out`, or `<run>/export/<model>.onnx`; checked writable before any work starts."""
    if out is None:
        if storage.is_uri(run):
            raise UserError(f"{run}: a run in a bucket needs --out, a local .onnx path")
        out = Path(run) / "export" / f"{model}.onnx"
    out = Path(out)
    if out.suffix != ".onnx":
        raise UserError(f"--out {out}: must end in .onnx")
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder")
    try:
        storage.ensure_writable(str(out.parent.resolve()))
    except UserError:
        raise UserError(f"--out {out}: not writable") from None
    return out


def load_members(saved: SavedEnsemble) -> list[ARNet]:
    """Each member as `predict` serves it (the Mean Teacher where one was trained), on the CPU,
    all trained at the recorded image size."""
    models = []
    with tempfile.TemporaryDirectory() as folder:
        for index, location in enumerate(saved.locations()):
            local = storage.download_file(location, Path(folder) / f"{index}.pt")
            state = load_checkpoint(local)
            size = int(state["config"]["image_size"])
            if size != saved.image_size:
                raise ExportError(
                    f"{location}: trained at {size} px, the ensemble at {saved.image_size}"
                )
            models.append(inference_model(state, source=location))
    return models


def check_exportable(saved: SavedEnsemble) -> None:
    """Only a graph that reproduces `predict` is written; say why before loading anything."""
    if saved.tta not in CROPPING_TTA:
        raise ExportError(
            f"tta {saved.tta!r}: resizes uint8 images in a way ONNX cannot reproduce within "
            f"{TOLERANCE:g}; export supports {' and '.join(CROPPING_TTA)}"
        )
    if saved.stored_size != stored_size(saved.image_size):
        raise ExportError(
            f"stored size {saved.stored_size} px: this (older) ensemble resizes its images "
            f"to {stored_size(saved.image_size)} px before cropping, which ONNX cannot "
            f"reproduce within {TOLERANCE:g}"
        )


def check_images(saved: SavedEnsemble) -> tuple[np.ndarray, str]:
    """Images to compare onnxruntime with PyTorch on, uint8 [N, 3, S, S]: the built-in set's
    val images when the run was tuned on it, else seeded noise with a black and a white
    image (the ends of the input range)."""
    if _tuned_on_builtin(saved.run):
        from ar_ray.data import load_builtin

        val = load_builtin(saved.image_size).val
        if val.images.shape[-1] == saved.stored_size and len(val.images):
            pick = np.linspace(0, len(val.images) - 1, min(CHECK_IMAGES, len(val.images)))
            return val.images[pick.astype(int)], "val images of the built-in data"
    size = saved.stored_size
    noise = np.random.default_rng(0).integers(0, 256, (CHECK_IMAGES - 2, 3, size, size))
    ends = np.stack([np.zeros((3, size, size)), np.full((3, size, size), 255)])
    return np.concatenate([noise, ends]).astype(np.uint8), "deterministic images (seed 0)"


def _tuned_on_builtin(run: str) -> bool:
    """Whether the run's tune request names no data folder (the built-in set)."""
    location = storage.join(run, "tune", "request.yaml")
    try:
        return yaml.safe_load(storage.read_text(location))["request"]["data"] is None
    except (OSError, UserError, yaml.YAMLError, KeyError, TypeError):
        return False


def pytorch_probabilities(
    saved: SavedEnsemble, members: Sequence[ARNet], images: np.ndarray
) -> np.ndarray:
    """What `ar-ray predict` answers for `images`: each member's `predict_probabilities`,
    combined with the saved weights and temperature."""
    batch = torch.from_numpy(np.ascontiguousarray(images))
    member_probs = torch.stack(
        [predict_probabilities(model, batch, saved.image_size, saved.tta) for model in members]
    )
    return combine(member_probs.numpy(), saved.fitted_weights)


def write_onnx(module: ExportedEnsemble, path: str, example: Tensor) -> None:
    """torch.onnx (the dynamo exporter) with a dynamic batch axis, the weights in the file."""
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on internal APIs
        _onnx_export(module, example, path, batch)
    os.chmod(path, SHARED_MODE)


def _onnx_export(module: nn.Module, example: Tensor, path: str, batch: Any) -> None:
    """A model torch.onnx cannot express is one line; --debug shows the exporter's story."""
    try:
        torch.onnx.export(
            module,
            (example,),
            path,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=OPSET,
            dynamo=True,
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
        )
    except Exception as error:  # the exporter raises many kinds, all meaning "cannot"
        raise ExportError(
            f"torch.onnx could not export this ensemble ({type(error).__name__}); --debug shows why"
        ) from error


def onnx_probabilities(path: str, images: np.ndarray) -> np.ndarray:
    """The exported file's answer, as a deployment would get it: onnxruntime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images)})[0]


def max_difference(path: str, expected: np.ndarray, images: np.ndarray) -> float:
    """The largest probability difference from PyTorch; above `TOLERANCE` is an error."""
    answer = onnx_probabilities(path, images)
    if answer.shape != expected.shape:
        raise ExportError(f"ONNX answered {list(answer.shape)}, PyTorch {list(expected.shape)}")
    difference = float(np.abs(answer - expected).max())
    if not difference <= TOLERANCE:
        raise ExportError(
            f"ONNX probabilities differ from PyTorch's by {difference:.3g} > {TOLERANCE:g} "
            f"on {len(images)} images; nothing was written"
        )
    return difference


def export_saved(saved: SavedEnsemble, model: str, out: Path) -> ExportResult:
    """Build the graph, write it to a temp file, check it with onnxruntime, then publish it
    and its sidecar. A failed check leaves nothing behind."""
    check_exportable(saved)
    members = load_members(saved)
    module = ExportedEnsemble(
        members, saved.weights, saved.temperature, saved.tta, saved.image_size
    ).eval()
    images, checked_on = check_images(saved)
    expected = pytorch_probabilities(saved, members, images)
    differences: list[float] = []

    def write_and_check(path: str) -> None:
        with torch.no_grad():
            write_onnx(module, path, torch.from_numpy(images[:2].copy()))
        differences.append(max_difference(path, expected, images))

    atomic_save(out, write_and_check)
    result = ExportResult(
        out=out,
        sidecar=out.with_suffix(".json"),
        model=model,
        format="onnx",
        opset=OPSET,
        members=len(members),
        tta=saved.tta,
        checked_images=len(images),
        checked_on=checked_on,
        max_abs_diff=differences[0],
    )
    try:
        atomic_write_text(result.sidecar, json.dumps(sidecar(saved, result), indent=2) + "\n")
        os.chmod(result.sidecar, SHARED_MODE)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return result


def sidecar(saved: SavedEnsemble, result: ExportResult) -> dict[str, Any]:
    """What a serving stack needs to feed the file and read its answer, and what it holds."""
    size = saved.stored_size
    return {
        "file": result.out.name,
        "format": result.format,
        "opset": result.opset,
        "model": result.model,
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 3, size, size],
            "layout": "NCHW",
            "dtype": "uint8",
            "channels": "RGB",
            "range": [0, 255],
            "size": size,
            "how": (
                "as ar-ray decodes images (ar_ray.data.image.decode_image): EXIF orientation "
                "applied, RGB (transparency on white), shorter side resized to "
                f"{size} px (bicubic), centre {size}x{size} square"
            ),
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", len(saved.classes)],
            "dtype": "float32",
            "meaning": "class probabilities (each row sums to 1), in the order of `classes`",
        },
        "classes": list(saved.classes),
        "image_size": saved.image_size,
        "tta": saved.tta,
        "members": list(saved.members),
        "weights": list(saved.weights),
        "method": saved.method,
        "temperature": saved.temperature,
        "check": {
            "images": result.checked_images,
            "on": result.checked_on,
            "max_abs_diff": result.max_abs_diff,
            "tolerance": TOLERANCE,
            "against": "ar-ray predict's PyTorch path on the CPU (fp32)",
        },
        "versions": versions(),
        "run": saved.run,
    }


def versions() -> dict[str, str]:
    """The software that wrote and checked the file."""
    found = {}
    for package in ("ar-ray", "torch", "torchvision", *EXTRA_PACKAGES["export"]):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def run_export(run: str, *, model: str, format: str, out: str | Path | None) -> ExportResult:
    """Cheap checks first (choices, packages, the record, the output), then the export."""
    check_choices(model, format)
    require_extra("export")
    run = storage.resolve(run)
    saved = MODELS[model](run)
    return export_saved(saved, model, output_path(run, model, out))
