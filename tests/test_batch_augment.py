"""The batched device augmentation draws from the same distributions as the per-image path.

Run on CPU tensors. Crops, flips and erasing are read back from the pixels of an image that
encodes its own coordinates; policy draws (op, magnitude, sign) are compared with those the
per-image v2 policy makes, and the batched ops are checked image by image against the v2
op on the same image. Tolerances are several standard errors wide at a fixed seed, far
below what a wrong implementation (one crop per batch, another op set, no sign flips, a
constant magnitude) would give; each test was seen to fail on such a break.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ar_ray.config import RecipeConfig
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


def per_image(config: RecipeConfig, count: int) -> torch.Tensor:
    torch.manual_seed(0)
    transform = build_train_transform(config)
    image = coordinate_image()
    return torch.stack([transform(image) for _ in range(count)])


def batched(config: RecipeConfig, count: int, batch: int = 250) -> torch.Tensor:
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
    config = RecipeConfig(image_size=OUT, rrc_scale_min=0.25, erasing_p=0.3)
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


def record_draws(policy: torch.nn.Module) -> list[tuple[str, float]]:
    """Spy on the per-image policy's op calls: (op, magnitude) as its forward drew them.

    The op itself is skipped (the image comes back as it is): only the draws are compared
    here, so thousands of them cost seconds. Applying them is the next test's business.
    """
    calls: list[tuple[str, float]] = []

    def recording(image, transform_id, magnitude, **kwargs):
        calls.append((transform_id, magnitude))
        return image

    policy._apply_image_or_video_transform = recording
    return calls


def op_statistics(ops: list[str], magnitudes: torch.Tensor, draws: int) -> dict[str, dict]:
    """Per applied op: its share of the draws (`trials`), mean and variance of |magnitude|
    and count `n`; under key "sign", the share negative of the signed draws (magnitude != 0)."""
    stats: dict[str, dict] = {}
    for op in sorted(set(ops) - {"Identity"}):
        values = magnitudes[torch.tensor([name == op for name in ops])].abs()
        stats[op] = {
            "share": len(values) / draws,
            "trials": draws,
            "mean": values.mean().item(),
            "var": values.var().item() if len(values) > 1 else 0.0,
            "n": len(values),
        }
    signed = magnitudes[magnitudes != 0]
    stats["sign"] = {"share": (signed < 0).float().mean().item(), "trials": len(signed)}
    return stats


SLOTS = {"randaugment": 2, "trivialaugment": 1, "autoaugment": 2}


def reference_draws(config: RecipeConfig, count: int) -> tuple[list[str], torch.Tensor]:
    policy = build_train_transform(config).transforms[-1]
    calls = record_draws(policy)
    torch.manual_seed(0)
    image = torch.zeros(3, OUT, OUT, dtype=torch.uint8)
    for _ in range(count):
        policy(image)
    return [op for op, _ in calls], torch.tensor([m for _, m in calls], dtype=torch.float64)


def candidate_draws(config: RecipeConfig, count: int) -> tuple[list[str], torch.Tensor]:
    policy = BatchAugment(config, views=1).policy
    slots = policy.draw(count, OUT, torch.Generator().manual_seed(0))
    ops = [policy.ops[index] for index in torch.cat([op for op, _ in slots]).tolist()]
    return ops, torch.cat([magnitude for _, magnitude in slots])


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment", "autoaugment"])
def test_policy_draws_match_the_per_image_distribution(policy):
    """Each op's share, mean |magnitude| and the sign share agree within 5 standard errors.

    At these counts that is about 10% of a mean |magnitude| drawn over bins (TrivialAugment)
    and exact for fixed magnitudes (RandAugment's), so a constant magnitude, a lost sign
    flip or a wrong table fails.
    """
    config = RecipeConfig(image_size=OUT, policy=policy, hflip=False, erasing_p=0.0)
    reference_count, candidate_count = 8000, 40000
    reference = op_statistics(
        *reference_draws(config, reference_count), reference_count * SLOTS[policy]
    )
    candidate = op_statistics(
        *candidate_draws(config, candidate_count), candidate_count * SLOTS[policy]
    )
    assert set(candidate) == set(reference)
    for op, ref in reference.items():
        got = candidate[op]
        variance = ref["share"] * (1 - ref["share"])
        share_error = (variance / ref["trials"] + variance / got["trials"]) ** 0.5
        assert abs(got["share"] - ref["share"]) <= 5 * share_error + 1e-9, op
        if op != "sign":
            error = (ref["var"] / ref["n"] + got["var"] / got["n"]) ** 0.5
            assert abs(got["mean"] - ref["mean"]) <= 5 * error + 1e-6, (op, got, ref)


def known_draws(policy, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every op of the policy at five of its magnitudes, both signs, in a shuffled order;
    rotations by exactly +-90 and 0 degrees too (v2 takes shortcuts for those)."""
    table, ops, magnitudes = policy.table(size), [], []
    generator = torch.Generator().manual_seed(1)
    for index, op in enumerate(policy.ops):
        bins = torch.randint(policy.num_bins, (4,), generator=generator).tolist()
        for bin_ in [*bins, policy.num_bins - 1]:
            for sign in (1, -1) if policy.signed[index] else (1,):
                ops.append(index)
                magnitudes.append(sign * table[index, bin_].item())
        if op == "Rotate":
            ops += [index] * 3
            magnitudes += [90.0, -90.0, 0.0]
    shuffle = torch.randperm(len(ops), generator=generator)
    return torch.tensor(ops)[shuffle], torch.tensor(magnitudes, dtype=torch.float64)[shuffle]


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment", "autoaugment"])
def test_each_image_gets_exactly_the_per_image_op_result(policy):
    """Known ops and magnitudes on distinct images, one batch: every output row equals the
    per-image v2 op on the same input row, bit for bit (the batched maths replicates v2's
    float32 arithmetic, fused multiply-adds included, and samples the same grid)."""
    config = RecipeConfig(image_size=OUT, policy=policy)
    batched_policy = BatchAugment(config, views=1).policy
    reference = batched_policy.policy  # the per-image pipeline's own v2 module
    ops, magnitudes = known_draws(batched_policy, OUT)
    images = torch.randint(
        0,
        256,
        (len(ops), 3, OUT, OUT),
        generator=torch.Generator().manual_seed(2),
        dtype=torch.uint8,
    )
    plan = batched_policy.plan((ops, magnitudes), OUT)
    out = batched_policy.apply(images, plan, plan.params)
    assert batched_policy.op_calls == len(plan.groups) <= 1 + len(batched_policy.ops) - 5
    for row, (index, magnitude) in enumerate(zip(ops.tolist(), magnitudes.tolist(), strict=True)):
        op = batched_policy.ops[index]
        expected = reference._apply_image_or_video_transform(
            images[row], op, magnitude, interpolation=reference.interpolation, fill=reference._fill
        )
        assert torch.equal(out[row], expected), (row, op, magnitude)


def test_trivialaugment_makes_at_most_16_op_calls_per_view_at_batch_128():
    augment = BatchAugment(RecipeConfig(image_size=OUT, policy="trivialaugment"), views=2)
    images = torch.randint(0, 256, (128, 3, STORED, STORED), dtype=torch.uint8)
    augment(images, torch.Generator().manual_seed(0))
    assert 0 < augment.policy.op_calls <= 2 * 16


def test_views_are_independent_draws_in_the_loaders_layout():
    config = RecipeConfig(image_size=OUT, policy="randaugment")
    augment = BatchAugment(config, views=2)
    images = coordinate_image().expand(8, -1, -1, -1)
    views = augment(images, torch.Generator().manual_seed(1))
    assert views.shape == (8, 2, 3, OUT, OUT) and views.dtype == torch.uint8
    assert not torch.equal(views[:, 0], views[:, 1])


class CrossDeviceOps(TorchDispatchMode):
    """Records every op whose tensors sit on more than one device (a host-device copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [arg for arg in (*args, out) if isinstance(arg, torch.Tensor)]
        if len({tensor.device for tensor in tensors}) > 1:
            self.ops.append(str(func))
        return out


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment", "autoaugment"])
def test_a_view_copies_to_the_device_once_and_reads_nothing_back(policy):
    """On the meta device tensors have no data: any read back to the host (.item(),
    .tolist(), nonzero, a shape that depends on values) raises, so a batch that augments
    there never waits for a GPU; and each view crosses to the device in exactly one copy
    (`.to(device)` of a CPU tensor shows up here; `torch.tensor(list, device=...)` would
    not, as it copies below the dispatcher, so the module builds none)."""
    augment = BatchAugment(RecipeConfig(image_size=OUT, policy=policy, erasing_p=0.25), views=2)
    images = torch.empty(16, 3, STORED, STORED, dtype=torch.uint8, device="meta")
    with CrossDeviceOps() as mode:
        views = augment(images, torch.Generator().manual_seed(0))
    assert views.shape == (16, 2, 3, OUT, OUT) and views.device.type == "meta"
    assert mode.ops == ["aten._to_copy.default"] * 2
