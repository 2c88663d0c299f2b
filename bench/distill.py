"""Distillation: how much of a 3-member ensemble's gain one student keeps, and at what speed.

On the built-in data, per seed (paired: every arm of a seed shares its members):

- the ensemble of 3 default-recipe members (`--epochs` each), weighted as `ar-ray ensemble`
  weights it (cross-fitted on val, uniform unless a fitted method is beyond noise);
- its member best on val;
- a student of the same backbone distilled from that ensemble for the members' epochs, and
  one for 3x those epochs, as `ar-ray distill` trains it (`distilling.student_config`, the
  ensemble as online teacher through `distillation_objective`, T = 4, no label term);

test top-1 (centre crop, the whole test set) and the gain over the best member, paired over
seeds and images with a bootstrap 95% interval. Then speed on this CPU, alternating arms in
`--rounds` rounds: images/s of the ensemble, the best member and the student in PyTorch
eager, and of the student exported to ONNX (`exporting.write_onnx`) under onnxruntime
against the same graph in PyTorch eager.

    python bench/distill.py                       # 3 seeds, report
    python bench/distill.py --seeds 1 --no-report # one seed per process
    python bench/distill.py --report-only
    python bench/distill.py --quick

Trained models and their val/test probabilities are kept under runs/bench/distill/.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from common import (
    NUM_CPUS,
    bench_splits,
    machine_line,
    paired_bootstrap,
    parse_args,
    whole_split_probabilities,
    write_results,
)
from ensemble_gain import member_seed

from ar_ray.config import RecipeConfig
from ar_ray.distilling import DistillRequest, student_config
from ar_ray.ensemble_weights import FittedWeights, best_member, combine, cross_fit, stratified_folds
from ar_ray.exporting import INPUT_NAME, ExportedEnsemble, max_difference, write_onnx
from ar_ray.metrics import top_k_correct
from ar_ray.recipe.checkpoint import inference_model
from ar_ray.recipe.distillation import EnsembleTeacher, distillation_objective
from ar_ray.recipe.engine import fit
from ar_ray.recipe.models import ARNet

RUNS = Path("runs/bench/distill")
MEMBERS = 3
STUDENT_INDEX = 10  # the student's training seed is member_seed(seed, 10): none of the members'
TEMPERATURE, LABEL_WEIGHT = DistillRequest.temperature, DistillRequest.label_weight
TIMED_IMAGES = 500


@dataclass(frozen=True)
class Settings:
    epochs: int
    limit_per_class: int | None
    quick: bool

    def folder(self, seed: int) -> Path:
        tag = "quick_" if self.quick else ""
        return RUNS / f"{tag}e{self.epochs}_l{self.limit_per_class}_s{seed}"


@dataclass
class Trained:
    """One trained model: its weights (to teach or to time) and its val/test probabilities."""

    model: ARNet
    val: np.ndarray
    test: np.ndarray
    epochs: int
    seconds: float


def train(
    name: str, config: RecipeConfig, settings: Settings, seed: int, splits, **fit_options
) -> Trained:
    """Train `config` (with `fit_options`, e.g. an objective) once, or load the saved run."""
    path = settings.folder(seed) / f"{name}.pt"
    if not path.exists():
        started = time.perf_counter()
        result = fit(config, splits, **fit_options)
        seconds = time.perf_counter() - started
        model = inference_model(result.state)
        saved = {
            "config": config.to_dict(),
            "num_classes": splits.num_classes,
            "weights": model.state_dict(),
            "val": whole_split_probabilities(model, splits.val, config.image_size, "center"),
            "test": whole_split_probabilities(model, splits.test, config.image_size, "center"),
            "seconds": seconds,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        torch.save(saved, temporary)
        temporary.rename(path)
        print(f"seed {seed} {name}: {config.epochs} epochs, {seconds:.0f} s", flush=True)
    saved = torch.load(path, weights_only=False)
    config = RecipeConfig.from_dict(saved["config"])
    model = ARNet(config, saved["num_classes"])
    model.load_state_dict(saved["weights"])
    return Trained(model.eval(), saved["val"], saved["test"], config.epochs, saved["seconds"])


@dataclass
class Seed:
    """One seed's arms: the members, their weighting and the two students."""

    members: list[Trained]
    fitted: FittedWeights
    best: int
    students: dict[int, Trained]  # epochs -> student


def run_seed(settings: Settings, seed: int, splits) -> Seed:
    base = RecipeConfig(epochs=settings.epochs)
    members = [
        train(f"member{i}", base.replace(seed=member_seed(seed, i)), settings, seed, splits)
        for i in range(MEMBERS)
    ]
    val = np.stack([m.val for m in members])
    labels = splits.val.labels
    fitted_ = cross_fit(val, labels, stratified_folds(labels, seed=seed))
    fitted = fitted_.fitted[fitted_.chosen]
    best = best_member(val, labels)
    teacher = EnsembleTeacher([m.model for m in members], fitted.weights, fitted.temperature)
    objective = distillation_objective(teacher, TEMPERATURE, LABEL_WEIGHT)
    students = {}
    for epochs in (settings.epochs, 3 * settings.epochs):
        request = DistillRequest(run="bench", epochs=epochs, seed=member_seed(seed, STUDENT_INDEX))
        config = student_config(request, base.replace(seed=member_seed(seed, best)))
        students[epochs] = train(
            f"student_e{epochs}", config, settings, seed, splits, objective=objective
        )
    return Seed(members, fitted, best, students)


def accuracy_table(settings: Settings, runs: list[Seed], splits) -> pd.DataFrame:
    labels = splits.test.labels
    best_right = [top_k_correct(r.members[r.best].test, labels, 1) for r in runs]
    ensemble = [combine(np.stack([m.test for m in r.members]), r.fitted) for r in runs]
    ensemble_gain = np.mean([top_k_correct(p, labels, 1).mean() for p in ensemble]) - np.mean(
        [b.mean() for b in best_right]
    )
    arms = {
        f"ensemble of {MEMBERS}": (ensemble, MEMBERS * settings.epochs, MEMBERS),
        "best member on val": ([r.members[r.best].test for r in runs], settings.epochs, 1),
    }
    for epochs in runs[0].students:
        arms[f"student, {epochs} epochs"] = (
            [r.students[epochs].test for r in runs],
            MEMBERS * settings.epochs + epochs,
            1,
        )
    rows = []
    for arm, (probs, epochs, forwards) in arms.items():
        right = [top_k_correct(p, labels, 1) for p in probs]
        diff = np.stack([r.astype(float) - b for r, b in zip(right, best_right, strict=True)])
        gains = 100 * diff.mean(axis=1)
        low, high = paired_bootstrap(diff)
        kept = gains.mean() / (100 * ensemble_gain) if ensemble_gain > 0 else float("nan")
        rows.append(
            {
                "model": arm,
                "epochs spent": epochs,
                "forwards per image": forwards,
                "test top-1": 100 * np.mean([r.mean() for r in right]),
                "gain over best member (points)": float(gains.mean()),
                "95% interval": f"[{low:+.2f}, {high:+.2f}]",
                "per seed": " / ".join(f"{g:+.2f}" for g in gains),
                "share of the ensemble's gain": kept,
            }
        )
    return pd.DataFrame(rows)


def images_per_second(predict, images: torch.Tensor, chunk: int = 100) -> float:
    predict(images[:chunk])  # warm-up: first-call costs
    started = time.perf_counter()
    for start in range(0, len(images), chunk):
        predict(images[start : start + chunk])
    return len(images) / (time.perf_counter() - started)


def speed_tables(seed: Seed, splits, rounds: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Images/s per arm, each round timing every arm in turn (a busy spell hits all of
    them); then ratios to the ensemble, and ONNX to eager for the same graph."""
    import onnxruntime

    size = RecipeConfig.image_size
    student = seed.students[max(seed.students)].model
    graphs = {
        f"ensemble of {MEMBERS}": ExportedEnsemble(
            [m.model for m in seed.members],
            seed.fitted.weights,
            seed.fitted.temperature,
            "center",
            size,
        ),
        "best member on val": ExportedEnsemble(
            [seed.members[seed.best].model], [1.0], 1.0, "center", size
        ),
        "student": ExportedEnsemble([student], [1.0], 1.0, "center", size),
    }
    images = torch.from_numpy(np.ascontiguousarray(splits.test.images[:TIMED_IMAGES]))
    predictors = {}
    for name, graph in graphs.items():
        graph.eval()
        predictors[f"{name}, PyTorch eager"] = torch.no_grad()(graph)
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "student.onnx")
        write_onnx(graphs["student"], path, images[:2])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = NUM_CPUS
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        # export's own check: onnxruntime against the eager graph, within its tolerance
        expected = predictors["student, PyTorch eager"](images[:50]).numpy()
        onnx_check = max_difference(path, expected, images[:50].numpy())
        predictors["student, ONNX Runtime"] = lambda batch: session.run(
            None, {INPUT_NAME: batch.numpy()}
        )
        torch.set_num_threads(NUM_CPUS)
        rates: dict[str, list[float]] = {name: [] for name in predictors}
        for _ in range(rounds):
            for name, predict in predictors.items():
                rates[name].append(images_per_second(predict, images))
    ensemble = rates[f"ensemble of {MEMBERS}, PyTorch eager"]
    speed = pd.DataFrame(
        [
            {"model": name, "images/s (median)": statistics.median(values)}
            | ratio_columns(values, ensemble, "x ensemble")
            for name, values in rates.items()
        ]
    )
    onnx = pd.DataFrame(
        [
            {"model": "student", "max abs probability difference": f"{onnx_check:.1e}"}
            | ratio_columns(
                rates["student, ONNX Runtime"], rates["student, PyTorch eager"], "ONNX / eager"
            )
        ]
    )
    return speed, onnx


def ratio_columns(values: list[float], bases: list[float], label: str) -> dict[str, object]:
    """Round by round ratios (the same round's base): their median and range."""
    ratios = [value / base for value, base in zip(values, bases, strict=True)]
    return {
        f"{label} (median)": statistics.median(ratios),
        f"{label} range": f"{min(ratios):.2f}-{max(ratios):.2f}",
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=8, help="each member's; students 1x, 3x")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--limit-per-class", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5, help="alternating speed rounds")
    parser.add_argument("--no-report", action="store_true", help="train only")
    parser.add_argument("--report-only", action="store_true", help="report from saved runs")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], add_arguments)
    if args.quick:
        args.epochs, args.seeds, args.limit_per_class, args.rounds = 1, [0, 1], 5, 3
    settings = Settings(args.epochs, args.limit_per_class, args.quick)
    splits = bench_splits(args.limit_per_class)
    last = f"student_e{3 * settings.epochs}.pt"  # written last: the seed is complete
    missing = [seed for seed in args.seeds if not (settings.folder(seed) / last).exists()]
    if args.report_only and missing:
        raise SystemExit(f"bench/distill.py: seeds {missing} are not trained yet")
    runs = [run_seed(settings, seed, splits) for seed in args.seeds]
    if args.no_report:
        return
    notes = [
        machine_line(
            f"Built-in data ({len(splits.train)} train / {len(splits.val)} val / "
            f"{len(splits.test)} test images), default recipe, {settings.epochs} epochs per "
            f"member, seeds {args.seeds}; students: the best member's backbone and recipe, "
            f"T = {TEMPERATURE:g}, label weight {LABEL_WEIGHT:g}, trained on train only. "
            "Test top-1 (%) on the whole test set, centre crop; gain = model minus the member "
            "best on val, paired over seeds and images (bootstrap 95% interval resampling "
            "both); 'epochs spent' includes the members a student learns from. Speed: seed "
            f"{args.seeds[0]}'s models on this CPU ({NUM_CPUS} threads), {TIMED_IMAGES} test "
            f"images in batches of 100, median of {args.rounds} alternating rounds; the "
            f"student timed is the {3 * settings.epochs}-epoch one."
        )
    ]
    speed, onnx = speed_tables(runs[0], splits, args.rounds)
    tables = {
        "test top-1 against the best member": accuracy_table(settings, runs, splits),
        "speed on CPU, PyTorch eager and ONNX Runtime": speed,
        "the exported student: ONNX Runtime against PyTorch eager, same graph": onnx,
    }
    write_results("distill", tables, notes, settings.quick)


if __name__ == "__main__":
    main()
