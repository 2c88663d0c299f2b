"""The loss maths against definitions computed by hand or by naive loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from ar_ray.config import RecipeConfig
from ar_ray.recipe.augment import build_batch_mixer
from ar_ray.recipe.losses import (
    contrastive_regularization,
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


def test_supcon_with_several_positives_per_anchor_matches_the_hand_computed_value():
    """Images 0 and 1 share class 0 and point along e1; image 2 (class 1) along e2.

    Cosines are 1 within a class and 0 across. Anchors of class 0 have 3 positives (sim 1)
    and 2 negatives (sim 0): each positive's log-probability is 1/t - log(3 e^(1/t) + 2).
    Anchors of class 1 have 1 positive and 4 negatives: 1/t - log(e^(1/t) + 4). SupCon
    averages over positives, then over the 6 anchors (4 of class 0, 2 of class 1).
    """
    t = 0.5
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    views = torch.stack([e1, 2 * e1, 3 * e2])  # lengths differ: the loss normalises them
    class0 = -(1 / t - math.log(3 * math.exp(1 / t) + 2))
    class1 = -(1 / t - math.log(math.exp(1 / t) + 4))
    expected = (4 * class0 + 2 * class1) / 6
    got = supcon(views, views.clone(), torch.tensor([0, 0, 1]), t).item()
    assert math.isclose(got, expected, rel_tol=1e-6)


def naive_supcon(z1, z2, labels, tau):
    """Khosla et al. (2020), eq. 2, written as loops over anchors and positives."""
    z = F.normalize(torch.cat([z1, z2]), dim=1).tolist()
    label = labels.tolist() * 2
    n, total = len(z), 0.0
    for i in range(n):

        def sim(k, i=i):
            return sum(a * b for a, b in zip(z[i], z[k], strict=True)) / tau

        others = [k for k in range(n) if k != i]
        positives = [k for k in others if label[k] == label[i]]
        log_denominator = math.log(sum(math.exp(sim(k)) for k in others))
        total += -sum(sim(p) - log_denominator for p in positives) / len(positives)
    return total / n


def test_supcon_equals_the_loop_reference_with_uneven_classes():
    torch.manual_seed(1)
    z1, z2 = torch.randn(7, 5), torch.randn(7, 5)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 0])  # 1 to 7 positives per anchor
    got = supcon(z1, z2, labels, 0.2).item()
    assert math.isclose(got, naive_supcon(z1, z2, labels, 0.2), rel_tol=1e-5)


@pytest.mark.parametrize("variant", ["ntxent", "supcon"])
def test_contrastive_logits_stay_fp32_inside_bf16_autocast(variant):
    """The training step runs under bf16 autocast; the similarity logits must not.

    Nearly parallel projections at temperature 0.05: bf16 rounding of their cosines moves
    the loss far more than 1e-5, so this fails if the matrix product is autocast.
    """
    torch.manual_seed(0)
    base = torch.randn(16, 32)
    z1, z2 = base + 0.3 * torch.randn(16, 32), base + 0.3 * torch.randn(16, 32)
    labels = torch.arange(16) % 4
    full = contrastive_regularization(z1, z2, 0.05, variant, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = contrastive_regularization(z1, z2, 0.05, variant, labels)
    assert autocast.dtype == torch.float32
    assert torch.allclose(autocast, full, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", ["mixup_alpha", "cutmix_alpha"])
def test_supcon_positive_class_is_what_most_of_the_mixed_pixels_show(kind):
    """Each sample is one-hot over channels, so a mixed sample's per-channel mean is the share
    of its pixels (CutMix) or intensity (MixUp) that came from each source image: the truth the
    positive label must follow, read from the pixels rather than from the mixer's targets."""
    labels = torch.tensor([3, 0, 2, 1])
    sources = torch.eye(4)[:, :, None, None].expand(4, 4, 15, 15)  # odd area: no exact halves
    views = torch.stack([sources, sources], dim=1)  # [B, V, C, H, W] as the engine mixes
    mix = build_batch_mixer(RecipeConfig(**{kind: 1.0}), num_classes=5)
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
