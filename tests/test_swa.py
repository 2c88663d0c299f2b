"""SWA in a real fit with Mean Teacher: the served model is the hand-made average of the
student's last two epoch-end checkpoints, with BatchNorm statistics of its own, and a run
resumed inside the averaging window ends on the same model."""

import io
import math

import pytest
import torch

from ar_ray.config import RecipeConfig
from ar_ray.recipe.checkpoint import inference_model, load_checkpoint, save_checkpoint
from ar_ray.recipe.engine import evaluate, fit
from ar_ray.recipe.models import ARNet


def _copy(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.fixture(scope="module")
def swa_run(small_splits, module_tmp):
    """3 epochs, SWA over the last 2, Mean Teacher from epoch 1; every epoch's checkpoint."""
    tiny = small_splits.limit_per_class(3)
    config = RecipeConfig(
        epochs=3, swa_epochs=2, batch_size=8, mt_weight=1.0, mt_start_epoch=1, seed=2
    )
    folder = module_tmp
    states = {}

    def keep(metrics, state):
        states[metrics["epoch"]] = _copy(state)
        save_checkpoint(state, folder / f"epoch{metrics['epoch']}.pt")

    result = fit(config, tiny, on_epoch=keep)
    return config, tiny, states, result, folder


def test_swa_is_the_average_of_the_last_two_students(swa_run):
    config, tiny, states, result, _ = swa_run
    assert states[1]["swa"] is None  # the window is epochs 2 and 3
    assert [states[e]["swa"]["count"] for e in (2, 3)] == [1, 2]
    final = states[3]["swa"]["module"]
    names = [name for name, _ in ARNet(config, tiny.num_classes).named_parameters()]
    assert names
    for name in names:
        by_hand = (states[2]["model"][name] + states[3]["model"][name]) / 2
        torch.testing.assert_close(final[name], by_hand, rtol=1e-5, atol=1e-6)
    # the student was averaged, not the teacher (an average of the teacher's differs)
    teacher = {e: states[e]["teacher"]["module"] for e in (2, 3)}
    assert any(
        not torch.allclose(final[name], (teacher[2][name] + teacher[3][name]) / 2) for name in names
    )


def test_batchnorm_statistics_are_recomputed_over_the_training_images(swa_run):
    config, tiny, states, _, _ = swa_run
    final = states[3]["swa"]["module"]
    means = [key for key in final if key.endswith("running_mean")]
    assert means
    batches = math.ceil(len(tiny.train) / config.batch_size)  # one un-augmented pass
    for key in means:
        tracked = key.replace("running_mean", "num_batches_tracked")
        assert int(final[tracked]) == batches, key
        for other in (states[2]["model"], states[3]["model"], states[3]["teacher"]["module"]):
            assert not torch.allclose(final[key], other[key]), key
            variance = key.replace("running_mean", "running_var")
            assert not torch.allclose(final[variance], other[variance]), variance


def test_the_average_is_evaluated_checkpointed_and_served(swa_run):
    config, tiny, states, result, folder = swa_run
    served = inference_model(load_checkpoint(folder / "epoch3.pt"))
    for key, value in served.state_dict().items():
        assert torch.equal(value, states[3]["swa"]["module"][key]), key
    for key, value in result.model.state_dict().items():
        assert torch.equal(value, states[3]["swa"]["module"][key]), key
    scores = evaluate(served, tiny.val, config.image_size, "center")
    assert result.history[-1]["val_top1"] == scores["top1"]
    assert result.history[-1]["val_nll"] == pytest.approx(scores["nll"])
    # inside the window the average's statistics are stale: the teacher is still served
    middle = inference_model(states[2])
    for key, value in middle.state_dict().items():
        assert torch.equal(value, states[2]["teacher"]["module"][key]), key


def test_a_run_resumed_inside_the_window_ends_on_the_same_average(swa_run):
    config, tiny, states, _, folder = swa_run
    resumed = fit(config, tiny, resume_from=load_checkpoint(folder / "epoch2.pt"))
    assert resumed.state["swa"]["count"] == 2
    for key, value in states[3]["swa"]["module"].items():
        assert torch.equal(value, resumed.state["swa"]["module"][key]), key
