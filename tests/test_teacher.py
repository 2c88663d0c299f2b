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
        for _ in range(3):  # three training-mode forwards: num_batches_tracked becomes 3
            student(torch.randn(4, 3))
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
    # the integer counter is copied, not averaged nor left at the teacher's starting 0
    assert teacher.module[1].num_batches_tracked.item() == 3
    assert teacher.module[1].num_batches_tracked.dtype == torch.long


def test_the_teacher_takes_no_gradients_and_leaves_the_student_trainable():
    student = nn.Linear(2, 2)
    teacher = EmaTeacher(student, decay=0.9)
    assert not any(p.requires_grad for p in teacher.module.parameters())
    assert all(p.requires_grad for p in student.parameters())
    assert not teacher.module.training


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


def test_soft_pseudo_labels_temper_the_teacher():
    """At T = 2 the teacher's odds 1 : 3 become 1 : sqrt(3), so the labels differ from T = 1."""
    logits = torch.tensor([[0.0, math.log(3.0)]])
    labels = soft_pseudo_labels(logits, torch.tensor([0]), temperature=2.0, mix=0.5)
    high = math.sqrt(3.0) / (1.0 + math.sqrt(3.0))  # about 0.634, not 0.75
    expected = torch.tensor([[0.5 * (1.0 - high) + 0.5, 0.5 * high]])
    assert torch.allclose(labels, expected, atol=1e-6), labels


def test_rampup_goes_from_small_to_one():
    assert rampup(0.0, 5) == math.exp(-5)
    assert rampup(5.0, 5) == 1.0 == rampup(9.0, 5) == rampup(0.0, 0)


def test_rampup_follows_the_squared_exponent_inside_the_ramp():
    """exp(-5 (1 - t)^2) at interior points, worked out by hand: t = 0.5 gives
    exp(-1.25) (exp(-2.5) without the square), t = 0.2 gives exp(-3.2), t = 0.8 exp(-0.2)."""
    assert math.isclose(rampup(2.5, 5), math.exp(-1.25), rel_tol=1e-12)
    assert math.isclose(rampup(1.0, 5), math.exp(-3.2), rel_tol=1e-12)
    assert math.isclose(rampup(4.0, 5), math.exp(-0.2), rel_tol=1e-12)
    assert math.isclose(rampup(-1.0, 5), math.exp(-5), rel_tol=1e-12)  # clamped below
    assert math.isclose(rampup(0.25, 0.5), math.exp(-1.25), rel_tol=1e-12)  # a sub-epoch ramp


def test_state_dict_round_trip_restores_weights_and_warmup_step():
    teacher = EmaTeacher(nn.Linear(2, 2), decay=0.9)
    for _ in range(3):
        teacher.update(nn.Linear(2, 2))
    state = teacher.state_dict()
    assert set(state) == {"module", "step"} and state["step"] == 3
    restored = EmaTeacher(nn.Linear(2, 2), decay=0.9)
    restored.load_state_dict({"module": state["module"], "step": 3.0})  # as read back, a float
    assert restored.step == 3 and isinstance(restored.step, int)
    assert restored.current_decay() == 0.75  # min(1 - 1/4, 0.9): the warm-up resumes
    for mine, theirs in zip(restored.module.parameters(), teacher.module.parameters(), strict=True):
        assert torch.equal(mine, theirs)
