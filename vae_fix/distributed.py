"""Data-parallel training across processes started by `torchrun` (NCCL on GPUs, gloo on CPUs).

Every rank draws the same full batch from the same seeded generator and keeps its own slice, and
gradients are averaged over ranks after each backward pass. A loss whose normalisers (counts,
variances) are summed over ranks with `all_sum` then has exactly the gradient of the full batch, so
N processes give the weights one process gives (up to float rounding), and a run can be checked on
CPU with two gloo processes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import InputError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def my_slice(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's share of a full batch `[B, ...]` (B divisible by the world size)."""
        if batch.shape[0] % self.size:
            raise InputError("--batch", f"{batch.shape[0]} crops do not split over {self.size} processes",
                             f"a multiple of {self.size}")
        n = batch.shape[0] // self.size
        return batch[self.rank * n:(self.rank + 1) * n]

    def average_gradients(self, params) -> None:
        if self.size == 1:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.size

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over ranks (differentiable only on this rank's share: use it for counts and
        normalisers, which carry no gradient)."""
        if self.size == 1:
            return t
        import torch.distributed as dist

        t = t.detach().clone()
        dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist
            dist.barrier()


def world_from_env(device: str) -> tuple[World, str]:
    """(the world `torchrun` set up in the environment, this rank's device). One process: (World(), device)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(rank, size), (f"cuda:{local}" if cuda else device)


def leave(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
