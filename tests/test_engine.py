"""engine.fit on the built-in data: it learns, and resuming reproduces the same weights."""

import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ar_ray.config import RecipeConfig
from ar_ray.data import DatasetSplits, ImageSplit
from ar_ray.recipe.augment import build_batch_mixer
from ar_ray.recipe.checkpoint import inference_model, load_checkpoint, save_checkpoint
from ar_ray.recipe.engine import (
    _Run,
    _train_loader,
    evaluate,
    fit,
    teacher_views,
    view_major,
    views_per_image,
)
from ar_ray.recipe.sampling import BATCH, ORDER, SAMPLE, EpochSampler, mixed_seed


@pytest.mark.slow
def test_default_run_reaches_70_percent_test_top1(builtin_splits):
    config = RecipeConfig()
    assert config.epochs <= 10
    result = fit(config, builtin_splits)
    assert [m["epoch"] for m in result.history] == list(range(1, config.epochs + 1))
    test = evaluate(result.model, builtin_splits.test, config.image_size, "center")
    assert test["top1"] >= 0.70, test


def _snapshot(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


TIMINGS = ("epoch_seconds", "started_at", "finished_at")


def _scores(history):
    """An epoch history without its wall-clock fields: what a resumed run must reproduce."""
    return [{k: v for k, v in metrics.items() if k not in TIMINGS} for metrics in history]


def _saving_to(folder):
    """An `on_epoch` that writes each epoch's checkpoint file as a member does."""

    def save(metrics, state):
        save_checkpoint(state, folder / f"epoch{metrics['epoch']}.pt")

    return save


def test_resume_from_epoch_two_matches_uninterrupted_run(small_splits, tmp_path):
    """Resumed from the epoch-2 checkpoint file (save_checkpoint, load_checkpoint), epoch 3
    ends with the weights, teacher and scores of an uninterrupted 3-epoch run."""
    config = RecipeConfig(
        epochs=3, batch_size=16, mt_weight=1.0, mt_start_epoch=1, mixup_alpha=0.4, seed=3
    )
    full = fit(config, small_splits, on_epoch=_saving_to(tmp_path))
    saved = load_checkpoint(tmp_path / "epoch2.pt")
    assert saved["teacher"] is not None and saved["epoch"] == 2
    resumed = fit(config, small_splits, resume_from=saved)
    assert [m["epoch"] for m in resumed.history] == [1, 2, 3]
    assert _scores(resumed.history) == _scores(full.history)  # epoch 3 was trained again
    for key, value in full.state["model"].items():
        assert torch.equal(value, resumed.state["model"][key]), key
    for key, value in full.state["teacher"]["module"].items():
        assert torch.equal(value, resumed.state["teacher"]["module"][key]), key
    # and the served model is the teacher, rebuilt from the checkpoint alone
    served = inference_model(_snapshot(full.state))
    for key, value in served.state_dict().items():
        assert torch.equal(value, full.state["teacher"]["module"][key]), key


def test_stage_two_resumed_from_another_teachers_stage_one_is_the_run_from_scratch(
    small_splits, tmp_path
):
    """A staged search trains stage one once, cut at `mt_start_epoch`, under whatever Mean
    Teacher keys it was given, and resumes it with each searched set: the result must be
    the run of that config from scratch, bit for bit, or the leaderboard's configs would not
    reproduce. Stage one here had other weight, decay and temperature."""
    tiny = small_splits.limit_per_class(4)
    stage_two = RecipeConfig(
        epochs=4, batch_size=8, mt_weight=1.0, mt_decay=0.9, mt_start_epoch=2,
        mt_rampup_epochs=1.0, mt_temperature=1.0, mixup_alpha=0.4, seed=5,
    )  # fmt: skip
    other = stage_two.replace(mt_weight=0.3, mt_decay=0.99, mt_temperature=2.0)
    cut = fit(other, tiny, until_epoch=2, on_epoch=_saving_to(tmp_path))
    assert [m["epoch"] for m in cut.history] == [1, 2] and cut.state["teacher"] is None
    resumed = fit(stage_two, tiny, resume_from=load_checkpoint(tmp_path / "epoch2.pt"))
    scratch = fit(stage_two, tiny)
    # stage one is the full run's first two epochs, learning rates included (one schedule)
    assert _scores(cut.history) == _scores(scratch.history)[:2]
    assert _scores(resumed.history) == _scores(scratch.history)
    for part in ("model", "teacher"):
        theirs = scratch.state[part] if part == "model" else scratch.state[part]["module"]
        ours = resumed.state[part] if part == "model" else resumed.state[part]["module"]
        for key, value in theirs.items():
            assert torch.equal(value, ours[key]), (part, key)
    assert resumed.state["config"] == stage_two.to_dict()


def test_sgd_momentum_survives_the_checkpoint_and_the_resume_is_exact(small_splits, tmp_path):
    """SGD's momentum buffers come back from the checkpoint file as they were saved, so a
    2-epoch fit resumed from its epoch-1 file ends bit for bit where an uninterrupted one
    does (restarting the momentum at zero would change every weight in epoch 2)."""
    tiny = small_splits.limit_per_class(3)
    config = RecipeConfig(epochs=2, batch_size=8, optimizer="sgd", lr=0.05, seed=6)
    kept = {}

    def keep(metrics, state):
        kept[metrics["epoch"]] = _snapshot(state)
        save_checkpoint(state, tmp_path / f"epoch{metrics['epoch']}.pt")

    full = fit(config, tiny, on_epoch=keep)
    loaded = load_checkpoint(tmp_path / "epoch1.pt")
    buffers = kept[1]["optimizer"]["state"]
    assert buffers and all(b["momentum_buffer"].abs().sum() > 0 for b in buffers.values())
    assert loaded["optimizer"]["state"].keys() == buffers.keys()
    for index, saved in buffers.items():
        assert torch.equal(
            loaded["optimizer"]["state"][index]["momentum_buffer"], saved["momentum_buffer"]
        )
    resumed = fit(config, tiny, resume_from=loaded)
    assert _scores(resumed.history) == _scores(full.history)
    for key, value in full.state["model"].items():
        assert torch.equal(value, resumed.state["model"][key]), key


def test_the_seed_sets_the_init_and_every_epoch(small_splits):
    """The same seed gives identical weights. Another seed gives other initial weights (it
    reaches the model init), another image order (it reaches the sampler), and, from the
    very same epoch-1 checkpoint, another epoch 2: the seed steers the data order and
    augmentation too, not only the init."""
    tiny = small_splits.limit_per_class(3)
    config = RecipeConfig(epochs=2, batch_size=8, cr_weight=0.0, seed=0)
    other = config.replace(seed=1)

    def initial(config):
        return _Run(config, tiny, torch.device("cpu"), 0, False).model.state_dict()

    def order(config):
        sampler = _train_loader(config, tiny.train, 0, 1, 0, False)[0].sampler
        return [index for _, index in sampler]

    first = initial(config)
    assert all(torch.equal(value, initial(config)[key]) for key, value in first.items())
    assert not torch.equal(first["classifier.weight"], initial(other)["classifier.weight"])
    assert order(config) == order(config) != order(other)

    kept = {}

    def keep(metrics, state):
        kept[metrics["epoch"]] = _snapshot(state)

    full = fit(config, tiny, on_epoch=keep).state["model"]
    again = fit(config, tiny).state["model"]
    for key, value in full.items():
        assert torch.equal(value, again[key]), key
    reseeded = fit(other, tiny, resume_from=kept[1]).state["model"]
    assert not torch.equal(full["classifier.weight"], reseeded["classifier.weight"])


def _read_only(split: ImageSplit) -> ImageSplit:
    """A copy of `split` whose arrays are read-only, as Ray's object store hands them out."""
    images, labels = split.images.copy(), split.labels.copy()
    images.flags.writeable = labels.flags.writeable = False
    return ImageSplit(images, labels, list(split.ids))


def test_fit_and_evaluate_take_read_only_arrays_as_trials_get_them(small_splits):
    shared = DatasetSplits(
        train=_read_only(small_splits.train),
        val=_read_only(small_splits.val),
        test=None,
        classes=small_splits.classes,
    )
    config = RecipeConfig(epochs=1, batch_size=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(config, shared)
        evaluate(result.model, shared.val, config.image_size, "tencrop")
    assert not [w for w in caught if "writable" in str(w.message)]
    built_with_the_splits = torch.tensor(shared.train.channel_stats.mean)
    assert torch.allclose(result.model.mean.flatten(), built_with_the_splits)


@pytest.mark.parametrize("mixer", ["mixup", "cutmix"])
@pytest.mark.parametrize("cr_weight", [0.0, 0.1])
def test_teacher_sees_other_noise_with_the_students_mix_partner_and_target(mixer, cr_weight):
    config = RecipeConfig(
        cr_weight=cr_weight,
        mt_weight=1.0,
        mixup_alpha=1.0 if mixer == "mixup" else 0.0,
        cutmix_alpha=1.0 if mixer == "cutmix" else 0.0,
    )
    assert views_per_image(config) == 2
    torch.manual_seed(0)
    batch, size, delta = 8, 16, 0.01
    # image i is flat grey a_i; its second view is a_i + delta, so the two views differ
    # everywhere, and after mixing the difference stays exactly delta only where both views
    # took the same partner with the same lambda / box
    grey = torch.linspace(0.1, 0.8, batch)[:, None, None, None, None]
    views = grey.expand(batch, 2, 3, size, size).clone()
    views[:, 1] += delta
    labels = torch.arange(batch)
    mixed, targets = build_batch_mixer(config, num_classes=batch)(views, labels)
    assert not torch.equal(targets, F.one_hot(labels, batch).float())  # it did mix
    student_count = 2 if cr_weight > 0 else 1
    student = view_major(mixed[:, :student_count])
    teacher = teacher_views(mixed, student_count)
    assert student.shape == teacher.shape
    difference = teacher - student
    assert (difference.abs() > delta / 2).all()  # different noise on every pixel
    expected = torch.full_like(difference, delta)
    if student_count == 2:  # the second student view is paired with the first view
        expected[batch:] = -delta
    assert torch.allclose(difference, expected, atol=1e-6)  # same partner, lambda and box


def test_mean_teacher_draws_its_own_view_and_off_it_does_not():
    assert views_per_image(RecipeConfig(cr_weight=0.0, mt_weight=0.0)) == 1
    assert views_per_image(RecipeConfig(cr_weight=0.0, mt_weight=0.5)) == 2
    assert views_per_image(RecipeConfig(cr_weight=0.1, mt_weight=0.0)) == 2


def test_loader_workers_do_not_change_the_weights(small_splits):
    """Persistent workers never reseed: every draw must come from (seed, epoch, index)."""
    tiny = small_splits.limit_per_class(3)
    config = RecipeConfig(epochs=2, batch_size=8, policy="randaugment", mixup_alpha=0.4, seed=2)
    in_process = fit(config, tiny, loader_workers=0).state["model"]
    two_workers = fit(config, tiny, loader_workers=2).state["model"]
    for key, value in in_process.items():
        assert torch.equal(value, two_workers[key]), key


def test_batched_augmentation_trains_and_resumes_exactly(small_splits):
    tiny = small_splits.limit_per_class(3)
    config = RecipeConfig(epochs=2, batch_size=8, policy="autoaugment", erasing_p=0.5, seed=4)
    saved = {}

    def keep(metrics, state):
        saved[metrics["epoch"]] = _snapshot(state)

    full = fit(config, tiny, on_epoch=keep, batch_augment=True)
    resumed = fit(config, tiny, resume_from=saved[1], batch_augment=True)
    assert all(torch.isfinite(torch.tensor(m["train_loss"])) for m in full.history)
    for key, value in full.state["model"].items():
        assert torch.equal(value, resumed.state["model"][key]), key


def _crop_areas(config: RecipeConfig, split: ImageSplit, batched: bool) -> torch.Tensor:
    """The stored-image area share of every crop one epoch of the engine's loader serves,
    through the per-image transform or through its batched augmenter; read back from
    images whose channels 0 and 1 encode x and y (4 * coordinate + 2)."""
    loader, augment = _train_loader(config, split, 0, 1, 0, batched)
    loader.sampler.set_epoch(0)
    areas = []
    for step, (inputs, _labels) in enumerate(loader):
        views = inputs if augment is None else augment(inputs, torch.Generator().manual_seed(step))
        coordinates = (views[:, 0, :2].float() - 2) / 4
        extent = coordinates.amax(dim=(2, 3)) - coordinates.amin(dim=(2, 3)) + 1
        areas.append(extent.prod(dim=1) / split.images.shape[-1] ** 2)
    return torch.cat(areas)


def test_batched_and_per_image_paths_crop_alike():
    """The two paths' crop-area deciles agree within 0.05 (about 4 standard errors of a
    difference at 2048 crops each, the areas spread over [0.25, 1]); a scale range of
    (0.08, 1) or (0.35, 1) on one side moves the low deciles by 0.09 or more."""
    size, count = 64, 2048
    ramp = np.arange(size, dtype=np.uint8) * 4 + 2
    image = np.stack(
        [np.broadcast_to(ramp, (size, size)), np.broadcast_to(ramp[:, None], (size, size))]
        + [np.full((size, size), 128, np.uint8)]
    )
    split = ImageSplit(
        np.ascontiguousarray(np.broadcast_to(image, (count, 3, size, size))),
        np.zeros(count, np.int64),
        [str(i) for i in range(count)],
    )
    config = RecipeConfig(
        image_size=32, batch_size=64, rrc_scale_min=0.25, hflip=False, erasing_p=0.0, seed=5
    )
    deciles = torch.linspace(0.1, 0.9, 9)
    per_image = _crop_areas(config, split, batched=False).quantile(deciles)
    batched = _crop_areas(config, split, batched=True).quantile(deciles)
    assert (per_image - batched).abs().max() < 0.05, (per_image, batched)


def test_each_epoch_is_one_seeded_permutation_split_across_ranks():
    """5 images on 2 ranks: 3 steps each, the permutation padded by wrapping its first
    index, rank r taking every other position from r; the epoch rides along."""
    ranks = [EpochSampler(5, seed=3, rank=r, world=2) for r in range(2)]
    assert [len(r) for r in ranks] == [3, 3]
    assert {epoch for epoch, _ in ranks[0]} == {0}  # before any set_epoch
    for sampler in ranks:
        sampler.set_epoch(1)
    first, second = ([index for _, index in sampler] for sampler in ranks)
    assert {epoch for sampler in ranks for epoch, _ in sampler} == {1}
    padded = [None] * 6
    padded[0::2], padded[1::2] = first, second
    assert sorted(padded[:5]) == [0, 1, 2, 3, 4] and padded[5] == padded[0]
    alone = EpochSampler(5, seed=3)
    alone.set_epoch(1)
    assert [index for _, index in alone] == padded[:5]  # the same permutation on 1 rank
    other_seed = EpochSampler(5, seed=4)
    other_seed.set_epoch(1)
    assert [index for _, index in other_seed] != padded[:5]
    alone.set_epoch(2)
    assert [index for _, index in alone] != padded[:5]


def test_mixed_seeds_are_32_bit_and_keep_the_streams_apart():
    seeds = {mixed_seed(purpose, 0, 0) for purpose in (ORDER, SAMPLE, BATCH)}
    assert len(seeds) == 3 and all(0 <= seed < 2**32 for seed in seeds)
    assert mixed_seed(SAMPLE, 1, 2) != mixed_seed(SAMPLE, 2, 1)
