"""Beam and greedy search (``method="beam"``/``"greedy"`` of ``duollm.oracle.search``).

A prefix's true loss is only known once every layer is chosen, so a prefix is scored by its
loss after completing the remaining layers with the *biggest feasible* routes (the costliest
route while the budget allows, then the next): an optimistic "what if the rest were strong"
estimate that never leaves the budget. A beam at least as wide as the number of patterns prunes
nothing and is exhaustive search.
"""
from __future__ import annotations

import math
import time
from typing import List, Sequence

import torch

from .budgets import BudgetSpec, as_budget
from .results import OracleResult
from .runner import Runner


def _complete(runner: Runner, spec: BudgetSpec, choices: Sequence[int], i: int, g: torch.Tensor,
              g_cost: torch.Tensor) -> torch.Tensor:
    """Losses (W, B, T) of branches g after layer i's FFN, completed from layer i+1 on with
    the biggest feasible routes; g_cost the branches' costs, (W, B, T) or (W, 1, 1)."""
    L = runner.stack.n_layers
    by_size = sorted(choices, key=lambda c: float(spec.costs[c]), reverse=True)
    W, B, T = g.shape[:3]
    g_cost = g_cost.expand(W, B, T) if spec.per_position else g_cost
    for j in range(i + 1, L):
        g = runner.attend(j, g)
        route = torch.full(g_cost.shape, by_size[-1], dtype=torch.int64, device=g.device)
        chosen = torch.zeros(g_cost.shape, dtype=torch.bool, device=g.device)
        for c in by_size:
            fits = ~chosen & spec.feasible(g_cost + spec.costs[c], L - j - 1, choices)
            route = torch.where(fits, torch.full_like(route, c), route)
            chosen |= fits
        g_cost = g_cost + spec.costs[route]
        g = runner.ffn(j, g, route.expand(W, B, T))
    return runner.losses(g)


@torch.no_grad()
def unit_beam(runner: Runner, spec: BudgetSpec, choices: Sequence[int], granularity: str,
              budget, base, paths, beam_width: int, progress: bool) -> OracleResult:
    """Beam per unit: per sequence (rows mode, ``"sequence"``) or per position (the
    fixed-context token oracle): each unit keeps its own ``beam_width`` best prefixes."""
    t0 = time.perf_counter()
    dev = runner.h0.device
    L, B, T = runner.stack.n_layers, runner.B, runner.T
    h = runner.h0.expand(1, B, T, -1)  # (W, B, T, d)
    prefix = torch.zeros(0, 1, B, T, dtype=torch.int64, device=dev)  # (i, W, B, T)
    cost = torch.zeros(1, B, T, dtype=torch.float64, device=dev)
    evaluated = 0
    layers = range(L)
    if progress:
        from tqdm.auto import tqdm
        layers = tqdm(layers, desc=f"beam {granularity}", leave=False)
    for i in layers:
        h = runner.attend(i, h)
        kid_h = torch.cat([runner.ffn(i, h, c) for c in choices])  # (R*W, B, T, d)
        kid_prefix = torch.cat([torch.cat([prefix, torch.full((1, *prefix.shape[1:]), c,
                                                              device=dev)])
                                for c in choices], 1)  # (i+1, R*W, B, T)
        kid_cost = torch.cat([cost + spec.costs[c] for c in choices])  # (R*W, B, T)
        ok = spec.feasible(kid_cost, L - i - 1, choices)
        score = _complete(runner, spec, choices, i, kid_h, kid_cost).double()
        evaluated += kid_h.shape[0]
        if granularity == "sequence":
            score = score.mean(-1, keepdim=True).expand_as(score)
        score = torch.where(ok, score, torch.full_like(score, math.inf))
        W = min(beam_width, kid_h.shape[0])
        if granularity == "sequence":
            idx = score[:, :, 0].topk(W, 0, largest=False).indices  # (W, B)
            idx = idx[:, :, None].expand(W, B, T)
        else:
            idx = score.topk(W, 0, largest=False).indices  # (W, B, T)
        h = kid_h.gather(0, idx[..., None].expand(W, B, T, kid_h.shape[-1]))
        prefix = kid_prefix.gather(1, idx[None].expand(i + 1, W, B, T))
        cost = kid_cost.gather(0, idx)
        best_score = score.gather(0, idx)
    if not bool(torch.isfinite(best_score[0]).all()):
        raise ValueError(f"budget: no pattern of {L} layers meets {budget}")
    routes = prefix[:, 0]  # (L, B, T)
    if granularity == "sequence":
        loss = best_score[0, :, 0].float()
        routes = torch.cat([routes, routes[:, :, -1:]], 2)
    else:
        loss = best_score[0].float()
        routes = torch.cat([routes, runner.base_routes[:, :, -1:]], 2)
    elapsed = time.perf_counter() - t0
    method = "greedy" if beam_width == 1 else "beam"
    return OracleResult(routes.cpu(), loss.cpu(), evaluated, evaluated / max(elapsed, 1e-9),
                        elapsed, granularity, method, as_budget(budget),
                        base if granularity == "token" else None, tuple(paths))


def _keep_by_votes(score: torch.Tensor, width: int) -> torch.Tensor:
    """Indices of the ``width`` prefixes (rows of score (K, B, T)) that are the best of the
    most positions, ties (and the rest) by mean score."""
    K = score.shape[0]
    votes = torch.bincount(score.argmin(0).reshape(-1), minlength=K)  # (K,)
    mean = torch.where(torch.isfinite(score), score, torch.full_like(score, 1e30)).mean((1, 2))
    order = mean.argsort(stable=True)
    order = order[(-votes[order]).argsort(stable=True)]
    return order[:width]


@torch.no_grad()
def pattern_beam(runner: Runner, spec: BudgetSpec, choices: Sequence[int], budget, paths,
                 beam_width: int, progress: bool) -> OracleResult:
    """Beam for the paper's token oracle: prefixes are whole-sequence patterns shared by every
    position, so positions sharing a budget (one class per distinct ``(lo, hi)``) share one beam
    of ``beam_width`` prefixes, kept by how many positions each is the best of (then by mean
    score). The last layer is not pruned: each position takes its best complete pattern."""
    t0 = time.perf_counter()
    dev = runner.h0.device
    L, B, T = runner.stack.n_layers, runner.B, runner.T
    lo = spec.lo if spec.per_position else torch.full((T,), spec.lo, dtype=torch.float64)
    hi = spec.hi if spec.per_position else torch.full((T,), spec.hi, dtype=torch.float64)
    if lo.shape != (T,):
        raise ValueError(f"budget: a per-position budget needs {T} ks (one per scored "
                         f"position), got {tuple(lo.shape)}")
    classes = sorted(set(zip(lo.tolist(), hi.tolist())))
    best_loss = torch.full((B, T), math.inf, dtype=torch.float64, device=dev)
    best_pat = torch.zeros(L, B, T, dtype=torch.int64, device=dev)
    evaluated = 0
    todo: List = classes
    if progress:
        from tqdm.auto import tqdm
        todo = tqdm(classes, desc="beam token (pattern)", leave=False)
    for c_lo, c_hi in todo:
        cspec = BudgetSpec(spec.costs.to(dev), c_lo, c_hi)
        pos = ((lo == c_lo) & (hi == c_hi)).to(dev)  # (T,) positions of this class
        h = runner.h0  # (W, B, T, d)
        prefix = torch.zeros(1, 0, dtype=torch.int64, device=dev)  # (W, i)
        cost = torch.zeros(1, dtype=torch.float64, device=dev)  # (W,)
        for i in range(L):
            h = runner.attend(i, h)
            kids_h, kids_prefix, kids_cost = [], [], []
            for c in choices:
                c_cost = cost + cspec.costs[c]
                keep = cspec.feasible(c_cost, L - i - 1, choices)
                if not bool(keep.any()):
                    continue
                kids_h.append(runner.ffn(i, h[keep], c))
                kids_prefix.append(torch.cat([prefix[keep], torch.full(
                    (int(keep.sum()), 1), c, dtype=torch.int64, device=dev)], 1))
                kids_cost.append(c_cost[keep])
            if not kids_h:
                raise ValueError(f"budget: no pattern of {L} layers meets {budget}")
            h, prefix, cost = torch.cat(kids_h), torch.cat(kids_prefix), torch.cat(kids_cost)
            score = _complete(runner, cspec, choices, i, h, cost[:, None, None]).double()
            score = score[:, :, pos]  # (K, B, T_class)
            evaluated += h.shape[0]
            if i < L - 1 and h.shape[0] > beam_width:
                sel = _keep_by_votes(score, beam_width)
                h, prefix, cost = h[sel], prefix[sel], cost[sel]
        j = score.argmin(0)  # (B, T_class): each position's best complete pattern
        best_loss[:, pos] = score.gather(0, j[None])[0]
        best_pat[:, :, pos] = prefix[j].permute(2, 0, 1)
    routes = torch.cat([best_pat, best_pat[:, :, -1:]], 2)  # (L, B, T+1)
    elapsed = time.perf_counter() - t0
    method = "greedy" if beam_width == 1 else "beam"
    return OracleResult(routes.cpu(), best_loss.float().cpu(), evaluated,
                        evaluated / max(elapsed, 1e-9), elapsed, "token", method,
                        as_budget(budget), "pattern", tuple(paths))
