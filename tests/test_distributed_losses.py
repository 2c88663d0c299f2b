"""Contrastive regularisation under DDP: two gloo workers train the 1-process objective.

Each worker holds half of one fixed batch and a Linear projection wrapped in
DistributedDataParallel, as a member with `--workers-per-member 2` does. Their loss and
their DDP-averaged gradients must equal one process's on the whole batch; the same halves
without gathering must not, so the comparison can tell the two apart.
"""

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ar_ray.recipe.losses import contrastive_regularization, nt_xent, supcon

WORLD = 2
TEMPERATURE = 0.5
VARIANTS = ("ntxent", "supcon")


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two views of 8 inputs; labels repeat across the halves so SupCon positives span both
    workers."""
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randn(2, 8, 6, generator=generator)
    labels = torch.tensor([0, 1, 2, 0, 1, 0, 2, 1])
    return first, second, labels


def fresh_projection() -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(6, 4)


def step(model: nn.Module, first, second, labels, variant: str, gather: bool):
    """One forward over both views (view-major, as the engine batches them) and a backward."""
    first_z, second_z = model(torch.cat([first, second])).chunk(2)
    if gather:
        loss = contrastive_regularization(first_z, second_z, TEMPERATURE, variant, labels)
    elif variant == "ntxent":
        loss = nt_xent(first_z, second_z, TEMPERATURE)
    else:
        loss = supcon(first_z, second_z, labels, TEMPERATURE)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def worker(rank: int, port: int, results: Path) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        first, second, labels = fixed_batch()
        half = slice(rank * 4, (rank + 1) * 4)
        out = {}
        for variant in VARIANTS:
            for gather in (True, False):
                model = DistributedDataParallel(fresh_projection())
                out[variant, gather] = step(
                    model, first[half], second[half], labels[half], variant, gather
                )
        torch.save(out, results / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_split_batch_loss_and_gradients_equal_the_whole_batch(tmp_path):
    first, second, labels = fixed_batch()
    expected = {
        variant: step(fresh_projection(), first, second, labels, variant, gather=True)
        for variant in VARIANTS
    }
    mp.spawn(worker, args=(free_port(), tmp_path), nprocs=WORLD)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]

    for variant in VARIANTS:
        want_loss, want_grads = expected[variant]
        for rank in range(WORLD):
            loss, grads = results[rank][variant, True]
            assert torch.allclose(loss, want_loss, atol=1e-6), (variant, rank)
            for got, want in zip(grads, want_grads, strict=True):
                assert torch.allclose(got, want, atol=1e-6), (variant, rank)
            # without the gather each worker sees only its own negatives and positives
            local_loss, local_grads = results[rank][variant, False]
            assert not torch.allclose(local_loss, want_loss, atol=1e-3), (variant, rank)
            assert not torch.allclose(local_grads[0], want_grads[0], atol=1e-3), (variant, rank)
