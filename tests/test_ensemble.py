"""tune -> ensemble -> predict on a real local Ray, and a member that survives a failure."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import ray.data
import torch
import yaml
from helpers import assert_top5, make_image_folder, run_cli, tensorboard_scalars, write_image
from PIL import Image

from ar_ray.cli import print_summary
from ar_ray.data.size import stored_size
from ar_ray.ensemble_weights import combine, cross_fit, stratified_folds
from ar_ray.ensembling import (
    EnsembleRequest,
    EnsembleResult,
    describe_members,
    estimate,
    plan_members,
    run_ensemble,
)
from ar_ray.inference import InferenceOptions, ensemble_top_k, member_probabilities
from ar_ray.labelling import run_predict
from ar_ray.leaderboard import load_tune_record
from ar_ray.members import MemberSpec, TrainOptions, member_train_loop, train_member
from ar_ray.metrics import PROB_FLOOR, classification_metrics
from ar_ray.recipe.augment import predict_probabilities
from ar_ray.recipe.checkpoint import inference_model, load_checkpoint
from ar_ray.saved_ensemble import SavedEnsemble
from ar_ray.search import run_tune
from ar_ray.search_space import load_search_space
from ar_ray.tune_request import TuneRequest

pytestmark = pytest.mark.ray

QUICK = Path(__file__).parent.parent / "search_spaces" / "quick.yaml"
OUTPUTS = [
    "members.csv",
    "weights.csv",
    "metrics.csv",
    "predictions.csv",
    "report.md",
    "members_vs_ensemble.png",
    "weights.png",
    "reliability.png",
    "ensemble.yaml",
    "probs_val.npz",
    "probs_test.npz",
]


@pytest.fixture(scope="module")
def ensemble_run(ray_cluster, small_splits, module_tmp):
    root = module_tmp
    request = TuneRequest(
        space=str(QUICK), trials=3, epochs=1, storage=str(root), name="e", limit_per_class=10
    )
    run_tune(request, load_search_space(QUICK), small_splits)
    run = str(root / "e")
    record = load_tune_record(run)
    summary = run_ensemble(  # retrain: the members train (test_finished_trials_are_members)
        EnsembleRequest(run=run, members=2, epochs=1, retrain=True),
        record,
        small_splits,
        TrainOptions(root=run),
    )
    return Path(run), summary


def test_finished_trials_are_members_unless_they_differ(ray_cluster, small_splits, tmp_path):
    """Members whose config and epochs are finished trials' are those trials' final
    checkpoints, byte for byte, and nothing trains; other epochs, DDP workers or --retrain
    train them."""
    request = TuneRequest(
        space=str(QUICK), trials=2, epochs=1, storage=str(tmp_path), name="r", limit_per_class=10
    )
    board = run_tune(request, load_search_space(QUICK), small_splits)
    run = str(tmp_path / "r")
    record = load_tune_record(run)
    for changed in ({"epochs": 2}, {"workers_per_member": 2}, {"retrain": True}):
        specs = plan_members(EnsembleRequest(run=run, members=2, **changed), record)
        assert [s.reuse for s in specs] == ["", ""], changed
    plain = EnsembleRequest(run=run, members=2)
    specs = plan_members(plain, record)
    assert (
        describe_members(specs, run)
        == "members: 2 reused from finished tune trials, 0 to train (0 epochs in all)"
    )
    run_ensemble(plain, record, small_splits, TrainOptions(root=run))
    members = pd.read_csv(tmp_path / "r" / "ensemble" / "members.csv")
    assert list(members["status"]) == [f"reused from trial {t}" for t in members["trial_id"]]
    for member in members.to_dict("records"):
        (trial_dir,) = (tmp_path / "r" / "tune").glob(f"*{member['trial_id']}*")
        last = max(trial_dir.glob("checkpoint_*"))  # the trial's final checkpoint
        published = tmp_path / "r" / "members" / member["member"]
        assert (published / "checkpoint.pt").read_bytes() == (last / "checkpoint.pt").read_bytes()
        assert sorted(p.name for p in published.iterdir()) == [
            "checkpoint.pt",
            "config.yaml",
            "metrics.csv",
        ]
        row = board[board["trial_id"] == member["trial_id"]].iloc[0]
        assert member["val_top1"] == pytest.approx(row["val_top1"])


def test_ensemble_writes_every_output(ensemble_run, small_splits):
    run, summary = ensemble_run
    for name in OUTPUTS:
        assert (run / "ensemble" / name).stat().st_size > 0, name
    members = pd.read_csv(run / "ensemble" / "members.csv")
    assert len(members) == 2 and members["member"].is_unique and members["seed"].is_unique
    assert (members["epochs_trained"] == 1).all() and members["reason"].str.len().gt(0).all()
    for member in members["member"]:
        state = load_checkpoint(run / "members" / member / "checkpoint.pt")
        assert state["epoch"] == 1
    predictions = pd.read_csv(run / "ensemble" / "predictions.csv")
    assert len(predictions) == len(small_splits.test)
    assert set(predictions["predicted"]) <= set(small_splits.classes)
    assert (predictions["top5_probs"].str.split().str.len() == 5).all()
    top5 = predictions["top5"].str.split("|")  # not spaces: "Ankle boot" is one class
    assert (top5.str.len() == 5).all() and (top5.str[0] == predictions["predicted"]).all()
    assert top5.map(set(small_splits.classes).issuperset).all()
    metrics = pd.read_csv(run / "ensemble" / "metrics.csv")
    assert set(metrics["split"]) == {"val", "test"}
    assert {"uniform", "greedy", "nll", "final"} <= set(metrics["name"])
    estimates = metrics.groupby(["split", "kind"])["estimate"].unique().map(list).to_dict()
    assert estimates == {
        ("val", "member"): ["selected-on-val"],
        ("val", "ensemble"): ["out-of-fold"],
        ("test", "member"): ["held-out"],
        ("test", "ensemble"): ["held-out"],
    }
    assert "![" in (run / "ensemble" / "report.md").read_text()


def test_saved_val_probabilities_reproduce_the_out_of_fold_scores_and_the_weights(
    ensemble_run, small_splits
):
    """metrics.csv's val ensemble rows are the cross-fit of probs_val.npz on its recorded
    folds (5, dealt with the run's seed), and ensemble.yaml holds the chosen method refitted
    on all of val."""
    run, summary = ensemble_run
    saved = np.load(run / "ensemble" / "probs_val.npz")
    assert list(saved["ids"]) == small_splits.val.ids
    assert np.array_equal(saved["folds"], stratified_folds(saved["labels"], 5, seed=0))
    fit = cross_fit(saved["member_probs"], saved["labels"], saved["folds"])
    metrics = pd.read_csv(run / "ensemble" / "metrics.csv").set_index(["split", "name"])
    for method, probs in fit.out_of_fold.items():
        reported = metrics.loc[("val", method), ["top1", "top5", "nll"]]
        expected = classification_metrics(probs, saved["labels"])
        assert np.allclose(reported, [expected[k] for k in ("top1", "top5", "nll")], atol=1e-9)
    record = yaml.safe_load((run / "ensemble" / "ensemble.yaml").read_text())
    assert record["method"] == summary.chosen == fit.chosen
    weights = fit.fitted[fit.chosen].weights
    names = pd.read_csv(run / "ensemble" / "members.csv")["member"].to_numpy()
    assert record["members"] == list(names[weights > 0])  # predict loads no unused member
    assert np.allclose(record["weights"], weights[weights > 0], atol=1e-6)
    assert record["fold_methods"] == list(fit.fold_choices)
    assert record["images_per_call"] == 64  # the CPU actors' batch, recorded with the run


def test_gains_over_the_member_best_on_val_come_with_their_intervals(ensemble_run):
    """Recomputed from the saved probabilities: the best member is the best on val, and each
    split's final-vs-best gain is the difference in images right, inside its interval."""
    run, summary = ensemble_run
    val, test = (np.load(run / "ensemble" / f"probs_{s}.npz") for s in ("val", "test"))
    names = list(pd.read_csv(run / "ensemble" / "members.csv")["member"])
    solo = [classification_metrics(p, val["labels"]) for p in val["member_probs"]]
    best = min(range(len(names)), key=lambda m: (-solo[m]["top1"], solo[m]["nll"], m))
    assert summary.best_member == names[best]
    fit = cross_fit(val["member_probs"], val["labels"], val["folds"])
    finals = {
        "val": fit.out_of_fold["final"],
        "test": combine(test["member_probs"], fit.fitted[fit.chosen]),
    }
    metrics = pd.read_csv(run / "ensemble" / "metrics.csv").set_index(["split", "name"])
    lines = summary.summary_lines()
    assert lines[0] == f"weights: {fit.reason}"
    for split, saved in (("val", val), ("test", test)):
        right = finals[split].argmax(axis=1) == saved["labels"]
        best_right = saved["member_probs"][best].argmax(axis=1) == saved["labels"]
        points = 100 * (right.mean() - best_right.mean())
        gain = metrics.loc[
            (split, "final"), ["vs_best_member", "vs_best_member_low", "vs_best_member_high"]
        ]
        assert gain.iloc[0] == pytest.approx(points) and gain.iloc[1] <= points <= gain.iloc[2]
        assert metrics.loc[(split, names[best])].vs_best_member_low == 0  # itself, exactly
        line = next(line for line in lines if line.startswith(f"{split} top-1:"))
        assert line.endswith(
            f"; best on val): {points:+.2f} points [{gain.iloc[1]:+.2f}, {gain.iloc[2]:+.2f}]"
        )
    report = (run / "ensemble" / "report.md").read_text()
    assert all(f"- {line}" in report for line in lines)


def test_members_csv_says_how_each_member_differs_and_what_it_weighs(ensemble_run):
    run, summary = ensemble_run
    members = pd.read_csv(run / "ensemble" / "members.csv")
    val = np.load(run / "ensemble" / "probs_val.npz")
    first, second = val["member_probs"].argmax(axis=2)  # two members: the rest is the other
    assert members["disagreement"].tolist() == pytest.approx([(first != second).mean()] * 2)
    assert members["final_weight"].sum() == pytest.approx(1.0)
    left_out = members[members["final_weight"] == 0]
    assert all(note.startswith("left out: adds no val top-1") for note in left_out["note"])


def test_summary_prints_every_score_then_the_weights_and_the_gains(capsys):
    rows = [  # (name, kind, split, top-1, gain, low, high)
        ("a", "member", "val", 0.70, 0.0, 0.0, 0.0),
        ("final", "ensemble", "val", 0.72, 2.0, -0.5, 4.5),
        ("a", "member", "test", 0.50, 0.0, 0.0, 0.0),
        ("final", "ensemble", "test", 0.55, 5.0, 1.25, 8.75),
    ]
    metrics = pd.DataFrame(
        [
            {"name": n, "kind": k, "split": s, "estimate": estimate(s, k), "top1": t,
             "vs_best_member": g, "vs_best_member_low": lo, "vs_best_member_high": hi}
            for n, k, s, t, g, lo, hi in rows
        ]
    )  # fmt: skip
    reason = "uniform scores best out of fold"
    print_summary(EnsembleResult(metrics, "uniform", "runs/x", best_member="a", reason=reason))
    lines = capsys.readouterr().out.splitlines()
    assert lines[-4:] == [
        "outputs: runs/x/ensemble",
        "weights: uniform scores best out of fold",
        "val top-1: ensemble (uniform weights) 72.00% (out-of-fold) "
        "vs best member a 70.00% (selected-on-val; best on val): +2.00 points [-0.50, +4.50]",
        "test top-1: ensemble (uniform weights) 55.00% (held-out) "
        "vs best member a 50.00% (held-out; best on val): +5.00 points [+1.25, +8.75]",
    ]


def test_actor_tencrop_equals_local_tencrop(ensemble_run, small_splits):
    run, _ = ensemble_run
    checkpoints = SavedEnsemble.load(str(run)).locations()
    images = small_splits.val.images[:37]  # not a multiple of the batch size
    pool = InferenceOptions(max_actors=2, batch_size=16)
    (remote,) = member_probabilities(checkpoints, [images], tta="tencrop", options=pool)
    for index, location in enumerate(checkpoints):
        model = inference_model(load_checkpoint(Path(location)))
        local = predict_probabilities(model, torch.from_numpy(images), 28, "tencrop").numpy()
        assert np.allclose(remote[index], local, atol=1e-5)


def test_predict_labels_a_folder_of_mixed_images(ensemble_run, tmp_path):
    run, _ = ensemble_run
    photos = tmp_path / "photos"
    write_image(photos / "big.jpg", (320, 240))
    write_image(photos / "grey.png", (30, 50), mode="L")
    write_image(photos / "nested" / "rgba.png", (64, 64), mode="RGBA")
    (photos / "notes.txt").write_text("not an image")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "labels.csv"
    address = ray.get_runtime_context().gcs_address
    result = run_cli(
        *("predict", "--ensemble", str(run), "--images", f"file://{photos}"),
        *("--out", str(out), "--address", address, "--max-actors", "2"),
    )
    assert result.returncode == 0, result.stderr
    assert "each inference actor requests 1 CPU + 0 GPU (the ensemble's" in result.stdout
    assert "1 images could not be decoded" in result.stdout
    frame = pd.read_csv(out, keep_default_na=False)
    assert len(frame) == 4 and frame["image_id"].str.endswith((".jpg", ".png")).all()
    good = frame[frame["error"] == ""]
    assert len(good) == 3 and good["confidence"].between(0, 1).all()
    assert (good["top5_probs"].str.split().str.len() == 5).all()
    bad = frame[frame["error"] != ""]
    assert bad["image_id"].str.endswith("broken.jpg").all() and (bad["predicted"] == "").all()
    assert pd.read_csv(tmp_path / "labels_pool.csv")["images"].sum() == 4
    assert not list(tmp_path.glob(".*partial"))


def test_predict_gives_the_probabilities_the_ensemble_saved(ensemble_run, small_splits):
    """The same weights, temperature and TenCrop through both paths: predict's top-5 classes
    and probabilities equal the saved val probabilities combined with the saved weights."""
    run, _ = ensemble_run
    saved = SavedEnsemble.load(str(run))
    checkpoints, weights = saved.locations(), saved.fitted_weights
    images = small_splits.val.images[:8]
    member = np.load(run / "ensemble" / "probs_val.npz")["member_probs"][:, :8]
    expected = combine(member, weights)
    batch = {"path": np.arange(8).astype(str), "image": np.asarray(images), "error": np.full(8, "")}
    rows = next(
        ensemble_top_k(
            ray.data.from_items([{k: v[i] for k, v in batch.items()} for i in range(8)]),
            checkpoints,
            weights,
            tta=saved.tta,
            options=InferenceOptions(),
            top_k=5,
        )
    )
    order = np.argsort(rows["path"].astype(int))
    assert_top5(rows["classes"][order], rows["probs"][order], expected, atol=1e-5)


def tempered_mixture(member_probs: np.ndarray, weights, temperature: float) -> np.ndarray:
    """By hand: the weighted mean of the members' probabilities (floored at PROB_FLOOR, as
    log(0) would be), raised to 1/T and renormalised (softmax(log(mean) / T))."""
    mixed = np.tensordot(np.asarray(weights, dtype=np.float64), member_probs, axes=1)
    tempered = np.maximum(mixed, PROB_FLOOR) ** (1.0 / temperature)
    return tempered / tempered.sum(axis=1, keepdims=True)


def assert_scores_by_hand(reported: np.ndarray, probs: np.ndarray, labels: np.ndarray) -> None:
    """metrics.csv's top-1, top-5 and NLL against `probs` by hand: top-k from how many
    classes are ahead of the label, NLL with its log floored at PROB_FLOOR (a member sure of
    a wrong class gives its label a float32 0). A class within a relative 1e-6 of the
    label's probability may rank on either side of it (float32 and float64 break such ties
    apart), so an accuracy must lie between counting every such tie against the label and
    counting none; without ties the two bounds are one number."""
    true = probs[np.arange(len(labels)), labels][:, None]
    surely_ahead = (probs > true * (1 + 1e-6) + 1e-15).sum(axis=1)
    maybe_ahead = (probs >= true * (1 - 1e-6) - 1e-15).sum(axis=1) - 1  # not the label
    for value, k in zip(reported[:2], (1, 5), strict=True):
        assert np.mean(maybe_ahead < k) - 1e-9 <= value <= np.mean(surely_ahead < k) + 1e-9, k
    nll = -np.mean(np.log(np.maximum(true[:, 0], PROB_FLOOR)))
    assert reported[2] == pytest.approx(nll, abs=1e-9)


def test_predict_applies_hand_made_weights_and_temperature(ensemble_run, small_splits, tmp_path):
    """A saved ensemble given weights [0.9, 0.1] and T = 0.5: `ar-ray predict` labels PNGs of
    val images with the members' probabilities (saved by the ensemble run) mixed 0.9 : 0.1
    and sharpened to the power 1/T = 2, as worked out here in numpy."""
    run, _ = ensemble_run
    hand = tmp_path / "hand"
    (hand / "ensemble").mkdir(parents=True)
    (hand / "members").symlink_to(run / "members")  # the record names members/<id>/...
    saved = SavedEnsemble.load(str(run))
    replace(saved, method="hand", weights=[0.9, 0.1], temperature=0.5).save(hand / "ensemble")
    count, images = 12, tmp_path / "images"
    images.mkdir()
    for row, image in enumerate(small_splits.val.images[:count]):  # lossless, stored size
        Image.fromarray(image.transpose(1, 2, 0)).save(images / f"{row:02d}.png")
    member = np.load(run / "ensemble" / "probs_val.npz")["member_probs"][:, :count]
    mixed = 0.9 * member[0].astype(np.float64) + 0.1 * member[1]
    expected = mixed**2 / (mixed**2).sum(axis=1, keepdims=True)
    out = tmp_path / "labels.csv"
    address = ray.get_runtime_context().gcs_address
    result = run_cli(
        *("predict", "--ensemble", str(hand), "--images", str(images)),
        *("--out", str(out), "--address", address, "--max-actors", "2"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    frame = pd.read_csv(out).sort_values("image_id")
    assert [Path(p).name for p in frame["image_id"]] == [f"{r:02d}.png" for r in range(count)]
    listed = [[saved.classes.index(c) for c in row.split("|")] for row in frame["top5"]]
    assert frame["predicted"].tolist() == [row.split("|")[0] for row in frame["top5"]]
    assert np.allclose(frame["confidence"], expected.max(axis=1), atol=1e-5)
    shown = np.array([[float(p) for p in row.split()] for row in frame["top5_probs"]])
    assert_top5(np.array(listed), shown, expected, atol=6e-5)


def test_ensemble_outputs_are_the_saved_test_probabilities_mixed_by_the_chosen_weights(
    ensemble_run, small_splits
):
    """weights.csv and ensemble.yaml agree on the chosen weights and temperature; every
    test row of metrics.csv, and predictions.csv, follow from probs_test.npz mixed by hand
    with the weights and temperature weights.csv lists for each method."""
    run, _ = ensemble_run
    folder = run / "ensemble"
    record = yaml.safe_load((folder / "ensemble.yaml").read_text())
    weights = pd.read_csv(folder / "weights.csv")
    saved = np.load(folder / "probs_test.npz")
    member, labels = saved["member_probs"].astype(np.float64), saved["labels"]
    assert list(saved["ids"]) == small_splits.test.ids
    assert np.array_equal(labels, small_splits.test.labels)
    metrics = pd.read_csv(folder / "metrics.csv").set_index(["split", "name"])
    columns = ["top1", "top5", "nll"]
    mixtures = {}
    for method, rows in weights.groupby("method"):
        rows = rows.set_index("member").loc[record["members"]]  # in the members' order
        (temperature,) = rows["temperature"].unique()
        mixtures[method] = tempered_mixture(member, rows["weight"], temperature)
        reported = metrics.loc[("test", method), columns].to_numpy(dtype=float)
        assert_scores_by_hand(reported, mixtures[method], labels)
        if method == record["method"]:
            assert record["weights"] == rows["weight"].tolist()
            assert record["temperature"] == temperature
    assert set(mixtures) == {"uniform", "greedy", "nll"}
    final = mixtures[record["method"]]
    reported = metrics.loc[("test", "final"), columns].to_numpy(dtype=float)
    assert_scores_by_hand(reported, final, labels)
    for index, name in enumerate(record["members"]):
        reported = metrics.loc[("test", name), columns].to_numpy(dtype=float)
        assert_scores_by_hand(reported, member[index], labels)

    predictions = pd.read_csv(folder / "predictions.csv", dtype={"image_id": str})
    assert predictions["image_id"].tolist() == list(small_splits.test.ids)
    classes = record["classes"]
    listed = np.array([[classes.index(c) for c in row.split("|")] for row in predictions["top5"]])
    assert predictions["predicted"].tolist() == [classes[row[0]] for row in listed]
    assert predictions["label"].tolist() == [classes[i] for i in labels]
    assert np.allclose(predictions["confidence"], final.max(axis=1), atol=1e-9)
    shown = np.array([[float(p) for p in row.split()] for row in predictions["top5_probs"]])
    assert_top5(listed, shown, final, atol=6e-5)


def test_predict_decodes_files_to_the_stored_size_the_ensemble_recorded(
    ensemble_run, small_splits, tmp_path
):
    """Val images saved losslessly at their stored 32 px: decoded to the recorded size they
    come back pixel for pixel, so predict gives the probabilities ensemble saved for them
    (decoding to the 28 px image size would resize them and change every probability)."""
    run, _ = ensemble_run
    ensemble = SavedEnsemble.load(str(run))
    assert ensemble.stored_size == small_splits.stored_size == stored_size(28) == 32
    record = yaml.safe_load((run / "ensemble" / "ensemble.yaml").read_text())
    legacy = {key: value for key, value in record.items() if key != "stored_size"}
    older = SavedEnsemble.from_record(legacy)  # older ensembles stored images at image_size
    assert older.stored_size == 28 and older.classes == ensemble.classes
    images = small_splits.val.images[:5]
    for row, image in enumerate(images):
        Image.fromarray(image.transpose(1, 2, 0)).save(tmp_path / f"{row}.png")
    out = tmp_path / "labels.csv"
    run_predict(ensemble, [str(tmp_path)], out, InferenceOptions())
    frame = pd.read_csv(out).sort_values("image_id")
    saved = np.load(run / "ensemble" / "probs_val.npz")["member_probs"]
    expected = combine(saved, ensemble.fitted_weights)[:5]
    assert frame["predicted"].tolist() == [ensemble.classes[i] for i in expected.argmax(axis=1)]
    assert np.allclose(frame["confidence"], expected.max(axis=1), atol=1e-5)


TIMINGS = ["epoch_seconds", "started_at", "finished_at"]


def test_member_resumed_after_a_failure_ends_where_an_uninterrupted_one_does(
    ray_cluster, small_splits, tmp_path
):
    """Two DDP workers (gloo). The first attempt dies at the end of epoch 2, before reporting
    it; the retry resumes from epoch 1's checkpoint (epoch 1's record, timings included, is the
    first attempt's) and ends with the weights and every epoch's metrics of an
    uninterrupted member of the same config. Mixup draws from each rank's global RNG, so
    the ranks' random state must be rebuilt on resume, not only the weights."""
    marker = tmp_path / "resumed_from.json"

    def flaky_loop(loop_config):
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            if ray.train.get_context().get_world_rank() == 0:
                with checkpoint.as_directory() as folder:
                    state = load_checkpoint(Path(folder) / "checkpoint.pt")
                marker.write_text(json.dumps(state["history"]))
            member_train_loop(loop_config)
            return
        import ar_ray.checkpointed_fit as checkpointed

        real_fit = checkpointed.fit

        def fit_failing_in_epoch_two(*args, on_epoch, **kwargs):
            """Not right after epoch 1's report: Train's controller takes that report in
            asynchronously, and a worker that dies at once can beat it (seen on a loaded
            machine: every retry started without a checkpoint)."""

            def fail_before_reporting_epoch_two(metrics, state):
                if metrics["epoch"] == 2:
                    raise RuntimeError("injected failure in epoch 2")
                on_epoch(metrics, state)

            return real_fit(*args, on_epoch=fail_before_reporting_epoch_two, **kwargs)

        checkpointed.fit = fit_failing_in_epoch_two
        try:
            member_train_loop(loop_config)
        finally:
            checkpointed.fit = real_fit

    from ar_ray.config import RecipeConfig

    config = RecipeConfig(epochs=2, batch_size=8, mixup_alpha=0.4, seed=5)
    tiny = ray.put(small_splits.limit_per_class(3))
    finished = {}
    for name, loop in [("steady", member_train_loop), ("flaky", flaky_loop)]:
        options = TrainOptions(root=str(tmp_path / name), workers_per_member=2)
        last = train_member(MemberSpec(name, config, "t0", 1, "test"), tiny, options, loop)
        assert last["epoch"] == 2
        finished[name] = tmp_path / name / "members" / name
    (first_attempt,) = json.loads(marker.read_text())  # the retry started after epoch 1
    steady, flaky = (load_checkpoint(finished[n] / "checkpoint.pt") for n in ("steady", "flaky"))
    assert flaky["epoch"] == 2 and flaky["history"][0] == first_attempt  # kept, not retrained
    for key, value in steady["model"].items():
        assert torch.equal(value, flaky["model"][key]), key
    steady_metrics, flaky_metrics = (
        pd.read_csv(finished[n] / "metrics.csv").drop(columns=TIMINGS) for n in ("steady", "flaky")
    )
    assert list(flaky_metrics["epoch"]) == [1, 2]
    pd.testing.assert_frame_equal(flaky_metrics, steady_metrics, check_exact=True)
    # rank 0 logged each epoch to TensorBoard beside metrics.csv; the retry in a file of its
    # own, so the first attempt's epoch is still there
    for name, files in (("steady", 1), ("flaky", 2)):
        logged = tensorboard_scalars(finished[name] / "tensorboard")
        metrics = pd.read_csv(finished[name] / "metrics.csv")
        for tag in ("val_top1", "train_loss", "lr"):
            assert logged[tag] == pytest.approx(
                dict(zip(metrics["epoch"], metrics[tag], strict=True))
            )
        assert len(list((finished[name] / "tensorboard").glob("events.out.tfevents.*"))) == files
    shutil.rmtree(tmp_path / "steady")
    shutil.rmtree(tmp_path / "flaky")


def test_ensemble_from_a_folder_without_a_tune_run_fails_clearly(tmp_path):
    data = make_image_folder(tmp_path / "data")
    result = run_cli("ensemble", "--from", str(data))
    assert result.returncode == 2 and "no leaderboard.csv" in result.stderr


def test_tune_and_ensemble_through_a_storage_uri(ray_cluster, small_splits, tmp_path):
    """`--storage` as a URI takes the object-store code path (pyarrow), as s3:// or gs:// do."""
    uri = f"file://{tmp_path}"
    request = TuneRequest(
        space=str(QUICK), trials=2, epochs=1, storage=uri, name="u", limit_per_class=10
    )
    run_tune(request, load_search_space(QUICK), small_splits)
    run = f"{uri}/u"
    summary = run_ensemble(
        EnsembleRequest(run=run, members=2, epochs=1, tta="center"),
        load_tune_record(run),
        small_splits,
        TrainOptions(root=run),
    )
    assert summary.folder == f"{run}/ensemble"
    for name in ("metrics.csv", "ensemble.yaml", "report.md", "predictions.csv"):
        assert (tmp_path / "u" / "ensemble" / name).stat().st_size > 0
    saved = SavedEnsemble.load(run)
    checkpoints, weights = saved.locations(), saved.fitted_weights
    assert all(c.startswith("file://") for c in checkpoints) and len(weights.weights) == 2


PROBE = """
import json, sys
from ar_ray.cli import main
code = main(sys.argv[1:])
heavy = ("ray.tune", "ray.train", "optuna")
loaded = sorted(m for m in sys.modules if m in heavy or m.startswith(tuple(h + "." for h in heavy)))
print("LOADED " + json.dumps(loaded))
sys.exit(code)
"""


def test_predict_imports_neither_the_search_nor_the_training_stack(ensemble_run, tmp_path):
    """`ar-ray predict` needs the saved record, inference and data: a real predict, in a
    fresh process, labels images without importing Ray Tune, Ray Train or Optuna."""
    run, _ = ensemble_run
    write_image(tmp_path / "images" / "a.png", size=(32, 32))
    out = tmp_path / "labels.csv"
    done = subprocess.run(
        [sys.executable, "-c", PROBE, "predict", "--ensemble", str(run), "--out", str(out)]
        + ["--images", str(tmp_path / "images")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(pd.read_csv(out)) == 1
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("LOADED ")]
    assert json.loads(line.removeprefix("LOADED ")) == []
