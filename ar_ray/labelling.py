"""`ar-ray predict`: a saved ensemble labels images of any number, wherever they are stored.

Files are listed on the driver but read and decoded by Ray Data tasks on the cluster; only
each image's top-k classes come back, and they are appended to the output as they arrive,
so the driver's memory does not grow with the number of images. An image that cannot be
decoded becomes a row with an `error`, never the end of the run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from ar_ray import storage
from ar_ray.data import IMAGE_EXTENSIONS, DataError
from ar_ray.data.image import decode_image_bytes
from ar_ray.errors import UserError
from ar_ray.inference import InferenceOptions, PoolTally, ensemble_top_k
from ar_ray.outputs import atomic_write_csv
from ar_ray.predictions import TOP_K, top_k_frame
from ar_ray.saved_ensemble import SavedEnsemble


def check_locations(locations: list[str]) -> list[str]:
    """Absolute local paths (read tasks may run in another working directory) or URIs; a
    missing one fails here, before the cluster does any work."""
    resolved = []
    for location in locations:
        full = storage.resolve(location)
        if not storage.exists(full):
            raise UserError(f"{location}: no such file, folder or bucket prefix")
        resolved.append(full)
    return resolved


def decode_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Runs in Ray Data tasks: bytes -> uint8 CHW, with an error message for a bad image."""
    images = np.zeros((len(batch["path"]), 3, size, size), dtype=np.uint8)
    errors = []
    for row, (path, data) in enumerate(zip(batch["path"], batch["bytes"], strict=True)):
        try:
            images[row] = decode_image_bytes(data, str(path), size)
            errors.append("")
        except DataError as error:
            errors.append(str(error))
    return {"path": batch["path"], "image": images, "error": np.array(errors, dtype=object)}


def image_dataset(locations: list[str], size: int) -> ray.data.Dataset:
    """Image files under files, folders and s3:// / gs:// prefixes, decoded on the cluster."""
    files = ray.data.read_binary_files(
        locations,
        include_paths=True,
        file_extensions=[extension.lstrip(".") for extension in sorted(IMAGE_EXTENSIONS)],
    )
    return files.map_batches(decode_batch, fn_kwargs={"size": size}, batch_size=64)


@dataclass
class PredictResult:
    """Where the predictions went, how many images, how many failed to decode."""

    out: Path  # CSV or Parquet: image_id, predicted, top5, confidence, top5_probs, error
    images: int
    errors: int
    pool: Path  # which actors labelled how many images

    def frame(self) -> pd.DataFrame:
        """The predictions, read back."""
        return pd.read_parquet(self.out) if self.out.suffix == ".parquet" else pd.read_csv(self.out)


def pool_file(out: Path) -> Path:
    return out.with_name(f"{out.stem}_pool.csv")


class PredictionWriter:
    """Appends result batches to a temp file beside `out`, renamed into place when complete:
    an interrupted run leaves nothing half-written. CSV, or Parquet for a `.parquet` name."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.partial = out.with_name(f".{out.name}.partial")
        self.parquet = out.suffix.lower() == ".parquet"
        self._parquet_writer: pq.ParquetWriter | None = None
        self._csv = None

    def append(self, frame: pd.DataFrame) -> None:
        if self.parquet:
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self._parquet_writer is None:
                self._parquet_writer = pq.ParquetWriter(self.partial, table.schema)
            self._parquet_writer.write_table(table)
            return
        header = self._csv is None
        if self._csv is None:
            self._csv = open(self.partial, "w", newline="")  # noqa: SIM115 (closed in _close)
        frame.to_csv(self._csv, header=header, index=False)

    def _close(self) -> None:
        if self._parquet_writer is not None:
            self._parquet_writer.close()
        if self._csv is not None:
            self._csv.close()

    def commit(self) -> None:
        self._close()
        os.replace(self.partial, self.out)

    def discard(self) -> None:
        self._close()
        with contextlib.suppress(FileNotFoundError):
            self.partial.unlink()


def _frames(
    ensemble: SavedEnsemble, locations: list[str], options: InferenceOptions, tally: PoolTally
) -> Iterator[pd.DataFrame]:
    images = image_dataset(locations, ensemble.stored_size)
    batches = ensemble_top_k(
        images,
        ensemble.locations(),
        ensemble.fitted_weights,
        tta=ensemble.tta,
        options=options,
        top_k=TOP_K,
    )
    for batch in batches:
        tally.add(batch)
        frame = top_k_frame(
            [str(path) for path in batch["path"]],
            batch["classes"],
            batch["probs"],
            ensemble.classes,
        )
        frame["error"] = batch["error"]
        yield frame


def run_predict(
    ensemble: SavedEnsemble, locations: list[str], out: Path, options: InferenceOptions
) -> PredictResult:
    """Label every image under `locations`, streaming rows to `out` as batches finish."""
    writer = PredictionWriter(out)
    tally = PoolTally()
    images = errors = 0
    try:
        for frame in _frames(ensemble, locations, options, tally):
            writer.append(frame)
            images += len(frame)
            errors += int((frame["error"] != "").sum())
    except BaseException:
        writer.discard()
        raise
    if images == 0:
        writer.discard()
        raise UserError(f"{' '.join(locations)}: no image files found")
    writer.commit()
    atomic_write_csv(pool_file(out), tally.frame())
    return PredictResult(out=out, images=images, errors=errors, pool=pool_file(out))
