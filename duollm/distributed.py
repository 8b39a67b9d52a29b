"""Data-parallel helpers: set up ``torch.distributed`` from the ``torchrun`` environment.

``torchrun --nproc_per_node N -m duollm train ...`` sets ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK`` and the rendezvous variables; ``init()`` reads them and joins the process group
(gloo on the CPU, NCCL on CUDA). A single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``)
needs no process group and every helper here is then a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    owns_group: bool = False  # init() created the process group (and shutdown() ends it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE: expected an int, got {value!r}") from None


def init(device: str = "cpu") -> DistInfo:
    """Join the process group described by the environment, if ``WORLD_SIZE > 1``.

    Args:
      device: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL; each rank takes GPU ``LOCAL_RANK``).
    Returns: this process's ``DistInfo``; its ``device`` is the one the rank should use.
    """
    world = env_world_size()
    if world <= 1:
        return DistInfo(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    is_cuda = torch.device(device).type == "cuda"
    if is_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    owns = not dist.is_initialized()  # a caller may have joined already (and keeps it)
    if owns:
        dist.init_process_group(backend="nccl" if is_cuda else "gloo")
    if dist.get_world_size() != world:
        raise RuntimeError(f"process group has {dist.get_world_size()} ranks, WORLD_SIZE "
                           f"says {world}")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device,
                    owns_group=owns)


def shutdown(info: DistInfo) -> None:
    """Leave the process group if ``init`` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def rank_slice(info: DistInfo, global_batch: int) -> slice:
    """The rows of a global batch this rank trains on (equal contiguous shares)."""
    if global_batch % info.world_size:
        raise ValueError(f"batch_size: the global batch {global_batch} must divide evenly "
                         f"across {info.world_size} ranks")
    per = global_batch // info.world_size
    return slice(info.rank * per, (info.rank + 1) * per)


def mean_across(info: DistInfo, value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over all ranks (the value itself in one process)."""
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def wrap(model: torch.nn.Module, info: DistInfo,
         find_unused_parameters: bool = False) -> torch.nn.Module:
    """``model`` under ``DistributedDataParallel`` when distributed, else unchanged."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.local_rank] if torch.device(info.device).type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters)
