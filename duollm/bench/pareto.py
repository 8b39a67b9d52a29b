"""The frontier's typed rows and its accounting (``duollm bench frontier``).

* ``FrontierRow`` — one routing (or dense model): held-out loss and perplexity, the realised
  route shares, FLOPs and weight bytes per token from the realised routes (router included),
  the ideal speedups of that mix, and measured prefill / decode tokens/s at batch 1 and 8 with
  the speedup over the unconverted dense model measured in the same run.
* ``route_accounting`` — shares, FLOPs and bytes per token of an ``(L, B, T)`` routes tensor:
  counted from the routes taken, never from a nominal mix.
* ``pareto_front`` — which points no other point beats on both loss (lower) and tokens/s
  (higher); ``front_lines`` — one line per routing saying where it is on the front.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from ..config import router_flops, swiglu_flops

# The timed settings: (phase, batch). Each gives a tokens/s and a front.
SETTINGS = (("prefill", 1), ("prefill", 8), ("decode", 1), ("decode", 8))


def setting_key(phase: str, batch: int) -> str:
    return f"{phase}_b{batch}"


@dataclass
class FrontierRow:
    """One point of the frontier (a row of the CSV/JSON)."""

    routing: str               # e.g. "all-big", "fixed k=2", "router big 0.50", "dense big"
    kind: str                  # dense | policy | fixed | random | router | oracle
    k: float = float("nan")    # big layers per token (mean, realised)
    deployable: bool = True    # the oracle is a bound: it needs the future tokens
    pattern: str = ""          # fixed patterns: the layer pattern (e.g. "2,1,1,2")
    loss: float = float("nan")         # held-out next-token loss (nats), evaluation split
    perplexity: float = float("nan")
    share_big: float = float("nan")    # of every (layer, token) route on the evaluation split
    share_small: float = float("nan")
    share_skip: float = float("nan")
    ffn_flops_per_token: float = float("nan")    # realised, router included
    flops_per_token: float = float("nan")        # + attention projections and head
    bytes_per_token: float = float("nan")        # weights one token reads (batch 1)
    ideal_ffn_speedup: float = float("nan")      # all-big FFN FLOPs / realised FFN FLOPs
    ideal_speedup: float = float("nan")          # the same for the whole model's FLOPs
    prefill_b1_tps: float = float("nan")
    prefill_b8_tps: float = float("nan")
    decode_b1_tps: float = float("nan")
    decode_b8_tps: float = float("nan")
    prefill_b1_speedup: float = float("nan")     # measured, vs the unconverted dense model
    prefill_b8_speedup: float = float("nan")
    decode_b1_speedup: float = float("nan")
    decode_b8_speedup: float = float("nan")
    prefill_b1_front: bool = False
    prefill_b8_front: bool = False
    decode_b1_front: bool = False
    decode_b8_front: bool = False
    note: str = ""
    error: str = ""

    def tps(self, key: str) -> float:
        return getattr(self, f"{key}_tps")


@dataclass
class ModelCosts:
    """Per-token costs of one model shape: FFN FLOPs per route (skip, small, big) per layer,
    the FLOPs and weight elements outside the FFNs, and bytes per weight element."""

    n_layers: int
    d_model: int
    route_flops: Sequence[float]      # (3,) one layer's FFN FLOPs per token, by route
    route_params: Sequence[float]     # (3,) one layer's FFN weights, by route
    other_flops: float                # attention projections + head, per token
    other_params: float               # the weights behind other_flops
    bytes_per_param: int

    @classmethod
    def of(cls, stack, other_params: int, bytes_per_param: int) -> "ModelCosts":
        """From a ``RoutedStack`` (widths) and the count of the weights every token multiplies
        outside the FFNs (attention projections and the head; not the embedding lookup)."""
        d = stack.d_model
        flops = [0.0, float(swiglu_flops(d, stack.d_small)), float(swiglu_flops(d, stack.d_big))]
        params = [0.0, 3.0 * d * stack.d_small, 3.0 * d * stack.d_big]
        return cls(stack.n_layers, d, flops, params, 2.0 * other_params, float(other_params),
                   bytes_per_param)

    def all_big_flops(self) -> float:
        return self.n_layers * self.route_flops[2] + self.other_flops


@dataclass
class Accounting:
    shares: List[float] = field(default_factory=list)  # (skip, small, big) over all routes
    k: float = float("nan")
    ffn_flops: float = float("nan")
    flops: float = float("nan")
    bytes: float = float("nan")
    ideal_ffn_speedup: float = float("nan")
    ideal_speedup: float = float("nan")


def route_accounting(routes: torch.Tensor, costs: ModelCosts,
                     router_paths: Optional[int] = None) -> Accounting:
    """Costs per token of the realised ``routes`` (L, ...) (any trailing shape: the tokens).

    FFN FLOPs per token = sum over layers of each route's share times its FLOPs, plus, with a
    router of ``router_paths`` logits, its linear map on every token at every layer. Bytes per
    token are the weights one token reads at batch 1: the non-FFN weights, each layer's path
    by its share, and the router's weights."""
    L = routes.shape[0]
    flat = routes.reshape(L, -1).cpu()
    counts = torch.stack([(flat == r).sum(1) for r in range(3)], 1).double()  # (L, 3)
    per_layer = counts / counts.sum(1, keepdim=True).clamp_min(1)
    f = torch.tensor(list(costs.route_flops), dtype=torch.float64)
    p = torch.tensor(list(costs.route_params), dtype=torch.float64)
    ffn = float((per_layer @ f).sum())
    params = float((per_layer @ p).sum()) + costs.other_params
    if router_paths is not None:
        ffn += L * router_flops(costs.d_model, router_paths)
        params += L * (costs.d_model + 1) * router_paths
    shares = (counts.sum(0) / counts.sum().clamp_min(1)).tolist()
    big_ffn = costs.n_layers * costs.route_flops[2]
    acc = Accounting(shares=shares, k=float(per_layer[:, 2].sum()), ffn_flops=ffn,
                     flops=ffn + costs.other_flops, bytes=params * costs.bytes_per_param)
    acc.ideal_ffn_speedup = big_ffn / ffn if ffn > 0 else math.inf
    acc.ideal_speedup = costs.all_big_flops() / acc.flops
    return acc


def apply_accounting(row: FrontierRow, acc: Accounting) -> FrontierRow:
    row.share_skip, row.share_small, row.share_big = acc.shares
    row.k = acc.k
    row.ffn_flops_per_token, row.flops_per_token = acc.ffn_flops, acc.flops
    row.bytes_per_token = acc.bytes
    row.ideal_ffn_speedup, row.ideal_speedup = acc.ideal_ffn_speedup, acc.ideal_speedup
    return row


def pareto_front(points: Sequence[Sequence[float]]) -> List[bool]:
    """For ``(loss, tokens_per_s)`` points: True where no other point has a loss as low and a
    speed as high with at least one strictly better. A point with a NaN is never on the
    front, nor does it dominate."""
    ok = [not (math.isnan(a) or math.isnan(b)) for a, b in points]
    out = []
    for i, (loss, tps) in enumerate(points):
        if not ok[i]:
            out.append(False)
            continue
        dominated = any(ok[j] and j != i and points[j][0] <= loss and points[j][1] >= tps
                        and (points[j][0] < loss or points[j][1] > tps)
                        for j in range(len(points)))
        out.append(not dominated)
    return out


def mark_fronts(rows: List[FrontierRow]) -> None:
    """Set every row's ``<setting>_front`` from the deployable rows' loss and tokens/s."""
    for phase, batch in SETTINGS:
        key = setting_key(phase, batch)
        live = [r for r in rows if r.deployable]
        marks = pareto_front([(r.loss, r.tps(key)) for r in live])
        for r, m in zip(live, marks):
            setattr(r, f"{key}_front", m)


def front_lines(rows: List[FrontierRow]) -> List[str]:
    """One line per routing: loss, decode speed and where it is on the front."""
    lines = []
    for r in rows:
        head = f"{r.routing:<22} loss {r.loss:.4f} (ppl {r.perplexity:7.2f})"
        if not r.deployable:
            lines.append(f"{head}  bound only, not deployable (needs the tokens it "
                         f"predicts): not on any front")
            continue
        on = [setting_key(p, b) for p, b in SETTINGS if getattr(r, f"{setting_key(p, b)}_front")]
        where = ("on the front at " + ", ".join(on) if on else "dominated at every setting")
        speed = (f"decode b1 {r.decode_b1_tps:8.1f} tok/s ({r.decode_b1_speedup:.2f}x dense, "
                 f"ideal {r.ideal_speedup:.2f}x)")
        lines.append(f"{head}  {speed}  {where}")
    return lines


def dominated_by(rows: List[FrontierRow], row: FrontierRow, key: str) -> Dict[str, float]:
    """The deployable rows that dominate ``row`` at setting ``key``: {routing: loss}."""
    out = {}
    for o in rows:
        if o is row or not o.deployable:
            continue
        if (o.loss <= row.loss and o.tps(key) >= row.tps(key)
                and (o.loss < row.loss or o.tps(key) > row.tps(key))):
            out[o.routing] = o.loss
    return out
