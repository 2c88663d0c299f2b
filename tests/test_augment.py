"""Training transforms, batch mixing and TenCrop evaluation."""

import contextlib
import warnings

import numpy as np
import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from ar_ray.config import RecipeConfig
from ar_ray.data.size import stored_size
from ar_ray.recipe.augment import (
    AugmentedViews,
    build_batch_mixer,
    build_train_transform,
    center_crop_batch,
    device_autocast,
    model_layout,
    predict_probabilities,
    ten_crop_batch,
)


class MeanColourNet(nn.Module):
    """Logits from each image's mean colour: blind to where a crop was taken."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 4)

    def forward(self, x):
        return self.linear(x.mean(dim=(2, 3)))


class PositionNet(nn.Module):
    """Logits that depend on the pixels, so different crops give different answers."""

    def __init__(self, size):
        super().__init__()
        self.linear = nn.Linear(3 * size * size, 4)

    def forward(self, x):
        return self.linear(x.flatten(1))


def hand_ten_crops(images: torch.Tensor, size: int, top: int) -> torch.Tensor:
    """The reference, sliced by hand: top-left, top-right, bottom-left, bottom-right and the
    centre (its corner at `top`, `top`), then the same five cut from the horizontally flipped
    image (torchvision's order), stacked crop-major: [10 * B, C, S, S]."""

    def five(x: torch.Tensor) -> list[torch.Tensor]:
        centre = slice(top, top + size)
        return [
            x[..., :size, :size],
            x[..., :size, -size:],
            x[..., -size:, :size],
            x[..., -size:, -size:],
            x[..., centre, centre],
        ]

    return torch.cat(five(images) + five(images.flip(-1)))


def gradient_images(count: int, side: int) -> torch.Tensor:
    """uint8 images whose every pixel differs from its neighbours, so any other crop position,
    flip or order changes the result."""
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    planes = [(x + 3 * y + 50 * c + 90 * b) % 256 for b in range(count) for c in range(3)]
    return torch.stack(planes).view(count, 3, side, side).to(torch.uint8)


def test_ten_crop_positions_and_order_match_slices_cut_by_hand():
    """All ten crops, pixel for pixel, against slices cut by hand at 28 px from the 32 px
    stored image (centre offset (32 - 28) / 2 = 2); the flipped five are the mirror images
    of the top-right, top-left, bottom-right, bottom-left and centre crops."""
    size = 28
    images = gradient_images(3, stored_size(size))  # at the eval size: no resize applies
    assert images.shape[-1] == 32
    crops = ten_crop_batch(images, size)
    assert crops.shape == (30, 3, size, size)
    expected = hand_ten_crops(images, size, top=2)
    for crop in range(10):  # crop-major: rows crop*3 .. crop*3+2 are the three images
        rows = slice(3 * crop, 3 * crop + 3)
        assert torch.equal(crops[rows], expected[rows]), f"crop {crop}"
    assert torch.equal(crops[15:18], images[..., :size, -size:].flip(-1))  # flip of top-right
    assert len({bytes(crop.flatten().tolist()) for crop in crops}) == 30  # no two alike


def test_tencrop_on_constant_image_equals_centre_prediction():
    torch.manual_seed(0)
    images = torch.full((2, 3, 28, 28), 120, dtype=torch.uint8)
    images[1] = 30
    model = PositionNet(24)
    tencrop = predict_probabilities(model, images, 24, "tencrop")
    centre = predict_probabilities(model, images, 24, "center")
    assert tencrop.shape == (2, 4)
    assert torch.allclose(tencrop, centre, atol=1e-6)
    assert torch.allclose(tencrop.sum(1), torch.ones(2))


def test_tencrop_averages_the_ten_crops():
    torch.manual_seed(0)
    side = stored_size(24)  # TenCrop's input size, so no resize sits between the two
    images = torch.randint(0, 256, (2, 3, side, side), dtype=torch.uint8)
    model = PositionNet(24)
    crops = hand_ten_crops(images, 24, top=round((side - 24) / 2)).float() / 255
    expected = torch.softmax(model(crops), 1).view(10, 2, 4).mean(0)
    assert torch.allclose(predict_probabilities(model, images, 24, "tencrop"), expected, atol=1e-6)
    assert not torch.allclose(expected, predict_probabilities(model, images, 24, "center"))
    assert predict_probabilities(MeanColourNet(), images, 24, "tencrop").shape == (2, 4)


def test_images_stored_at_eval_size_are_cropped_not_resampled():
    size = 24
    stored = stored_size(size)  # 27: what the data loaders store for 24 px models
    images = torch.randint(0, 256, (2, 3, stored, stored), dtype=torch.uint8)
    top = round((stored - size) / 2)
    assert torch.equal(
        center_crop_batch(images, size), images[..., top : top + size, top : top + size]
    )
    crops = ten_crop_batch(images, size)
    assert torch.equal(crops[:2], images[..., :size, :size])  # top-left corner, real pixels
    assert torch.equal(crops[2:4], images[..., :size, -size:])  # top-right corner


def test_images_of_another_size_are_resized_to_eval_size_before_cropping():
    size = 24
    images = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    resized = TF.resize(images, [stored_size(size)] * 2, antialias=True)
    assert torch.equal(center_crop_batch(images, size), TF.center_crop(resized, [size, size]))
    assert torch.equal(ten_crop_batch(images, size)[:2], resized[..., :size, :size])
    assert not torch.equal(center_crop_batch(images, size), TF.center_crop(images, [size, size]))


def test_no_tta_scores_the_whole_stored_image_scaled_to_the_model_size():
    torch.manual_seed(0)
    size = 24
    images = torch.randint(0, 256, (2, 3, stored_size(size), stored_size(size)))
    images = images.to(torch.uint8)
    model = PositionNet(size)
    whole = TF.resize(images, [size, size], antialias=True).float() / 255
    expected = torch.softmax(model(whole), 1)
    assert torch.allclose(predict_probabilities(model, images, size, "none"), expected, atol=1e-6)
    assert not torch.allclose(expected, predict_probabilities(model, images, size, "center"))
    at_model_size = images[..., :size, :size]  # already the model's size: used as it is
    plain = torch.softmax(model(at_model_size.float() / 255), 1)
    assert torch.allclose(predict_probabilities(model, at_model_size, size, "none"), plain)


def test_train_transform_and_two_views_of_a_read_only_shared_array():
    config = RecipeConfig(image_size=24, policy="randaugment", erasing_p=1.0)
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 28, 28), dtype=np.uint8)
    images.flags.writeable = False  # as numpy arrays come out of Ray's object store
    original = images.copy()
    dataset = AugmentedViews(images, np.arange(4), build_train_transform(config), views=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when handed a non-writable array
        views, label = dataset[(0, 1)]
    assert views.shape == (2, 3, 24, 24) and views.dtype == torch.uint8 and label == 1
    assert not torch.equal(views[0], views[1])
    assert np.array_equal(images, original)


def test_a_sample_is_seeded_by_its_epoch_and_index_not_by_the_process_rng():
    config = RecipeConfig(image_size=24, policy="trivialaugment")
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 28, 28), dtype=np.uint8)
    dataset = AugmentedViews(images, np.arange(4), build_train_transform(config), 1, seed=5)
    torch.manual_seed(1)
    first = dataset[(3, 2)][0]
    state = torch.get_rng_state()
    torch.manual_seed(2)  # another worker, another RNG state: the same sample
    assert torch.equal(dataset[(3, 2)][0], first)
    assert not torch.equal(dataset[(4, 2)][0], first)  # the next epoch draws anew
    torch.manual_seed(1)
    dataset[(3, 2)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left as it was


def test_mixer_shares_partner_and_lambda_across_views():
    torch.manual_seed(0)
    config = RecipeConfig(mixup_alpha=1.0)
    mix = build_batch_mixer(config, num_classes=3)
    views = torch.rand(6, 1, 3, 8, 8).repeat(1, 2, 1, 1, 1)  # identical twins
    mixed, targets = mix(views, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert torch.allclose(mixed[:, 0], mixed[:, 1])
    assert targets.shape == (6, 3) and torch.allclose(targets.sum(1), torch.ones(6))
    assert not torch.allclose(mixed, views)


def test_mixer_off_returns_one_hot():
    mix = build_batch_mixer(RecipeConfig(), num_classes=3)
    views = torch.rand(2, 1, 3, 8, 8)
    same, targets = mix(views, torch.tensor([2, 0]))
    assert same is views and targets.tolist() == [[0, 0, 1], [1, 0, 0]]


def test_on_the_cpu_images_keep_their_layout_and_no_autocast_runs():
    images = torch.zeros(2, 3, 4, 4)
    assert model_layout(images) is images
    assert isinstance(device_autocast(torch.device("cpu")), contextlib.nullcontext)
