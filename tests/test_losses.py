"""The loss maths against definitions computed by hand or by naive loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from ar_ray.config import RunConfig
from ar_ray.recipe.augment import build_batch_mixer
from ar_ray.recipe.losses import (
    dominant_labels,
    nt_xent,
    soft_cross_entropy,
    supcon,
    symmetric_cross_entropy,
)


def test_sce_with_alpha_one_beta_zero_is_cross_entropy():
    logits, labels = torch.randn(16, 7), torch.randint(0, 7, (16,))
    got = symmetric_cross_entropy(logits, labels, alpha=1.0, beta=0.0)
    assert torch.allclose(got, F.cross_entropy(logits, labels), atol=1e-6)


def test_rce_matches_hand_computed_value():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    p = torch.softmax(logits, dim=1)[0]
    # label 0: log q = 0 for the true class and A for the others
    a = -3.0
    expected = -(p[1] * a + p[2] * a)
    got = symmetric_cross_entropy(logits, torch.tensor([0]), 0.0, 1.0, log_zero=a)
    assert math.isclose(got.item(), expected.item(), rel_tol=1e-5)


def test_sce_soft_targets_equal_hard_for_one_hot_and_mix_linearly_in_ce():
    logits, labels = torch.randn(8, 5), torch.randint(0, 5, (8,))
    one_hot = F.one_hot(labels, 5).float()
    hard = symmetric_cross_entropy(logits, labels, 0.7, 0.3)
    assert torch.allclose(symmetric_cross_entropy(logits, one_hot, 0.7, 0.3), hard, atol=1e-6)
    soft = 0.6 * one_hot + 0.4 * F.one_hot((labels + 1) % 5, 5).float()
    ce_soft = symmetric_cross_entropy(logits, soft, 1.0, 0.0)
    expected = 0.6 * F.cross_entropy(logits, labels) + 0.4 * F.cross_entropy(
        logits, (labels + 1) % 5
    )
    assert torch.allclose(ce_soft, expected, atol=1e-5)
    assert torch.allclose(soft_cross_entropy(logits, soft), ce_soft, atol=1e-6)


def naive_nt_xent(z1, z2, tau):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n, batch = len(z), len(z1)
    total = 0.0
    for i in range(n):
        twin = (i + batch) % n
        denominator = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[twin]) / tau) / denominator)
    return total / n


def test_nt_xent_equals_double_loop_reference():
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    assert math.isclose(nt_xent(z1, z2, 0.5).item(), naive_nt_xent(z1, z2, 0.5), rel_tol=1e-5)


def test_nt_xent_is_small_when_views_coincide_and_large_when_random():
    torch.manual_seed(0)
    z = torch.randn(32, 64) * 3
    same = nt_xent(z, z.clone(), 0.1).item()
    random = nt_xent(z, torch.randn(32, 64), 0.1).item()
    assert same < 0.05 < math.log(63) * 0.5 < random


def test_supcon_reduces_to_nt_xent_when_every_label_is_distinct():
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    labels = torch.arange(5)
    assert torch.allclose(supcon(z1, z2, labels, 0.3), nt_xent(z1, z2, 0.3), atol=1e-5)


def test_supcon_pulls_same_class_together():
    base = F.normalize(torch.randn(2, 16), dim=1)
    grouped = base[[0, 0, 1, 1]]
    labels = torch.tensor([0, 0, 1, 1])
    shuffled = labels[[0, 2, 1, 3]]
    assert supcon(grouped, grouped, labels, 0.1) < supcon(grouped, grouped, shuffled, 0.1)


@pytest.mark.parametrize("kind", ["mixup_alpha", "cutmix_alpha"])
def test_supcon_positive_class_is_what_most_of_the_mixed_pixels_show(kind):
    """Each sample is one-hot over channels, so a mixed sample's per-channel mean is the share
    of its pixels (CutMix) or intensity (MixUp) that came from each source image: the truth the
    positive label must follow, read from the pixels rather than from the mixer's targets."""
    labels = torch.tensor([3, 0, 2, 1])
    sources = torch.eye(4)[:, :, None, None].expand(4, 4, 15, 15)  # odd area: no exact halves
    views = torch.stack([sources, sources], dim=1)  # [B, V, C, H, W] as the engine mixes
    mix = build_batch_mixer(RunConfig(**{kind: 1.0}), num_classes=5)
    own_shares = []
    for seed in range(20):
        torch.manual_seed(seed)
        mixed, targets = mix(views, labels)
        shares = mixed[:, 0].mean(dim=(-2, -1))  # [sample, source]
        pixel_label = labels[shares.argmax(dim=1)]
        assert torch.equal(dominant_labels(targets), pixel_label)
        assert (targets.gather(1, pixel_label[:, None]) >= 0.5).all()
        own_shares += shares.diagonal().tolist()
    # real mixes on both sides of one half: some samples took their partner's class
    assert min(own_shares) < 0.45 and max(s for s in own_shares if s < 1) > 0.55
