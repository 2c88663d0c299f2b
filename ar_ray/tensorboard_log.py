"""A member's epochs as TensorBoard scalars, next to its metrics, while it trains.

Train V2 takes no Tune logger callbacks, so a Train worker logs for itself: rank 0 writes
each epoch's scalars with tensorboardX (which `ray[tune]` installs) to a local event file
and copies it into `<member>/tensorboard/` on the run's storage, a folder or a bucket,
after every epoch. `tensorboard --logdir <run>/members` then shows every member as it
trains. A retried worker starts a new event file beside the old one (named by time, host,
process and a random token: a retry in the same second on the same host must not replace
it), so the epochs before a failure stay in view.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2
from tensorboardX.summary import scalar

from ar_ray import storage

TENSORBOARD_DIR = "tensorboard"
SCALARS = ("train_loss", "val_top1", "val_nll", "lr", "epoch_seconds")  # of engine.fit's


class EpochScalars:
    """`after_epoch` for rank 0: the epoch's SCALARS at step `epoch`, then the event file
    copied to `folder` (a path or URI).

    It writes through tensorboardX's synchronous `EventsWriter`, not `SummaryWriter`, whose
    background thread may not have written an epoch yet when the file is copied.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.local = tempfile.TemporaryDirectory(prefix="ar-ray-tensorboard-")
        unique = f".{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self.writer = EventsWriter(os.path.join(self.local.name, "events"), unique)

    def __call__(self, metrics: Mapping[str, Any]) -> None:
        for key in SCALARS:
            if key in metrics:
                summary = scalar(key, float(metrics[key]))
                step = int(metrics["epoch"])
                self.writer.write_event(
                    event_pb2.Event(summary=summary, step=step, wall_time=time.time())
                )
        self.writer.flush()
        for event_file in Path(self.local.name).iterdir():
            storage.upload_file(event_file, storage.join(self.folder, event_file.name))
