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


# --------------------------------------------------------------------------- FSDP2


def fsdp_shard(model: torch.nn.Module, info: DistInfo, units=None) -> torch.nn.Module:
    """Shard ``model``'s parameters across the ranks with FSDP2 (``fully_shard``), in place.

    Each of ``units`` (default: ``model.layers``, the decoder blocks) becomes its own FSDP
    group, gathered just before its forward and freed after it, so a rank holds one block's
    full weights at a time plus its 1/N share of the rest; the root (embeddings, final norm,
    a tied head) is the last group. Tied parameters must live in one group (they do here: the
    root). Call it before building the optimizer: the parameters become ``DTensor`` shards.
    A single process (``info.enabled`` false) has nothing to shard; ``model`` is returned as is.
    """
    if not info.enabled:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import warnings

    # A block's output is a view (the routed FFN reshapes), which FSDP2 warns about in case
    # the caller modifies it in place; DuoLLM never does (h = block(h) is out of place), and
    # the two-rank tests compare every gradient step with one process.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view",
                            category=UserWarning)
    mesh = init_device_mesh(torch.device(info.device).type, (info.world_size,))
    for unit in (model.layers if units is None else units):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_fsdp(model: torch.nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def fsdp_full_state(model: torch.nn.Module, optimizer=None, rank0_only: bool = True):
    """Full (unsharded) model and optimizer state dicts of an FSDP2 model; a collective.

    Every rank must call it. With ``rank0_only`` the tensors are gathered to the CPU of rank 0
    and the other ranks get empty dicts (for saving); otherwise every rank gets all of them
    on its device (for handing back a whole model). The optimizer's state is keyed by
    parameter name (``torch.distributed.checkpoint``'s format), not by index.
    Returns: ``(model_state, optimizer_state or None)``.
    """
    from torch.distributed.checkpoint import state_dict as dcp

    opts = dcp.StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    msd = dcp.get_model_state_dict(model, options=opts)
    osd = None if optimizer is None else dcp.get_optimizer_state_dict(model, optimizer,
                                                                      options=opts)
    return msd, osd


def fsdp_load_optimizer(model: torch.nn.Module, optimizer, state_by_name) -> None:
    """Load a full, name-keyed optimizer state (as ``fsdp_full_state`` gives) into the
    sharded ``optimizer`` of ``model``; every rank passes the whole state."""
    from torch.distributed.checkpoint import state_dict as dcp

    dcp.set_optimizer_state_dict(model, optimizer, optim_state_dict=state_by_name,
                                 options=dcp.StateDictOptions(full_state_dict=True))


# --------------------------------------------------------------------------- sharding work


def shard_range(info: DistInfo, n: int) -> range:
    """The items ``0..n-1`` this rank handles: contiguous shares, sizes differing by at most
    one (the first ``n % world_size`` ranks take one more); empty when ``n < world_size``
    leaves a rank nothing."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    per, extra = divmod(n, info.world_size)
    start = info.rank * per + min(info.rank, extra)
    return range(start, start + per + (1 if info.rank < extra else 0))


def gather_objects(info: DistInfo, obj) -> list:
    """``obj`` of every rank, in rank order, on every rank (``[obj]`` in one process).

    Objects travel pickled; tensors inside should be on the CPU (a CUDA tensor would be
    rebuilt on the receiving rank's GPU of the same index).
    """
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def join(device: str = "cpu") -> DistInfo:
    """Like ``init``, but the process group, once joined, stays joined until the process
    exits (then it is left): for helpers called many times in one ``torchrun`` process,
    since leaving and re-joining a group between calls is not reliable with gloo."""
    info = init(device)
    if info.owns_group:
        import atexit

        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
        info = DistInfo(info.rank, info.world_size, info.local_rank, info.device, False)
    return info
