"""GPU check: the CUDA path end to end within a short device loan (4 minutes on one H100/H200).

    PYTHONPATH=. python3 bench/gpu_check.py               # on the device: at most --budget-s
    PYTHONPATH=. python3 bench/gpu_check.py --cpu-smoke   # the same sections, tiny, on CPU
    PYTHONPATH=. python3 bench/gpu_check.py --sections recipe,ddp   # a subset

It runs from the source tree where Ray and Optuna are absent (the device machine has only
torch, torchvision, numpy, pandas, pyarrow, pyyaml and pillow): every section but the two
Ray ones is pure PyTorch, and those two record "skipped: ray not installed", which is not a
failure. Sections, in order of value; a failing one never stops the others:
- recipe: the default recipe (`search_spaces/ar_default.yaml`: its fixed values and the
  middle of every searched range) at 224 px with bf16 autocast and channels_last: every
  epoch's loss is finite, and 3 epochs straight give the same weights, bit for bit, as 2
  epochs then a resume from the saved checkpoint (Mean Teacher from epoch 2, so the resumed
  checkpoint carries a teacher).
- throughput_resnet18 / throughput_resnet50: train images/s, one view, of a step on data
  already on the device (the ceiling: the model alone) and of `engine.fit` through the
  pipeline a CUDA member gets: its loader workers and the batched augmentation on the
  device (`batch_augment=True`, forced so that the CPU smoke run goes through it too).
- ray_member (Ray): one member through `members.train_members` on a 1-GPU Ray Train worker.
- inference_tencrop: TenCrop images/s of the engine's own eval path
  (`augment.predict_probabilities`) on the device, 256 uint8 images handed over per call.
- inference_actor (Ray): TenCrop images/s of one GPU actor through
  `inference.member_probabilities`, the difference of a small and a large call.
- ddp: two processes (`torch.multiprocessing`) share the one GPU: `engine.fit` under a
  process group (DistributedDataParallel, SyncBatchNorm), and the gradient-carrying gather
  of `losses.contrastive_regularization` checked against a one-process reference. NCCL
  refuses two ranks on one device ("Duplicate GPU detected"), so nccl is tried first and
  gloo on CUDA tensors runs when it refuses; the backend that ran and why are recorded.

Time caps. `--budget-s` counts from the start of this script, so imports and CUDA start-up
are inside it. Each section's cap is its part of the time left (less CLOSING_S for the end),
shared with the sections still to run in proportion to their weights: time that a section
did not use, or a skipped Ray section's, goes to the ones after it, and the last one ends
by the budget's end. A cap is a SIGALRM timer whose handler raises `SectionCapped` in the
main thread. Python runs the handler between any two bytecodes, so the cap stops a section
between two of its ops: inside `engine.fit`'s epoch, which has no per-step hook, and inside
an op that loops in Python (issue 17's roi_align fallback) alike, without a subprocess per
section paying Python, torch and CUDA start-up again. It cannot interrupt one long native
call; the DDP ranks, whose collectives could hang, run in child processes the parent kills.
`SectionCapped` is a BaseException, so no `except Exception` swallows it, and the timer
fires again every REFIRE_S until the section has unwound, in case one lands where Python
ignores it (a `__del__`). A section writes what it has measured into its result as it
goes, so a capped one reports that, with "capped": true.

After every section the report is rewritten, atomically: a run killed midway still reports
what it finished. Writes <out>/gpu_check.json and <out>/gpu_check.md (default
bench/results/, and bench/results/quick/ for --cpu-smoke, so a smoke run never overwrites
device results). Exits 1 when a section failed or was capped, 2 without a CUDA device
(unless --cpu-smoke) or for an unknown section name.

Goals, judged on the device only: ResNet-50 at 224 px trains at >= 2,500 images/s on
synthetic data; the real pipeline reaches >= 0.8x of synthetic; the whole check <= 4 min.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import cache, partial
from pathlib import Path
from statistics import median
from typing import Any

STARTED = time.monotonic()  # the budget's start: torch's import and CUDA start-up count
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# cuBLAS is only deterministic with a fixed workspace, and it reads this when CUDA starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import RESULTS, markdown_table  # noqa: E402
from torch import nn  # noqa: E402

from ar_ray.config import RecipeConfig  # noqa: E402
from ar_ray.data import DatasetSplits, ImageSplit  # noqa: E402
from ar_ray.data.size import stored_size  # noqa: E402
from ar_ray.outputs import atomic_write_text, environment_info  # noqa: E402
from ar_ray.recipe.augment import (  # noqa: E402
    CROPS_PER_IMAGE,
    device_autocast,
    predict_probabilities,
    to_unit_float,
)
from ar_ray.recipe.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from ar_ray.recipe.engine import fit  # noqa: E402
from ar_ray.recipe.losses import (  # noqa: E402
    contrastive_regularization,
    supcon,
    symmetric_cross_entropy,
)
from ar_ray.recipe.models import ARNet, place_model  # noqa: E402
from ar_ray.resources import loader_workers_for  # noqa: E402
from ar_ray.search_space import Domain, load_search_space  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPACE = ROOT / "search_spaces" / "ar_default.yaml"
CLASSES = 10
GOAL_SYNTHETIC = 2500.0  # ResNet-50 images/s: NVIDIA's A100 AMP figure; an H100 is faster
GOAL_PIPELINE_RATIO = 0.8
GOAL_SECONDS = 240.0  # a loan is ~15 min of device time, up to 4 of them machine start-up
REFIRE_S = 2.0  # a capped section that has not unwound yet is interrupted again this often
WORLD = 2  # DDP ranks sharing the one device
CLOSING_S = 5.0  # kept from the sections: a capped one's unwinding, the last report
SMOKE_BUDGET_S = 900.0  # the smoke run measures nothing; its caps only end a hang, and a busy
# 2-CPU machine can take a minute to start Ray
RANK_EXIT_S = 2.0  # a rank that wrote its record may exit this long before it is killed


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the device run and the CPU smoke run."""

    image_size: int
    small_input: bool  # the 3x3 stem: only for the smoke run's tiny images
    recipe_images: int
    recipe_batch: int
    recipe_epochs: int
    batch: int  # throughput batch (ar_default.yaml's 128 on the device)
    warmup_steps: int
    timed_steps: int
    pipeline_images: int
    pipeline_epochs: int  # the first one (worker and cuDNN start-up) is not timed
    member_images: int
    member_epochs: int
    worker_cpus: int  # a member's CPUs (its loader workers), the Ray worker's and actor's
    tencrop_batch: int  # images per predict_probabilities call
    tencrop_warmup_calls: int
    tencrop_timed_calls: int
    inference_images: tuple[int, int]
    ddp_images: int  # over both ranks
    ddp_batch: int  # global: each rank takes half
    ddp_epochs: int
    ray_cpus: int
    expected_backend: str  # the Ray Train worker's


DEVICE = Sizes(
    image_size=224,
    small_input=False,
    recipe_images=256,  # 8 steps of 32 per epoch: 3 epochs + 1 resumed = 32 steps
    recipe_batch=32,
    recipe_epochs=3,
    batch=128,
    warmup_steps=10,
    timed_steps=30,  # ~1.3 s of ResNet-50 at ~3,000 images/s
    pipeline_images=2048,  # 16 steps of 128 per epoch
    pipeline_epochs=3,
    member_images=256,
    member_epochs=2,
    worker_cpus=min(8, os.cpu_count() or 2),
    tencrop_batch=256,  # 2,560 crops: a batch for an 80-140 GB GPU, not the CPU's 64
    tencrop_warmup_calls=3,
    tencrop_timed_calls=20,
    inference_images=(512, 2560),
    ddp_images=128,  # 4 steps of 16 per rank per epoch
    ddp_batch=32,
    ddp_epochs=2,
    ray_cpus=os.cpu_count() or 2,
    expected_backend="nccl",
)
SMOKE = Sizes(
    image_size=16,
    small_input=True,
    recipe_images=16,
    recipe_batch=8,
    recipe_epochs=3,
    batch=8,
    warmup_steps=1,
    timed_steps=2,
    pipeline_images=16,
    pipeline_epochs=2,
    member_images=16,
    member_epochs=1,
    worker_cpus=1,
    tencrop_batch=4,
    tencrop_warmup_calls=1,
    tencrop_timed_calls=2,
    inference_images=(8, 24),
    ddp_images=16,
    ddp_batch=8,
    ddp_epochs=1,
    ray_cpus=2,
    expected_backend="gloo",
)
ARCHS = ("resnet18", "resnet50")


@dataclass(frozen=True)
class Context:
    """What every section gets: the sizes, the device, a scratch folder, its cap's end."""

    sizes: Sizes
    device: torch.device
    folder: Path
    deadline: float = math.inf  # time.monotonic() at which the running section is capped


# ---------------------------------------------------------------- time caps


class SectionCapped(BaseException):
    """The running section's cap passed. A BaseException: no `except Exception` in the
    engine, torch or Ray may swallow it."""


_cap_armed = False  # the SIGALRM handler raises only while a section runs under its cap


def _on_alarm(signum: int, frame: Any) -> None:
    if _cap_armed:
        raise SectionCapped


def _disarm() -> None:
    """Stop the cap timer; cleared flag first, so a late alarm is ignored, not raised."""
    global _cap_armed
    _cap_armed = False
    signal.setitimer(signal.ITIMER_REAL, 0)


def call_with_cap(body: Callable[[], None], cap: float) -> bool:
    """Run `body` in the main thread for at most `cap` seconds; True when the cap stopped it
    (or left it no time to start). Its other exceptions propagate, the timer stopped."""
    global _cap_armed
    if cap <= 0:
        return True
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        try:
            _cap_armed = True
            signal.setitimer(signal.ITIMER_REAL, cap, REFIRE_S)
            body()
        finally:
            _disarm()
    except SectionCapped:
        _disarm()  # again: an alarm may have fired inside the first one, before its flag
        return True
    finally:
        signal.signal(signal.SIGALRM, previous)
    return False


# ---------------------------------------------------------------- configs and data


def midpoint(domain: Domain) -> Any:
    """The middle of a searched range: a typical trial, not an extreme one."""
    if domain.kind == "choice":
        return domain.values[len(domain.values) // 2]
    low, high = domain.values
    if domain.kind == "loguniform":
        return math.sqrt(low * high)
    middle = (low + high) / 2
    return round(middle) if domain.kind == "int" else middle


def recipe_config(sizes: Sizes) -> RecipeConfig:
    """ar_default.yaml at this run's size; Mean Teacher from epoch 2, so a resume into epoch
    3 carries the teacher."""
    space = load_search_space(SPACE)
    values = space.fixed | {key: midpoint(domain) for key, domain in space.searched.items()}
    values |= {
        "image_size": sizes.image_size,
        "small_input": sizes.small_input,
        "epochs": sizes.recipe_epochs,
        "batch_size": sizes.recipe_batch,
        "warmup_epochs": 1.0,
        "mt_start_epoch": 1,
        "mt_rampup_epochs": 1.0,
    }
    return RecipeConfig.from_dict(values, source=str(SPACE))


def throughput_config(sizes: Sizes, arch: str) -> RecipeConfig:
    """One view, no teacher: the step NVIDIA's images/s figures describe."""
    return recipe_config(sizes).replace(
        arch=arch,
        cr_weight=0.0,
        mt_weight=0.0,
        batch_size=sizes.batch,
        epochs=sizes.pipeline_epochs,
    )


def ddp_config(sizes: Sizes) -> RecipeConfig:
    """A small member: ResNet-18 with CR on (SupCon gathers projections and labels), and no
    Mean Teacher, whose per-rank EMA copy DDP does not synchronise."""
    return recipe_config(sizes).replace(
        arch="resnet18",
        cr_variant="supcon",
        mt_weight=0.0,
        batch_size=sizes.ddp_batch,
        epochs=sizes.ddp_epochs,
    )


def synthetic_images(count: int, size: int, seed: int) -> np.ndarray:
    """Smooth colour fields, stored as the loaders store images: square at `size`."""
    generator = torch.Generator().manual_seed(seed)
    seeds = torch.randint(0, 256, (count, 3, 8, 8), generator=generator).float()
    fields = F.interpolate(seeds, size=(size, size), mode="bilinear", align_corners=False)
    return fields.round().clamp(0, 255).to(torch.uint8).numpy()


def synthetic_splits(train: int, val: int, image_size: int, seed: int = 0) -> DatasetSplits:
    stored = stored_size(image_size)

    def split(count: int, name: str, offset: int) -> ImageSplit:
        labels = np.arange(count, dtype=np.int64) % CLASSES
        ids = [f"{name}-{i}" for i in range(count)]
        return ImageSplit(synthetic_images(count, stored, seed + offset), labels, ids)

    return DatasetSplits(
        train=split(train, "train", 0),
        val=split(val, "val", 1),
        test=None,
        classes=[f"class{i}" for i in range(CLASSES)],
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- recipe


@contextmanager
def deterministic_kernels() -> Iterator[list[str]]:
    """cuDNN and cuBLAS pick non-deterministic kernels by default, so two identical CUDA runs
    differ in the last bits, resumed or not. Yields the ops that had no deterministic kernel."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found: list[str] = []
        try:
            yield found
        finally:
            torch.use_deterministic_algorithms(before)
            found += sorted(
                {str(w.message).splitlines()[0] for w in caught if "determinis" in str(w.message)}
            )


def tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from tensors(value, f"{prefix}.{key}" if prefix else str(key))


def max_weight_difference(first: dict[str, Any], second: dict[str, Any]) -> float:
    """Largest absolute difference over the student's and the teacher's tensors."""
    mine = dict(tensors({"model": first["model"], "teacher": first["teacher"]}))
    theirs = dict(tensors({"model": second["model"], "teacher": second["teacher"]}))
    if mine.keys() != theirs.keys():
        return math.inf
    return max(
        (mine[key].double() - theirs[key].double()).abs().max().item() if mine[key].numel() else 0.0
        for key in mine
    )


def recipe_section(context: Context, result: dict[str, Any]) -> None:
    """Finite losses and a bit-exact resume of the recipe a GPU trial runs (CR, Mean Teacher,
    batched augmentation on the device): what a short loan must confirm first."""
    config = recipe_config(context.sizes)
    splits = synthetic_splits(context.sizes.recipe_images, config.batch_size, config.image_size)
    saved = context.folder / "recipe_epoch_before_last.pt"
    steps_per_epoch = len(splits.train) // config.batch_size
    straight_losses: list[float] = []
    result |= {"config": config.to_dict(), "steps_per_epoch": steps_per_epoch}
    result["straight_losses"] = straight_losses  # grows epoch by epoch: a capped run shows it

    def record_and_keep_before_last(metrics: dict[str, Any], state: dict[str, Any]) -> None:
        straight_losses.append(metrics["train_loss"])
        if metrics["epoch"] == config.epochs - 1:
            save_checkpoint(state, saved)

    with deterministic_kernels() as nondeterministic:
        result["ops_without_deterministic_kernel"] = nondeterministic
        straight = fit(config, splits, on_epoch=record_and_keep_before_last, device=context.device)
        resumed = fit(config, splits, resume_from=load_checkpoint(saved), device=context.device)
    losses = straight_losses + [resumed.history[-1]["train_loss"]]
    difference = max_weight_difference(straight.state, resumed.state)
    steps = steps_per_epoch * (config.epochs + 1)
    result |= {
        "steps": steps,
        "train_losses": losses,
        "max_abs_weight_difference": difference,
        "checks": {
            "finite_loss": all(math.isfinite(loss) for loss in losses),
            "identical_resume": difference == 0.0,
        },
        "summary": f"{steps} steps ({config.arch}), resume difference {difference:g}",
    }


# ---------------------------------------------------------------- throughput


def synthetic_rate(config: RecipeConfig, sizes: Sizes, device: torch.device) -> float:
    """images/s of forward, SCE, backward and SGD on one batch that never leaves the device:
    the model alone, the ceiling the input pipeline is judged against."""
    torch.manual_seed(config.seed)
    model = place_model(ARNet(config, CLASSES), device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    shape = (config.batch_size, 3, config.image_size, config.image_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    labels = torch.randint(0, CLASSES, (config.batch_size,), device=device)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format

    def step() -> None:
        with device_autocast(device):
            logits = model(to_unit_float(images).contiguous(memory_format=memory_format))
            loss = symmetric_cross_entropy(
                logits.float(), labels, config.sce_alpha, config.sce_beta, config.sce_log_zero
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(sizes.warmup_steps):
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(sizes.timed_steps):
        step()
    synchronize(device)
    return config.batch_size * sizes.timed_steps / (time.perf_counter() - started)


def pipeline_rate(
    config: RecipeConfig, sizes: Sizes, device: torch.device, epoch_seconds: list[float]
) -> float:
    """images/s of `engine.fit`'s epochs after the first (appended to `epoch_seconds` as they
    end): loader, augmentation, step and a one-batch validation, as a CUDA member trains:
    with a member's loader workers and the batched augmentation on the device."""
    splits = synthetic_splits(sizes.pipeline_images, config.batch_size, config.image_size)

    def record(metrics: dict[str, Any], state: dict[str, Any]) -> None:
        epoch_seconds.append(metrics["epoch_seconds"])

    fit(
        config,
        splits,
        device=device,
        on_epoch=record,
        loader_workers=loader_workers_for(sizes.worker_cpus),
        batch_augment=True,
    )
    trained = (len(splits.train) // config.batch_size) * config.batch_size
    return trained / median(epoch_seconds[1:])


def throughput_section(context: Context, result: dict[str, Any], arch: str) -> None:
    """Whether the input pipeline keeps the GPU busy: its rate against the model's alone."""
    sizes = context.sizes
    config = throughput_config(sizes, arch)
    epoch_seconds: list[float] = []
    result |= {
        "config": config.to_dict(),
        "loader_workers": loader_workers_for(sizes.worker_cpus),
        "batch_augment": True,
        "pipeline_epoch_seconds": epoch_seconds,
    }
    synthetic = result["synthetic_images_per_s"] = synthetic_rate(config, sizes, context.device)
    real = pipeline_rate(config, sizes, context.device, epoch_seconds)
    ratio = real / synthetic
    result |= {
        "pipeline_images_per_s": real,
        "pipeline_vs_synthetic": ratio,
        "checks": {"positive_rates": synthetic > 0 and real > 0},
        "summary": f"synthetic {synthetic:,.0f} img/s, pipeline {real:,.0f} img/s ({ratio:.2f}x)",
    }


# ---------------------------------------------------------------- Ray sections


@cache
def ray_installed() -> bool:
    """Whether the Ray sections can run: the device machine has no Ray."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def start_ray(cpus: int) -> None:
    """Its own local Ray, never one already running on the machine."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=cpus, include_dashboard=False)


def stop_ray() -> None:
    """Shut down the Ray a Ray section started; nothing when none was imported."""
    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()


def member_loop_recording_worker(marker: str, loop_config: dict[str, Any]) -> None:
    """`member_train_loop`, then a note of what the worker really got: the process group's
    backend, the device and its peak memory (Ray Train tears the group down after)."""
    from ar_ray.members import member_train_loop, worker_device

    member_train_loop(loop_config)
    device = worker_device()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    record = {"backend": dist.get_backend(), "device": str(device), "peak_gpu_memory_mb": peak}
    Path(marker).write_text(json.dumps(record))


def member_section(context: Context, result: dict[str, Any]) -> None:
    from ar_ray.members import MemberSpec, TrainOptions, member_dir, train_members
    from ar_ray.resources import Resources

    sizes = context.sizes
    start_ray(sizes.ray_cpus)
    gpus = 1.0 if context.device.type == "cuda" else 0.0
    config = recipe_config(sizes).replace(arch="resnet18", epochs=sizes.member_epochs)
    result["config"] = config.to_dict()
    splits = synthetic_splits(sizes.member_images, sizes.recipe_batch, sizes.image_size)
    spec = MemberSpec("gpu-check", config, "gpu-check", 1, "bench/gpu_check.py")
    root = str(context.folder / "members-run")
    options = TrainOptions(root=root, worker=Resources(sizes.worker_cpus, gpus), max_failures=0)
    marker = context.folder / "member_worker.json"
    loop = partial(member_loop_recording_worker, str(marker))
    status = train_members([spec], splits, options, train_loop=loop)
    worker = json.loads(marker.read_text())
    losses = pd.read_csv(Path(member_dir(root, spec.member_id)) / "metrics.csv")["train_loss"]
    want_device = "cuda" if gpus else "cpu"
    result |= {
        "status": status[spec.member_id],
        "worker": worker,
        "train_losses": losses.tolist(),
        "checks": {
            "backend": worker["backend"] == sizes.expected_backend,
            "device": worker["device"].startswith(want_device),
            "finite_loss": bool(np.isfinite(losses).all()),
        },
        "summary": f"{worker['backend']} on {worker['device']}, {len(losses)} epochs",
    }


def actor_inference_section(context: Context, result: dict[str, Any]) -> None:
    from ar_ray.inference import InferenceOptions, PoolTally, member_probabilities
    from ar_ray.resources import Resources

    sizes, device = context.sizes, context.device
    start_ray(sizes.ray_cpus)
    gpus = 1.0 if device.type == "cuda" else 0.0
    config = throughput_config(sizes, "resnet50").replace(epochs=1, batch_size=sizes.recipe_batch)
    result["config"] = config.to_dict()
    checkpoint = context.folder / "inference_member.pt"  # real weights of one short epoch
    splits = synthetic_splits(2 * sizes.recipe_batch, sizes.recipe_batch, sizes.image_size)
    save_checkpoint(fit(config, splits, device=device).state, checkpoint)
    options = InferenceOptions(actor=Resources(sizes.worker_cpus, gpus), max_actors=1)
    small, large = sizes.inference_images
    images = synthetic_images(large, stored_size(sizes.image_size), seed=7)
    seconds: dict[int, float] = {}
    result["seconds_by_images"] = seconds
    tally = PoolTally()
    for count in (small, large):
        started = time.perf_counter()
        (probs,) = member_probabilities(
            [str(checkpoint)], [images[:count]], tta="tencrop", options=options, tally=tally
        )
        seconds[count] = time.perf_counter() - started
    extra = seconds[large] - seconds[small]  # a loaded machine can make it <= 0
    steady = (large - small) / extra if extra > 0 else None
    actors = tally.frame()
    rate = f"{steady:,.0f} img/s steady" if steady else "steady rate not measurable (noise)"
    result |= {
        "first_call_images_per_s": small / seconds[small],
        "steady_images_per_s": steady,
        "actor_gpus": actors["gpus"].tolist(),
        "checks": {
            "probabilities": bool(np.allclose(probs.sum(axis=-1), 1.0, atol=1e-3)),
            "actor_holds_gpu": bool((actors["gpus"] == gpus).all()),
        },
        "summary": f"TenCrop {rate} ({config.arch}, {gpus:g} GPU actor)",
    }


# ---------------------------------------------------------------- TenCrop inference


def tencrop_section(context: Context, result: dict[str, Any]) -> None:
    """Images/s of `predict_probabilities(..., "tencrop")` on uint8 batches handed over from
    the host, as the engine's evaluation and an inference actor call it. Random weights: the
    rate does not depend on them, and no training run is paid for."""
    sizes, device = context.sizes, context.device
    config = throughput_config(sizes, "resnet50")
    torch.manual_seed(config.seed)
    model = place_model(ARNet(config, CLASSES), device).eval()
    images = torch.from_numpy(
        synthetic_images(sizes.tencrop_batch, stored_size(config.image_size), seed=7)
    )
    result |= {"arch": config.arch, "batch_images": sizes.tencrop_batch, "timed_calls": 0}

    def call() -> torch.Tensor:
        return predict_probabilities(model, images, config.image_size, "tencrop")

    for _ in range(sizes.tencrop_warmup_calls):
        call()
    synchronize(device)
    started = time.perf_counter()
    for done in range(1, sizes.tencrop_timed_calls + 1):
        probabilities = call()
        result["timed_calls"] = done
    synchronize(device)
    rate = sizes.tencrop_batch * sizes.tencrop_timed_calls / (time.perf_counter() - started)
    sums = probabilities.sum(dim=1).cpu()
    result |= {
        "images_per_s": rate,
        "crops_per_s": rate * CROPS_PER_IMAGE["tencrop"],
        "checks": {"probabilities": bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-3))},
        "summary": f"TenCrop {rate:,.0f} img/s ({config.arch}, {sizes.tencrop_batch} per call)",
    }


# ---------------------------------------------------------------- DDP


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's bytes: equal on two ranks only if the weights are
    identical. Buffers are left out: without SyncBatchNorm (CPU) running statistics are
    per rank by design."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def gather_gradient_error(device: torch.device, temperature: float) -> float:
    """Largest difference between this rank's gradients and loss through
    `contrastive_regularization` under the process group and what its docstring promises:
    the one-process SupCon loss of the global batch, and world x its gradient for this
    rank's rows. Every rank draws the same global batch and takes its own rows."""
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = 4
    generator = torch.Generator().manual_seed(0)
    every = torch.randn(2, world * rows, 8, generator=generator, dtype=torch.float64)
    labels = torch.arange(world * rows) % 3  # several positives per anchor
    mine = slice(rank * rows, (rank + 1) * rows)
    local = [every[view, mine].to(device).requires_grad_() for view in range(2)]
    loss = contrastive_regularization(*local, temperature, "supcon", labels[mine].to(device))
    loss.backward()
    whole = [every[view].to(device).requires_grad_() for view in range(2)]
    reference = supcon(*whole, labels.to(device), temperature)
    reference.backward()
    errors = [(loss - reference).abs().item()]
    errors += [
        (mine_z.grad - world * whole_z.grad[mine]).abs().max().item()
        for mine_z, whole_z in zip(local, whole, strict=True)
    ]
    return max(errors)


def ddp_rank_outcome(config: RecipeConfig, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """What one rank checks once its process group works: a DDP fit and the gather."""
    splits = synthetic_splits(sizes.ddp_images, config.batch_size, config.image_size)
    losses: list[float] = []
    result = fit(
        config,
        splits,
        device=device,
        on_epoch=lambda metrics, state: losses.append(metrics["train_loss"]),
    )
    sync_layers = sum(isinstance(m, nn.SyncBatchNorm) for m in result.model.modules())
    return {
        "train_losses": losses,
        "parameter_digest": parameter_digest(result.model),
        "sync_batchnorm_layers": sync_layers,
        "gather_gradient_error": gather_gradient_error(device, config.cr_temperature),
    }


def ddp_rank(
    rank: int,
    backend: str,
    store: str,
    config: dict[str, Any],
    sizes: Sizes,
    device_type: str,
    record: str,
) -> None:
    """One rank, in its own process: join the group, probe it with one all-reduce, run the
    checks, write the outcome to `record`. A probe error is recorded as the backend's
    refusal (NCCL: two ranks on one device), so the parent can fall back to gloo."""
    torch.set_num_threads(sizes.worker_cpus)
    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    outcome: dict[str, Any] = {"backend": backend, "device": str(device)}
    try:
        dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=WORLD)
        probe = torch.ones(1, device=device)
        dist.all_reduce(probe)
        synchronize(device)
    except Exception as error:  # recorded for the parent; nothing else can run without it
        # NCCL names the cause ("Duplicate GPU detected") lines below its first
        outcome["refused"] = " | ".join(f"{type(error).__name__}: {error}".splitlines())[:600]
        atomic_write_text(Path(record), json.dumps(outcome))
        return
    try:
        outcome |= ddp_rank_outcome(RecipeConfig.from_dict(config), sizes, device)
    except Exception as error:
        traceback.print_exc()
        outcome["error"] = f"{type(error).__name__}: {error}"[:2000]
    atomic_write_text(Path(record), json.dumps(outcome))
    dist.destroy_process_group()


def wait_for_ranks(processes: list[Any], records: list[Path], timeout: float) -> None:
    """Until every rank wrote its record, one refused the backend or failed (the others
    would wait for it in a collective), all exited, or `timeout`."""
    ends = time.monotonic() + timeout
    while time.monotonic() < ends and any(p.is_alive() for p in processes):
        written = [json.loads(r.read_text()) for r in records if r.exists()]
        if len(written) == len(records) or any("refused" in w or "error" in w for w in written):
            return
        time.sleep(0.2)


def run_ranks(
    context: Context, backend: str, config: RecipeConfig, timeout: float
) -> list[dict[str, Any]]:
    """Start WORLD ranks with `backend` and return their records; a rank that wrote none
    gets {"no_record": why}. Ranks still running at the end (a hang, the cap) are killed."""
    spawn = torch.multiprocessing.get_context("spawn")
    store = context.folder / f"ddp-{backend}-store"
    records = [context.folder / f"ddp-{backend}-rank{rank}.json" for rank in range(WORLD)]
    processes = [
        spawn.Process(
            target=ddp_rank,
            args=(
                rank,
                backend,
                str(store),
                config.to_dict(),
                context.sizes,
                context.device.type,
                str(record),
            ),
            daemon=True,
        )
        for rank, record in enumerate(records)
    ]
    try:
        for process in processes:
            process.start()
        wait_for_ranks(processes, records, timeout)
        for process in processes:
            process.join(RANK_EXIT_S)
        exits = [process.exitcode for process in processes]  # None: still running
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
    return [
        json.loads(record.read_text())
        if record.exists()
        else {"no_record": "still running, killed" if code is None else f"exit code {code}"}
        for record, code in zip(records, exits, strict=True)
    ]


def ddp_checks(ranks: list[dict[str, Any]], device: torch.device) -> dict[str, bool]:
    """Both ranks trained on the device with finite losses and ended with identical weights,
    SyncBatchNorm was in the model exactly where the engine converts (CUDA), and the gather
    matched its one-process reference."""
    done = all("parameter_digest" in rank for rank in ranks)
    return {
        "both_ranks_finished": done,
        "device": done and all(rank["device"].startswith(device.type) for rank in ranks),
        "finite_loss": done
        and all(math.isfinite(loss) for rank in ranks for loss in rank["train_losses"]),
        "identical_weights": done and len({rank["parameter_digest"] for rank in ranks}) == 1,
        "sync_batchnorm": done
        and all((rank["sync_batchnorm_layers"] > 0) == (device.type == "cuda") for rank in ranks),
        "gather_gradient": done and all(rank["gather_gradient_error"] < 1e-9 for rank in ranks),
    }


def ranks_with_fallback(
    context: Context, config: RecipeConfig, attempts: list[dict[str, Any]]
) -> tuple[str, list[dict[str, Any]]]:
    """The backend that ran and its ranks' records. nccl first on CUDA, in at most half of
    the time left, so a hanging nccl still leaves gloo (on CUDA tensors) its turn when nccl
    refuses; gloo only on CPU. Each attempt is appended to `attempts` as it ends."""
    backends = ["nccl", "gloo"] if context.device.type == "cuda" else ["gloo"]
    for backend in backends:
        last = backend == backends[-1]
        left = context.deadline - time.monotonic()
        ranks = run_ranks(context, backend, config, left if last else left / 2)
        refusal = next((rank["refused"] for rank in ranks if "refused" in rank), None)
        missing = [rank["no_record"] for rank in ranks if "no_record" in rank]
        if refusal is None and missing and not last:  # a crash or a hang in its time share
            refusal = f"no record from {len(missing)} rank(s): {', '.join(missing)}"
        attempts.append({"backend": backend, "refused": refusal})
        if refusal is None:
            break
    return backend, ranks


def ddp_section(context: Context, result: dict[str, Any]) -> None:
    """Two ranks share the device through `engine.fit`, as a multi-GPU member's would."""
    config = ddp_config(context.sizes)
    attempts: list[dict[str, Any]] = []
    result |= {"config": config.to_dict(), "attempts": attempts}
    backend, ranks = ranks_with_fallback(context, config, attempts)
    fallback = f" (nccl refused: {attempts[0]['refused']})" if len(attempts) > 1 else ""
    problems = [
        rank.get("error") or rank.get("refused") or rank.get("no_record")
        for rank in ranks
        if "parameter_digest" not in rank
    ]
    failed = f"; {problems[0].splitlines()[0]}" if problems else ""  # the full text is in ranks
    result |= {
        "backend": backend,
        "ranks": ranks,
        "checks": ddp_checks(ranks, context.device),
        "summary": f"{WORLD} ranks, {backend} on {context.device.type}{fallback}{failed}"[:200],
    }


# ---------------------------------------------------------------- running and reporting


@dataclass(frozen=True)
class Section:
    run: Callable[[Context, dict[str, Any]], None]
    weight: float  # its part of the time left, against the sections still to run
    needs_ray: bool = False


SECTIONS: dict[str, Section] = {  # in order of value: a short loan runs the first ones
    "recipe": Section(recipe_section, 0.28),
    "throughput_resnet18": Section(partial(throughput_section, arch="resnet18"), 0.11),
    "throughput_resnet50": Section(partial(throughput_section, arch="resnet50"), 0.14),
    "ray_member": Section(member_section, 0.11, needs_ray=True),
    "inference_tencrop": Section(tencrop_section, 0.06),
    "inference_actor": Section(actor_inference_section, 0.09, needs_ray=True),
    "ddp": Section(ddp_section, 0.21),
}


def runs_here(section: Section) -> bool:
    """False for a Ray section where Ray is not installed (the device machine)."""
    return not section.needs_ray or ray_installed()


def run_section(name: str, section: Section, context: Context, cap: float) -> dict[str, Any]:
    """Run one section under its cap, keeping its result (partial when capped) or its
    error, its wall time and its peak GPU memory."""
    result: dict[str, Any] = {"cap_seconds": cap}
    if not runs_here(section):
        result |= {"status": "skipped", "summary": "skipped: ray not installed"}
        print(f"[gpu_check] {name}: skipped: ray not installed", flush=True)
        return result
    print(f"[gpu_check] {name} (cap {cap:.0f} s) ...", flush=True)
    device = context.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    context = replace(context, deadline=time.monotonic() + cap)
    try:
        capped = call_with_cap(partial(section.run, context, result), cap)
        passed = not capped and all(result["checks"].values())
        result |= {"status": "capped" if capped else "pass" if passed else "FAIL"}
        if capped:
            kept = "partial result kept" if cap > 0 else "not started: the budget was spent"
            result |= {"capped": True, "summary": f"capped at {cap:.0f} s; {kept}"}
    except Exception as error:  # recorded: one failing section must not stop the others
        traceback.print_exc()
        result |= {"status": "FAIL", "error": f"{type(error).__name__}: {error}"[:2000]}
        result["summary"] = result["error"].splitlines()[0][:160]
    result["seconds"] = time.perf_counter() - started
    if device.type == "cuda":
        result["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.empty_cache()
    print(f"[gpu_check] {name}: {result['status']} in {result['seconds']:.1f} s", flush=True)
    return result


def goals(sections: dict[str, dict], total: float, judged: bool) -> list[dict[str, Any]]:
    """The issue's targets; on CPU they are shown but not judged."""

    def rate(arch: str, key: str) -> float | None:
        return sections.get(f"throughput_{arch}", {}).get(key)

    synthetic = rate("resnet50", "synthetic_images_per_s")
    rows = [("ResNet-50 synthetic images/s", synthetic, ">=", GOAL_SYNTHETIC)]
    rows += [
        (
            f"{arch} pipeline / synthetic",
            rate(arch, "pipeline_vs_synthetic"),
            ">=",
            GOAL_PIPELINE_RATIO,
        )
        for arch in ARCHS
    ]
    rows.append(("whole check seconds", total, "<=", GOAL_SECONDS))
    result = []
    for goal, measured, relation, target in rows:
        if not judged:
            verdict = "not judged (cpu smoke)"
        elif measured is None:
            verdict = "not measured"
        else:
            met = measured >= target if relation == ">=" else measured <= target
            verdict = "pass" if met else "FAIL"
        result.append(
            {
                "goal": goal,
                "measured": measured,
                "target": f"{relation} {target:g}",
                "result": verdict,
            }
        )
    return result


def environment(device: torch.device, cuda_start_seconds: float | None) -> dict[str, Any]:
    info: dict[str, Any] = environment_info() | {"cpus": os.cpu_count(), "device": str(device)}
    if device.type == "cuda":
        info |= {
            "gpu": torch.cuda.get_device_name(device),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "cuda_start_seconds": cuda_start_seconds,
        }
    return info


def markdown(report: dict[str, Any]) -> str:
    sections = pd.DataFrame(
        [
            {
                "section": name,
                "result": entry["status"],
                "seconds": entry.get("seconds", 0.0),
                "cap s": entry["cap_seconds"],
                "peak GPU MiB": entry.get("peak_gpu_memory_mb", float("nan")),
                "summary": entry["summary"],
            }
            for name, entry in report["sections"].items()
        ],
        columns=["section", "result", "seconds", "cap s", "peak GPU MiB", "summary"],
    )
    env = report["environment"]
    where = env.get("gpu", "CPU only")
    state = "finished" if report["finished"] else "in progress (rewritten after each section)"
    return (
        "\n\n".join(
            [
                f"# gpu_check ({report['mode']}, {state})",
                f"{where}, {env['cpus']} CPUs; torch {env['torch']}, ray {env['ray']}; "
                f"total {report['total_seconds']:.1f} s of a {report['budget_seconds']:g} s "
                f"budget.",
                "### Sections\n\n" + markdown_table(sections),
                "### Goals\n\n" + markdown_table(pd.DataFrame(report["goals"])),
            ]
        )
        + "\n"
    )


def write_report(out: Path, report: dict[str, Any]) -> str:
    """Both files, atomically: a reader, or a run killed next, sees a whole report."""
    atomic_write_text(out / "gpu_check.json", json.dumps(report, indent=2, default=str) + "\n")
    text = markdown(report)
    atomic_write_text(out / "gpu_check.md", text)
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="the same steps, tiny, on CPU")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/)")
    parser.add_argument(
        "--budget-s",
        type=float,
        help=f"wall time for the whole run, start-up included; shared by the sections "
        f"by weight (default {GOAL_SECONDS:g}, {SMOKE_BUDGET_S:g} with --cpu-smoke)",
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset, run in this order: {','.join(SECTIONS)}",
    )
    return parser.parse_args(argv)


def chosen_sections(text: str) -> list[str] | None:
    """The named sections in SECTIONS' order, or None (after a one-line error) for a name
    that is not one."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        print(
            f"gpu_check: unknown section {', '.join(unknown) or repr(text)}; "
            f"choose from {','.join(SECTIONS)}",
            file=sys.stderr,
        )
        return None
    return [name for name in SECTIONS if name in names]


def start_device(smoke: bool) -> tuple[torch.device, float | None]:
    """The device, and the seconds CUDA took to start (its context), so they are on record."""
    if smoke:
        return torch.device("cpu"), None
    started = time.perf_counter()
    device = torch.device("cuda", torch.cuda.current_device())
    torch.zeros(1, device=device)
    synchronize(device)
    return device, time.perf_counter() - started


def refresh_report(report: dict[str, Any], out: Path, judged: bool, finished: bool) -> str:
    """Totals and goals as of now, written out; the markdown, for printing at the end."""
    total = time.monotonic() - STARTED
    sections = report["sections"]
    peaks = [s["peak_gpu_memory_mb"] for s in sections.values() if "peak_gpu_memory_mb" in s]
    report |= {
        "finished": finished,
        "goals": goals(sections, total, judged),
        "peak_gpu_memory_mb": max(peaks) if peaks else None,
        "total_seconds": total,
    }
    return write_report(out, report)


def section_cap(names: list[str], seconds_left: float) -> float:
    """The first named section's cap: its weight's part of `seconds_left`, against the
    weights of all the named sections that run here; 0 if it does not run here."""
    section = SECTIONS[names[0]]
    if not runs_here(section):
        return 0.0
    weights = sum(SECTIONS[name].weight for name in names if runs_here(SECTIONS[name]))
    return max(0.0, seconds_left) * section.weight / weights


def run_sections(
    names: list[str], context: Context, budget: float, report: dict[str, Any], out: Path
) -> None:
    """Each named section under its cap (see the module's docstring), the report rewritten
    after each."""
    ends = STARTED + budget - CLOSING_S
    for index, name in enumerate(names):
        cap = section_cap(names[index:], ends - time.monotonic())
        report["sections"][name] = run_section(name, SECTIONS[name], context, cap)
        refresh_report(report, out, judged=report["mode"] == "device", finished=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = chosen_sections(args.sections)
    if names is None:
        return 2
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --cpu-smoke for the CPU run", file=sys.stderr)
        return 2
    sizes = SMOKE if smoke else DEVICE
    budget = (SMOKE_BUDGET_S if smoke else GOAL_SECONDS) if args.budget_s is None else args.budget_s
    if smoke:  # it measures nothing: one thread keeps it from fighting its own workers
        torch.set_num_threads(1)
    device, cuda_start = start_device(smoke)
    out = args.out or (RESULTS / "quick" if smoke else RESULTS)
    report: dict[str, Any] = {
        "mode": "cpu-smoke" if smoke else "device",
        "budget_seconds": budget,
        "sizes": asdict(sizes),
        "environment": environment(device, cuda_start),
        "start_seconds": time.monotonic() - STARTED,
        "sections": {},
    }
    refresh_report(report, out, judged=not smoke, finished=False)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            run_sections(names, Context(sizes, device, Path(scratch)), budget, report, out)
    finally:
        stop_ray()
    print(refresh_report(report, out, judged=not smoke, finished=True), flush=True)
    ok = all(s["status"] in ("pass", "skipped") for s in report["sections"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
