"""Build the bundled Fashion-MNIST few-shot split (`ar_ray/data/builtin/fashion_mnist_fewshot.npz`).

The split mirrors the VIPriors data-efficient challenge shape: 50 train + 50 val images per class,
disjoint, drawn with a fixed seed from the official 60k training set, plus the untouched official
10k test set. Shipping one small npz keeps `ar-ray` runnable offline with no download step, and
recording the source indices lets anyone verify or regenerate the draw.

Usage: python scripts/make_builtin_dataset.py [--source DIR] [--seed 0] [--output PATH]
"""

from __future__ import annotations

import argparse
import gzip
import os
import tempfile
from pathlib import Path

import numpy as np

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
PER_CLASS = 50
DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "ar_ray" / "data" / "builtin" / "fashion_mnist_fewshot.npz"
IDX_UBYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file by its header so a wrong or truncated file fails loudly, not silently."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    zero, dtype, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or dtype != IDX_UBYTE:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {shape} values, found {data.size}")
    return data.reshape(shape)


def load_part(source: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(source / f"{part}-images-idx3-ubyte.gz")
    labels = read_idx(source / f"{part}-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels


def draw_indices(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, one seeded permutation feeds both splits, so train and val never overlap."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in range(len(CLASSES)):
        picked = rng.permutation(np.flatnonzero(labels == label))[: 2 * PER_CLASS]
        train.append(picked[:PER_CLASS])
        val.append(picked[PER_CLASS:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def write_atomic(output: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write beside the target then rename, so an interrupted run never leaves a broken npz."""
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".fashion_mnist_", suffix=".npz", dir=output.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez_compressed(handle, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the shipped file must be world-readable
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build(source: Path, seed: int) -> dict[str, np.ndarray]:
    train_images, train_labels = load_part(source, "train")
    test_images, test_labels = load_part(source, "t10k")
    train_idx, val_idx = draw_indices(train_labels, seed)
    return {
        "train_images": train_images[train_idx],
        "train_labels": train_labels[train_idx],
        "val_images": train_images[val_idx],
        "val_labels": train_labels[val_idx],
        "test_images": test_images,
        "test_labels": test_labels,
        "classes": np.array(CLASSES),
        "train_source_indices": train_idx.astype(np.int64),
        "val_source_indices": val_idx.astype(np.int64),
        "seed": np.array(seed, dtype=np.int64),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="dir of idx .gz files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    write_atomic(args.output, build(args.source, args.seed))
    size_mb = args.output.stat().st_size / 1e6
    print(f"wrote {args.output} ({size_mb:.1f} MB)")


if __name__ == "__main__":
    main()
