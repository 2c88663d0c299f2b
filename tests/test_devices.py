"""A process computes on CUDA only when it holds a GPU: what Ray assigned, not what it sees.

No CUDA exists here, so the Ray tests check the decision's inputs as a real task reads them on
a node that advertises a (logical) GPU, and the decision for those inputs when told CUDA exists.
"""

import ray
import torch

from ar_ray.cluster import choose_device, ray_gpu_view


def test_outside_ray_cuda_is_used_wherever_it_exists():
    assert choose_device(cuda_available=True, in_ray_worker=False, gpu_ids=[]).type == "cuda"
    assert choose_device(cuda_available=False, in_ray_worker=False, gpu_ids=[]).type == "cpu"


def test_a_ray_worker_uses_cuda_only_with_gpus_assigned():
    assert choose_device(cuda_available=True, in_ray_worker=True, gpu_ids=[]).type == "cpu"
    assert choose_device(cuda_available=True, in_ray_worker=True, gpu_ids=["0"]).type == "cuda"
    assert choose_device(cuda_available=False, in_ray_worker=True, gpu_ids=["0"]).type == "cpu"


def told_cuda_exists(**resources):
    """A task that returns its `ray_gpu_view()` and the choice for it were CUDA present.
    Made inside a function so Ray ships it by value (workers cannot import test modules)."""

    def view_and_choice() -> tuple[tuple[bool, list[str]], torch.device]:
        view = ray_gpu_view()
        return view, choose_device(True, *view)

    return ray.remote(**resources)(view_and_choice)


def test_a_0_gpu_task_on_a_gpu_node_chooses_the_cpu(ray_cluster):
    assert ray.cluster_resources().get("GPU") == 1  # the node has a GPU the task could see
    view, device = ray.get(told_cuda_exists(num_gpus=0).remote())
    assert view == (True, [])
    assert device == torch.device("cpu")


def test_a_1_gpu_task_sees_its_id_and_chooses_cuda(ray_cluster):
    view, device = ray.get(told_cuda_exists(num_gpus=1).remote())
    assert view == (True, ["0"])
    assert device == torch.device("cuda")


def test_a_0_gpu_actor_chooses_the_cpu(ray_cluster):
    """Inference actors and Train workers are actors: the same view holds there."""

    @ray.remote(num_gpus=0)
    class Probe:
        def choice(self) -> tuple[tuple[bool, list[str]], torch.device]:
            view = ray_gpu_view()
            return view, choose_device(True, *view)

    view, device = ray.get(Probe.remote().choice.remote())
    assert view == (True, []) and device == torch.device("cpu")


def test_the_driver_is_outside_ray(ray_cluster):
    assert ray_gpu_view() == (False, [])


def test_a_cpu_fit_never_pins_memory_even_where_cuda_is_visible(monkeypatch, small_splits):
    """Pinning opens a CUDA context on GPU 0: only a fit that trains on CUDA may pin."""
    from ar_ray.config import RecipeConfig
    from ar_ray.recipe.engine import _Run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a 0-GPU process on a GPU node
    config = RecipeConfig(image_size=28, arch="resnet18", small_input=True, batch_size=8)
    run = _Run(config, small_splits, torch.device("cpu"), loader_workers=0, batch_augment=False)
    assert run.loader.pin_memory is False
