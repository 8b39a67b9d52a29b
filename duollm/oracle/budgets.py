"""Budgets: how much compute a layer pattern may spend (``docs/routes-and-budgets.md``).

A budget is a set of additive per-route costs plus bounds on their sum over the layers:

* ``Exactly(k)`` / ``AtMost(k)``: the number of layers on ``route`` (``BIG`` by default; e.g.
  ``AtMost(2, route=SKIP)`` allows at most two skipped layers);
* ``FlopBudget``: forward FFN FLOPs per token over all layers, absolute or as a fraction of
  all-big (from the model's ``d_model``, ``d_small``, ``d_big``);
* ``PerPosition(ks)``: a count budget whose k depends on the scored position (token oracles
  only); ``linear_schedule`` builds a decreasing or increasing schedule with a given mean.

An ``int`` k means ``Exactly(k)`` (k big layers); ``None`` means every pattern.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

from ..config import swiglu_flops
from ..reference import BIG, SKIP, SMALL

ROUTE_NAMES = {SKIP: "skip", SMALL: "small", BIG: "big"}
_EPS = 1e-9


def _check_route(route) -> int:
    if isinstance(route, bool) or not isinstance(route, int) or route not in ROUTE_NAMES:
        raise ValueError(f"route: expected SKIP (0), SMALL (1) or BIG (2), got {route!r}")
    return int(route)


def _check_count(k, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {k!r}")
    return int(k)


def route_flops(model) -> torch.Tensor:
    """(3,) float64 forward FLOPs of one token through one layer's FFN, indexed by route
    (skip 0, small, big), from ``model``'s (a DuoLLM, converted HF model or stack) widths."""
    from ..stack import as_stack

    s = as_stack(model)
    return torch.tensor([0.0, float(swiglu_flops(s.d_model, s.d_small)),
                         float(swiglu_flops(s.d_model, s.d_big))], dtype=torch.float64)


def _count_costs(route: int) -> torch.Tensor:
    costs = torch.zeros(3, dtype=torch.float64)
    costs[route] = 1.0
    return costs


@dataclass
class BudgetSpec:
    """A budget as additive per-route costs and bounds on the total over the layers.

    ``lo``/``hi`` are floats, or ``(T,)`` float64 tensors for a per-position budget (they
    broadcast against the last, position, dimension of a cost tensor).
    """

    costs: torch.Tensor  # (3,) float64, indexed by route
    lo: Union[float, torch.Tensor]
    hi: Union[float, torch.Tensor]

    @property
    def per_position(self) -> bool:
        return isinstance(self.lo, torch.Tensor)

    def to(self, device) -> "BudgetSpec":
        mv = (lambda v: v.to(device)) if self.per_position else (lambda v: v)
        return BudgetSpec(self.costs.to(device), mv(self.lo), mv(self.hi))

    def loose(self) -> "BudgetSpec":
        """The scalar bounds that contain every position's (prefix pruning shared by all)."""
        if not self.per_position:
            return self
        return BudgetSpec(self.costs, float(self.lo.min()), float(self.hi.max()))

    def meets(self, total: torch.Tensor) -> torch.Tensor:
        """Whether complete patterns of ``total`` cost are inside the bounds."""
        return (total >= self.lo - _EPS) & (total <= self.hi + _EPS)

    def feasible(self, cost: torch.Tensor, remaining: int, choices: Sequence[int]) -> torch.Tensor:
        """Whether a prefix of total ``cost`` can still end inside the bounds."""
        c = self.costs[list(choices)]
        lo_end = cost + remaining * float(c.min())
        hi_end = cost + remaining * float(c.max())
        return (lo_end <= self.hi + _EPS) & (hi_end >= self.lo - _EPS)


@dataclass(frozen=True)
class _LayerCount:
    """A bound on how many layers take ``route``: the fields, checks and wording that
    ``Exactly`` and ``AtMost`` share (they differ only in the lower bound)."""

    k: int
    route: int = BIG
    # Class attributes, not fields: how __str__ says the bound, and whether k is also the floor.
    _words = ""
    _exact = False

    def __post_init__(self):
        _check_count(self.k)
        _check_route(self.route)

    def spec(self, model=None) -> BudgetSpec:
        lower = float(self.k) if self._exact else -math.inf
        return BudgetSpec(_count_costs(self.route), lower, float(self.k))

    def __str__(self) -> str:
        return f"{self._words} {self.k} {ROUTE_NAMES[self.route]}"


@dataclass(frozen=True)
class Exactly(_LayerCount):
    """Exactly ``k`` layers on ``route`` (default ``BIG``) per token (or per sequence)."""

    _words = "exactly"
    _exact = True


@dataclass(frozen=True)
class AtMost(_LayerCount):
    """At most ``k`` layers on ``route`` (default ``BIG``) per token (or per sequence)."""

    _words = "at most"


@dataclass(frozen=True)
class FlopBudget:
    """At most ``max_flops_per_token`` forward FFN FLOPs per token summed over all layers, or
    (``fraction``) that fraction of the all-big FFN FLOPs. Give exactly one of the two."""

    max_flops_per_token: Optional[float] = None
    fraction: Optional[float] = None

    def __post_init__(self):
        if (self.max_flops_per_token is None) == (self.fraction is None):
            raise ValueError("FlopBudget: give exactly one of max_flops_per_token, fraction")

    def spec(self, model=None) -> BudgetSpec:
        if model is None:
            raise ValueError("budget: a FlopBudget needs the model (pass model=)")
        from ..stack import as_stack

        costs = route_flops(model)
        hi = (self.max_flops_per_token if self.max_flops_per_token is not None
              else self.fraction * as_stack(model).n_layers * float(costs[BIG]))
        return BudgetSpec(costs, -math.inf, float(hi) * (1 + _EPS))

    def __str__(self) -> str:
        if self.fraction is not None:
            return f"FFN FLOPs <= {self.fraction:g} x all-big"
        return f"FFN FLOPs <= {self.max_flops_per_token:g}/token"


@dataclass(frozen=True)
class PerPosition:
    """A position-varying count budget: position ``t`` (predicting token ``t+1``) uses exactly
    (``kind="exactly"``) or at most (``"at_most"``) ``ks[t]`` layers on ``route``.

    ``ks`` has one int per scored position, ``T-1`` for tokens ``(B, T)``; token-granularity
    oracles only (a sequence has one pattern, so it cannot meet several ks).
    """

    ks: Tuple[int, ...]
    kind: str = "exactly"
    route: int = BIG

    def __post_init__(self):
        ks = self.ks.tolist() if isinstance(self.ks, torch.Tensor) else list(self.ks)
        object.__setattr__(self, "ks", tuple(_check_count(k, "ks") for k in ks))
        if not self.ks:
            raise ValueError("ks: expected at least one position")
        if self.kind not in ("exactly", "at_most"):
            raise ValueError(f"kind: expected 'exactly' or 'at_most', got {self.kind!r}")
        _check_route(self.route)

    @property
    def mean(self) -> float:
        return sum(self.ks) / len(self.ks)

    def spec(self, model=None) -> BudgetSpec:
        hi = torch.tensor(self.ks, dtype=torch.float64)
        lo = hi.clone() if self.kind == "exactly" else torch.full_like(hi, -math.inf)
        return BudgetSpec(_count_costs(self.route), lo, hi)

    def __str__(self) -> str:
        word = "exactly" if self.kind == "exactly" else "at most"
        return (f"{word} ks[t] {ROUTE_NAMES[self.route]} per position (ks {self.ks[0]}.."
                f"{self.ks[-1]}, mean {self.mean:.3g})")


Budget = Union[int, Exactly, AtMost, FlopBudget, PerPosition, None]
BUDGET_TYPES = (Exactly, AtMost, FlopBudget, PerPosition)


def linear_schedule(n_positions: int, mean: float, n_layers: int,
                    direction: str = "decreasing") -> Tuple[int, ...]:
    """(n_positions,) ints in 0..n_layers, linear in the position, with the given mean.

    The line runs from ``mean + s`` to ``mean - s`` (``"decreasing"``; the reverse for
    ``"increasing"``) with the widest ``s`` that stays inside ``[0, n_layers]``; values are
    rounded so their sum is ``round(mean * n_positions)`` (the mean is exact whenever
    ``mean * n_positions`` is an integer) and the order stays monotone (nonincreasing for
    ``"decreasing"``).
    """
    n = _check_count(n_positions, "n_positions")
    if n == 0:
        raise ValueError("n_positions: expected at least one position")
    if not 0 <= mean <= n_layers:
        raise ValueError(f"mean: expected a value in [0, {n_layers}], got {mean!r}")
    if direction not in ("decreasing", "increasing"):
        raise ValueError(f"direction: expected 'decreasing' or 'increasing', got {direction!r}")
    s = min(mean, n_layers - mean)
    x = (torch.linspace(mean + s, mean - s, n, dtype=torch.float64) if n > 1
         else torch.tensor([float(mean)], dtype=torch.float64))  # (n,) nonincreasing
    base = x.floor()
    r = int(round(mean * n) - float(base.sum()))  # how many positions round up, 0..n
    # Round up the r largest fractional parts, ties to the earlier position: an earlier
    # position never gets less than a later one, so the schedule stays monotone.
    order = sorted(range(n), key=lambda t: (-float(x[t] - base[t]), t))
    up = torch.zeros(n, dtype=torch.float64)
    up[order[:max(0, min(n, r))]] = 1.0
    ks = (base + up).long().clamp(0, n_layers)
    if direction == "increasing":
        ks = ks.flip(0)
    return tuple(ks.tolist())


def as_budget(budget: Budget):
    """An int k means ``Exactly(k)``; None means no budget (every pattern)."""
    if budget is None or isinstance(budget, BUDGET_TYPES):
        return budget
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(f"budget: expected an int, Exactly, AtMost, FlopBudget, PerPosition or "
                        f"None, got {type(budget).__name__}")
    return Exactly(budget)


def spec_of(budget: Budget, model=None) -> BudgetSpec:
    """The ``BudgetSpec`` of any budget form (``model`` is needed by ``FlopBudget`` only)."""
    budget = as_budget(budget)
    if budget is None:
        return BudgetSpec(_count_costs(BIG), -math.inf, math.inf)
    return budget.spec(model)


def check_paths(paths, skip: bool = False) -> Tuple[int, ...]:
    """The routes a layer chooses among: ``paths`` when given, else ``route_choices(skip)``."""
    if paths is None:
        return route_choices(skip)
    if isinstance(paths, (str, bytes)) or not hasattr(paths, "__iter__"):
        raise TypeError(f"paths: expected a sequence of routes, got {paths!r}")
    out = tuple(sorted(_check_route(int(p) if isinstance(p, torch.Tensor) else p)
                       for p in paths))
    if not out or len(set(out)) != len(out):
        raise ValueError(f"paths: expected distinct routes among SKIP, SMALL, BIG, got "
                         f"{paths!r}")
    return out


def route_choices(skip: bool = False, paths=None) -> Tuple[int, ...]:
    """The routes a layer chooses among: ``(SKIP, SMALL, BIG)`` or ``(SMALL, BIG)``, or the
    sorted ``paths`` when given (e.g. ``(SKIP, BIG)`` for the big-or-skip oracle)."""
    if paths is not None:
        return check_paths(paths)
    return (SKIP, SMALL, BIG) if skip else (SMALL, BIG)


def all_patterns(n_layers: int, skip: bool = False, budget: Budget = None, model=None,
                 paths=None) -> torch.Tensor:
    """Every layer pattern (n, n_layers) int64 over ``route_choices(skip, paths)`` that meets
    ``budget`` (lexicographic order). A ``PerPosition`` budget keeps the patterns that meet
    at least one position's k; ``FlopBudget`` needs ``model``."""
    choices = route_choices(skip, paths)
    pats = torch.tensor(list(itertools.product(choices, repeat=n_layers)),
                        dtype=torch.int64).view(-1, n_layers)
    if budget is None:
        return pats
    spec = spec_of(budget, model).loose()
    return pats[spec.meets(spec.costs[pats].sum(1))]
