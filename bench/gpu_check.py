"""GPU check: the CUDA path end to end, in one run of at most 8 minutes on one H100.

    python bench/gpu_check.py              # on a GPU machine (about 3 to 5 min on one H100)
    python bench/gpu_check.py --cpu-smoke  # the same steps, tiny, on CPU (run by the tests)

Sections; each records its result or its error and its wall time, and a failing one never
stops the others:
- recipe: the default recipe (`search_spaces/ar_default.yaml`: its fixed values, and the
  middle of every searched range) at 224 px with bf16 autocast and channels_last, a few
  hundred steps: every epoch's loss is finite, and N epochs straight give the same weights,
  bit for bit, as N-1 epochs then a resume from the saved checkpoint.
- throughput_resnet18 / throughput_resnet50: train images/s, one view, of a step on data
  already on the device (the ceiling: the model alone) and of `engine.fit` through the real
  loader and augmentation (what a member gets).
- ray_member: one member through `members.train_members` on a 1-GPU Ray Train worker: the
  DDP backend it got (nccl), its device and its finite losses.
- inference_actor: TenCrop images/s of one GPU actor through
  `inference.member_probabilities`; the steady rate is the difference of a small and a
  large call, so actor start-up and weight loading cancel out.
Peak GPU memory (`torch.cuda.max_memory_allocated`) is recorded per section.

Goals, judged on the device only: ResNet-50 at 224 px trains at >= 2,500 images/s on
synthetic data; the real pipeline reaches >= 0.8x of synthetic; the whole check <= 8 min.

Writes <out>/gpu_check.json and <out>/gpu_check.md (default bench/results/, and
bench/results/quick/ for --cpu-smoke, so a smoke run never overwrites device results).
Exits 1 when a section failed (an error, or a check such as identical resume).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from statistics import median
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# cuBLAS is only deterministic with a fixed workspace, and it reads this when CUDA starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import RESULTS, markdown_table  # noqa: E402

from ar_ray.config import RunConfig  # noqa: E402
from ar_ray.data import DatasetSplits, ImageSplit  # noqa: E402
from ar_ray.data.size import stored_size  # noqa: E402
from ar_ray.outputs import atomic_write_text, environment_info  # noqa: E402
from ar_ray.recipe.augment import device_autocast, to_unit_float  # noqa: E402
from ar_ray.recipe.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from ar_ray.recipe.engine import default_device, fit  # noqa: E402
from ar_ray.recipe.losses import symmetric_cross_entropy  # noqa: E402
from ar_ray.recipe.models import ARNet, place_model  # noqa: E402
from ar_ray.search_space import Domain, load_search_space  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPACE = ROOT / "search_spaces" / "ar_default.yaml"
CLASSES = 10
GOAL_SYNTHETIC = 2500.0  # ResNet-50 images/s: NVIDIA's A100 AMP figure; an H100 is faster
GOAL_PIPELINE_RATIO = 0.8
GOAL_SECONDS = 480.0


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
    worker_cpus: int  # the Ray Train worker's and the inference actor's CPUs
    inference_images: tuple[int, int]
    ray_cpus: int
    expected_backend: str


DEVICE = Sizes(
    image_size=224,
    small_input=False,
    recipe_images=1600,  # 50 steps of 32 per epoch: 4 epochs + 1 resumed = 250 steps
    recipe_batch=32,
    recipe_epochs=4,
    batch=128,
    warmup_steps=15,
    timed_steps=40,
    pipeline_images=2560,
    pipeline_epochs=3,
    member_images=256,
    member_epochs=2,
    worker_cpus=min(8, os.cpu_count() or 2),
    inference_images=(512, 2560),
    ray_cpus=os.cpu_count() or 2,
    expected_backend="nccl",
)
SMOKE = Sizes(
    image_size=16,
    small_input=True,
    recipe_images=16,
    recipe_batch=8,
    recipe_epochs=2,
    batch=8,
    warmup_steps=1,
    timed_steps=2,
    pipeline_images=16,
    pipeline_epochs=2,
    member_images=16,
    member_epochs=1,
    worker_cpus=1,
    inference_images=(8, 24),
    ray_cpus=2,
    expected_backend="gloo",
)
ARCHS = ("resnet18", "resnet50")


def midpoint(domain: Domain) -> Any:
    """The middle of a searched range: a typical trial, not an extreme one."""
    if domain.kind == "choice":
        return domain.values[len(domain.values) // 2]
    low, high = domain.values
    if domain.kind == "loguniform":
        return math.sqrt(low * high)
    middle = (low + high) / 2
    return round(middle) if domain.kind == "int" else middle


def recipe_config(sizes: Sizes) -> RunConfig:
    """ar_default.yaml at this run's size; Mean Teacher from epoch 2, so a resume carries it."""
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
    return RunConfig.from_dict(values, source=str(SPACE))


def throughput_config(sizes: Sizes, arch: str) -> RunConfig:
    """One view, no teacher: the step NVIDIA's images/s figures describe."""
    return recipe_config(sizes).replace(
        arch=arch,
        cr_weight=0.0,
        mt_weight=0.0,
        batch_size=sizes.batch,
        epochs=sizes.pipeline_epochs,
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


def recipe_section(sizes: Sizes, device: torch.device, folder: Path) -> dict[str, Any]:
    config = recipe_config(sizes)
    splits = synthetic_splits(sizes.recipe_images, sizes.recipe_batch, sizes.image_size)
    saved = folder / "recipe_epoch_before_last.pt"

    def keep_before_last(metrics: dict[str, Any], state: dict[str, Any]) -> None:
        if metrics["epoch"] == config.epochs - 1:
            save_checkpoint(state, saved)

    with deterministic_kernels() as nondeterministic:
        straight = fit(config, splits, on_epoch=keep_before_last, device=device)
        resumed = fit(config, splits, resume_from=load_checkpoint(saved), device=device)
    losses = [m["train_loss"] for m in straight.history] + [resumed.history[-1]["train_loss"]]
    difference = max_weight_difference(straight.state, resumed.state)
    steps = (len(splits.train) // config.batch_size) * (config.epochs + 1)
    return {
        "config": config.to_dict(),
        "steps": steps,
        "train_losses": losses,
        "max_abs_weight_difference": difference,
        "ops_without_deterministic_kernel": nondeterministic,
        "checks": {
            "finite_loss": all(math.isfinite(loss) for loss in losses),
            "identical_resume": difference == 0.0,
        },
        "summary": f"{steps} steps ({config.arch}), resume difference {difference:g}",
    }


def synthetic_rate(config: RunConfig, sizes: Sizes, device: torch.device) -> float:
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


def pipeline_rate(config: RunConfig, sizes: Sizes, device: torch.device) -> float:
    """images/s of `engine.fit`'s epochs after the first: loader, augmentation, step and a
    one-batch validation, as a member trains."""
    splits = synthetic_splits(sizes.pipeline_images, config.batch_size, config.image_size)
    history = fit(config, splits, device=device).history
    trained = (len(splits.train) // config.batch_size) * config.batch_size
    return trained / median(m["epoch_seconds"] for m in history[1:])


def throughput_section(sizes: Sizes, device: torch.device, arch: str) -> dict[str, Any]:
    config = throughput_config(sizes, arch)
    synthetic = synthetic_rate(config, sizes, device)
    real = pipeline_rate(config, sizes, device)
    ratio = real / synthetic
    return {
        "config": config.to_dict(),
        "synthetic_images_per_s": synthetic,
        "pipeline_images_per_s": real,
        "pipeline_vs_synthetic": ratio,
        "checks": {"positive_rates": synthetic > 0 and real > 0},
        "summary": f"synthetic {synthetic:,.0f} img/s, pipeline {real:,.0f} img/s ({ratio:.2f}x)",
    }


def start_ray(cpus: int) -> None:
    """Its own local Ray, never one already running on the machine."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=cpus, include_dashboard=False)


def member_loop_recording_worker(marker: str, loop_config: dict[str, Any]) -> None:
    """`member_train_loop`, then a note of what the worker really got: the process group's
    backend, the device and its peak memory (Ray Train tears the group down after)."""
    import torch.distributed as dist

    from ar_ray.members import member_train_loop, worker_device

    member_train_loop(loop_config)
    device = worker_device()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    record = {"backend": dist.get_backend(), "device": str(device), "peak_gpu_memory_mb": peak}
    Path(marker).write_text(json.dumps(record))


def member_section(sizes: Sizes, device: torch.device, folder: Path) -> dict[str, Any]:
    from ar_ray.members import MemberSpec, TrainOptions, member_dir, train_members
    from ar_ray.resources import Resources

    start_ray(sizes.ray_cpus)
    gpus = 1.0 if device.type == "cuda" else 0.0
    config = recipe_config(sizes).replace(arch="resnet18", epochs=sizes.member_epochs)
    splits = synthetic_splits(sizes.member_images, sizes.recipe_batch, sizes.image_size)
    spec = MemberSpec("gpu-check", config, "gpu-check", 1, "bench/gpu_check.py")
    root = str(folder / "members-run")
    options = TrainOptions(root=root, worker=Resources(sizes.worker_cpus, gpus), max_failures=0)
    marker = folder / "member_worker.json"
    loop = partial(member_loop_recording_worker, str(marker))
    status = train_members([spec], splits, options, train_loop=loop)
    worker = json.loads(marker.read_text())
    losses = pd.read_csv(Path(member_dir(root, spec.member_id)) / "metrics.csv")["train_loss"]
    want_device = "cuda" if gpus else "cpu"
    return {
        "config": config.to_dict(),
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


def inference_section(sizes: Sizes, device: torch.device, folder: Path) -> dict[str, Any]:
    from ar_ray.inference import InferenceOptions, PoolTally, member_probabilities
    from ar_ray.resources import Resources

    start_ray(sizes.ray_cpus)
    gpus = 1.0 if device.type == "cuda" else 0.0
    config = throughput_config(sizes, "resnet50").replace(epochs=1, batch_size=sizes.recipe_batch)
    checkpoint = folder / "inference_member.pt"  # real weights of one short epoch
    splits = synthetic_splits(2 * sizes.recipe_batch, sizes.recipe_batch, sizes.image_size)
    save_checkpoint(fit(config, splits, device=device).state, checkpoint)
    options = InferenceOptions(actor=Resources(sizes.worker_cpus, gpus), max_actors=1)
    small, large = sizes.inference_images
    images = synthetic_images(large, stored_size(sizes.image_size), seed=7)
    seconds, tally = {}, PoolTally()
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
    return {
        "config": config.to_dict(),
        "seconds_by_images": seconds,
        "first_call_images_per_s": small / seconds[small],
        "steady_images_per_s": steady,
        "actor_gpus": actors["gpus"].tolist(),
        "checks": {
            "probabilities": bool(np.allclose(probs.sum(axis=-1), 1.0, atol=1e-3)),
            "actor_holds_gpu": bool((actors["gpus"] == gpus).all()),
        },
        "summary": f"TenCrop {rate} ({config.arch}, {gpus:g} GPU actor)",
    }


def run_section(name: str, body: Callable[[], dict[str, Any]], device: torch.device) -> dict:
    """Run one section, keeping its result or its error, its wall time and peak GPU memory."""
    print(f"[gpu_check] {name} ...", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    try:
        outcome = body()
        outcome["passed"] = all(outcome["checks"].values())
    except Exception as error:  # recorded: one failing section must not stop the others
        traceback.print_exc()
        outcome = {"passed": False, "error": f"{type(error).__name__}: {error}"[:2000]}
        outcome["summary"] = outcome["error"].splitlines()[0][:160]
    outcome["seconds"] = time.perf_counter() - started
    if device.type == "cuda":
        outcome["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.empty_cache()
    status = "pass" if outcome["passed"] else "FAIL"
    print(f"[gpu_check] {name}: {status} in {outcome['seconds']:.1f} s", flush=True)
    return outcome


def goals(sections: dict[str, dict], total: float, judged: bool) -> list[dict[str, Any]]:
    """The issue's targets; on CPU they are shown but not judged."""

    def rate(arch: str, key: str) -> float | None:
        return sections.get(f"throughput_{arch}", {}).get(key)

    rows = [
        (
            "ResNet-50 synthetic images/s",
            rate("resnet50", "synthetic_images_per_s"),
            ">=",
            GOAL_SYNTHETIC,
        )
    ]
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
            verdict = "FAIL (not measured)"
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


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = environment_info() | {"cpus": os.cpu_count(), "device": str(device)}
    if device.type == "cuda":
        info |= {
            "gpu": torch.cuda.get_device_name(device),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    return info


def markdown(report: dict[str, Any]) -> str:
    sections = pd.DataFrame(
        [
            {
                "section": name,
                "result": "pass" if entry["passed"] else "FAIL",
                "seconds": entry["seconds"],
                "peak GPU MiB": entry.get("peak_gpu_memory_mb", float("nan")),
                "summary": entry["summary"],
            }
            for name, entry in report["sections"].items()
        ]
    )
    env = report["environment"]
    where = env.get("gpu", "CPU only")
    return (
        "\n\n".join(
            [
                f"# gpu_check ({report['mode']})",
                f"{where}, {env['cpus']} CPUs; torch {env['torch']}, ray {env['ray']}; "
                f"total {report['total_seconds']:.1f} s.",
                "### Sections\n\n" + markdown_table(sections),
                "### Goals\n\n" + markdown_table(pd.DataFrame(report["goals"])),
            ]
        )
        + "\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="the same steps, tiny, on CPU")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/)")
    args = parser.parse_args()
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --cpu-smoke for the CPU run", file=sys.stderr)
        return 2
    sizes = SMOKE if smoke else DEVICE
    if smoke:  # it measures nothing: one thread keeps it from fighting its own Ray workers
        torch.set_num_threads(1)
    device = torch.device("cpu") if smoke else default_device()
    out = args.out or (RESULTS / "quick" if smoke else RESULTS)
    started = time.perf_counter()
    sections: dict[str, dict] = {}
    try:
        with tempfile.TemporaryDirectory() as name:
            folder = Path(name)
            bodies: dict[str, Callable[[], dict[str, Any]]] = {
                "recipe": partial(recipe_section, sizes, device, folder),
                **{
                    f"throughput_{arch}": partial(throughput_section, sizes, device, arch)
                    for arch in ARCHS
                },
                "ray_member": partial(member_section, sizes, device, folder),
                "inference_actor": partial(inference_section, sizes, device, folder),
            }
            for section, body in bodies.items():
                sections[section] = run_section(section, body, device)
    finally:
        import ray

        ray.shutdown()
    total = time.perf_counter() - started
    peaks = [s["peak_gpu_memory_mb"] for s in sections.values() if "peak_gpu_memory_mb" in s]
    report = {
        "mode": "cpu-smoke" if smoke else "device",
        "sizes": asdict(sizes),
        "environment": environment(device),
        "sections": sections,
        "goals": goals(sections, total, judged=not smoke),
        "peak_gpu_memory_mb": max(peaks) if peaks else None,
        "total_seconds": total,
    }
    atomic_write_text(out / "gpu_check.json", json.dumps(report, indent=2, default=str) + "\n")
    text = markdown(report)
    atomic_write_text(out / "gpu_check.md", text)
    print(text, flush=True)
    return 0 if all(entry["passed"] for entry in sections.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
