"""`fit`: one Attract-and-Repulse training run, resumable to the exact weights.

The engine knows nothing of Ray. It reports each epoch through `on_epoch(metrics, state)`,
and it joins data-parallel training when a caller (Ray Train) has already initialised
`torch.distributed`: the same function serves `ar-ray train`, a Tune trial and a DDP member.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ar_ray.config import RecipeConfig, cycle_ends
from ar_ray.data import DatasetSplits, ImageSplit
from ar_ray.recipe.augment import (
    CROPS_PER_IMAGE,
    AugmentedViews,
    build_batch_mixer,
    build_train_transform,
    device_autocast,
    model_layout,
    predict_probabilities,
    to_unit_float,
)
from ar_ray.recipe.batch_augment import BatchAugment
from ar_ray.recipe.checkpoint import check_same_arch, load_weights
from ar_ray.recipe.losses import contrastive_regularization, dominant_labels, soft_cross_entropy
from ar_ray.recipe.losses import symmetric_cross_entropy as sce
from ar_ray.recipe.models import ARNet, place_model
from ar_ray.recipe.sampling import BATCH, EpochSampler, mixed_seed
from ar_ray.recipe.swa import WeightAverage
from ar_ray.recipe.teacher import EmaTeacher, rampup, soft_pseudo_labels

EpochCallback = Callable[[dict[str, Any], dict[str, Any]], None]
Objective = Callable[[Tensor, Tensor, Tensor], Tensor]
"""(the student's input images, its fp32 logits, the recipe's loss) -> the loss to minimise:
another training signal (distillation) without a second training loop."""
EVAL_CROPS = 640  # crops per forward when evaluating: TenCrop batches 64 images
PREFETCH_BATCHES = 4  # per loader worker: evens out the policy ops' uneven cost per batch


@dataclass
class FitResult:
    model: ARNet  # the model to serve: SWA's average, else the teacher, else the student
    state: dict[str, Any]  # the final checkpoint
    history: list[dict[str, Any]] = field(default_factory=list)


def default_device() -> torch.device:
    """CUDA wherever this process sees it: right outside Ray (`ar-ray train`). A process on
    Ray may see GPUs it does not hold, so Ray-side callers pass the device Ray assigned."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def lr_factor(
    step: int, warmup_steps: int, total_steps: int, restarts: Sequence[int] = ()
) -> float:
    """Linear warm-up, then cosine decay to zero by the end of each cycle (SGDR, Loshchilov
    & Hutter 2017): `restarts` are the steps where a new cycle starts at the full rate
    again, so the model at each cycle's end has settled in a minimum (a snapshot member).
    Only the first cycle warms up: a restart is meant to jump out of the minimum. Without
    restarts this is the single warm-up-and-cosine schedule, to the bit."""
    start = max((restart for restart in restarts if restart <= step), default=0)
    if start == 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    end = min((restart for restart in restarts if restart > step), default=total_steps)
    begin = warmup_steps if start == 0 else start
    progress = (step - begin) / max(1, end - begin)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _optimizer(config: RecipeConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.momentum > 0,
    )


def _seed_epoch(config: RecipeConfig, epoch: int, rank: int) -> None:
    """Reseed the training process's RNG (Mixup/CutMix draws) from (seed, epoch, rank).

    An epoch is then a pure function of the weights and optimiser state it starts from, so
    a resumed run reproduces the uninterrupted one without carrying RNG states around. The
    augmentation draws are seeded per sample or per batch instead (`ar_ray.recipe.sampling`).
    """
    torch.manual_seed((config.seed * 1_000_003 + epoch * 7_919 + rank) % (2**63))


def views_per_image(config: RecipeConfig) -> int:
    """Independent augmentations drawn per image: two feed contrastive regularisation, and
    Mean Teacher needs a view of its own so teacher and student see different noise.

    The count is fixed for the whole run, so a Mean Teacher run with CR off also draws the
    second view before its teacher starts: the loader keeps one shape from the first epoch.
    """
    return 2 if config.cr_weight > 0 or config.mean_teacher else 1


def view_major(views: Tensor) -> Tensor:
    """[B, V, C, H, W] -> [V * B, C, H, W]: all first views, then all second views."""
    batch, count = views.shape[:2]
    return views.transpose(0, 1).reshape(batch * count, *views.shape[2:])


def teacher_views(views: Tensor, student_count: int) -> Tensor:
    """The teacher's input, row for row with the student's `view_major(views[:, :count])`.

    Mean Teacher (Tarvainen & Valpola 2017) compares predictions under *different* noise:
    each student view is paired with the next view of the same image, so with two views the
    teacher sees the student's other view, and with one student view it sees the spare one.
    All views come out of one Mixup/CutMix call (`build_batch_mixer` stacks the views of an
    image before mixing), so a pair shares its mix partner, lambda, box and soft target.
    """
    count = views.shape[1]
    return view_major(views[:, [(view + 1) % count for view in range(student_count)]])


def _train_loader(
    config: RecipeConfig,
    split: ImageSplit,
    rank: int,
    world: int,
    workers: int,
    on_device: bool,
    pin_memory: bool = False,
) -> tuple[DataLoader, BatchAugment | None]:
    """The epoch-keyed loader (call `sampler.set_epoch` each epoch) and, when augmentation
    runs batched on the device, the augmenter its stored images go through there."""
    views = views_per_image(config)
    transform = None if on_device else build_train_transform(config)
    dataset = AugmentedViews(
        split.images, split.labels, transform, views, seed=config.seed, rank=rank
    )
    batch = max(2, min(config.batch_size // world, len(split) // world))
    loader = DataLoader(
        dataset,
        batch_size=batch,
        sampler=EpochSampler(len(split), config.seed, rank, world),
        drop_last=True,  # a batch of one breaks BatchNorm and the contrastive loss
        num_workers=workers,
        persistent_workers=workers > 0,  # worker start-up is paid once per fit, not per epoch
        prefetch_factor=PREFETCH_BATCHES if workers > 0 else None,
        generator=torch.Generator(),  # its base-seed draw must not touch the global RNG
        pin_memory=pin_memory,  # a CUDA fit's only: pinning opens a context on a GPU
    )
    return loader, BatchAugment(config, views) if on_device else None


def split_probabilities(
    model: nn.Module, split: ImageSplit, image_size: int, tta: str, rank: int = 0, world: int = 1
) -> Iterator[tuple[Tensor, Tensor]]:
    """(labels, probabilities [B, K]) chunk by chunk, each at most EVAL_CROPS crops.

    Chunks bound memory whatever the split's size; rank r of `world` takes every world-th
    chunk, so DDP ranks score disjoint shards of the same order.
    """
    batch = EVAL_CROPS // CROPS_PER_IMAGE[tta]
    for start in range(rank * batch, len(split), batch * world):
        chunk = split.rows(start, start + batch)  # writable copies: torch may take them as-is
        yield (
            torch.from_numpy(chunk.labels),
            predict_probabilities(model, torch.from_numpy(chunk.images), image_size, tta),
        )


def evaluate(model: nn.Module, split: ImageSplit, image_size: int, tta: str) -> dict[str, float]:
    """Top-1 and NLL; under DDP each rank scores a shard and the sums are all-reduced."""
    rank, world = _world()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct, nll sum, count
    for labels, probs in split_probabilities(model, split, image_size, tta, rank, world):
        labels = labels.to(device, non_blocking=True)
        totals[0] += (probs.argmax(dim=1) == labels).sum()
        totals[1] += F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum")
        totals[2] += len(labels)
    if world > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    correct, nll, count = totals.tolist()
    return {"top1": correct / max(count, 1), "nll": nll / max(count, 1)}


class _Run:
    """The mutable state of one fit: model, teacher, optimiser, schedule and history."""

    def __init__(
        self,
        config: RecipeConfig,
        splits: DatasetSplits,
        device: torch.device,
        loader_workers: int,
        batch_augment: bool,
        objective: Objective | None = None,
    ) -> None:
        self.config, self.splits, self.device = config, splits, device
        self.objective = objective
        self.rank, self.world = _world()
        torch.manual_seed(config.seed)
        self.model = ARNet(config, splits.num_classes)
        stats = splits.train.channel_stats  # computed once, when the splits were built
        self.model.set_normalization(torch.tensor(stats.mean), torch.tensor(stats.std))
        if self.world > 1 and device.type == "cuda":
            # Batch statistics over the global batch, as the 1-worker trial had. CUDA only:
            # torch 2.14's DDP refuses SyncBatchNorm on CPU ("SyncBatchNorm layers only work
            # with GPU modules"), so gloo workers on CPU keep per-worker statistics. ARNet is
            # not a BatchNorm itself, so its layers are swapped in place.
            nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        place_model(self.model, device)
        device_ids = [device] if device.type == "cuda" else None
        self.trained: nn.Module = (
            DistributedDataParallel(self.model, device_ids=device_ids)
            if self.world > 1
            else self.model
        )
        self.optimizer = _optimizer(config, self.model)
        self.loader, self.batch_augment = _train_loader(
            config,
            splits.train,
            self.rank,
            self.world,
            loader_workers,
            batch_augment,
            pin_memory=device.type == "cuda",
        )
        self.steps_per_epoch = len(self.loader)
        warmup = round(config.warmup_epochs * self.steps_per_epoch)
        total = config.epochs * self.steps_per_epoch
        ends = cycle_ends(config.epochs, config.lr_cycles)
        restarts = [end * self.steps_per_epoch for end in ends[:-1]]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, warmup, total, restarts)
        )
        self.mix = build_batch_mixer(config, splits.num_classes)
        self.teacher: EmaTeacher | None = None
        self.swa: WeightAverage | None = None
        self.epoch = 0
        self.history: list[dict[str, Any]] = []

    def state(self) -> dict[str, Any]:
        return {
            "format": 1,
            "epoch": self.epoch,
            "config": self.config.to_dict(),
            "classes": list(self.splits.classes),
            "num_classes": self.splits.num_classes,
            "model": self.model.state_dict(),
            "teacher": self.teacher.state_dict() if self.teacher else None,
            "swa": self.swa.state_dict() if self.swa else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": list(self.history),
        }

    def restore(self, state: dict[str, Any]) -> None:
        check_same_arch(state, self.config)
        load_weights(self.model, state["model"], "checkpoint")
        if state.get("teacher"):
            self.teacher = EmaTeacher(self.model, self.config.mt_decay)
            self.teacher.load_state_dict(state["teacher"])
        if state.get("swa"):
            self.swa = WeightAverage(self.model)
            self.swa.load_state_dict(state["swa"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])

    @property
    def serving_model(self) -> ARNet:
        """SWA's average once the last epoch recomputed its BatchNorm statistics (before,
        they are stale), else the teacher where Mean Teacher runs, else the student."""
        if self.swa is not None and self.epoch == self.config.epochs:
            return self.swa.module
        return self.teacher.module if self.teacher else self.model

    def end_epoch(self) -> None:
        """Count the epoch; inside SWA's window (the last `swa_epochs`) average the student
        at its end, and after the last one give the average its BatchNorm statistics."""
        self.epoch += 1
        config = self.config
        if self.epoch <= config.epochs - config.swa_epochs:
            return
        if self.swa is None:
            self.swa = WeightAverage(self.model)
        self.swa.update(self.model)
        if self.epoch == config.epochs:
            self.swa.recompute_batchnorm(self.splits.train, config.image_size, config.batch_size)

    def _loss(self, views: Tensor, labels: Tensor, progress: float) -> Tensor:
        config = self.config
        views, targets = self.mix(to_unit_float(views.to(self.device, non_blocking=True)), labels)
        batch = views.shape[0]
        student_count = 2 if config.cr_weight > 0 else 1
        images = model_layout(view_major(views[:, :student_count]))
        targets = targets.repeat(student_count, 1)
        with device_autocast(self.device):
            if config.cr_weight > 0:
                logits, projections = self.trained(images, with_projection=True)
            else:
                logits = self.trained(images)
            logits = logits.float()
            loss = sce(logits, targets, config.sce_alpha, config.sce_beta, config.sce_log_zero)
            if config.cr_weight > 0:
                first, second = projections.float().chunk(2)
                loss = loss + config.cr_weight * contrastive_regularization(
                    first,
                    second,
                    config.cr_temperature,
                    config.cr_variant,
                    dominant_labels(targets[:batch]),
                )
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_input = model_layout(teacher_views(views, student_count))
                    teacher_logits = self.teacher.module(teacher_input).float()
                pseudo = soft_pseudo_labels(
                    teacher_logits, targets, config.mt_temperature, config.mt_mix
                )
                weight = config.mt_weight * rampup(progress, config.mt_rampup_epochs)
                loss = loss + weight * soft_cross_entropy(logits, pseudo)
        return loss if self.objective is None else self.objective(images, logits, loss)

    def _views(self, inputs: Tensor, step: int) -> Tensor:
        """[B, V, C, S, S] uint8: the loader's views, or the batch augmented on the device."""
        if self.batch_augment is None:
            return inputs
        seed = mixed_seed(BATCH, self.config.seed, self.epoch, self.rank, step)
        images = inputs.to(self.device, non_blocking=True)
        return self.batch_augment(images, torch.Generator().manual_seed(seed))

    def train_epoch(self) -> float:
        config = self.config
        if config.mean_teacher and self.teacher is None and self.epoch >= config.mt_start_epoch:
            self.teacher = EmaTeacher(self.model, config.mt_decay)  # stage two starts here
        _seed_epoch(config, self.epoch, self.rank)
        loader = self.loader
        loader.sampler.set_epoch(self.epoch)
        self.trained.train()
        # Summed where the loss lives and read once per epoch: a per-step `.item()` would
        # wait for the GPU to drain its queue every step.
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        batches = 0
        for index, (inputs, labels) in enumerate(loader):
            progress = self.epoch - config.mt_start_epoch + index / len(loader)
            views = self._views(inputs, index)
            loss = self._loss(views, labels.to(self.device, non_blocking=True), progress)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            if self.teacher is not None:
                self.teacher.update(self.model)
            total += loss.detach()
            batches += 1
        return total.item() / max(batches, 1)


def fit(
    config: RecipeConfig,
    splits: DatasetSplits,
    *,
    on_epoch: EpochCallback | None = None,
    resume_from: dict[str, Any] | None = None,
    device: torch.device | None = None,
    epoch_labels: dict[str, Any] | None = None,
    loader_workers: int = 0,
    batch_augment: bool | None = None,
    until_epoch: int | None = None,
    objective: Objective | None = None,
) -> FitResult:
    """Train `config` on `splits`, evaluating on val every epoch (centre crop).

    `on_epoch(metrics, state)` runs after each epoch on every rank; `state` is the full
    checkpoint dict and references live tensors, so persist it before returning.
    `resume_from` is such a dict: training continues after its epoch. `epoch_labels` are
    recorded with every epoch's metrics (e.g. the machine it ran on), so they survive in the
    checkpoint's history across resumes. `loader_workers` (execution, not a hyperparameter:
    results do not depend on it) augment in parallel; `batch_augment` augments whole batches
    on the device instead, by default where that device is CUDA. `until_epoch` ends the fit
    early on the full run's schedule (a staged search's stage-one trial stops where Mean
    Teacher would start): resuming its state with `config` gives the full run bit for bit.
    With `swa_epochs`, the last epoch evaluates and returns SWA's average (`_Run.end_epoch`).
    `objective` turns each step's loss into another (`Objective`), e.g. distillation's.
    """
    device = device or default_device()
    on_device = device.type == "cuda" if batch_augment is None else batch_augment
    run = _Run(config, splits, device, loader_workers, on_device, objective)
    if resume_from is not None:
        run.restore(resume_from)
    last = config.epochs if until_epoch is None else min(until_epoch, config.epochs)
    while run.epoch < last:
        started, started_at = time.perf_counter(), time.time()
        train_loss = run.train_epoch()
        run.end_epoch()
        scores = evaluate(run.serving_model, splits.val, config.image_size, "center")
        metrics = {
            "epoch": run.epoch,
            "train_loss": train_loss,
            "val_top1": scores["top1"],
            "val_nll": scores["nll"],
            "lr": run.optimizer.param_groups[0]["lr"],
            "epoch_seconds": time.perf_counter() - started,
            "started_at": started_at,  # wall clock: when runs on other machines overlapped
            "finished_at": time.time(),
            **(epoch_labels or {}),
        }
        run.history.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics, run.state())
    return FitResult(model=run.serving_model.eval(), state=run.state(), history=run.history)
