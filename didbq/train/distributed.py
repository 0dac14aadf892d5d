"""Data parallelism via torchrun: one process per rank, gloo on CPU, nccl on CUDA; only rank 0 writes."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over ranks (the value itself in a single process)."""
        if not self.active:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world


def setup(device: str | None = None) -> Distributed:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = torch.cuda.is_available() if device in (None, "auto") else device.startswith("cuda")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    else:
        chosen = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Distributed(rank, world, chosen)


def teardown(context: Distributed) -> None:
    if context.active and dist.is_initialized():
        dist.destroy_process_group()
