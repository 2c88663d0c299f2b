"""Small real image folders and a way to run the CLI as a user would."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, size: tuple[int, int] = (40, 32), seed: int = 0, mode="RGB") -> Path:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)
    return path


def make_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 3) -> Path:
    """A VIPriors layout with train/val/test class folders of small random JPEGs and PNGs."""
    for split in ("train", "val", "test"):
        for index, name in enumerate(classes):
            for i in range(per_class):
                suffix = ".jpg" if i % 2 == 0 else ".png"
                write_image(root / split / name / f"{i}{suffix}", seed=100 * index + i)
    return root


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ar_ray.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


def free_port() -> int:
    """A port nothing listens on (it was free a moment ago): for a new service, or as an
    unreachable one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_user_error(result: subprocess.CompletedProcess, culprit: str) -> None:
    """Exit 2, one line on stderr naming the culprit, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in lines if line.startswith("ar-ray: error:")]
    assert len(errors) == 1 and culprit in errors[0], result.stderr


def assert_top5(listed: np.ndarray, shown: np.ndarray, expected: np.ndarray, atol: float) -> None:
    """Top-5 class indices `listed` and their probabilities `shown` ([N, 5] each) against
    probabilities `expected` ([N, K]) worked out by hand: the listed classes hold the 5
    largest expected probabilities, in order, and show them. Classes whose probabilities tie
    (a member sure of one class floors all others alike) may come in either order, as
    float32 and float64 break such ties apart."""
    listed = np.asarray(listed)
    largest = -np.sort(-expected, axis=1)[:, :5]
    assert np.allclose(np.take_along_axis(expected, listed, axis=1), largest, atol=atol)
    assert np.allclose(shown, largest, atol=atol)


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the TensorBoard event files in `folder` ({tag: {step: value}}), read
    from the TFRecord framing itself (length, its CRC, an Event proto, its CRC)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars
