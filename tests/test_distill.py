"""`ar-ray distill`: the KD loss against hand-computed values, then a real tune -> ensemble
-> distill on the session's Ray (short schedules), resume after an interrupt, predict and
export of the student, and the one-line errors."""

from __future__ import annotations

import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

import ar_ray
from ar_ray.config import RecipeConfig
from ar_ray.ensemble_weights import FittedWeights, combine
from ar_ray.ensembling import EnsembleRequest, run_ensemble
from ar_ray.leaderboard import load_tune_record
from ar_ray.members import TrainOptions
from ar_ray.recipe.augment import predict_probabilities
from ar_ray.recipe.checkpoint import CHECKPOINT_FILE, inference_model, load_checkpoint
from ar_ray.recipe.distillation import EnsembleTeacher, kd_loss
from ar_ray.recipe.models import ARNet
from ar_ray.saved_ensemble import SavedEnsemble
from ar_ray.search import run_tune
from ar_ray.search_space import load_search_space
from ar_ray.tune_request import TuneRequest
from tests.helpers import assert_user_error, run_cli, write_image

QUICK = Path(__file__).parent.parent / "search_spaces" / "quick.yaml"


def _hand_kd(student: list[float], teacher: list[float], t: float) -> float:
    """T^2 * sum_k p_k (log p_k - log q_k), p the teacher's tempered softmax, q the student's."""
    p = [math.exp(v / t) for v in teacher]
    q = [math.exp(v / t) for v in student]
    p = [v / sum(p) for v in p]
    q = [v / sum(q) for v in q]
    return t * t * sum(pk * (math.log(pk) - math.log(qk)) for pk, qk in zip(p, q, strict=True))


def test_kd_loss_is_t_squared_kl_from_teacher_to_student():
    student = [[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]]
    teacher = [[0.5, 2.5, 0.0], [1.0, -2.0, 0.5]]
    for t in (1.0, 2.0, 4.0):
        expected = np.mean([_hand_kd(s, q, t) for s, q in zip(student, teacher, strict=True)])
        got = kd_loss(torch.tensor(student), torch.tensor(teacher), t).item()
        assert got == pytest.approx(expected, rel=1e-5), t
    # the direction matters: KL(student || teacher) is another number here
    swapped = np.mean([_hand_kd(q, s, 2.0) for s, q in zip(student, teacher, strict=True)])
    assert kd_loss(torch.tensor(student), torch.tensor(teacher), 2.0).item() != pytest.approx(
        swapped, rel=1e-3
    )
    # bf16 logits are scored in fp32
    half = kd_loss(torch.tensor(student).bfloat16(), torch.tensor(teacher).bfloat16(), 2.0)
    assert half.dtype == torch.float32


def test_ensemble_teacher_answers_what_predict_combines():
    """softmax(teacher logits) is `combine` of the members' probabilities, weights and
    temperature: the student learns the very ensemble `predict` serves."""
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append(ARNet(RecipeConfig(image_size=28, seed=seed), 4).eval())
    teacher = EnsembleTeacher(members, [0.25, 0.75], temperature=1.7)
    images = torch.rand(5, 3, 28, 28)
    with torch.no_grad():
        member_probs = torch.stack([torch.softmax(m(images), dim=1) for m in members])
    expected = combine(member_probs.numpy(), FittedWeights("nll", np.array([0.25, 0.75]), 1.7))
    got = torch.softmax(teacher(images), dim=1).numpy()
    assert np.allclose(got, expected, atol=1e-5)
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_fit_minimises_the_objective_it_is_given(small_splits):
    """The engine's `objective` hook replaces the recipe's loss: every step calls it with the
    student's input and fp32 logits, its value is what the epoch reports, and its gradient
    is what trains (here: class 3 for every image, which the recipe's loss never asks for)."""
    from ar_ray.recipe.engine import fit

    returned: list[float] = []

    def objective(images, logits, supervised):
        assert images.shape[0] == logits.shape[0] and logits.dtype == torch.float32
        assert supervised.requires_grad  # the recipe's loss, for a label term
        loss = kd_loss(logits, 10.0 * F.one_hot(torch.full_like(logits[:, 0], 3).long(), 10), 1.0)
        returned.append(loss.item())
        return loss

    config = RecipeConfig(image_size=28, epochs=2, batch_size=25, cr_weight=0.0, lr=0.01)
    result = fit(config, small_splits, objective=objective, device=torch.device("cpu"))
    steps = len(returned) // 2
    assert steps == len(small_splits.train) // 25
    for epoch, row in enumerate(result.history):
        mine = returned[epoch * steps : (epoch + 1) * steps]
        assert row["train_loss"] == pytest.approx(np.mean(mine), rel=1e-5)
    # batch statistics, as in training: 8 steps leave BatchNorm's running ones far off
    probs = predict_probabilities(
        result.model.train(), torch.from_numpy(small_splits.val.images.copy()), 28, "center"
    )
    assert (probs.argmax(dim=1) == 3).float().mean() > 0.9


@pytest.fixture(scope="module")
def ensembled(ray_cluster, small_splits, module_tmp):
    """tune (2 trials, 1 epoch) and an ensemble of them (reused trials: no member trains)."""
    root = module_tmp
    request = TuneRequest(
        space=str(QUICK), trials=2, epochs=1, storage=str(root), name="d", limit_per_class=10
    )
    run_tune(request, load_search_space(QUICK), small_splits)
    run = str(root / "d")
    run_ensemble(
        EnsembleRequest(run=run, members=2), load_tune_record(run), small_splits, TrainOptions(run)
    )
    return Path(run)


@pytest.fixture(scope="module")
def distilled(ensembled):
    return ar_ray.distill(str(ensembled), epochs=1, label_weight=0.5)


@pytest.mark.ray
def test_distill_writes_the_student_scored_beside_the_ensemble(distilled, ensembled):
    folder = ensembled / "distilled"
    for name in ("checkpoint.pt", "config.yaml", "history.csv", "metrics.csv", "speed.csv",
                 "report.md", "top1_vs_speed.png", "ensemble.yaml"):  # fmt: skip
        assert (folder / name).stat().st_size > 0, name
    state = load_checkpoint(folder / "checkpoint.pt")
    assert state["epoch"] == 1 and state["config"]["lr_cycles"] == 1
    metrics = pd.read_csv(folder / "metrics.csv")
    assert sorted(metrics["kind"]) == sorted(["distilled", "ensemble", "member"] * 2)
    assert set(metrics["split"]) == {"val", "test"}
    theirs = pd.read_csv(ensembled / "ensemble" / "metrics.csv")
    for row in metrics[metrics["kind"] != "distilled"].to_dict("records"):
        name = "final" if row["kind"] == "ensemble" else row["name"]
        same = theirs[(theirs["name"] == name) & (theirs["split"] == row["split"])].iloc[0]
        assert row["top1"] == pytest.approx(same["top1"]) and row["estimate"] == same["estimate"]
    member = metrics[metrics["kind"] == "member"]
    assert (member["vs_best_member"] == 0).all()
    # the student's rows, worked out here from its checkpoint with the ensemble's TenCrop
    saved = SavedEnsemble.load(str(ensembled))
    student = inference_model(state)
    test = pd.read_csv(ensembled / "ensemble" / "predictions.csv")
    probs_test = np.load(ensembled / "ensemble" / "probs_test.npz")
    row = metrics[(metrics["kind"] == "distilled") & (metrics["split"] == "test")].iloc[0]
    from ar_ray.data import load_dataset

    splits = load_dataset(None, 28).limit_per_class(10)
    assert list(splits.test.ids) == list(probs_test["ids"]) == list(test["image_id"])
    probs = predict_probabilities(
        student, torch.from_numpy(splits.test.images.copy()), 28, saved.tta
    ).numpy()
    assert row["top1"] == pytest.approx((probs.argmax(1) == splits.test.labels).mean())
    nll = -np.log(np.clip(probs[np.arange(len(probs)), splits.test.labels], 1e-12, None)).mean()
    assert row["nll"] == pytest.approx(nll, rel=1e-4)  # TenCrop's answer, not another view's
    assert row["estimate"] == "held-out"
    speed = pd.read_csv(folder / "speed.csv")
    assert list(speed["model"]) == ["distilled", "ensemble", "best member"]
    assert list(speed["forwards_per_image"]) == [10, 10 * len(saved.members), 10]
    assert (speed["images_per_second"] > 0).all() and speed["device"].nunique() == 1
    assert "top1_vs_speed.png" in (folder / "report.md").read_text()
    assert distilled.summary[-1].startswith("images/s")


@pytest.mark.ray
def test_predict_model_distilled_uses_the_student(distilled, ensembled, tmp_path):
    for index in range(3):
        write_image(tmp_path / "photos" / f"{index}.png", (32, 32), seed=index)
    labelled = ar_ray.predict(
        str(ensembled), str(tmp_path / "photos"), model="distilled", out=tmp_path / "p.csv"
    )
    frame = labelled.frame()
    student = inference_model(load_checkpoint(ensembled / "distilled" / "checkpoint.pt"))
    saved = SavedEnsemble.load(str(ensembled), "distilled")
    assert saved.weights == [1.0] and saved.checkpoints == ["distilled/checkpoint.pt"]
    from ar_ray.data.image import decode_image

    rows = sorted(frame.to_dict("records"), key=lambda r: r["image_id"])
    images = np.stack([decode_image(Path(r["image_id"]), saved.stored_size) for r in rows])
    probs = predict_probabilities(student, torch.from_numpy(images), 28, saved.tta).numpy()
    assert [r["predicted"] for r in rows] == [saved.classes[i] for i in probs.argmax(1)]
    assert np.allclose([r["confidence"] for r in rows], probs.max(1), atol=1e-4)


@pytest.mark.ray
def test_export_model_distilled_checks_out_with_onnxruntime(distilled, ensembled, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "student.onnx"
    done = run_cli("export", "--from", str(ensembled), "--model", "distilled", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exported the distilled (1 members" in done.stdout
    sidecar = yaml.safe_load(out.with_suffix(".json").read_text())
    assert sidecar["model"] == "distilled" and sidecar["weights"] == [1.0]
    assert sidecar["check"]["max_abs_diff"] <= 1e-4


@pytest.mark.ray
def test_without_a_label_term_the_student_learns_from_the_teacher_only(ensembled, tmp_path):
    """`distill_train_loop` trains on the distillation objective: with label weight 0 the
    train labels never reach a gradient, so permuting them changes no weight (every random
    draw is seeded, so two runs are bit-identical); the recipe's loss would change them."""
    from dataclasses import replace

    from ar_ray.data import load_dataset
    from ar_ray.distill_job import train_student
    from ar_ray.distilling import DistillRequest, plan_distill

    splits = load_dataset(None, 28).limit_per_class(10)
    shuffled = replace(splits, train=replace(splits.train, labels=np.roll(splits.train.labels, 7)))
    assert (shuffled.train.labels != splits.train.labels).mean() > 0.8
    plan = plan_distill(DistillRequest(run=str(ensembled), epochs=1, label_weight=0.0))
    states = []
    for name, data in (("labels", splits), ("shuffled", shuffled)):
        checkpoint = train_student(
            plan.name,
            plan.config,
            plan.saved,
            data,
            TrainOptions(str(tmp_path / name)),
            temperature=4.0,
            label_weight=0.0,
            folder=str(tmp_path / name),
        )
        with checkpoint.as_directory() as trained:
            states.append(load_checkpoint(Path(trained) / CHECKPOINT_FILE))
    first, second = (state["model"] for state in states)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert states[0]["history"][0]["train_loss"] == states[1]["history"][0]["train_loss"]


def case_no_ensemble(tmp_path, run):
    return ["--from", str(tmp_path)], "no saved ensemble"


def case_not_a_classifier(tmp_path, run):
    return ["--from", str(run), "--arch", "fcn_resnet50"], "arch='fcn_resnet50'"


def case_unwritable_output(tmp_path, run):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("distilled"))
    (copy / "distilled").write_text("a file where the outputs go")
    return ["--from", str(copy)], f"{copy / 'distilled'}: storage is not writable"


def case_rerun_without_resume(tmp_path, run):
    return ["--from", str(run)], "already exists; pass --resume or --overwrite"


@pytest.mark.ray
@pytest.mark.parametrize(
    "case",
    [
        case_no_ensemble,
        case_not_a_classifier,
        case_unwritable_output,
        case_rerun_without_resume,
    ],  # fmt: skip
)
def test_bad_input_is_one_line(case, distilled, ensembled, tmp_path):
    args, culprit = case(tmp_path, ensembled)
    assert_user_error(run_cli("distill", *args, timeout=120), culprit)


@pytest.mark.ray
def test_sigterm_during_distill_then_resume_keeps_trained_epochs(ensembled, tmp_path):
    import ray

    run = tmp_path / "r"
    shutil.copytree(ensembled, run, ignore=shutil.ignore_patterns("distilled"))
    address = ray.get_runtime_context().gcs_address
    args = ["distill", "--from", str(run), "--epochs", "3", "--address", address]

    def checkpoints():
        return sorted((run / "distilled" / "train").glob("*/checkpoint_*/checkpoint.pt"))

    process = subprocess.Popen(
        [sys.executable, "-m", "ar_ray.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while len(checkpoints()) < 2:  # epoch 1 is registered once a second checkpoint follows
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "never became ready"
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "resume with:" in stderr, stderr[-3000:]
    assert not (run / "distilled" / "checkpoint.pt").exists()
    first_epoch = load_checkpoint(checkpoints()[0])["history"][0]

    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = load_checkpoint(run / "distilled" / "checkpoint.pt")["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[0] == first_epoch  # kept, timings included, not trained again
