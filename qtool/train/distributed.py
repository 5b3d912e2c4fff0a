"""Data-parallel training on PyTorch's own engine.

``torchrun`` (or ``qtool quantize --nproc N``, which calls torchrun's launcher) starts one
process per worker and sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; this module joins them with
``torch.distributed`` (gloo on CPU, nccl on GPU) and wraps the model in
``DistributedDataParallel``, which averages gradients inside every ``backward()``.

How a data-parallel run stays equal to a single process with the same global batch:

- every rank draws the same seeded global batch and trains on its slice of it
  (``DomainBatchSampler(rank, world_size)``), so the averaged gradient is the global-batch one;
- both passes of a SAM-family step run ``backward()`` through DDP, so the perturbation and the
  update direction (and GAQAT's statistics, which read them) are computed from all-reduced
  gradients: every rank perturbs, decides and steps identically;
- BatchNorm normalises with the statistics of the global batch (``qtool.train.sync_batchnorm``);
- lazily initialised state (LSQ step sizes, activation signs) is decided on the whole first
  global batch before DDP wraps the model (``Trainer``), and DDP's constructor copies rank 0's
  parameters and buffers to every rank;
- evaluation splits each domain over the ranks and sums integer counts, so model selection sees
  the same accuracies everywhere.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from qtool.errors import QtoolError
from qtool.launch import launched_by_torchrun

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class World:
    """The processes of one run. ``World()`` is a single process on the CPU."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0 writes every file (checkpoints, cache, report) and shows progress."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over all ranks (in place; the same bits on every rank)."""
        if self.is_distributed:
            dist.all_reduce(tensor)
        return tensor

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank: for decisions that read the filesystem, so that a
        file appearing between two ranks' checks cannot send them down different paths."""
        if not self.is_distributed:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def shard(self, count: int) -> torch.Tensor:
        """This rank's share of ``range(count)`` (interleaved, so shares differ by at most one)."""
        return torch.arange(self.rank, count, self.size)

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` under DDP, or ``model`` itself for a single process.

        DDP copies rank 0's parameters and buffers to every rank once, here. It does not re-send
        buffers before each forward pass (``forward_sync_buffers=False``): every buffer already
        evolves identically on all ranks (BatchNorm statistics are global, LSQ flags are set
        before wrapping), so that would only cost time, twice per SAM step."""
        if not self.is_distributed:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # 1x1 conv weights in channels_last have strides that differ from DDP's bucket views only
        # in size-1 dimensions (the same memory order); DDP warns about it, harmlessly.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name not in DEVICES:
        raise QtoolError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    cuda = torch.cuda.is_available()
    if name == "cuda" and not cuda:
        raise QtoolError("--device cuda: no CUDA device is available to this process")
    if name == "cpu" or not cuda:
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


@contextmanager
def joined_world(device: str = "auto") -> Iterator[World]:
    """The ``World`` torchrun started this process in (one process when not under torchrun).

    Joins the process group on entry and leaves it on exit. A process group someone else
    already created (a notebook, a test harness) is used as it is and left open."""
    size = int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = resolve_device(device, local_rank)
    if size == 1:
        yield World(device=target)
        return
    if target.type == "cuda":
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", size))
        if per_node > torch.cuda.device_count():
            raise QtoolError(f"{per_node} processes per machine but {torch.cuda.device_count()} GPU(s): "
                             "start one process per GPU, or train on the CPU with --device cpu")
        torch.cuda.set_device(target)
    owner = not dist.is_initialized()
    if owner:
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
    try:
        yield World(dist.get_rank(), dist.get_world_size(), target)
        if owner:  # leave together: a rank that tears gloo down while rank 0 still writes can abort at exit
            dist.barrier()
    finally:
        if owner:
            dist.destroy_process_group()


def replicas_agree(model: nn.Module, world: World) -> bool:
    """Whether every rank holds the same weights (a cheap fingerprint, compared at each
    model-selection point: DDP keeps replicas equal only while every rank computes identically)."""
    if not world.is_distributed:
        return True
    with torch.no_grad():
        fingerprint = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(world.device)
    lowest, highest = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    dist.all_reduce(highest, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lowest, highest))
