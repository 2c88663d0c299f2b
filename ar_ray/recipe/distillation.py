"""Knowledge distillation (Hinton et al. 2015): a student learns a teacher's tempered answer.

The teacher here is a saved weighted ensemble, run online on the student's own augmented
batch (Beyer et al. 2022: teacher and student see the same crop, so the student is asked to
match the teacher everywhere it is shown, not only at the centre crop). Engine-agnostic: the
engine only calls the objective `distillation_objective` returns (`engine.Objective`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ar_ray.ensemble_weights import log_combine
from ar_ray.recipe.augment import device_autocast
from ar_ray.recipe.engine import Objective


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """`T^2 * KL(softmax(teacher / T) || softmax(student / T))`, averaged over the batch.

    The KL runs teacher -> student (the teacher's distribution is the target), in fp32
    whatever autocast produced: bf16 log-probabilities of near-zero classes are too coarse.
    T^2 keeps the gradient's size independent of T (Hinton et al., section 2).
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(student, teacher, reduction="batchmean", log_target=True)
    return temperature**2 * kl


class EnsembleTeacher(nn.Module):
    """A saved ensemble as one frozen model: float [0, 1] images -> the ensemble's logits.

    Its "logits" are the ensemble's log-probabilities, from the formula `combine` uses
    (`ensemble_weights.log_combine`), so softmax of them is the ensemble's prediction for
    that crop.
    """

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float], temperature: float):
        super().__init__()
        self.members = nn.ModuleList(members).eval().requires_grad_(False)
        total = float(sum(weights))
        self.register_buffer("weights", torch.tensor([w / total for w in weights]))
        self.temperature = float(temperature)

    def train(self, mode: bool = True) -> EnsembleTeacher:
        """Always in eval mode: the teacher's BatchNorm statistics must never move."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        with device_autocast(images.device):
            probs = [torch.softmax(member(images).float(), dim=1) for member in self.members]
        return log_combine(torch.stack(probs), self.weights.float(), self.temperature)


def distillation_objective(
    teacher: nn.Module, temperature: float, label_weight: float
) -> Objective:
    """(student input, student logits, the recipe's supervised loss) -> the distillation
    loss, plus `label_weight` times the supervised loss when it is above 0."""

    def objective(images: Tensor, logits: Tensor, supervised: Tensor) -> Tensor:
        loss = kd_loss(logits, teacher(images), temperature)
        return loss + label_weight * supervised if label_weight > 0 else loss

    return objective
