"""The EMA teacher formula, its warm-up, and the soft pseudo labels."""

import math

import torch
from torch import nn

from ar_ray.recipe.teacher import EmaTeacher, rampup, soft_pseudo_labels


def test_ema_update_follows_warmup_formula_for_params_and_buffers():
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    teacher = EmaTeacher(student, decay=0.9)
    before = [p.clone() for p in teacher.module.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.fill_(2.0)
    teacher.update(student)  # step 0: decay min(0, 0.9) = 0 -> copies the student
    for mine, theirs in zip(teacher.module.parameters(), student.parameters(), strict=True):
        assert torch.allclose(mine, theirs)
    assert torch.allclose(teacher.module[1].running_mean, torch.full((2,), 2.0))
    for _ in range(20):
        teacher.update(student)  # warm-up until the decay cap is hit
    assert teacher.current_decay() == 0.9
    snapshot = [p.clone() for p in teacher.module.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.update(student)
    pairs = zip(snapshot, teacher.module.parameters(), student.parameters(), strict=True)
    for old, new, theirs in pairs:
        assert torch.allclose(new, 0.9 * old + 0.1 * theirs, atol=1e-6)
    after = teacher.module.parameters()
    assert not any(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert teacher.module[1].num_batches_tracked == student[1].num_batches_tracked


def test_warmup_decay_sequence():
    teacher = EmaTeacher(nn.Linear(1, 1), decay=0.999)
    decays = []
    for _ in range(4):
        decays.append(teacher.current_decay())
        teacher.update(nn.Linear(1, 1))
    assert decays == [0.0, 0.5, 1 - 1 / 3, 0.75]


def test_soft_pseudo_labels_mix_teacher_and_truth():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    labels = soft_pseudo_labels(logits, torch.tensor([0]), temperature=1.0, mix=0.5)
    assert torch.allclose(labels, torch.tensor([[0.5 * 0.25 + 0.5, 0.5 * 0.75]]))
    assert torch.allclose(labels.sum(1), torch.ones(1))


def test_rampup_goes_from_small_to_one():
    assert rampup(0.0, 5) == math.exp(-5)
    assert rampup(5.0, 5) == 1.0 == rampup(9.0, 5) == rampup(0.0, 0)
