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

from .model import DuoLLM
from .oracle import AtMost, Exactly, FlopBudget, pattern_losses
from .reference import BIG


def budget_name(budget) -> str:
    """Column suffix of a budget: ``k`` for AtMost(k), ``eq{k}``, ``flops{fraction}``."""
    if isinstance(budget, AtMost):
        return str(budget.k)
    if isinstance(budget, Exactly):
        return f"eq{budget.k}"
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
def token_difficulty(model: DuoLLM, tokens: torch.Tensor, budgets: Sequence = (1,),
                     base="small", reference=None, kinds: Optional[torch.Tensor] = None,
                     skip: bool = False, progress: bool = False) -> DifficultyTable:
    """Per-token losses under cheap, full and oracle routing, and the difficulty.

    Args:
      tokens: (B, T) int64.
      budgets: ints (at most k big layers) or budget objects; one oracle column each.
      base: the context routing of the token oracle.
      reference: the budget whose oracle defines ``difficulty`` (default: the last budget).
      kinds: optional (B, T) ground-truth kind of every token (e.g. ``duollm.synthetic``).
    Returns: a ``DifficultyTable`` of B * (T-1) rows.
    """
    budgets = [AtMost(b) if isinstance(b, int) and not isinstance(b, bool) else b
               for b in budgets]
    if not budgets:
        raise ValueError("budgets: expected at least one budget")
    reference = budgets[-1] if reference is None else (
        AtMost(reference) if isinstance(reference, int) else reference)
    tokens = tokens.to(model.embed.weight.device, torch.int64)
    B, T = tokens.shape
    table = pattern_losses(model, tokens, "token", skip=skip, base=base, progress=progress)
    oracle, big_layers = {}, {}
    for b in budgets + ([reference] if reference not in budgets else []):
        res = table.select(b)
        oracle[budget_name(b)] = res.loss.reshape(-1)
        big_layers[budget_name(b)] = (res.routes[:, :, :-1] == BIG).sum(0).reshape(-1)
    loss_small = model.token_losses(tokens, "small").reshape(-1)
    loss_big = model.token_losses(tokens, "big").reshape(-1)
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
        oracle_big_layers=big_layers)


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
