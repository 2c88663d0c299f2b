"""Attract (SCE), repulse (contrastive regularisation) and Mean Teacher consistency losses."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def as_distribution(targets: Tensor, num_classes: int) -> Tensor:
    """Hard labels become one-hot rows so every loss below handles Mixup/teacher targets too."""
    if targets.dtype in (torch.int64, torch.int32):
        return F.one_hot(targets.long(), num_classes).float()
    return targets.float()


def symmetric_cross_entropy(
    logits: Tensor, targets: Tensor, alpha: float, beta: float, log_zero: float = -4.0
) -> Tensor:
    """SCE (Wang et al. 2019): `alpha * CE + beta * RCE`, mean over the batch.

    RCE swaps prediction and label, `-sum_k p_k log q_k`; `log 0` is undefined, so the label
    is clamped from below at `exp(log_zero)` (the paper's A = -4), which leaves one-hot labels
    at exactly `log 1 = 0` and `A` and lets soft labels through unchanged above that floor.
    """
    q = as_distribution(targets, logits.shape[1])
    log_p = F.log_softmax(logits, dim=1)
    ce = -(q * log_p).sum(dim=1)
    p = log_p.exp()
    rce = -(p * q.clamp(min=math.exp(log_zero)).log()).sum(dim=1)
    return (alpha * ce + beta * rce).mean()


def soft_cross_entropy(logits: Tensor, soft_targets: Tensor) -> Tensor:
    """Cross entropy against a distribution: the Mean Teacher pull toward pseudo labels."""
    return -(soft_targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _pairwise_logits(z1: Tensor, z2: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Cosine similarities of all 2B projections with the self-pairs masked out."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    return logits.masked_fill(self_mask, float("-inf")), self_mask


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """NT-Xent / InfoNCE (SimCLR): each view must find its twin among the other 2B-2 images.

    This is the 'repulse' force: instances push apart even within a class.
    """
    logits, _ = _pairwise_logits(z1, z2, temperature)
    batch = len(z1)
    twin = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)]).to(z1.device)
    return F.cross_entropy(logits, twin)


def supcon(z1: Tensor, z2: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020): same-class views attract too."""
    logits, self_mask = _pairwise_logits(z1, z2, temperature)
    all_labels = torch.cat([labels, labels])
    positives = (all_labels[:, None] == all_labels[None, :]) & ~self_mask
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    log_prob = log_prob.masked_fill(~positives, 0.0)
    return -(log_prob.sum(dim=1) / positives.sum(dim=1)).mean()


def contrastive_regularization(
    z1: Tensor, z2: Tensor, temperature: float, variant: str, labels: Tensor
) -> Tensor:
    """The CR term of `L = SCE + lambda_cr * CR`; `variant` chooses instance or class positives."""
    if variant == "ntxent":
        return nt_xent(z1, z2, temperature)
    if variant == "supcon":
        return supcon(z1, z2, labels, temperature)
    raise ValueError(f"unknown contrastive variant {variant!r}")
