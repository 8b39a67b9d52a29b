"""The oracle sharded across processes: ``sharded_search`` and ``sharded_pattern_losses``.

Under ``torchrun --nproc_per_node N`` each rank searches a contiguous share of the batch's
sequences (every sequence's search is independent of the others': patterns, budgets and the
prefix tree are per sequence; the one exception, the beam of the paper's token oracle, which
ranks prefixes over the whole batch, is refused), then the shares are gathered in rank
order, so the result has the batch's own order and equals a single process's. Every rank
must hold the same model (e.g. loaded from one checkpoint) and call with the same
arguments. In one process (no ``WORLD_SIZE``) these are ``duollm.oracle.search`` and
``pattern_losses`` themselves.

The process group is joined on the first call (gloo for a CPU model, NCCL for CUDA) unless
the caller already joined it, and stays joined until the process exits. Scale by running::

    torchrun --nproc_per_node 8 my_oracle_script.py   # which calls sharded_search
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional

import torch

from .. import distributed
from ..oracle import OracleResult, PatternTable, pattern_losses, search


def device_of(model) -> str:
    """"cuda" or "cpu": where the model (a module or a ``RoutedStack``) runs."""
    from ..stack import RoutedStack

    if isinstance(model, RoutedStack):
        device = model.device
    else:
        device = next(iter(model.parameters()), torch.empty(0)).device
    return "cuda" if torch.device(device).type == "cuda" else "cpu"


def _local_args(info: distributed.DistInfo, tokens: torch.Tensor, base):
    """This rank's rows of ``tokens`` (and of a per-token ``base``), and their range."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError("tokens: expected a (B, T) integer tensor")
    rows = distributed.shard_range(info, tokens.shape[0])
    sl = slice(rows.start, rows.stop)
    if isinstance(base, torch.Tensor) and base.dim() == 3:  # (L, B, T) context routes
        if base.shape[1] != tokens.shape[0]:
            raise ValueError(f"base: routes of shape {tuple(base.shape)} do not cover the "
                             f"batch of {tokens.shape[0]} sequences")
        base = base[:, sl]
    return tokens[sl], base, rows


def _to_cpu(obj):
    """``obj`` (an OracleResult or PatternTable) with its tensors on the CPU, for pickling;
    the model reference stays behind (every rank has its own)."""
    if obj is None:
        return None
    changes = {f.name: getattr(obj, f.name).cpu() for f in dataclasses.fields(obj)
               if isinstance(getattr(obj, f.name), torch.Tensor) and f.name != "base"}
    if any(f.name == "model" for f in dataclasses.fields(obj)):
        changes["model"] = None
    return dataclasses.replace(obj, **changes)


def sharded_search(model, tokens: torch.Tensor, budget, granularity: str = "sequence",
                   method: str = "exhaustive", skip: bool = False, base="big",
                   **kwargs) -> OracleResult:
    """``duollm.oracle.search`` with the batch's sequences shared among the ``torchrun`` ranks.

    Arguments as ``search`` (``base`` given as (L, B, T) routes is split with the batch).
    Returns on every rank the whole batch's ``OracleResult`` (``routes`` (L, B, T) and
    ``loss`` (B,) or (B, T-1), on the CPU, in the batch's order); ``elapsed_s`` is the
    slowest rank's wall time and ``patterns_evaluated`` one sequence share's count (each
    share walks the same patterns, as one process walks them once for the whole batch).
    """
    if method in ("beam", "greedy") and granularity == "token" and isinstance(base, str) \
            and base == "pattern":
        # That beam keeps the prefixes that are best for the most positions of the whole
        # batch: sequences are not independent, and a share of them would keep other ones.
        raise ValueError("method: the beam of the paper's token oracle (base='pattern') "
                         "ranks prefixes over the whole batch, so sharding its sequences "
                         "would change the result; use method='exhaustive', or "
                         "duollm.oracle.search in one process")
    info = distributed.join(device_of(model))
    if not info.enabled:
        return search(model, tokens, budget, granularity, method, skip, base, **kwargs)
    t0 = time.perf_counter()
    local_tokens, local_base, rows = _local_args(info, tokens, base)
    kwargs["progress"] = kwargs.get("progress", False) and info.is_main
    local = (search(model, local_tokens, budget, granularity, method, skip, local_base,
                    **kwargs) if len(rows) else None)
    parts = distributed.gather_objects(info, (_to_cpu(local), time.perf_counter() - t0))
    done = [p for p, _ in parts if p is not None]
    elapsed = max(t for _, t in parts)
    first = done[0]
    return dataclasses.replace(
        first, routes=torch.cat([p.routes for p in done], dim=1),
        loss=torch.cat([p.loss for p in done], dim=0),
        patterns_evaluated=max(p.patterns_evaluated for p in done), elapsed_s=elapsed,
        patterns_per_s=max(p.patterns_evaluated for p in done) / max(elapsed, 1e-9),
        base=base if first.base is not None else None)


def sharded_pattern_losses(model, tokens: torch.Tensor, granularity: str = "sequence",
                           skip: bool = False, base="big", **kwargs) -> PatternTable:
    """``duollm.oracle.pattern_losses`` with the sequences shared among the ranks.

    Returns on every rank the whole batch's ``PatternTable`` (``losses`` (n, B, T-1), CPU),
    whose ``.select(budget)`` gives any budget's oracle as one process's table does.
    """
    info = distributed.join(device_of(model))
    if not info.enabled:
        return pattern_losses(model, tokens, granularity, skip, base, **kwargs)
    t0 = time.perf_counter()
    local_tokens, local_base, rows = _local_args(info, tokens, base)
    kwargs["progress"] = kwargs.get("progress", False) and info.is_main
    local = (pattern_losses(model, local_tokens, granularity, skip, local_base, **kwargs)
             if len(rows) else None)
    parts = distributed.gather_objects(info, (_to_cpu(local), time.perf_counter() - t0))
    stack = None if local is None else local.model
    done = [p for p, _ in parts if p is not None]
    first = done[0]
    for p in done[1:]:
        if not torch.equal(p.patterns, first.patterns):  # the same walk on every share
            raise RuntimeError("ranks walked different patterns: are the models and "
                               "arguments the same on every rank?")
    base_routes: Optional[torch.Tensor] = None
    if first.base_routes is not None:
        base_routes = torch.cat([p.base_routes for p in done], dim=1)
    if stack is None:  # this rank had no sequences: rebuild the model reference locally
        from ..stack import as_stack
        stack = as_stack(model)
    return dataclasses.replace(
        first, losses=torch.cat([p.losses for p in done], dim=1), base_routes=base_routes,
        elapsed_s=max(t for _, t in parts), model=stack,
        base=base if first.base is not None and not isinstance(first.base, str)
        else first.base)


def once_across_ranks(fn):
    """Decorator: under ``torchrun`` (a process group joined, world size > 1) rank 0 alone
    runs ``fn`` and every other rank receives its result (``torch.save``'d, loaded onto the
    rank's own device), so work that every rank would repeat identically (router training,
    the beam/greedy comparison) runs once. Without a process group it simply calls ``fn``.
    Every rank must call it, in the same order."""
    import functools
    import io

    import torch.distributed as dist

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return fn(*args, **kwargs)
        payload = [None]
        if dist.get_rank() == 0:
            out = fn(*args, **kwargs)
            buf = io.BytesIO()
            torch.save(out, buf)
            payload = [buf.getvalue()]
        dist.broadcast_object_list(payload, src=0)
        if dist.get_rank() == 0:
            return out
        device = (f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl"
                  else "cpu")
        return torch.load(io.BytesIO(payload[0]), map_location=device, weights_only=False)

    return wrapper


def sharded_selected_losses(model, tokens: torch.Tensor, budgets, granularity: str = "sequence",
                            skip: bool = False, base="big", **kwargs):
    """``[pattern_losses(model, tokens, ...).select(b).loss for b in budgets]`` with the
    sequences shared among the ``torchrun`` ranks: each rank walks and keeps only its share's
    table, and only the selected losses (one (B, ...) tensor per budget, CPU, batch order) are
    gathered, so no rank holds the whole table. Equal to one process's (selection is per
    sequence and position)."""
    info = distributed.join(device_of(model))
    if not info.enabled:
        tab = pattern_losses(model, tokens, granularity, skip, base, **kwargs)
        return [tab.select(b).loss.cpu() for b in budgets]
    local_tokens, local_base, rows = _local_args(info, tokens, base)
    kwargs["progress"] = kwargs.get("progress", False) and info.is_main
    local = None
    if len(rows):
        tab = pattern_losses(model, local_tokens, granularity, skip, local_base, **kwargs)
        local = [tab.select(b).loss.cpu() for b in budgets]
        del tab
    done = [p for p in distributed.gather_objects(info, local) if p is not None]
    return [torch.cat([p[i] for p in done], dim=0) for i in range(len(budgets))]
