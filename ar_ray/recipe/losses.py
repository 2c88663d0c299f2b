"""Attract (SCE), repulse (contrastive regularisation) and Mean Teacher consistency losses."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ar_ray.config import SCE_LOG_ZERO


def as_distribution(targets: Tensor, num_classes: int) -> Tensor:
    """Hard labels become one-hot rows so every loss below handles Mixup/teacher targets too."""
    if targets.dtype in (torch.int64, torch.int32):
        return F.one_hot(targets.long(), num_classes).float()
    return targets.float()


def symmetric_cross_entropy(
    logits: Tensor, targets: Tensor, alpha: float, beta: float, log_zero: float = SCE_LOG_ZERO
) -> Tensor:
    """SCE (Wang et al. 2019): `alpha * CE + beta * RCE`, mean over the batch.

    RCE swaps prediction and label, `-sum_k p_k log q_k`; `log 0` is undefined, so the label
    is clamped from below at `exp(log_zero)` (A; the released code's 1e-4 by default), which
    leaves one-hot labels at exactly `log 1 = 0` and `A` and lets soft labels through
    unchanged above that floor. As in the released code's PyTorch reproduction, CE is taken
    on the logits; unlike it, the softmax in RCE is not clamped at 1e-7 (a class below 1e-7
    moves RCE by less than 1e-7 * |A| per class).
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
    """Cosine similarities of all 2B projections with the self-pairs masked out, in fp32.

    Autocast would run `z @ z.T` in bf16, whose 8-bit mantissa rounds a cosine near 1 by up
    to 0.004; divided by a temperature of 0.05-0.2 that is a logit error of up to 0.08, on
    the very terms that separate a twin from its negatives. The matrix is 2B x 2B, small
    next to the backbone, so it is computed in fp32 whatever the surrounding autocast says.
    """
    with torch.autocast(z1.device.type, enabled=False):
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
        logits = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    return logits.masked_fill(self_mask, float("-inf")), self_mask


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """NT-Xent / InfoNCE (SimCLR): each view must find its twin among the other 2B-2 images.

    This is the 'repulse' force: instances push apart even within a class.
    """
    logits, _ = _pairwise_logits(z1, z2, temperature)
    batch = len(z1)
    twin = torch.arange(2 * batch, device=z1.device).roll(batch)  # made where it is used
    return F.cross_entropy(logits, twin)


def supcon(z1: Tensor, z2: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020): same-class views attract too."""
    logits, self_mask = _pairwise_logits(z1, z2, temperature)
    all_labels = torch.cat([labels, labels])
    positives = (all_labels[:, None] == all_labels[None, :]) & ~self_mask
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    log_prob = log_prob.masked_fill(~positives, 0.0)
    return -(log_prob.sum(dim=1) / positives.sum(dim=1)).mean()


def dominant_labels(soft_targets: Tensor) -> Tensor:
    """The class a (possibly mixed) sample stands for when SupCon picks its positives.

    Mixup and CutMix blend two classes with weights lambda and 1 - lambda, so one of them
    always carries weight >= 0.5: that dominant class is the sample's positive class, whichever
    of the two images it started as. A CutMix image whose pasted box covers more than half of
    it therefore counts as its partner's class, because that is what most of its pixels show.
    An exact 0.5 tie goes to the lower class index (`argmax` keeps the first maximum).
    """
    return soft_targets.argmax(dim=1)


class _GatherWithGradient(torch.autograd.Function):  # pragma: no mutate block, DDP only
    """`all_gather` along dim 0 whose backward sums every worker's gradient for this
    worker's rows (an all-reduce, then this worker's slice).

    Written out rather than `torch.distributed.nn.functional.all_gather` because torch 2.14
    deprecates that (FutureWarning) in favour of a private module; `all_gather` and
    `all_reduce` are public and run on gloo and nccl alike.
    """

    @staticmethod
    def forward(ctx, local: Tensor) -> Tensor:
        ctx.rows = len(local)
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()  # all_reduce works in place; autograd owns `grad`
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_across_workers(local: Tensor) -> Tensor:
    """This worker's rows -> every worker's rows, rank-major; unchanged outside DDP.

    Every worker must pass the same number of rows (the train loader drops the last partial
    batch and `DistributedSampler` gives every rank as many samples).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    return _GatherWithGradient.apply(local)


def contrastive_regularization(
    z1: Tensor, z2: Tensor, temperature: float, variant: str, labels: Tensor
) -> Tensor:
    """The CR term of `L = SCE + lambda_cr * CR`; `variant` chooses instance or class positives.

    Under data parallelism the term is the loss of the global batch, so a member trains the
    objective its 1-worker trial was tuned on: view 1 and view 2 are gathered separately,
    rank-major, so row i of the first still has its twin at row i of the second, and every
    worker computes the same full loss over all 2N projections (negatives and SupCon
    positives from every worker; labels carry no gradient).

    Why no scaling: every worker holds the whole loss L, and the gather's backward sums the
    W workers' gradients for a worker's rows, so that worker's projections receive
    W * dL/dz. DDP then averages the parameter gradients over the W workers, which divides
    by W again: the averaged gradient is exactly dL/dtheta of one process on the whole batch,
    and the loss value is the whole batch's too (as the local-mean SCE term's is, on average).
    Computing all 2N x 2N similarities on every worker duplicates a small matrix product in
    exchange for that exact value.
    """
    if variant not in ("ntxent", "supcon"):
        raise ValueError(f"unknown contrastive variant {variant!r}")
    z1, z2 = gather_across_workers(z1), gather_across_workers(z2)
    if variant == "ntxent":
        return nt_xent(z1, z2, temperature)
    return supcon(z1, z2, gather_across_workers(labels), temperature)
