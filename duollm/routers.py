"""Trained routers and the baselines they are judged against (docs/architecture.md).

* ``LinearRouter`` — one linear map per layer from the FFN input ``(B, T, d)`` to logits over
  its paths (``(SMALL, BIG)`` by default). Called as ``router(layer, hidden)`` it returns hard
  routes, so ``model(tokens, router)`` evaluates it. Hard routing is ``"argmax"`` or
  ``"threshold"``: big when ``logit_big - logit_small > router.threshold``, with the threshold
  calibrated (``calibrate``) so the realised big fraction matches a target budget.
* ``train_router`` — the model frozen, the router trained on ``LM loss + penalty`` where the
  FFN output is the probability-weighted mix of the paths (soft mixing, computed through each
  ``DuoFFN``'s ``big``/``small`` modules), the softmax temperature annealed geometrically from
  ``tau_start`` to ``tau_end``, and ``penalty * (E[p_big] - target_big)^2`` holding the expected
  big usage (over all token-layers) at the target.
* ``train_supervised_router`` — imitation of oracle routes: cross-entropy of the router's
  logits against the token-granularity oracle's route of every token and layer, on the hidden
  states of the oracle-routed forward pass (the Duo-LLM paper did not try this).
* Baselines at equal budget: ``fixed_pattern`` (all small, all big, first k big, last k big),
  ``best_random_pattern`` (best of N random layer patterns with k big layers),
  ``random_token_routes`` (each token draws its own k big layers); ``agreement`` compares a
  router's routes with the oracle's per layer.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import DuoConfig
from .model import DuoLLM
from .reference import BIG, SKIP, SMALL


class LinearRouter(nn.Module):
    """Per-layer linear routers ``d_model -> len(paths)`` logits.

    Args:
      config: the model's ``DuoConfig`` (n_layers, d_model).
      paths: the routes the router chooses among, e.g. ``(SMALL, BIG)`` or
        ``(SKIP, SMALL, BIG)``.
      mode: hard routing, ``"argmax"`` or ``"threshold"`` (two-path routers with BIG only).
    """

    def __init__(self, config: DuoConfig, paths: Sequence[int] = (SMALL, BIG),
                 mode: str = "argmax"):
        super().__init__()
        self.paths = tuple(int(p) for p in paths)
        if len(set(self.paths)) != len(self.paths) or not set(self.paths) <= {SKIP, SMALL, BIG}:
            raise ValueError(f"paths: expected distinct routes among SKIP, SMALL, BIG, got "
                             f"{paths!r}")
        if SKIP in self.paths and not config.skip:
            raise ValueError("paths: SKIP needs a config with skip=True")
        if mode not in ("argmax", "threshold"):
            raise ValueError(f"mode: expected 'argmax' or 'threshold', got {mode!r}")
        self.n_layers = config.n_layers
        self.proj = nn.ModuleList(nn.Linear(config.d_model, len(self.paths))
                                  for _ in range(config.n_layers))
        for p in self.proj:
            nn.init.zeros_(p.weight)
            nn.init.zeros_(p.bias)
        self.mode = mode
        self.threshold = 0.0
        self.register_buffer("route_of", torch.tensor(self.paths, dtype=torch.int64),
                             persistent=False)

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
        """Hard routes (...,) int64 for ``hidden`` (..., d): the ``DuoLLM`` router interface."""
        if self.mode == "threshold":
            if self.paths != (SMALL, BIG):
                raise ValueError("mode 'threshold' needs paths (SMALL, BIG)")
            big = self.big_score(layer, hidden) > self.threshold
            return torch.where(big, BIG, SMALL).to(torch.int64)
        return self.route_of[self.logits(layer, hidden).argmax(-1)]


def soft_forward(model: DuoLLM, router: LinearRouter, tokens: torch.Tensor, tau: float
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Soft-mixed forward: each FFN outputs ``sum_p softmax(logits / tau)_p * path_p(x)``.

    Args: tokens (B, T) int64 (inputs ``[:, :-1]``, targets ``[:, 1:]``).
    Returns: (mean next-token loss, (L,) mean big probability per layer).
    """
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    T = inp.shape[1]
    rope = model.rope[:T]
    h = model.embed(inp)  # (B, T, d)
    usage = []
    for i, layer in enumerate(model.layers):
        h = h + layer.attn(layer.attn_norm(h), rope, i, None)
        x = layer.ffn_norm(h)
        p = torch.softmax(router.logits(i, x).float() / tau, -1).to(x.dtype)  # (B, T, P)
        for j, route in enumerate(router.paths):
            if route == BIG:
                h = h + p[..., j:j + 1] * layer.ffn.big(x)
                usage.append(p[..., j].float().mean())
            elif route == SMALL:
                h = h + p[..., j:j + 1] * layer.ffn.small(x)
    logits = model.lm_head(model.norm(h)).float()
    loss = F.cross_entropy(logits.transpose(1, 2), tgt)
    return loss, torch.stack(usage)


def _batches(data, batch_size: int, seq_len: int, gen: torch.Generator):
    from .data import sample_batch

    tokens = data.train if hasattr(data, "train") else data
    while True:
        yield sample_batch(tokens, batch_size, seq_len, generator=gen)


def train_router(model: DuoLLM, data, target_big: float = 0.5, steps: int = 200,
                 batch_size: int = 8, seq_len: int = 128, lr: float = 1e-2,
                 penalty: float = 10.0, tau_start: float = 1.0, tau_end: float = 0.1,
                 paths: Sequence[int] = (SMALL, BIG), seed: int = 0,
                 progress: bool = False) -> Tuple[LinearRouter, List[Dict]]:
    """Train a ``LinearRouter`` on a frozen model (see the module docstring).

    Args:
      data: a ``TokenData`` (its ``train`` split is sampled) or a 1-D token tensor.
      target_big: the budget, as the fraction of token-layers routed big.
      penalty: weight of ``(E[p_big] - target_big)^2``.
    Returns: (router in ``"threshold"`` mode with ``threshold = 0``, history of dicts with
      ``step, tau, lm_loss, usage, objective``).
    """
    if not 0.0 <= target_big <= 1.0:
        raise ValueError(f"target_big: expected a fraction in [0, 1], got {target_big!r}")
    if BIG not in paths:
        raise ValueError("paths: a router without BIG has nothing to learn about the budget")
    device = model.embed.weight.device
    router = LinearRouter(model.config, paths).to(device)
    # Start at the target usage so the penalty does not dominate the first steps.
    j_big = router.paths.index(BIG)
    prior = min(max(target_big, 1e-3), 1 - 1e-3)
    for p in router.proj:
        nn.init.constant_(p.bias[j_big:j_big + 1],
                          math.log(prior / (1 - prior)) + math.log(len(router.paths) - 1))
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    batches = _batches(data, batch_size, seq_len, gen)
    history: List[Dict] = []
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=f"router {target_big:.2f}", leave=False)
    try:
        for step in it:
            tau = tau_start * (tau_end / tau_start) ** (step / max(1, steps - 1))
            tokens = next(batches).to(device)
            lm, usage = soft_forward(model, router, tokens, tau)
            use = usage.mean()
            obj = lm + penalty * (use - target_big) ** 2
            opt.zero_grad(set_to_none=True)
            obj.backward()
            opt.step()
            history.append({"step": step, "tau": tau, "lm_loss": float(lm.detach()),
                            "usage": float(use.detach()), "objective": float(obj.detach())})
    finally:
        for p, g in zip(model.parameters(), frozen):
            p.requires_grad_(g)
        model.train(was_training)
    router.mode = "threshold" if router.paths == (SMALL, BIG) else "argmax"
    router.target_big = target_big
    return router, history


@torch.no_grad()
def route_and_loss(model: DuoLLM, router: Callable, tokens: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hard-routed evaluation: (per-position losses (B, T-1), routes (L, B, T-1))."""
    rec: List[torch.Tensor] = []

    def recording(layer, hidden):
        r = router(layer, hidden)
        rec.append(r)
        return r

    losses = model.token_losses(tokens, recording)
    return losses, torch.stack(rec)


@torch.no_grad()
def calibrate(model: DuoLLM, router: LinearRouter, tokens: torch.Tensor, target_big: float,
              iters: int = 14) -> float:
    """Bisect ``router.threshold`` so the realised big fraction on ``tokens`` is the target.

    Returns the realised big fraction at the chosen threshold.
    """
    if router.paths != (SMALL, BIG):
        raise ValueError("calibrate: needs a router over paths (SMALL, BIG)")
    router.mode = "threshold"
    lo, hi = -50.0, 50.0  # the big fraction falls as the threshold rises
    best = (math.inf, 0.0, 0.0)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        router.threshold = mid
        _, routes = route_and_loss(model, router, tokens)
        frac = float((routes == BIG).float().mean())
        if abs(frac - target_big) < best[0]:
            best = (abs(frac - target_big), mid, frac)
        if frac > target_big:
            lo = mid
        else:
            hi = mid
    router.threshold = best[1]
    return best[2]


def train_supervised_router(model: DuoLLM, tokens: torch.Tensor, oracle_routes: torch.Tensor,
                            steps: int = 300, lr: float = 1e-2, weight_decay: float = 0.0,
                            seed: int = 0) -> Tuple[LinearRouter, List[Dict]]:
    """Fit a router to oracle routes by cross-entropy (imitation).

    Args:
      tokens: (B, T) int64 training sequences.
      oracle_routes: (L, B, T) routes (SMALL/BIG), e.g. a token oracle's ``.routes``.
    Returns: (router in ``"threshold"`` mode, history of ``step, ce, accuracy``).
    The features are the FFN inputs of the forward pass routed by ``oracle_routes``.
    """
    torch.manual_seed(seed)
    router = LinearRouter(model.config, (SMALL, BIG)).to(model.embed.weight.device)
    oracle_routes = oracle_routes.to(tokens.device)  # oracle results live on the CPU
    with torch.no_grad():
        _, hidden = model(tokens[:, :-1], oracle_routes[:, :, :-1], return_hidden=True)
    X = torch.stack([h.detach() for h in hidden])  # (L, B, T-1, d)
    y = (oracle_routes[:, :, :-1] == BIG).long()  # (L, B, T-1): path index in (SMALL, BIG)
    opt = torch.optim.Adam(router.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    for step in range(steps):
        logits = torch.stack([router.logits(i, X[i]) for i in range(X.shape[0])])
        ce = F.cross_entropy(logits.reshape(-1, 2).float(), y.reshape(-1))
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
def best_random_pattern(model: DuoLLM, tokens: torch.Tensor, k: int, n: int = 100,
                        seed: int = 0) -> Tuple[List[int], float, int]:
    """The best (lowest mean loss on ``tokens``) of ``n`` random k-big layer patterns.

    Returns (pattern, mean loss, number of distinct patterns tried).
    """
    pats = random_patterns(model.config.n_layers, k, n, seed).unique(dim=0)
    best = (None, math.inf)
    for p in pats:
        loss = float(model.token_losses(tokens, p).mean())
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
