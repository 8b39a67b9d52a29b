"""Oracle routing: the layer pattern that minimises next-token loss under a compute budget.

The study's stage 2 (docs/routes-and-budgets.md). ``search(model, tokens, budget, granularity,
method)`` returns an ``OracleResult``.

Granularities (``tokens`` is ``(B, T)``; the model reads ``tokens[:, :-1]`` and predicts
``tokens[:, 1:]``):

* ``"sequence"`` — one layer pattern per sequence, chosen independently for each sequence;
  ``.loss`` is that sequence's mean next-token cross-entropy, ``(B,)``.
* ``"token"`` — every position ``t`` is scored on its own: the context (all positions) is
  routed by ``base`` and only position ``t``'s path across the layers changes. Because the model
  is causal, position ``t``'s state at layer ``l`` depends on the (base-routed) earlier
  positions and on its own earlier layers only. ``.loss`` is ``(B, T-1)``, the loss of
  predicting ``tokens[:, t+1]``. ``.routes[:, b, t]`` is position ``t``'s best pattern; note
  that running *all* positions with these routes at once is a different experiment (the
  context would no longer be ``base``), so the reported loss of position ``t`` is realised by
  ``base`` routes with column ``t`` replaced by ``.routes[:, b, t]``.

Methods:

* ``"exhaustive"`` — exact. A depth-first walk of the tree over layers: every live branch is a
  partial pattern (a prefix of layers). At layer ``l`` a branch's attention is computed once and
  shared by all its children, which differ from layer ``l``'s FFN onwards; all live branches of
  a chunk go through the layer as one batch. Prefixes that can no longer meet the budget are
  pruned. For ``"token"`` the base forward runs once and caches each layer's keys and values;
  a branch (one candidate pattern at every position at once) attends to the cached base keys
  of earlier positions plus its own key at its own position.
* ``"beam"`` — keeps the ``beam_width`` best prefixes per sequence (or per position). A
  prefix's true loss is only known once every layer is chosen, so a prefix is scored by its
  loss after completing the remaining layers with the *biggest feasible* routes (big while the
  budget allows, then small, then skip): an optimistic "what if the rest were strong" estimate
  that never leaves the budget. With a beam at least as wide as the number of patterns it is
  exhaustive search.
* ``"greedy"`` — ``"beam"`` with ``beam_width=1``.

Budgets: an ``int`` k (= ``Exactly(k)``), ``Exactly(k)``, ``AtMost(k)`` (big layers per token)
or ``FlopBudget`` (FFN FLOPs per token over all layers, absolute or as a fraction of all-big).
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .config import swiglu_flops
from .model import DuoLLM, apply_rope
from .reference import BIG, SKIP, SMALL

# --------------------------------------------------------------------------- budgets


@dataclass(frozen=True)
class Exactly:
    """Exactly ``k`` big layers per token (or per sequence)."""

    k: int

    def spec(self, model: DuoLLM) -> "_Spec":
        return _Spec(_big_count_costs(), float(self.k), float(self.k))

    def __str__(self) -> str:
        return f"exactly {self.k} big"


@dataclass(frozen=True)
class AtMost:
    """At most ``k`` big layers per token (or per sequence)."""

    k: int

    def spec(self, model: DuoLLM) -> "_Spec":
        return _Spec(_big_count_costs(), -math.inf, float(self.k))

    def __str__(self) -> str:
        return f"at most {self.k} big"


@dataclass(frozen=True)
class FlopBudget:
    """At most ``max_flops_per_token`` forward FFN FLOPs per token summed over all layers, or
    (``fraction``) that fraction of the all-big FFN FLOPs. Give exactly one of the two."""

    max_flops_per_token: Optional[float] = None
    fraction: Optional[float] = None

    def __post_init__(self):
        if (self.max_flops_per_token is None) == (self.fraction is None):
            raise ValueError("FlopBudget: give exactly one of max_flops_per_token, fraction")

    def spec(self, model: DuoLLM) -> "_Spec":
        c = model.config
        costs = torch.tensor([0.0, float(swiglu_flops(c.d_model, c.d_small)),
                              float(swiglu_flops(c.d_model, c.d_big))], dtype=torch.float64)
        hi = (self.max_flops_per_token if self.max_flops_per_token is not None
              else self.fraction * c.n_layers * float(costs[BIG]))
        return _Spec(costs, -math.inf, float(hi) * (1 + 1e-9))

    def __str__(self) -> str:
        if self.fraction is not None:
            return f"FFN FLOPs <= {self.fraction:g} x all-big"
        return f"FFN FLOPs <= {self.max_flops_per_token:g}/token"


Budget = Union[int, Exactly, AtMost, FlopBudget, None]


def _big_count_costs() -> torch.Tensor:
    costs = torch.zeros(3, dtype=torch.float64)
    costs[BIG] = 1.0
    return costs


@dataclass
class _Spec:
    """A budget as additive per-route costs (indexed by route) and bounds on the total."""

    costs: torch.Tensor  # (3,) float64
    lo: float
    hi: float

    def to(self, device) -> "_Spec":
        return _Spec(self.costs.to(device), self.lo, self.hi)

    def feasible(self, cost: torch.Tensor, remaining: int, choices: Sequence[int]) -> torch.Tensor:
        """Whether a prefix of total ``cost`` can still end inside the bounds."""
        c = self.costs[list(choices)]
        lo_end = cost + remaining * float(c.min())
        hi_end = cost + remaining * float(c.max())
        return (lo_end <= self.hi + 1e-9) & (hi_end >= self.lo - 1e-9)


def as_budget(budget: Budget):
    """An int k means ``Exactly(k)``; None means no budget (every pattern)."""
    if budget is None or isinstance(budget, (Exactly, AtMost, FlopBudget)):
        return budget
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(f"budget: expected an int, Exactly, AtMost, FlopBudget or None, got "
                        f"{type(budget).__name__}")
    return Exactly(budget)


def _spec_of(budget, model: DuoLLM) -> _Spec:
    budget = as_budget(budget)
    if budget is None:
        return _Spec(_big_count_costs(), -math.inf, math.inf)
    return budget.spec(model)


def route_choices(skip: bool) -> Tuple[int, ...]:
    """The routes a layer chooses among: ``(SKIP, SMALL, BIG)`` or ``(SMALL, BIG)``."""
    return (SKIP, SMALL, BIG) if skip else (SMALL, BIG)


def all_patterns(n_layers: int, skip: bool = False, budget: Budget = None,
                 model: Optional[DuoLLM] = None) -> torch.Tensor:
    """Every layer pattern (n, n_layers) int64 that meets ``budget`` (lexicographic order)."""
    choices = route_choices(skip)
    pats = torch.tensor(list(itertools.product(choices, repeat=n_layers)),
                        dtype=torch.int64).view(-1, n_layers)
    if budget is None:
        return pats
    spec = _spec_of(budget, model) if model is not None else _spec_of_counts(budget)
    total = spec.costs[pats].sum(1)
    return pats[(total >= spec.lo - 1e-9) & (total <= spec.hi + 1e-9)]


def _spec_of_counts(budget) -> _Spec:
    budget = as_budget(budget)
    if isinstance(budget, FlopBudget):
        raise ValueError("budget: a FlopBudget needs the model (pass model=)")
    return budget.spec(None)


# --------------------------------------------------------------------------- results


@dataclass
class OracleResult:
    """What ``search`` found.

    Fields:
      routes: (n_layers, B, T) int64, the chosen pattern of every sequence / position (for
        ``"token"``, position ``T-1``, which predicts nothing, keeps the base route).
      loss: (B,) for ``"sequence"``, (B, T-1) for ``"token"``.
      patterns_evaluated: complete layer patterns whose loss was computed (each over the
        whole batch; beam counts every scored completion).
      patterns_per_s: ``patterns_evaluated`` per second of search.
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

    def big_fraction(self) -> float:
        """Fraction of (layer, scored position) routes that are big."""
        r = self.routes if self.granularity == "sequence" else self.routes[:, :, :-1]
        return float((r == BIG).float().mean())


@dataclass
class PatternTable:
    """The loss of every evaluated pattern at every position, from an exhaustive walk.

    Fields:
      patterns: (n, n_layers) int64.
      losses: (n, B, T-1) float32 per-position next-token loss under each pattern (for
        ``"token"``: only that position re-routed; for ``"sequence"``: the whole sequence).
      base_routes: (n_layers, B, T) the base routes (token granularity), else None.
    """

    patterns: torch.Tensor
    losses: torch.Tensor
    granularity: str
    skip: bool
    base_routes: Optional[torch.Tensor]
    elapsed_s: float
    model: Optional[DuoLLM] = field(default=None, repr=False)

    @property
    def patterns_per_s(self) -> float:
        return self.patterns.shape[0] / max(self.elapsed_s, 1e-9)

    def mask(self, budget: Budget) -> torch.Tensor:
        """(n,) bool: which patterns meet ``budget``."""
        if budget is None:
            return torch.ones(self.patterns.shape[0], dtype=torch.bool)
        spec = _spec_of(budget, self.model)
        total = spec.costs[self.patterns].sum(1)
        return (total >= spec.lo - 1e-9) & (total <= spec.hi + 1e-9)

    def select(self, budget: Budget) -> OracleResult:
        """The oracle at ``budget`` from this table (the budget must be within the table's)."""
        keep = self.mask(budget)
        if not bool(keep.any()):
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
            tok = torch.where(keep[:, None, None], self.losses, inf)  # (n, B, T-1)
            best = tok.argmin(0)  # (B, T-1)
            loss = tok.gather(0, best[None]).squeeze(0)
            routes = self.base_routes.clone()
            routes[:, :, :Tm] = self.patterns[best].permute(2, 0, 1)  # (L, B, T-1)
        return OracleResult(routes, loss, int(keep.sum()), self.patterns_per_s,
                            self.elapsed_s, self.granularity, "exhaustive", as_budget(budget))

    def loss_of(self, pattern: Sequence[int]) -> torch.Tensor:
        """(B, T-1) losses of one fixed pattern (must be in the table)."""
        p = torch.as_tensor(list(pattern), dtype=torch.int64)
        hit = (self.patterns == p).all(1).nonzero()
        if hit.numel() == 0:
            raise ValueError(f"pattern {list(pattern)} was not evaluated")
        return self.losses[int(hit[0])]


# --------------------------------------------------------------------------- the runner


class _Runner:
    """Runs the model layer by layer on a batch of branches ``h`` of shape (W, B, T, d).

    For ``"sequence"`` each (w, b) row is an ordinary causal sequence. For ``"token"`` each
    (w, b, t) element is position t of sequence b with its own route history; it attends to
    the cached base keys/values of positions < t and to its own key/value.
    """

    def __init__(self, model: DuoLLM, tokens: torch.Tensor, granularity: str, base,
                 max_elems: int):
        self.model, self.granularity, self.max_elems = model, granularity, max_elems
        self.inp, self.tgt = tokens[:, :-1], tokens[:, 1:]  # (B, T-1)
        B, T = self.inp.shape
        self.B, self.T = B, T
        self.rope = model.rope[:T]
        self.h0 = model.embed(self.inp)[None]  # (1, B, T, d)
        self.base_routes = None
        self.kv: List[Tuple[torch.Tensor, torch.Tensor]] = []
        if granularity == "token":
            self.base_routes = model.resolve_routes(base, B, T + 1, tokens.device).to(
                torch.int64).clone()  # (L, B, T+1)
            self._cache_base()

    def _qkv(self, layer, h: torch.Tensor):
        attn = layer.attn
        lead = h.shape[:-2]
        a = layer.attn_norm(h)
        q, k, v = (proj(a).view(*lead, self.T, attn.n_heads, attn.head_dim).transpose(-3, -2)
                   for proj in (attn.q_proj, attn.k_proj, attn.v_proj))  # (..., H, T, hd)
        return apply_rope(q, self.rope), apply_rope(k, self.rope), v

    def _cache_base(self) -> None:
        h = self.h0[0]  # (B, T, d)
        for i, layer in enumerate(self.model.layers):
            q, k, v = self._qkv(layer, h)  # (B, H, T, hd)
            self.kv.append((k, v))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + layer.attn.o_proj(out.transpose(1, 2).reshape(self.B, self.T, -1))
            h = layer.ffn(layer.ffn_norm(h), self.base_routes[i, :, :self.T], residual=h)

    def _chunks(self, W: int, per_branch: int):
        step = max(1, self.max_elems // max(1, per_branch))
        return [slice(s, min(W, s + step)) for s in range(0, W, step)]

    def attend(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """``h + attn(attn_norm(h))`` at layer i, h (W, B, T, d)."""
        layer = self.model.layers[i]
        W, B, T, d = h.shape
        if self.granularity == "sequence":
            out = layer.attn(layer.attn_norm(h.reshape(W * B, T, d)), self.rope, i, None)
            return h + out.view(W, B, T, d)
        H = layer.attn.n_heads
        pieces = [self._attend_token(i, layer, h[sl])
                  for sl in self._chunks(W, B * H * T * T)]
        return torch.cat(pieces, 0)

    def _attend_token(self, i: int, layer, h: torch.Tensor) -> torch.Tensor:
        W, B, T, d = h.shape
        q, k, v = self._qkv(layer, h)  # (W, B, H, T, hd)
        kb, vb = self.kv[i]  # (B, H, T, hd)
        scale = 1.0 / math.sqrt(q.shape[-1])
        s = torch.einsum("wbhtd,bhsd->wbhts", q, kb) * scale  # (W, B, H, T, T)
        s_self = (q * k).sum(-1) * scale  # (W, B, H, T)
        pos = torch.arange(T, device=h.device)
        earlier = pos[None, :] < pos[:, None]  # (T, T): key s strictly before query t
        eye = pos[None, :] == pos[:, None]
        s = torch.where(eye, s_self[..., None], s.masked_fill(~earlier, -math.inf))
        p = torch.softmax(s.float(), -1).to(q.dtype)
        p_self = p.diagonal(dim1=-2, dim2=-1)  # (W, B, H, T)
        out = torch.einsum("wbhts,bhsd->wbhtd", p.masked_fill(eye, 0.0), vb)
        out = out + p_self[..., None] * v
        out = out.transpose(-3, -2).reshape(W, B, T, d)
        return h + layer.attn.o_proj(out)

    def ffn(self, i: int, h: torch.Tensor, route) -> torch.Tensor:
        """``h + FFN_route(ffn_norm(h))`` at layer i; ``route`` an int or a (W, B, T) tensor."""
        layer = self.model.layers[i]
        x = layer.ffn_norm(h)
        if isinstance(route, int):
            if route == SKIP:
                return h
            mod = layer.ffn.big if route == BIG else layer.ffn.small
            return h + mod(x)
        return layer.ffn(x, route, residual=h)

    def losses(self, h: torch.Tensor) -> torch.Tensor:
        """(W, B, T) per-position next-token cross-entropy, float32."""
        W = h.shape[0]
        out = []
        for sl in self._chunks(W, self.B * self.T * self.model.config.vocab_size):
            logits = self.model.lm_head(self.model.norm(h[sl])).float()  # (w, B, T, V)
            w = logits.shape[0]
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                 self.tgt.expand(w, -1, -1).reshape(-1), reduction="none")
            out.append(ce.view(w, self.B, self.T))
        return torch.cat(out, 0)

    def unit_scores(self, losses: torch.Tensor) -> torch.Tensor:
        """Per-unit score (W, B, T): the sequence mean (broadcast) or the position's own."""
        if self.granularity == "sequence":
            return losses.mean(-1, keepdim=True).expand_as(losses)
        return losses


# --------------------------------------------------------------------------- search


def _check_args(model, tokens, granularity, method, skip):
    if not isinstance(model, DuoLLM):
        raise TypeError(f"model: expected a DuoLLM, got {type(model).__name__}")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError("tokens: expected a (B, T) integer tensor with T >= 2")
    if granularity not in ("sequence", "token"):
        raise ValueError(f"granularity: expected 'sequence' or 'token', got {granularity!r}")
    if method not in ("exhaustive", "beam", "greedy"):
        raise ValueError(f"method: expected 'exhaustive', 'beam' or 'greedy', got {method!r}")
    if skip and not model.config.skip:
        raise ValueError("skip=True needs a model whose config has skip=True")


@torch.no_grad()
def pattern_losses(model: DuoLLM, tokens: torch.Tensor, granularity: str = "sequence",
                   skip: bool = False, base="big", budget: Budget = None,
                   max_elems: int = 1 << 24, progress: bool = False) -> PatternTable:
    """Exhaustive walk: the per-position loss of every pattern meeting ``budget`` (None: all).

    Args:
      tokens: (B, T) int64. granularity, skip, base: see ``search``.
      max_elems: bounds the floats of one batched branch step (chunks the branches).
    Returns: a ``PatternTable``; ``.select(b)`` gives the oracle of any budget within it.
    """
    _check_args(model, tokens, granularity, "exhaustive", skip)
    tokens = tokens.to(model.embed.weight.device, torch.int64)
    t0 = time.perf_counter()
    runner = _Runner(model, tokens, granularity, base, max_elems)
    dev = tokens.device
    spec = _spec_of(budget, model).to(dev)
    choices = route_choices(skip)
    L = model.config.n_layers
    per_branch = runner.B * runner.T * max(model.config.d_big, model.config.d_model)
    pats: List[torch.Tensor] = []
    losses: List[torch.Tensor] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        total = (all_patterns(L, skip, budget, model).shape[0] if len(choices) ** L <= 1 << 20
                 else None)
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
        for sl in runner._chunks(h.shape[0], per_branch):
            walk(i + 1, h[sl], prefix[sl], cost[sl])

    walk(0, runner.h0, torch.zeros(1, 0, dtype=torch.int64, device=dev),
         torch.zeros(1, dtype=torch.float64, device=dev))
    if bar is not None:
        bar.close()
    if not pats:
        raise ValueError(f"budget: no pattern of {L} layers meets {budget}")
    base_routes = None if runner.base_routes is None else runner.base_routes.cpu()
    return PatternTable(torch.cat(pats).cpu(), torch.cat(losses).cpu(), granularity, skip,
                        base_routes, time.perf_counter() - t0, model)


@torch.no_grad()
def _beam(model: DuoLLM, tokens: torch.Tensor, budget, granularity: str, skip: bool, base,
          beam_width: int, max_elems: int, progress: bool) -> OracleResult:
    t0 = time.perf_counter()
    runner = _Runner(model, tokens, granularity, base, max_elems)
    dev = tokens.device
    spec = _spec_of(budget, model).to(dev)
    choices = route_choices(skip)
    by_size = sorted(choices, reverse=True)  # BIG, SMALL, (SKIP): completion preference
    L = model.config.n_layers
    B, T = runner.B, runner.T
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
        R = len(choices)
        kid_h = torch.cat([runner.ffn(i, h, c) for c in choices])  # (R*W, B, T, d)
        kid_prefix = torch.cat([torch.cat([prefix, torch.full((1, *prefix.shape[1:]), c,
                                                              device=dev)])
                                for c in choices], 1)  # (i+1, R*W, B, T)
        kid_cost = torch.cat([cost + spec.costs[c] for c in choices])
        ok = spec.feasible(kid_cost, L - i - 1, choices)  # (R*W, B, T)
        # Score each child by completing it with the biggest routes the budget allows.
        g, g_cost = kid_h, kid_cost
        for j in range(i + 1, L):
            g = runner.attend(j, g)
            route = torch.full_like(g_cost, choices[0], dtype=torch.int64)
            chosen = torch.zeros_like(g_cost, dtype=torch.bool)
            for c in by_size:
                fits = ~chosen & spec.feasible(g_cost + spec.costs[c], L - j - 1, choices)
                route = torch.where(fits, torch.full_like(route, c), route)
                chosen |= fits
            g_cost = g_cost + spec.costs[route]
            g = runner.ffn(j, g, route)
        evaluated += kid_h.shape[0]
        score = runner.unit_scores(runner.losses(g)).double()
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
                        elapsed,
                        granularity, method, as_budget(budget), base)


def search(model: DuoLLM, tokens: torch.Tensor, budget: Budget,
           granularity: str = "sequence", method: str = "exhaustive", skip: bool = False,
           base="big", beam_width: int = 4, max_elems: int = 1 << 24,
           progress: bool = False) -> OracleResult:
    """The routing that minimises next-token loss under ``budget`` (see the module docstring).

    Args:
      model: a ``DuoLLM`` (run without gradients).
      tokens: (B, T) int64; positions 0..T-2 predict tokens 1..T-1.
      budget: int k (exactly k big layers), ``Exactly``, ``AtMost``, ``FlopBudget`` or None.
      granularity: ``"sequence"`` or ``"token"``.
      method: ``"exhaustive"``, ``"beam"`` or ``"greedy"``.
      skip: choose among skip/small/big (3^L patterns) instead of small/big (2^L).
      base: the context's routes for ``"token"``: a policy name, a (L,) pattern or (L, B, T).
      beam_width: prefixes kept per sequence / position by ``"beam"``.
      max_elems: bound on the floats of one batched step (branches are chunked to fit).
    Returns: an ``OracleResult`` with ``.routes`` (L, B, T) and ``.loss`` ((B,) or (B, T-1)).
    """
    _check_args(model, tokens, granularity, method, skip)
    tokens = tokens.to(model.embed.weight.device, torch.int64)
    if method == "exhaustive":
        table = pattern_losses(model, tokens, granularity, skip, base, budget, max_elems,
                               progress)
        result = table.select(budget)
        result.base = base
        return result
    width = 1 if method == "greedy" else beam_width
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"beam_width: expected a positive int, got {beam_width!r}")
    return _beam(model, tokens, budget, granularity, skip, base, width, max_elems, progress)
