"""Data-parallel rank information for `ctp-train` (accelerate launch / torchrun), and its collectives."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    device: object
    rank: int = 0
    world: int = 1

    def agree(self, signum: int | None) -> int | None:
        """All ranks stop at the same step if any of them got a signal (else the others would hang)."""
        if self.world == 1:
            return signum
        import torch

        flag = torch.tensor([signum or 0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def gather_objects(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (a collective: all ranks must call it)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def distributed(device: str) -> Dist:
    """Rank info. Under `accelerate launch` / torchrun (WORLD_SIZE > 1) join the process group those launchers
    describe in the environment: NCCL with one GPU per LOCAL_RANK, else gloo on CPU. (accelerate's
    PartialState reports a single process for a CPU-only torchrun, so we read torch.distributed directly.)"""
    import torch
    import torch.distributed as tdist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cuda = torch.cuda.is_available() and device != "cpu"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not tdist.is_initialized():
            tdist.init_process_group("nccl" if cuda else "gloo")
        dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        return Dist(dev, tdist.get_rank(), tdist.get_world_size())
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Dist(torch.device(device))
