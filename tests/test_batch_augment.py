"""The batched device augmentation draws from the same distributions as the per-image path.

Run on CPU tensors. Crops, flips and erasing are read back from the pixels of an image that
encodes its own coordinates; policy ops are counted where both paths apply them (the v2
op). Tolerances are several standard errors wide at a fixed seed, far below what a wrong
implementation (one crop per batch, another op set, no sign flips) would give.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest
import torch

from ar_ray.config import RunConfig
from ar_ray.recipe.augment import build_train_transform
from ar_ray.recipe.batch_augment import BatchAugment

STORED, OUT = 64, 32


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of tiny ops: a second intra-op thread only spins on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def coordinate_image() -> torch.Tensor:
    """Channel 0 = 4x + 2, channel 1 = 4y + 2, channel 2 = 128: never 0, so erasing shows."""
    ramp = torch.arange(STORED) * 4 + 2
    return torch.stack(
        [ramp.expand(STORED, STORED), ramp.view(-1, 1).expand(STORED, STORED)]
        + [torch.full((STORED, STORED), 128)]
    ).to(torch.uint8)


def per_image(config: RunConfig, count: int) -> torch.Tensor:
    torch.manual_seed(0)
    transform = build_train_transform(config)
    image = coordinate_image()
    return torch.stack([transform(image) for _ in range(count)])


def batched(config: RunConfig, count: int, batch: int = 250) -> torch.Tensor:
    augment = BatchAugment(config, views=1)
    generator = torch.Generator().manual_seed(0)
    images = coordinate_image().expand(batch, -1, -1, -1)
    return torch.cat([augment(images, generator)[:, 0] for _ in range(count // batch)])


def measurements(out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image: erased?, flipped?, crop area fraction and log aspect of the stored box."""
    kept = out[:, 2] != 0
    erased = ~kept.all(dim=(1, 2))
    x = (out[:, 0].float() - 2) / 4
    y = (out[:, 1].float() - 2) / 4

    def extent(values: torch.Tensor) -> torch.Tensor:
        high = torch.where(kept, values, -1e9).amax(dim=(1, 2))
        low = torch.where(kept, values, 1e9).amin(dim=(1, 2))
        return high - low + 1

    width, height = extent(x), extent(y)
    rows = kept[:, :, 0] & kept[:, :, -1]
    flipped = ((x[:, :, 0] - x[:, :, -1]) * rows).sum(dim=1) > 0
    erased_share = (~kept).float().mean(dim=(1, 2))
    return {
        "erased": erased.float(),
        "flipped": flipped.float(),
        "area": width * height / STORED**2,
        "log_aspect": (width / height).log(),
        "erased_share": erased_share[erased],
    }


def test_crops_flips_and_erasing_match_the_per_image_distributions():
    config = RunConfig(image_size=OUT, rrc_scale_min=0.25, erasing_p=0.3)
    reference, candidate = (
        measurements(per_image(config, 1500)),
        measurements(batched(config, 1500)),
    )
    for key in ("erased", "flipped"):
        assert abs(candidate[key].mean() - reference[key].mean()) < 0.06, key
    assert abs(candidate["flipped"].mean() - 0.5) < 0.05
    assert abs(candidate["erased"].mean() - 0.3) < 0.05
    for key in ("area", "log_aspect", "erased_share"):
        assert abs(candidate[key].mean() - reference[key].mean()) < 0.03, key
        ratio = candidate[key].std() / reference[key].std()
        assert 0.8 < ratio < 1.25, (key, ratio)
    first_batch = batched(config, 250)
    boxes = {tuple(row.flatten().tolist()) for row in first_batch[:, :2, :, 0]}
    assert len(boxes) > 0.9 * len(first_batch)  # every image its own crop


def record_ops(policy: torch.nn.Module) -> list[tuple[str, float, int]]:
    """Spy on the v2 op both paths call: (op, magnitude, images it was applied to)."""
    calls: list[tuple[str, float, int]] = []
    apply = policy._apply_image_or_video_transform

    def recording(image, transform_id, magnitude, **kwargs):
        calls.append((transform_id, magnitude, 1 if image.ndim == 3 else len(image)))
        return apply(image, transform_id, magnitude, **kwargs)

    policy._apply_image_or_video_transform = recording
    return calls


def op_statistics(calls: list[tuple[str, float, int]], draws: int):
    """Frequency of each applied op per draw, its mean |magnitude|, and the share negative."""
    counts: Counter[str] = Counter()
    magnitude: defaultdict[str, float] = defaultdict(float)
    negative = signed = 0
    for op, value, images in calls:
        if op == "Identity":
            continue
        counts[op] += images
        magnitude[op] += abs(value) * images
        signed += images if value != 0 else 0
        negative += images if value < 0 else 0
    frequencies = {op: count / draws for op, count in counts.items()}
    means = {op: magnitude[op] / counts[op] for op in counts}
    return frequencies, means, negative / max(signed, 1)


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment", "autoaugment"])
def test_policy_ops_match_the_per_image_distribution(policy):
    count = 500
    config = RunConfig(image_size=24, policy=policy, hflip=False, erasing_p=0.0)
    slots = {"randaugment": 2, "trivialaugment": 1, "autoaugment": 2}[policy]
    transform = build_train_transform(config)
    reference_calls = record_ops(transform.transforms[-1])
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    for _ in range(count):
        transform(image)
    augment = BatchAugment(config, views=1)
    candidate_calls = record_ops(augment.policy.policy)
    generator = torch.Generator().manual_seed(0)
    for _ in range(count // 250):
        augment(image.expand(250, -1, -1, -1), generator)
    reference = op_statistics(reference_calls, count * slots)
    candidate = op_statistics(candidate_calls, count * slots)
    assert set(candidate[0]) == set(reference[0])
    for op, frequency in reference[0].items():
        assert abs(candidate[0][op] - frequency) < 0.04, op
        assert abs(candidate[1][op] - reference[1][op]) <= 0.25 * reference[1][op] + 0.5, op
    assert abs(candidate[2] - reference[2]) < 0.08


def test_views_are_independent_draws_in_the_loaders_layout():
    config = RunConfig(image_size=OUT, policy="randaugment")
    augment = BatchAugment(config, views=2)
    images = coordinate_image().expand(8, -1, -1, -1)
    views = augment(images, torch.Generator().manual_seed(1))
    assert views.shape == (8, 2, 3, OUT, OUT) and views.dtype == torch.uint8
    assert not torch.equal(views[:, 0], views[:, 1])
