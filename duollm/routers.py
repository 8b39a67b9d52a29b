"""Trained routers and the baselines they are judged against (the study's stage 3,
``docs/study.md``). Every function takes ``model``: a ``DuoLLM``, a Hugging Face model
converted by ``duollm.hf.convert`` or a ``RoutedStack``; models are seen only through
``duollm.stack``.

* ``LinearRouter`` — one linear map per layer from the FFN input ``(B, T, d)`` to logits over
  its paths (``(SMALL, BIG)`` by default, ``(SKIP, SMALL, BIG)`` with a skip path). Called as
  ``router(layer, hidden)`` it returns hard routes, so ``stack.forward(tokens, router)``
  evaluates it. Hard routing is ``"argmax"`` or ``"threshold"``: the path maximising
  ``logit_p - threshold * price_p``, with ``prices`` either the big indicator (``price_big = 1``,
  others 0: for two paths, big when ``logit_big - logit_small > threshold``) or each path's FFN
  FLOPs as a fraction of big. ``calibrate`` bisects the threshold so the realised big fraction
  or compute fraction matches a target; a larger threshold never picks a pricier path.
* ``train_router`` — the model frozen, the router trained on ``LM loss + penalty`` where each
  FFN outputs the probability-weighted mix of its paths (soft mixing through the stack's
  ``DuoFFN`` modules; the skip path contributes nothing), the softmax temperature annealed
  geometrically from ``tau_start`` to ``tau_end``, and the penalty holding either the expected
  big usage (``penalty * (E[p_big] - target_big)^2``) or the expected compute
  (``penalty * (E[FLOPs fraction] - target_compute)^2``, the FLOPs fraction of all-big) at the
  target.
* ``train_supervised_router`` — imitation of oracle routes: cross-entropy of the router's
  logits against an oracle's route of every token and layer, on the hidden states of the
  oracle-routed forward pass (the Duo-LLM paper did not try this).
* Baselines at equal budget: ``fixed_pattern`` (all small, all big, first k big, last k big),
  ``best_random_pattern`` (best of N random layer patterns with k big layers),
  ``random_token_routes`` (each token draws its own k big layers); ``agreement`` compares a
  router's routes with the oracle's per layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import DuoConfig
from .oracle.budgets import check_paths, route_flops
from .reference import BIG, SKIP, SMALL
from .stack import as_stack


def _shape_of(config) -> Tuple[int, int, bool]:
    """(n_layers, d_model, skip) of a ``DuoConfig``, a model or a stack."""
    if isinstance(config, DuoConfig):
        return config.n_layers, config.d_model, config.skip
    s = as_stack(config)
    return s.n_layers, s.d_model, s.skip


def compute_prices(model) -> torch.Tensor:
    """(3,) float64: each route's FFN FLOPs as a fraction of the big path's, indexed by route."""
    f = route_flops(model)
    return f / f[BIG]


def compute_fraction(routes: torch.Tensor, model) -> float:
    """Mean FFN FLOPs of hard ``routes`` (any shape) as a fraction of all-big."""
    return float(compute_prices(model).to(routes.device)[routes].mean())


class LinearRouter(nn.Module):
    """Per-layer linear routers ``d_model -> len(paths)`` logits.

    Args:
      config: the model's ``DuoConfig``, or the model / its ``RoutedStack`` (n_layers,
        d_model, skip are read from it).
      paths: the routes the router chooses among, e.g. ``(SMALL, BIG)`` or
        ``(SKIP, SMALL, BIG)``.
      mode: hard routing, ``"argmax"`` or ``"threshold"`` (argmax of
        ``logits - threshold * prices``; see the module docstring).
    """

    def __init__(self, config, paths: Sequence[int] = (SMALL, BIG), mode: str = "argmax"):
        super().__init__()
        self.paths = tuple(int(p) for p in paths)
        if len(set(self.paths)) != len(self.paths) or not set(self.paths) <= {SKIP, SMALL, BIG}:
            raise ValueError(f"paths: expected distinct routes among SKIP, SMALL, BIG, got "
                             f"{paths!r}")
        n_layers, d_model, skip = _shape_of(config)
        if SKIP in self.paths and not skip:
            raise ValueError("paths: SKIP needs a model built with skip=True")
        if mode not in ("argmax", "threshold"):
            raise ValueError(f"mode: expected 'argmax' or 'threshold', got {mode!r}")
        self.n_layers = n_layers
        self.proj = nn.ModuleList(nn.Linear(d_model, len(self.paths)) for _ in range(n_layers))
        for p in self.proj:
            nn.init.zeros_(p.weight)
            nn.init.zeros_(p.bias)
        self.mode = mode
        self.threshold = 0.0
        self.register_buffer("route_of", torch.tensor(self.paths, dtype=torch.int64),
                             persistent=False)
        # Big indicator: the threshold trades big against the rest (see set_prices).
        self.register_buffer("prices", (self.route_of == BIG).float(), persistent=False)

    def set_prices(self, kind: str, model=None) -> None:
        """What the threshold prices: ``"big"`` (big indicator) or ``"compute"`` (each path's
        FFN FLOPs over big's; needs ``model``)."""
        if kind == "big":
            prices = (self.route_of == BIG).float()
        elif kind == "compute":
            if model is None:
                raise ValueError("model: compute prices need the model's widths")
            prices = compute_prices(model).float().to(self.route_of.device)[self.route_of]
        else:
            raise ValueError(f"kind: expected 'big' or 'compute', got {kind!r}")
        self.prices = prices.to(self.route_of.device)

    def logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """(..., P) logits of ``hidden`` (..., d) at ``layer``."""
        return self.proj[layer](hidden.to(self.proj[layer].weight.dtype))

    def big_score(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """(...,) ``logit_big - max(other logits)``: positive where argmax picks BIG."""
        z = self.logits(layer, hidden)
        j = self.paths.index(BIG)
        others = torch.cat([z[..., :j], z[..., j + 1:]], -1)
        return z[..., j] - others.max(-1).values

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Hard routes (...,) int64 for ``hidden`` (..., d): the routes-callable interface."""
        z = self.logits(layer, hidden)
        if self.mode == "threshold":
            z = z - self.threshold * self.prices.to(z.dtype)
        return self.route_of[z.argmax(-1)]


@dataclass
class SoftForward:
    """A soft-mixed forward: ``loss`` the mean next-token loss (scalar, differentiable) and
    ``probs`` (L, P) each path's mean routing probability per layer (differentiable)."""

    loss: torch.Tensor
    probs: torch.Tensor

    def usage(self, paths: Sequence[int], route: int = BIG) -> torch.Tensor:
        """(L,) mean probability of ``route`` per layer (zeros when it is not a path)."""
        if route not in paths:
            return torch.zeros(self.probs.shape[0], device=self.probs.device)
        return self.probs[:, list(paths).index(route)]

    def compute(self, paths: Sequence[int], model) -> torch.Tensor:
        """(L,) expected FFN FLOPs per layer as a fraction of big."""
        prices = compute_prices(model)[list(paths)].float().to(self.probs.device)
        return self.probs @ prices


def soft_forward_stats(model, router: LinearRouter, tokens: torch.Tensor,
                       tau: float) -> SoftForward:
    """Soft-mixed forward: each FFN outputs ``sum_p softmax(logits / tau)_p * path_p(x)`` (a
    skip path adds nothing), through the stack's steps.

    Args: tokens (B, T) int64 (inputs ``[:, :-1]``, targets ``[:, 1:]``).
    """
    stack = as_stack(model)
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    h = stack.embed(inp)  # (B, T, d)
    probs = []
    for i in range(stack.n_layers):
        h = stack.attend(i, h)
        x = stack.ffn_input(i, h)
        p = torch.softmax(router.logits(i, x).float() / tau, -1).to(x.dtype)  # (B, T, P)
        ffn = stack.ffn_module(i)
        for j, route in enumerate(router.paths):
            if route == BIG:
                h = h + p[..., j:j + 1] * ffn.big(x)
            elif route == SMALL:
                h = h + p[..., j:j + 1] * ffn.small(x)
        probs.append(p.float().mean((0, 1)))
    logits = stack.head(h).float()
    return SoftForward(F.cross_entropy(logits.transpose(1, 2), tgt), torch.stack(probs))


def soft_forward(model, router: LinearRouter, tokens: torch.Tensor, tau: float
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean next-token loss, (L,) mean big probability per layer) of ``soft_forward_stats``."""
    s = soft_forward_stats(model, router, tokens, tau)
    return s.loss, s.usage(router.paths, BIG)


def _batches(data, batch_size: int, seq_len: int, gen: torch.Generator):
    from .data import sample_batch

    tokens = data.train if hasattr(data, "train") else data
    while True:
        yield sample_batch(tokens, batch_size, seq_len, generator=gen)


def _check_fraction(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
        raise ValueError(f"{name}: expected a fraction in [0, 1], got {value!r}")


def train_router(model, data, target_big: float = 0.5, steps: int = 200,
                 batch_size: int = 8, seq_len: int = 128, lr: float = 1e-2,
                 penalty: float = 10.0, tau_start: float = 1.0, tau_end: float = 0.1,
                 paths: Sequence[int] = (SMALL, BIG), seed: int = 0,
                 progress: bool = False, target_compute: Optional[float] = None
                 ) -> Tuple[LinearRouter, List[Dict]]:
    """Train a ``LinearRouter`` on a frozen model (see the module docstring).

    Args:
      model: a ``DuoLLM``, a converted HF model or a ``RoutedStack``.
      data: a ``TokenData`` (its ``train`` split is sampled) or a 1-D token tensor.
      target_big: the budget as the fraction of token-layers routed big (ignored when
        ``target_compute`` is given).
      target_compute: the budget as expected FFN FLOPs over all-big's (e.g. with
        ``paths=(SKIP, SMALL, BIG)``); the penalty is then on compute, not on big usage.
      penalty: weight of the squared gap between the expected usage (or compute) and target.
      seed: seeds the batch sampling (the router starts from a deterministic init).
    Returns: (router in ``"threshold"`` mode with ``threshold = 0`` (= argmax) and prices of
      the trained budget kind, history of dicts with ``step, tau, lm_loss, usage`` (expected
      big fraction), ``compute`` (expected FLOPs fraction), ``objective``).
    """
    stack = as_stack(model)
    on_compute = target_compute is not None
    _check_fraction("target_compute" if on_compute else "target_big",
                    target_compute if on_compute else target_big)
    paths = check_paths(paths)
    if BIG not in paths:
        raise ValueError("paths: a router without BIG has nothing to learn about the budget")
    if len(paths) < 2:
        raise ValueError(f"paths: a router needs at least two paths, got {paths!r}")
    device = stack.device
    router = LinearRouter(stack, paths).to(device)
    target = target_compute if on_compute else target_big
    # Start near the target so the penalty does not dominate the first steps.
    j_big = router.paths.index(BIG)
    prior = min(max(target, 1e-3), 1 - 1e-3)
    for p in router.proj:
        nn.init.constant_(p.bias[j_big:j_big + 1],
                          math.log(prior / (1 - prior)) + math.log(len(router.paths) - 1))
    params = list(stack.model.parameters())
    frozen = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    was_training = stack.model.training
    stack.model.eval()
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    batches = _batches(data, batch_size, seq_len, gen)
    history: List[Dict] = []
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=f"router {target:.2f}" + (" compute" if on_compute else ""),
                  leave=False)
    try:
        for step in it:
            tau = tau_start * (tau_end / tau_start) ** (step / max(1, steps - 1))
            tokens = next(batches).to(device)
            s = soft_forward_stats(stack, router, tokens, tau)
            use = s.usage(router.paths, BIG).mean()
            comp = s.compute(router.paths, stack).mean()
            obj = s.loss + penalty * ((comp if on_compute else use) - target) ** 2
            opt.zero_grad(set_to_none=True)
            obj.backward()
            opt.step()
            history.append({"step": step, "tau": tau, "lm_loss": float(s.loss.detach()),
                            "usage": float(use.detach()), "compute": float(comp.detach()),
                            "objective": float(obj.detach())})
    finally:
        for p, g in zip(params, frozen):
            p.requires_grad_(g)
        stack.model.train(was_training)
    router.mode = "threshold"
    router.set_prices("compute" if on_compute else "big", stack)
    router.target_big = None if on_compute else target_big
    router.target_compute = target_compute
    return router, history


@torch.no_grad()
def route_and_loss(model, router: Callable, tokens: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hard-routed evaluation: (per-position losses (B, T-1), routes (L, B, T-1))."""
    rec: List[torch.Tensor] = []

    def recording(layer, hidden):
        r = router(layer, hidden)
        rec.append(r if not isinstance(r, tuple) else r[0])
        return r

    losses = as_stack(model).token_losses(tokens, recording)
    return losses, torch.stack(rec)


@torch.no_grad()
def calibrate(model, router: LinearRouter, tokens: torch.Tensor,
              target_big: Optional[float] = None, iters: int = 14, *,
              target_compute: Optional[float] = None) -> float:
    """Bisect ``router.threshold`` so the realised big fraction (or, with ``target_compute``,
    the realised FFN FLOPs fraction of all-big) on ``tokens`` is the target.

    Sets the router to ``"threshold"`` mode with the matching prices. Any paths containing
    BIG work. Returns the realised fraction at the chosen threshold.
    """
    stack = as_stack(model)
    if (target_big is None) == (target_compute is None):
        raise ValueError("calibrate: give exactly one of target_big, target_compute")
    on_compute = target_compute is not None
    target = target_compute if on_compute else target_big
    _check_fraction("target_compute" if on_compute else "target_big", target)
    if BIG not in router.paths:
        raise ValueError("calibrate: needs a router with a BIG path")
    router.mode = "threshold"
    router.set_prices("compute" if on_compute else "big", stack)

    def realised(routes):
        return (compute_fraction(routes, stack) if on_compute
                else float((routes == BIG).float().mean()))

    lo, hi = -50.0, 50.0  # the realised fraction never rises as the threshold rises
    best = (math.inf, 0.0, 0.0)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        router.threshold = mid
        _, routes = route_and_loss(stack, router, tokens)
        frac = realised(routes)
        if abs(frac - target) < best[0]:
            best = (abs(frac - target), mid, frac)
        if frac > target:
            lo = mid
        else:
            hi = mid
    router.threshold = best[1]
    return best[2]


def train_supervised_router(model, tokens: torch.Tensor, oracle_routes: torch.Tensor,
                            steps: int = 300, lr: float = 1e-2, weight_decay: float = 0.0,
                            seed: int = 0, paths: Optional[Sequence[int]] = None
                            ) -> Tuple[LinearRouter, List[Dict]]:
    """Fit a router to oracle routes by cross-entropy (imitation).

    Args:
      tokens: (B, T) int64 training sequences.
      oracle_routes: (L, B, T) routes, e.g. a token oracle's ``.routes``.
      paths: the router's paths; default ``(SMALL, BIG)``, or the routes the oracle used
        (with BIG) when it used SKIP.
      seed: kept for a uniform interface; full-batch training from a zero init is
        deterministic.
    Returns: (router in ``"threshold"`` mode, history of ``step, ce, accuracy``).
    The features are the FFN inputs of the forward pass routed by ``oracle_routes``.
    """
    stack = as_stack(model)
    oracle_routes = oracle_routes.to(tokens.device)  # oracle results live on the CPU
    scored = oracle_routes[:, :, :-1]
    used = set(scored.unique().tolist())
    if paths is None:
        paths = (SMALL, BIG) if used <= {SMALL, BIG} else tuple(sorted(used | {BIG}))
    paths = check_paths(paths)
    if not used <= set(paths):
        raise ValueError(f"oracle_routes: uses routes {sorted(used)} outside paths {paths}")
    router = LinearRouter(stack, paths).to(stack.device)
    with torch.no_grad():
        _, hidden = stack.forward(tokens[:, :-1], scored, return_hidden=True)
    X = torch.stack([h.detach() for h in hidden])  # (L, B, T-1, d)
    index_of = torch.full((3,), -1, dtype=torch.int64, device=tokens.device)
    index_of[list(paths)] = torch.arange(len(paths), device=tokens.device)
    y = index_of[scored]  # (L, B, T-1): path index of each oracle route
    opt = torch.optim.Adam(router.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    P = len(paths)
    for step in range(steps):
        logits = torch.stack([router.logits(i, X[i]) for i in range(X.shape[0])])
        ce = F.cross_entropy(logits.reshape(-1, P).float(), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        ce.backward()
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            acc = float((logits.argmax(-1) == y).float().mean())
            history.append({"step": step, "ce": float(ce.detach()), "accuracy": acc})
    router.mode = "threshold"
    return router, history


# --------------------------------------------------------------------------- baselines


def fixed_pattern(n_layers: int, kind: str, k: int = 0) -> List[int]:
    """A (n_layers,) pattern: ``"small"``, ``"big"``, ``"first"`` (first k big) or ``"last"``."""
    if kind == "small":
        return [SMALL] * n_layers
    if kind == "big":
        return [BIG] * n_layers
    if not 0 <= k <= n_layers:
        raise ValueError(f"k: expected 0..{n_layers}, got {k}")
    if kind == "first":
        return [BIG] * k + [SMALL] * (n_layers - k)
    if kind == "last":
        return [SMALL] * (n_layers - k) + [BIG] * k
    raise ValueError(f"kind: expected small, big, first or last, got {kind!r}")


def random_patterns(n_layers: int, k: int, n: int, seed: int = 0) -> torch.Tensor:
    """(n, n_layers) patterns, each with exactly k big layers at uniformly random places."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.rand(n, n_layers, generator=gen).argsort(1).argsort(1)
    return torch.where(ranks < k, BIG, SMALL).to(torch.int64)


@torch.no_grad()
def best_random_pattern(model, tokens: torch.Tensor, k: int, n: int = 100,
                        seed: int = 0) -> Tuple[List[int], float, int]:
    """The best (lowest mean loss on ``tokens``) of ``n`` random k-big layer patterns.

    Returns (pattern, mean loss, number of distinct patterns tried).
    """
    stack = as_stack(model)
    pats = random_patterns(stack.n_layers, k, n, seed).unique(dim=0)
    best = (None, math.inf)
    for p in pats:
        loss = float(stack.token_losses(tokens, p).mean())
        if loss < best[1]:
            best = (p.tolist(), loss)
    return best[0], best[1], pats.shape[0]


def random_token_routes(n_layers: int, B: int, T: int, k: int, seed: int = 0) -> torch.Tensor:
    """(n_layers, B, T) routes where every token draws its own k big layers."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.rand(n_layers, B, T, generator=gen).argsort(0).argsort(0)
    return torch.where(ranks < k, BIG, SMALL).to(torch.int64)


def agreement(router_routes: torch.Tensor, oracle_routes: torch.Tensor) -> torch.Tensor:
    """(L,) fraction of tokens per layer where the two (L, B, T) route tensors agree.

    The shorter of the two time axes is used (an oracle's last column predicts nothing).
    """
    T = min(router_routes.shape[-1], oracle_routes.shape[-1])
    eq = router_routes[..., :T].cpu() == oracle_routes[..., :T].cpu()
    return eq.float().mean(dim=tuple(range(1, eq.dim())))


__all__ = ["LinearRouter", "SoftForward", "soft_forward", "soft_forward_stats", "train_router",
           "route_and_loss", "calibrate", "train_supervised_router", "fixed_pattern",
           "random_patterns", "best_random_pattern", "random_token_routes", "agreement",
           "compute_prices", "compute_fraction"]
