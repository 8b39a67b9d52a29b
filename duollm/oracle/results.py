"""What the oracles return: ``OracleResult`` (one budget) and ``PatternTable`` (every pattern's
loss at every position, from one exhaustive walk; ``select`` gives any budget's oracle)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import torch

from ..reference import BIG, SMALL
from .budgets import ROUTE_NAMES, Budget, as_budget, spec_of


def oracle_label(granularity: str, base, paths: Sequence[int] = (SMALL, BIG)) -> str:
    """A one-line name of an oracle variant, for reports (see ``duollm.oracle``)."""
    over = "/".join(ROUTE_NAMES[p] for p in paths)
    if granularity == "sequence":
        return f"sequence oracle (one {over} pattern per sequence)"
    if isinstance(base, str) and base == "pattern":
        return (f"paper's token oracle (every {over} pattern over the whole sequence, each "
                f"position's best)")
    ctx = f"all {base}" if isinstance(base, str) else "a given routing"
    return (f"context-fixed token oracle (context {ctx}, only the scored position's {over} "
            f"path varies)")


@dataclass
class OracleResult:
    """What ``search`` found.

    Fields:
      routes: (n_layers, B, T) int64, the chosen pattern of every sequence / position.
        Token granularity: with ``base="pattern"``, running ``routes[:, b, t]`` as a pattern
        over the whole sequence gives exactly ``loss[b, t]``; with a fixed-context base, the
        base routes with column t replaced by ``routes[:, b, t]`` give it. Position ``T-1``
        predicts nothing: it repeats position ``T-2``'s pattern (``"pattern"``) or keeps the
        base route.
      loss: (B,) for ``"sequence"``, (B, T-1) for ``"token"``.
      patterns_evaluated: complete layer patterns whose loss was computed (each over the
        whole batch; beam counts every scored completion).
      patterns_per_s: ``patterns_evaluated`` per second of search.
      base: ``"pattern"``, a context policy / routes for the fixed-context token oracle, or
        None for ``"sequence"``. paths: the routes each layer chose among.
    """

    routes: torch.Tensor
    loss: torch.Tensor
    patterns_evaluated: int
    patterns_per_s: float
    elapsed_s: float
    granularity: str
    method: str
    budget: object = None
    base: object = None
    paths: Tuple[int, ...] = (SMALL, BIG)

    @property
    def label(self) -> str:
        """Which oracle this is, in words (e.g. "paper's token oracle (...)")."""
        return oracle_label(self.granularity, self.base, self.paths)

    def describe(self) -> str:
        """The label, the budget and the method, for a report line."""
        budget = "no budget" if self.budget is None else str(self.budget)
        return f"{self.label}; {budget}; {self.method}"

    def _scored(self) -> torch.Tensor:
        return self.routes if self.granularity == "sequence" else self.routes[:, :, :-1]

    def route_fraction(self, route: int = BIG) -> float:
        """Fraction of (layer, scored position) routes equal to ``route``."""
        return float((self._scored() == route).float().mean())

    def big_fraction(self) -> float:
        """Fraction of (layer, scored position) routes that are big."""
        return self.route_fraction(BIG)


@dataclass
class PatternTable:
    """The loss of every evaluated pattern at every position, from an exhaustive walk.

    Fields:
      patterns: (n, n_layers) int64.
      losses: (n, B, T-1) float32 per-position next-token loss under each pattern: for
        ``"sequence"`` and the paper's token oracle (``base="pattern"``) the pattern runs over
        the whole sequence; for a fixed-context token table only that position is re-routed.
      base_routes: (n_layers, B, T) the fixed context's routes, else None.
      model: the ``RoutedStack`` searched (``FlopBudget`` reads its widths).
      base: ``"pattern"``, the fixed context's base, or None (``"sequence"``).
      paths: the routes each layer chose among.
    """

    patterns: torch.Tensor
    losses: torch.Tensor
    granularity: str
    skip: bool
    base_routes: Optional[torch.Tensor]
    elapsed_s: float
    model: object = field(default=None, repr=False)
    base: object = None
    paths: Tuple[int, ...] = (SMALL, BIG)

    @property
    def patterns_per_s(self) -> float:
        return self.patterns.shape[0] / max(self.elapsed_s, 1e-9)

    @property
    def label(self) -> str:
        return oracle_label(self.granularity, self.base, self.paths)

    @property
    def whole_sequence(self) -> bool:
        """Whether every pattern ran over the whole sequence (sequence or paper's oracle)."""
        return self.granularity == "sequence" or (isinstance(self.base, str)
                                                 and self.base == "pattern")

    def as_granularity(self, granularity: str) -> "PatternTable":
        """The same whole-sequence losses read at the other granularity: one walk gives both
        the sequence oracle and the paper's token oracle. No copy of the losses."""
        if not self.whole_sequence:
            raise ValueError("granularity: a fixed-context token table has no sequence view "
                             "(its patterns re-route one position only)")
        if granularity not in ("sequence", "token"):
            raise ValueError(f"granularity: expected 'sequence' or 'token', got "
                             f"{granularity!r}")
        return PatternTable(self.patterns, self.losses, granularity, self.skip, None,
                            self.elapsed_s, self.model,
                            "pattern" if granularity == "token" else None, self.paths)

    def mask(self, budget: Budget) -> torch.Tensor:
        """Which patterns meet ``budget``: (n,) bool, or (n, T-1) for a ``PerPosition``."""
        if budget is None:
            return torch.ones(self.patterns.shape[0], dtype=torch.bool)
        spec = spec_of(budget, self.model)
        total = spec.costs[self.patterns].sum(1)  # (n,)
        if spec.per_position:
            Tm = self.losses.shape[-1]
            if self.granularity != "token" or spec.lo.shape != (Tm,):
                raise ValueError(f"budget: a per-position budget needs token granularity and "
                                 f"{Tm} ks (one per scored position), got "
                                 f"{tuple(spec.lo.shape)} for {self.granularity!r}")
            return spec.meets(total[:, None])  # (n, T-1)
        return spec.meets(total)

    def select(self, budget: Budget) -> OracleResult:
        """The oracle at ``budget`` from this table (the budget must be within the table's)."""
        keep = self.mask(budget)
        if not bool(keep.any(0).all()):
            raise ValueError(f"budget: no evaluated pattern meets {budget}")
        L = self.patterns.shape[1]
        n, B, Tm = self.losses.shape
        inf = torch.tensor(math.inf, dtype=self.losses.dtype)
        if self.granularity == "sequence":
            seq = torch.where(keep[:, None], self.losses.mean(-1), inf)  # (n, B)
            best = seq.argmin(0)  # (B,)
            loss = seq[best, torch.arange(B)]
            routes = self.patterns[best].t()[:, :, None].expand(L, B, Tm + 1).contiguous()
        else:
            k3 = keep[:, None, None] if keep.dim() == 1 else keep[:, None, :]  # (n, 1|B, T-1)
            tok = torch.where(k3, self.losses, inf)  # (n, B, T-1)
            best = tok.argmin(0)  # (B, T-1)
            loss = tok.gather(0, best[None]).squeeze(0)
            chosen = self.patterns[best].permute(2, 0, 1)  # (L, B, T-1)
            if self.base_routes is None:  # whole-sequence patterns: the last column repeats
                routes = torch.cat([chosen, chosen[:, :, -1:]], 2)
            else:
                routes = self.base_routes.clone()
                routes[:, :, :Tm] = chosen
        n_ok = int(keep.any(1).sum()) if keep.dim() == 2 else int(keep.sum())
        return OracleResult(routes, loss, n_ok, self.patterns_per_s, self.elapsed_s,
                            self.granularity, "exhaustive", as_budget(budget),
                            self.base if self.granularity == "token" else None, self.paths)

    def loss_of(self, pattern: Sequence[int]) -> torch.Tensor:
        """(B, T-1) losses of one fixed pattern (must be in the table)."""
        p = torch.as_tensor(list(pattern), dtype=torch.int64)
        hit = (self.patterns == p).all(1).nonzero()
        if hit.numel() == 0:
            raise ValueError(f"pattern {list(pattern)} was not evaluated")
        return self.losses[int(hit[0])]
