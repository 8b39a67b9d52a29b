"""Token difficulty: how much a token gains from extra compute (docs/routes-and-budgets.md).

``difficulty = loss under the cheap routing (all small) - loss under the oracle at a budget``.
The oracle is the token-granularity exhaustive oracle with the context routed by ``base``
(default ``"small"``, so the only extra compute is the token's own path). An int budget ``k``
here means *at most* k big layers: the all-small pattern is then always a candidate and the
difficulty is never negative (up to float rounding). This is not the token's raw loss: a noisy
token has a high loss under every routing and so a low difficulty.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from .oracle import AtMost, Exactly, FlopBudget, PerPosition, oracle_label, pattern_losses
from .oracle.budgets import ROUTE_NAMES, route_choices
from .reference import BIG
from .stack import as_stack


def budget_name(budget) -> str:
    """Column suffix of a budget: ``k`` for AtMost(k), ``eq{k}``, ``flops{fraction}``; a
    route other than big is named (``3skip``, ``eq1skip``)."""
    if isinstance(budget, (AtMost, Exactly)):
        route = "" if budget.route == BIG else ROUTE_NAMES[budget.route]
        return (f"{budget.k}" if isinstance(budget, AtMost) else f"eq{budget.k}") + route
    if isinstance(budget, PerPosition):
        return f"pp{budget.kind}{budget.mean:g}"
    if isinstance(budget, FlopBudget):
        return (f"flops{budget.fraction:g}" if budget.fraction is not None
                else f"flops{budget.max_flops_per_token:g}")
    raise TypeError(f"budget: unsupported {budget!r}")


@dataclass
class DifficultyTable:
    """One row per scored token (flattened over batch and positions 0..T-2).

    Fields ((N,) tensors): ``sequence``, ``position``, ``token`` (the input at the position),
    ``target`` (the next token, the one being predicted), ``loss_small``, ``loss_big`` (the
    whole model all small / all big), ``loss_oracle[name]`` per budget, ``difficulty``
    (``loss_small - loss_oracle`` at ``reference``), ``kind`` (the target's ground-truth kind,
    when known).
    """

    sequence: torch.Tensor
    position: torch.Tensor
    token: torch.Tensor
    target: torch.Tensor
    loss_small: torch.Tensor
    loss_big: torch.Tensor
    loss_oracle: Dict[str, torch.Tensor]
    difficulty: torch.Tensor
    reference: str
    kind: Optional[torch.Tensor] = None
    oracle_big_layers: Dict[str, torch.Tensor] = field(default_factory=dict)
    base: object = "small"
    oracle: str = ""

    def columns(self) -> Dict[str, torch.Tensor]:
        cols = {"sequence": self.sequence, "position": self.position, "token": self.token,
                "target": self.target, "loss_small": self.loss_small, "loss_big": self.loss_big}
        for name, v in self.loss_oracle.items():
            cols[f"loss_oracle_{name}"] = v
        cols["difficulty"] = self.difficulty
        if self.kind is not None:
            cols["kind"] = self.kind
        return cols

    def __len__(self) -> int:
        return self.difficulty.numel()


@torch.no_grad()
def token_difficulty(model, tokens: torch.Tensor, budgets: Sequence = (1,),
                     base="small", reference=None, kinds: Optional[torch.Tensor] = None,
                     skip: bool = False, progress: bool = False,
                     paths=None) -> DifficultyTable:
    """Per-token losses under cheap, full and oracle routing, and the difficulty.

    Args:
      model: a ``DuoLLM``, a converted HF model or a ``RoutedStack``.
      tokens: (B, T) int64.
      budgets: ints (at most k big layers) or budget objects; one oracle column each.
      base: which token oracle: a fixed context (``"small"``, ``"big"``, a pattern) or
        ``"pattern"`` (the paper's). skip, paths: the oracle's choices (``duollm.oracle``).
      reference: the budget whose oracle defines ``difficulty`` (default: the last budget).
      kinds: optional (B, T) ground-truth kind of every token (e.g. ``duollm.study.synthetic``).
    Returns: a ``DifficultyTable`` of B * (T-1) rows.
    """
    budgets = [AtMost(b) if isinstance(b, int) and not isinstance(b, bool) else b
               for b in budgets]
    if not budgets:
        raise ValueError("budgets: expected at least one budget")
    reference = budgets[-1] if reference is None else (
        AtMost(reference) if isinstance(reference, int) else reference)
    stack = as_stack(model)
    tokens = tokens.to(stack.device, torch.int64)
    B, T = tokens.shape
    table = pattern_losses(stack, tokens, "token", skip=skip, base=base, progress=progress,
                           paths=paths)
    oracle, big_layers = {}, {}
    for b in budgets + ([reference] if reference not in budgets else []):
        res = table.select(b)
        oracle[budget_name(b)] = res.loss.reshape(-1)
        big_layers[budget_name(b)] = (res.routes[:, :, :-1] == BIG).sum(0).reshape(-1)
    loss_small = stack.token_losses(tokens, "small").reshape(-1)
    loss_big = stack.token_losses(tokens, "big").reshape(-1)
    ref = budget_name(reference)
    seq = torch.arange(B)[:, None].expand(B, T - 1).reshape(-1)
    pos = torch.arange(T - 1)[None].expand(B, T - 1).reshape(-1)
    return DifficultyTable(
        sequence=seq, position=pos, token=tokens[:, :-1].reshape(-1).cpu(),
        target=tokens[:, 1:].reshape(-1).cpu(), loss_small=loss_small.cpu(),
        loss_big=loss_big.cpu(),
        loss_oracle={k: v.cpu() for k, v in oracle.items() if k in
                     [budget_name(b) for b in budgets]},
        # The oracle table may live on the CPU while the model runs on a GPU.
        difficulty=loss_small.cpu() - oracle[ref].cpu(), reference=ref,
        kind=None if kinds is None else kinds[:, 1:].reshape(-1).cpu(),
        oracle_big_layers=big_layers, base=base,
        oracle=oracle_label("token", base, route_choices(skip, paths)))


def export_csv(path, table: DifficultyTable) -> None:
    """Write ``table`` as CSV: position, token, loss_small, loss_big, loss_oracle_<k>...,
    difficulty (plus sequence, target and kind)."""
    cols = table.columns()
    order = ["sequence", "position", "token", "target", "loss_small", "loss_big"]
    order += [c for c in cols if c.startswith("loss_oracle_")] + ["difficulty"]
    if "kind" in cols:
        order.append("kind")
    rows: List[List] = [cols[c].tolist() for c in order]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(order)
        for r in zip(*rows):
            w.writerow([f"{v:.6f}" if isinstance(v, float) else v for v in r])


def high_loss_correlation(table: DifficultyTable, quantile: float = 0.75) -> Dict[str, float]:
    """Pearson correlation of difficulty with the raw loss (all-big loss), over all tokens and
    over the high-loss tokens (raw loss at or above ``quantile``), and mean difficulties."""
    raw, diff = table.loss_big.double(), table.difficulty.double()
    thr = float(torch.quantile(raw, quantile))
    hi = raw >= thr

    def corr(a, b):
        if a.numel() < 3 or float(a.std()) == 0 or float(b.std()) == 0:
            return float("nan")
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    return {"corr_all": corr(raw, diff), "corr_high_loss": corr(raw[hi], diff[hi]),
            "threshold": thr, "n_high": int(hi.sum()),
            "mean_difficulty_high": float(diff[hi].mean()),
            "mean_difficulty_rest": float(diff[~hi].mean()) if bool((~hi).any()) else
            float("nan"),
            "mean_loss_high": float(raw[hi].mean()),
            "mean_loss_rest": float(raw[~hi].mean()) if bool((~hi).any()) else float("nan")}


@dataclass
class GainOverlap:
    """How differently small-model loss and gain (``difficulty``) rank the tokens.

    Fields: ``n`` tokens; ``n_top`` tokens in each top group (the ``1 - quantile`` share);
    ``n_low`` tokens in each bottom group (``n_top`` unless ``low`` was given);
    ``top_overlap`` the share of the top group by loss that is also in the top group by gain
    (1: the same tokens; ``chance_overlap`` = ``n_top / n`` when the two rankings are
    independent); ``high_loss_low_gain`` the share of the top-loss group whose gain is in the
    bottom group; ``low_loss_high_gain`` the share of the bottom-loss group whose gain is in the
    top group; ``spearman`` the rank correlation of loss and gain; ``loss`` the loss column
    ranked (``"loss_small"``).
    """

    n: int
    n_top: int
    quantile: float
    top_overlap: float
    chance_overlap: float
    high_loss_low_gain: float
    low_loss_high_gain: float
    spearman: float
    loss: str = "loss_small"
    n_low: int = 0

    def describe(self) -> str:
        q = round(100 * (1 - self.quantile))
        return (f"top {q}% by {self.loss} vs by gain: overlap {self.top_overlap:.2f} (chance "
                f"{self.chance_overlap:.2f}); high-loss tokens with low gain "
                f"{self.high_loss_low_gain:.2f}, low-loss tokens with high gain "
                f"{self.low_loss_high_gain:.2f}; Spearman {self.spearman:.2f} (n={self.n})")


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """(N,) ranks 0..N-1 (ties by position, so groups have exactly the stated sizes)."""
    r = torch.empty(x.numel(), dtype=torch.int64)
    r[x.argsort(stable=True)] = torch.arange(x.numel())
    return r


def gain_overlap(table: DifficultyTable, quantile: float = 0.75,
                 sequences: Optional[Sequence[int]] = None,
                 loss: str = "loss_small", low: Optional[float] = None) -> GainOverlap:
    """The paper's difficulty claim as numbers: rank tokens by ``loss`` and by gain.

    Args:
      table: a ``DifficultyTable``.
      quantile: the top group is the tokens above this quantile (0.75: the top quartile), the
        bottom group the same number of tokens from the other end.
      low: the share of tokens in each bottom group instead (e.g. 0.5: below the median).
        Gain is bounded by the loss (the oracle's loss is >= 0), so the bottom quartile by
        loss can hardly reach the top quartile by gain; the study's criterion uses 0.5.
      sequences: optional sequence ids to include, repeats allowed (a bootstrap resample over
        sequences); default every row.
      loss: ``"loss_small"`` (the paper's small-model loss) or ``"loss_big"``.
    Returns: a ``GainOverlap``.
    """
    if loss not in ("loss_small", "loss_big"):
        raise ValueError(f"loss: expected 'loss_small' or 'loss_big', got {loss!r}")
    raw, gain = getattr(table, loss).double(), table.difficulty.double()
    if sequences is not None:
        rows = [torch.nonzero(table.sequence == int(s)).flatten() for s in sequences]
        rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
        raw, gain = raw[rows], gain[rows]
    if raw.numel() < 2:
        raise ValueError(f"table: needs at least 2 tokens, got {raw.numel()}")
    return rank_overlap(raw, gain, quantile, loss, low)


def rank_overlap(loss: torch.Tensor, gain: torch.Tensor, quantile: float = 0.75,
                 loss_name: str = "loss_small", low: Optional[float] = None) -> GainOverlap:
    """``gain_overlap`` on tensors: ``loss`` and ``gain`` of the same tokens, any shape
    (flattened, e.g. (B, T-1) from an oracle table); ``loss_name`` labels the result.
    Returns: a ``GainOverlap``."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile: expected a value in (0, 1), got {quantile!r}")
    if low is not None and not 0.0 < low < 1.0:
        raise ValueError(f"low: expected a share in (0, 1), got {low!r}")
    raw, gain = loss.reshape(-1).double(), gain.reshape(-1).double()
    if raw.shape != gain.shape:
        raise ValueError(f"gain: {gain.numel()} tokens, loss has {raw.numel()}")
    n = raw.numel()
    if n < 2:
        raise ValueError(f"loss: needs at least 2 tokens, got {n}")
    n_top = max(1, round((1 - quantile) * n))
    r_loss, r_gain = _ranks(raw), _ranks(gain)
    n_low = n_top if low is None else max(1, round(low * n))
    top_loss, bot_loss = r_loss >= n - n_top, r_loss < n_low
    top_gain, bot_gain = r_gain >= n - n_top, r_gain < n_low
    rl, rg = r_loss.double(), r_gain.double()
    spearman = float(((rl - rl.mean()) * (rg - rg.mean())).sum()
                     / ((rl - rl.mean()).norm() * (rg - rg.mean()).norm()))
    return GainOverlap(
        n=n, n_top=n_top, quantile=quantile,
        top_overlap=float((top_loss & top_gain).sum()) / n_top, chance_overlap=n_top / n,
        high_loss_low_gain=float((top_loss & bot_gain).sum()) / n_top,
        low_loss_high_gain=float((bot_loss & top_gain).sum()) / n_low,
        spearman=spearman, loss=loss_name, n_low=n_low)
