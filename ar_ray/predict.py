"""`ar-ray predict`: a saved ensemble labels new images of any size, RGB or grey."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ar_ray.data import IMAGE_EXTENSIONS, decode_image
from ar_ray.ensemble import LoadedEnsemble, predictions_frame
from ar_ray.errors import UserError
from ar_ray.inference import run_predictors


def collect_images(paths: list[Path]) -> list[Path]:
    """Folders are searched recursively for image files; files are taken as given."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_EXTENSIONS
                and not p.name.startswith(".")
            )
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    if not files:
        raise UserError(f"{' '.join(map(str, paths))}: no image files found")
    return files


def run_predict(ensemble: LoadedEnsemble, files: list[Path]) -> pd.DataFrame:
    """Decode lazily so images stream to the actors instead of piling up in the driver."""
    checkpoints, weights, record = ensemble
    size = int(record["image_size"])
    images = (decode_image(path, size) for path in files)
    result = run_predictors(checkpoints, images, tta=record["tta"], weights=weights)
    return predictions_frame(result.ensemble_probs, [str(p) for p in files], record["classes"])
