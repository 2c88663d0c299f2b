"""The loss maths against definitions computed by hand or by naive loops."""

import inspect
import math
from pathlib import Path

import numpy as np
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
from ar_ray.search_space import load_search_space


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


def released_sce(logits, targets, alpha, beta):
    """SCE as the authors' released code computes it, written out in numpy (float64).

    YisenWang/symmetric_cross_entropy_for_noisy_labels (Keras) and its PyTorch reproduction
    HanxunH/SCELoss-Reproduce: `ce = CrossEntropy(logits, y)`, `p = clamp(softmax, 1e-7, 1)`,
    `rce = -sum(p * log(clamp(y, 1e-4, 1)))`, `alpha * mean(ce) + beta * mean(rce)`. `targets`
    are rows of a distribution (one-hot for a hard label), so the same formula covers the
    Mixup/CutMix targets the engine passes.
    """
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    shifted = x - x.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    ce = -(y * log_p).sum(axis=1)
    p = np.clip(np.exp(log_p), 1e-7, 1.0)
    rce = -(p * np.log(np.clip(y, 1e-4, 1.0))).sum(axis=1)
    return alpha * ce.mean() + beta * rce.mean()


RELEASED_WEIGHTS = [(0.1, 1.0), (6.0, 0.1), (1.0, 0.5)]  # CIFAR-10, CIFAR-100, ar-ray's


@pytest.mark.parametrize(("alpha", "beta"), RELEASED_WEIGHTS)
def test_sce_default_matches_the_released_code_on_hard_labels(alpha, beta):
    """Called as the engine calls it (the config's sce_log_zero), SCE is the released loss."""
    generator = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(16, 10, generator=generator)
    labels = torch.randint(0, 10, (16,), generator=generator)
    expected = released_sce(logits, np.eye(10)[labels.numpy()], alpha, beta)
    log_zero = RecipeConfig().sce_log_zero
    got = symmetric_cross_entropy(logits, labels, alpha, beta, log_zero).item()
    assert math.isclose(got, expected, rel_tol=1e-6)
    # ... and the function's own default is the config's, so no caller can get the other A
    assert symmetric_cross_entropy(logits, labels, alpha, beta).item() == got


def test_sce_default_log_zero_is_the_released_clamp():
    """A = ln 1e-4 (released code), not the paper text's -4: one value in both places."""
    assert RecipeConfig().sce_log_zero == math.log(1e-4)
    default = inspect.signature(symmetric_cross_entropy).parameters["log_zero"].default
    assert default == RecipeConfig().sce_log_zero


SPACES = sorted((Path(__file__).parent.parent / "search_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=lambda path: path.name)
def test_shipped_search_spaces_search_alpha_beta_with_the_released_log_zero(path):
    """The alpha/beta ranges sit around the released CIFAR-10 setting (0.1, 1.0), which was
    tuned with A = ln 1e-4: every shipped space fixes that A, and it is the default."""
    space = load_search_space(path)
    assert space.fixed["sce_log_zero"] == math.log(1e-4) == RecipeConfig().sce_log_zero
    alpha, beta = space.searched["sce_alpha"].values, space.searched["sce_beta"].values
    assert alpha[0] <= 0.1 <= alpha[1] and beta[0] <= 1.0 <= beta[1]


def test_sce_matches_the_released_formula_on_soft_targets():
    """Mixup/CutMix rows (two classes, lambda and 1 - lambda, zeros elsewhere) and a
    label-smoothed row: entries above 1e-4 enter the log unchanged, the zeros and an entry
    of 1e-5 are clamped to 1e-4, and CE is the expectation over the target."""
    generator = torch.Generator().manual_seed(5)
    logits = 2 * torch.randn(5, 6, generator=generator)
    targets = torch.zeros(5, 6)
    targets[0, [1, 4]] = torch.tensor([0.7, 0.3])
    targets[1, [0, 2]] = torch.tensor([0.5, 0.5])
    targets[2, [3, 5]] = torch.tensor([1 - 1e-5, 1e-5])  # 1e-5 sits below the clamp
    targets[3] = 0.02
    targets[3, 2] = 0.9  # label smoothing: every entry above the clamp
    targets[4, 5] = 1.0  # a one-hot row among them
    for alpha, beta in RELEASED_WEIGHTS:
        expected = released_sce(logits, targets, alpha, beta)
        got = symmetric_cross_entropy(logits, targets, alpha, beta, math.log(1e-4)).item()
        assert math.isclose(got, expected, rel_tol=1e-6), (alpha, beta)


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


def khosla_supcon(views, view_labels, temperature, base_temperature):
    """Khosla et al. (2020), eq. 2, one anchor at a time, in plain Python floats.

    `views` are the 2B projections (view 1 of every image, then view 2), `view_labels` the
    class each stands for. For anchor i, with A(i) every other view and P(i) those of its
    class: L_i = -(tau / base_tau) / |P(i)| * sum_{p in P(i)} log(exp(s_ip) / sum_{a in A(i)}
    exp(s_ia)), s = cosine / tau. The loss is the mean of L_i over the anchors with a
    positive (the reference code's `loss.view(anchor_count, batch_size).mean()`).
    """
    unit = []
    for v in views.tolist():
        norm = math.sqrt(sum(x * x for x in v))
        unit.append([x / norm for x in v])
    n, losses = len(unit), []
    for i in range(n):
        others = [a for a in range(n) if a != i]
        positives = [a for a in others if view_labels[a] == view_labels[i]]
        if not positives:
            continue
        sim = {
            a: sum(x * y for x, y in zip(unit[i], unit[a], strict=True)) / temperature
            for a in others
        }
        denominator = sum(math.exp(sim[a]) for a in others)
        mean_log_prob = sum(math.log(math.exp(sim[p]) / denominator) for p in positives)
        mean_log_prob /= len(positives)
        losses.append(-(temperature / base_temperature) * mean_log_prob)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
@pytest.mark.parametrize("variant", ["ntxent", "supcon"])
def test_contrastive_losses_equal_the_per_anchor_supcon_definition(variant, temperature):
    """Both CR variants against eq. 2 with base_temperature = temperature.

    SupCon's positives are the other views of the anchor's class; NT-Xent is SupCon whose
    only positive is the anchor's twin view (every image its own class). Classes are uneven
    (1 to 4 images: 1 to 7 positives per anchor) and projections are not unit length.
    Checked through the function itself and through `contrastive_regularization`, which
    the engine calls.
    """
    generator = torch.Generator().manual_seed(11)
    z1 = torch.randn(9, 6, generator=generator) * 2
    z2 = z1 + 0.5 * torch.randn(9, 6, generator=generator)  # twins closer than strangers
    labels = torch.tensor([0, 0, 1, 0, 2, 2, 0, 1, 3])
    if variant == "supcon":
        view_labels = labels.tolist() * 2
        direct = supcon(z1, z2, labels, temperature)
    else:
        view_labels = list(range(9)) * 2
        direct = nt_xent(z1, z2, temperature)
    expected = khosla_supcon(torch.cat([z1, z2]), view_labels, temperature, temperature)
    dispatched = contrastive_regularization(z1, z2, temperature, variant, labels)
    assert math.isclose(direct.item(), expected, rel_tol=1e-5)
    assert math.isclose(dispatched.item(), expected, rel_tol=1e-5)


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
