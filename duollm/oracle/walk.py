"""The exhaustive walk over the layer tree (``pattern_losses``) and ``search``."""
from __future__ import annotations

import time
from typing import List, Optional

import torch

from ..reference import SKIP
from ..stack import as_stack
from .beam import pattern_beam, unit_beam
from .budgets import Budget, all_patterns, as_budget, route_choices, spec_of
from .results import OracleResult, PatternTable
from .runner import Runner


def _is_pattern_base(base) -> bool:
    return isinstance(base, str) and base == "pattern"


def _prepare(model, tokens, granularity, method, skip, paths, base):
    """Checks every argument before any work; returns (stack, tokens, choices, mode)."""
    stack = as_stack(model)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] < 2 \
            or tokens.dtype.is_floating_point:
        raise ValueError("tokens: expected a (B, T) integer tensor with T >= 2")
    if granularity not in ("sequence", "token"):
        raise ValueError(f"granularity: expected 'sequence' or 'token', got {granularity!r}")
    if method not in ("exhaustive", "beam", "greedy"):
        raise ValueError(f"method: expected 'exhaustive', 'beam' or 'greedy', got {method!r}")
    choices = route_choices(skip, paths)
    if SKIP in choices and not stack.skip:
        what = "skip=True" if paths is None else f"paths {paths!r} (with SKIP)"
        raise ValueError(f"{what} needs a model whose config has skip=True")
    if callable(base) and not isinstance(base, torch.Tensor):
        raise TypeError("base: expected 'pattern', a policy name, a (n_layers,) pattern or "
                        "(n_layers, B, T) routes, not a router")
    if isinstance(base, str) and base not in ("pattern", "big", "small", "skip", "random"):
        raise ValueError(f"base: expected 'pattern', 'big', 'small', 'skip', 'random', a "
                         f"pattern or routes, got {base!r}")
    mode = "rows" if granularity == "sequence" or _is_pattern_base(base) else "context"
    return stack, tokens.to(stack.device, torch.int64), choices, mode


@torch.no_grad()
def pattern_losses(model, tokens: torch.Tensor, granularity: str = "sequence",
                   skip: bool = False, base="big", budget: Budget = None,
                   max_elems: int = 1 << 24, progress: bool = False,
                   paths=None) -> PatternTable:
    """Exhaustive walk: the per-position loss of every pattern meeting ``budget`` (None: all).

    Args:
      model: a ``DuoLLM``, a converted HF model or a ``RoutedStack``.
      tokens: (B, T) int64. granularity, skip, base, paths: see ``search``.
      max_elems: bounds the floats of one batched branch step (chunks the branches).
    Returns: a ``PatternTable``; ``.select(b)`` gives the oracle of any budget within it.
    A whole-sequence table (``"sequence"`` or ``base="pattern"``) also reads at the other
    granularity with ``.as_granularity``.
    """
    stack, tokens, choices, mode = _prepare(model, tokens, granularity, "exhaustive", skip,
                                            paths, base)
    t0 = time.perf_counter()
    runner = Runner(stack, tokens, mode, base, max_elems)
    dev = tokens.device
    # Prefixes are shared by every position, so a per-position budget prunes by its loosest k.
    spec = spec_of(budget, stack).loose().to(dev)
    L = stack.n_layers
    per_branch = runner.B * runner.T * max(stack.d_big, stack.d_model)
    pats: List[torch.Tensor] = []
    losses: List[torch.Tensor] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        total = (all_patterns(L, budget=budget, model=stack, paths=choices).shape[0]
                 if len(choices) ** L <= 1 << 20 else None)
        bar = tqdm(total=total, desc=f"oracle {granularity}", unit="pattern", leave=False)

    def walk(i: int, h: torch.Tensor, prefix: torch.Tensor, cost: torch.Tensor) -> None:
        # h (W, B, T, d) at layer i's input; prefix (W, i); cost (W,) float64
        if i == L:
            pats.append(prefix)
            losses.append(runner.losses(h))
            if bar is not None:
                bar.update(prefix.shape[0])
            return
        h = runner.attend(i, h)  # shared by every child of each branch
        kids_h, kids_prefix, kids_cost = [], [], []
        for c in choices:
            c_cost = cost + spec.costs[c]
            keep = spec.feasible(c_cost, L - i - 1, choices)
            if not bool(keep.any()):
                continue
            hk = h[keep] if not bool(keep.all()) else h
            kids_h.append(runner.ffn(i, hk, c))
            kids_prefix.append(torch.cat([prefix[keep], torch.full(
                (int(keep.sum()), 1), c, dtype=torch.int64, device=dev)], 1))
            kids_cost.append(c_cost[keep])
        if not kids_h:
            return
        h, prefix, cost = torch.cat(kids_h), torch.cat(kids_prefix), torch.cat(kids_cost)
        del kids_h
        for sl in runner.chunks(h.shape[0], per_branch):
            walk(i + 1, h[sl], prefix[sl], cost[sl])

    walk(0, runner.h0, torch.zeros(1, 0, dtype=torch.int64, device=dev),
         torch.zeros(1, dtype=torch.float64, device=dev))
    if bar is not None:
        bar.close()
    if not pats:
        raise ValueError(f"budget: no pattern of {L} layers meets {budget}")
    base_routes = None if runner.base_routes is None else runner.base_routes.cpu()
    tab_base = None if granularity == "sequence" else ("pattern" if mode == "rows" else base)
    return PatternTable(torch.cat(pats).cpu(), torch.cat(losses).cpu(), granularity,
                        SKIP in choices, base_routes, time.perf_counter() - t0, stack,
                        tab_base, choices)


def search(model, tokens: torch.Tensor, budget: Budget, granularity: str = "sequence",
           method: str = "exhaustive", skip: bool = False, base="big", beam_width: int = 4,
           max_elems: int = 1 << 24, progress: bool = False,
           paths: Optional[tuple] = None) -> OracleResult:
    """The routing that minimises next-token loss under ``budget`` (see ``duollm.oracle``).

    Args:
      model: a ``DuoLLM``, a converted HF model or a ``RoutedStack`` (run without gradients).
      tokens: (B, T) int64; positions 0..T-2 predict tokens 1..T-1.
      budget: int k (exactly k big layers), ``Exactly``/``AtMost`` (of any route),
        ``FlopBudget``, ``PerPosition`` (token granularity) or None.
      granularity: ``"sequence"`` or ``"token"``.
      method: ``"exhaustive"``, ``"beam"`` or ``"greedy"``.
      skip: choose among skip/small/big (3^L patterns) instead of small/big (2^L); shorthand
        for ``paths=(SKIP, SMALL, BIG)``.
      base: for ``"token"``: ``"pattern"`` is the paper's oracle (whole-sequence patterns,
        each position's best); a policy name, a (L,) pattern or (L, B, T) routes fix the
        context and re-route only the scored position. Default ``"big"`` (compatibility).
      beam_width: prefixes kept per sequence / position (per budget class for ``"pattern"``).
      max_elems: bound on the floats of one batched step (branches are chunked to fit).
      paths: the routes every layer chooses among, e.g. ``(SKIP, BIG)`` (big-or-skip).
    Returns: an ``OracleResult`` with ``.routes`` (L, B, T) and ``.loss`` ((B,) or (B, T-1)).
    """
    stack, tokens, choices, mode = _prepare(model, tokens, granularity, method, skip, paths,
                                            base)
    budget = as_budget(budget)
    spec = spec_of(budget, stack)
    if spec.per_position and granularity != "token":
        raise ValueError("budget: a per-position budget needs granularity='token'")
    if spec.per_position and spec.lo.shape != (tokens.shape[1] - 1,):
        raise ValueError(f"budget: a per-position budget needs {tokens.shape[1] - 1} ks (one "
                         f"per scored position), got {spec.lo.shape[0]}")
    if method == "exhaustive":
        table = pattern_losses(stack, tokens, granularity, skip, base, budget, max_elems,
                               progress, paths=choices)
        return table.select(budget)
    width = 1 if method == "greedy" else beam_width
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"beam_width: expected a positive int, got {beam_width!r}")
    runner = Runner(stack, tokens, mode, base, max_elems)
    spec = spec.to(tokens.device)
    if granularity == "token" and mode == "rows":
        return pattern_beam(runner, spec, choices, budget, choices, width, progress)
    return unit_beam(runner, spec, choices, granularity, budget, base, choices, width,
                     progress)

