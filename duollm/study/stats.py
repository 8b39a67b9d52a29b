"""Statistics the study's verdicts rest on: bootstrap 95% intervals over sequences, paired
differences, and the selection/evaluation split.

Sequences are the unit of resampling: tokens of one sequence share context and are not
independent, so every interval resamples whole sequences (with replacement) and recomputes the
statistic. Baselines that are *chosen* (the best fixed pattern, the best of N random patterns,
a router's threshold) are chosen on the selection split and scored on the evaluation split, so
their number is not flattered by the choice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Tuple

import torch

HOLDS, FAILS, UNRESOLVED = "holds", "does not hold", "not resolved"


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap percentile interval over ``n`` sequences."""

    estimate: float
    low: float
    high: float
    n: int
    level: float = 0.95

    def sign(self) -> int:
        """+1 when the interval lies above zero, -1 below, 0 when it includes zero."""
        return 1 if self.low > 0 else (-1 if self.high < 0 else 0)

    def text(self, nd: int = 4) -> str:
        return f"{self.estimate:.{nd}f} [{self.low:.{nd}f}, {self.high:.{nd}f}]"


@dataclass(frozen=True)
class Verdict:
    """A claim of the paper checked here: ``outcome`` is ``"holds"``, ``"does not hold"`` or
    ``"not resolved"`` (the interval includes zero); ``criterion`` says what was measured."""

    claim: str
    criterion: str
    interval: Interval
    outcome: str


def _as_2d(values) -> torch.Tensor:
    v = torch.as_tensor(values, dtype=torch.float64)
    if v.dim() == 0 or v.shape[0] < 1:
        raise ValueError(f"values: expected per-sequence values of shape (n, ...), n >= 1, "
                         f"got shape {tuple(v.shape)}")
    return v


def bootstrap(stat: Callable[..., float], *per_sequence, n_boot: int = 2000, seed: int = 0,
              level: float = 0.95) -> Interval:
    """Percentile bootstrap of ``stat(*arrays)`` resampling the first axis (sequences).

    Args:
      stat: maps tensors with the same first axis n (sequences) to a float.
      per_sequence: tensors (n, ...) that are resampled together (paired).
    Returns: ``Interval(stat(*arrays), lo, hi, n)``.
    """
    if not 0 < level < 1:
        raise ValueError(f"level: expected a fraction in (0, 1), got {level!r}")
    if not isinstance(n_boot, int) or n_boot < 10:
        raise ValueError(f"n_boot: expected an int >= 10, got {n_boot!r}")
    arrays = [_as_2d(a) for a in per_sequence]
    n = arrays[0].shape[0]
    if any(a.shape[0] != n for a in arrays):
        raise ValueError("per_sequence: every array needs the same number of sequences")
    est = float(stat(*arrays))
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=gen)
    boots = torch.tensor([float(stat(*(a[i] for a in arrays))) for i in idx],
                         dtype=torch.float64)
    boots = boots[~torch.isnan(boots)]
    if boots.numel() == 0:
        return Interval(est, math.nan, math.nan, n, level)
    a = (1 - level) / 2
    lo, hi = torch.quantile(boots, torch.tensor([a, 1 - a], dtype=torch.float64)).tolist()
    return Interval(est, lo, hi, n, level)


def bootstrap_mean(values, **kw) -> Interval:
    """Interval of the mean of per-sequence ``values`` (n,)."""
    return bootstrap(lambda v: v.mean(), values, **kw)


def paired_difference(a, b, **kw) -> Interval:
    """Interval of ``mean(a - b)`` for per-sequence values measured on the same sequences."""
    a, b = _as_2d(a), _as_2d(b)
    if a.shape != b.shape:
        raise ValueError(f"a, b: paired values need one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    return bootstrap(lambda x, y: (x - y).mean(), a, b, **kw)


def split_indices(n: int, seed: int = 0, selection_fraction: float = 0.5
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """A random disjoint (selection, evaluation) split of ``n`` sequence indices, both
    non-empty, each sorted."""
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"n: need at least 2 sequences to split, got {n!r}")
    if not 0 < selection_fraction < 1:
        raise ValueError(f"selection_fraction: expected a fraction in (0, 1), got "
                         f"{selection_fraction!r}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = min(n - 1, max(1, round(n * selection_fraction)))
    return perm[:k].sort().values, perm[k:].sort().values


def select_on(selection_scores, evaluation_values) -> Tuple[int, torch.Tensor]:
    """The candidate with the lowest selection score, and its evaluation values.

    Args:
      selection_scores: (m,) one score per candidate, measured on the selection split.
      evaluation_values: (m, n_eval) per-sequence values of every candidate on the
        evaluation split.
    Returns: (index of the chosen candidate, its (n_eval,) evaluation values).
    """
    s = torch.as_tensor(selection_scores, dtype=torch.float64)
    e = torch.as_tensor(evaluation_values)
    if s.dim() != 1 or e.dim() != 2 or e.shape[0] != s.shape[0]:
        raise ValueError(f"selection_scores (m,) and evaluation_values (m, n) disagree: "
                         f"{tuple(s.shape)} vs {tuple(e.shape)}")
    i = int(s.argmin())
    return i, e[i]


def verdict(claim: str, criterion: str, interval: Interval, expect: int = 1) -> Verdict:
    """``holds`` when the interval excludes zero on the ``expect`` side (+1: above), ``does not
    hold`` when it excludes zero on the other side, ``not resolved`` when it includes zero."""
    if expect not in (1, -1):
        raise ValueError(f"expect: expected +1 or -1, got {expect!r}")
    s = interval.sign()
    outcome = UNRESOLVED if s == 0 else (HOLDS if s == expect else FAILS)
    return Verdict(claim, criterion, interval, outcome)


def all_of(claim: str, criterion: str, parts) -> Verdict:
    """A claim made of several verdicts: holds if all hold, does not hold if any fails,
    otherwise not resolved. The reported interval is the first unresolved or failing part's."""
    parts = list(parts)
    if not parts:
        raise ValueError("parts: expected at least one verdict")
    bad = [p for p in parts if p.outcome == FAILS]
    open_ = [p for p in parts if p.outcome == UNRESOLVED]
    if bad:
        return Verdict(claim, criterion, bad[0].interval, FAILS)
    if open_:
        return Verdict(claim, criterion, open_[0].interval, UNRESOLVED)
    return Verdict(claim, criterion, parts[0].interval, HOLDS)
