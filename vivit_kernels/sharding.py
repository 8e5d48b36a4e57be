"""``predict_to_file`` under torchrun: this process's rank, world and device, and its share of the inputs (every
world-th one). torch.distributed does the work: a process group (NCCL for GPUs, gloo for the CPU) started here when
torchrun started us and nobody else did, barriers between the phases, and the ranks' timings gathered at the end.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .timings import Timings

__all__ = ["rank_device", "start", "share", "barrier", "gather_timings"]


def start(device: torch.device) -> tuple[int, int]:
    """(rank, world): torch.distributed's when torchrun started us (initialised here if needed: NCCL for GPUs,
    gloo for the CPU), else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def rank_device(device: Any) -> torch.device:
    """The device this process runs on: under torchrun, a GPU of its own (cuda:LOCAL_RANK) unless one was named."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_device(device)
    return device


def share(items: list, rank: int, world: int) -> list:
    """Rank ``rank``'s share of ``items``: every world-th one, starting at its own index."""
    return [item for i, item in enumerate(items) if i % world == rank]


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def gather_timings(timings: Timings, world: int) -> Timings:
    """Every rank's timings summed (the wall time averaged), on every rank; this rank's own without torchrun."""
    if world <= 1:
        return timings
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, timings)
    total = Timings(*(sum(getattr(t, f) for t in gathered) for f in
                      ("videos", "failed", "wall_s", "waiting_s", "decode_s", "preprocess_s", "model_s")))
    total.wall_s /= world
    torch.distributed.barrier()
    return total
