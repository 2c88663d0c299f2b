"""The learning rate of every optimiser step in a real fit: one warm-up-and-cosine schedule,
or `lr_cycles` cosine cycles with warm restarts (SGDR), each worked out here by hand."""

import math

import pytest
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ar_ray.config import ConfigError, RecipeConfig, cycle_ends
from ar_ray.recipe.engine import fit, lr_factor


def _step_rates(config, splits):
    """(the rate each optimiser step of a real fit used, the fit's history)."""
    rates = []

    def record(optimizer, args, kwargs):
        rates.append(optimizer.param_groups[0]["lr"])

    handle = register_optimizer_step_pre_hook(record)
    try:
        result = fit(config, splits)
    finally:
        handle.remove()
    assert len(rates) % config.epochs == 0
    return rates, result.history


def _old_factor(step, warmup, total):
    """The schedule before cycles existed, copied as it was."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@pytest.fixture(scope="module")
def tiny(small_splits):
    return small_splits.limit_per_class(3)  # 30 images: 7 steps of 4 per epoch


def test_two_cycles_restart_at_full_rate_and_decay_to_zero_at_each_end(tiny):
    """5 epochs in 2 cycles end at epochs 2 and 5 (floor(k * 5 / 2)); only the first warms
    up (1.5 epochs); each decays on a cosine that reaches 0 where its cycle ends."""
    config = RecipeConfig(epochs=5, lr_cycles=2, warmup_epochs=1.5, batch_size=4, lr=0.01)
    rates, history = _step_rates(config, tiny)
    per_epoch = len(rates) // 5
    warmup = round(1.5 * per_epoch)
    first_end = 2 * per_epoch

    def expected(step):
        if step < warmup:
            return (step + 1) / warmup
        if step < first_end:
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (first_end - warmup)))
        return 0.5 * (1 + math.cos(math.pi * (step - first_end) / (5 * per_epoch - first_end)))

    assert rates == pytest.approx([0.01 * expected(step) for step in range(len(rates))])
    assert rates[first_end] == pytest.approx(0.01)  # the restart: full rate, no warm-up
    decaying = rates[warmup:first_end]
    assert decaying == sorted(decaying, reverse=True) and decaying[-1] < 0.01 / 4
    # the rate after each epoch's last step: 0 at the run's end, full at the restart
    assert [m["lr"] for m in history][1] == pytest.approx(0.01)
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_one_cycle_is_the_old_schedule_to_the_bit(tiny):
    config = RecipeConfig(epochs=3, warmup_epochs=1.0, batch_size=8, lr=0.01)
    rates, _ = _step_rates(config, tiny)
    per_epoch = len(rates) // 3
    assert rates == [0.01 * _old_factor(s, per_epoch, 3 * per_epoch) for s in range(len(rates))]
    for warmup, total in [(0, 7), (3, 10), (10, 10), (12, 10), (1, 1)]:
        for step in range(total + 2):
            assert lr_factor(step, warmup, total) == _old_factor(step, warmup, total)


def test_cycle_ends_and_their_validation():
    assert cycle_ends(8, 1) == [8]
    assert cycle_ends(8, 3) == [2, 5, 8]
    assert cycle_ends(4, 4) == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="lr_cycles=5 must be in"):
        RecipeConfig(epochs=4, lr_cycles=5)
    with pytest.raises(ConfigError, match="lr_cycles=0 must be in"):
        RecipeConfig(lr_cycles=0)
    with pytest.raises(ConfigError, match="warmup_epochs=1.0 must be shorter"):
        RecipeConfig(epochs=4, lr_cycles=4, warmup_epochs=1.0)
    for swa in (-1, 4):
        with pytest.raises(ConfigError, match=f"swa_epochs={swa} must be in"):
            RecipeConfig(epochs=4, swa_epochs=swa)
