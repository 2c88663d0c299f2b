"""Mean Teacher: an EMA copy of the student whose tempered predictions become soft labels."""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from ar_ray.recipe.losses import as_distribution


class EmaTeacher:
    """Exponential moving average of a student's parameters and floating-point buffers.

    The decay warms up as `min(1 - 1/(step+1), decay)` so the first updates follow the
    student closely instead of averaging in the random (or stage-one) starting point.
    """

    def __init__(self, student: nn.Module, decay: float) -> None:
        self.decay = decay
        self.step = 0
        self.module = copy.deepcopy(student).eval()
        self.module.requires_grad_(False)

    def current_decay(self) -> float:
        return min(1.0 - 1.0 / (self.step + 1), self.decay)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """One EMA step over every tensor at once: a ResNet-50 has ~320 parameters and
        buffers, and one `_foreach` call per kind replaces as many kernel launches each."""
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_(
            list(self.module.parameters()), [p.detach() for p in student.parameters()], weight
        )
        mine, theirs = self.module.buffers(), student.buffers()
        pairs = list(zip(mine, theirs, strict=True))
        floats = [(m, t) for m, t in pairs if m.dtype.is_floating_point]
        counters = [(m, t) for m, t in pairs if not m.dtype.is_floating_point]
        if floats:
            torch._foreach_lerp_([m for m, _ in floats], [t for _, t in floats], weight)
        if counters:  # BatchNorm's num_batches_tracked: copied, an average means nothing
            torch._foreach_copy_([m for m, _ in counters], [t for _, t in counters])
        self.step += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.step = int(state["step"])


@torch.no_grad()
def soft_pseudo_labels(
    teacher_logits: Tensor, targets: Tensor, temperature: float, mix: float
) -> Tensor:
    """Mix the teacher's tempered probabilities with the (hard or soft) ground truth.

    Pure teacher labels drift with its mistakes; pure ground truth ignores what the teacher
    learned about class similarity. `mix` is the teacher's share.
    """
    teacher = torch.softmax(teacher_logits / temperature, dim=1)
    truth = as_distribution(targets, teacher_logits.shape[1])
    return mix * teacher + (1.0 - mix) * truth


def rampup(epoch_progress: float, rampup_epochs: float) -> float:
    """Sigmoid ramp-up of Laine & Aila / Tarvainen & Valpola: exp(-5 (1 - t)^2)."""
    if rampup_epochs <= 0:
        return 1.0
    t = min(max(epoch_progress / rampup_epochs, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)
