"""Routes forms and their resolution, below ``duollm.model`` and ``duollm.stack`` (both use it;
``duollm.stack`` re-exports every name here).

Routes forms (shared by ``DuoLLM.forward``, ``duollm.hf.routing`` and ``RoutedStack.forward``):

* a ``(n_layers, B, T)`` integer tensor: one route per token per layer;
* a ``(n_layers,)`` tensor or list: one route per layer for every token (a pattern);
* a router: any callable ``router(layer, hidden) -> routes`` (or ``(routes, gate)``) with
  ``hidden`` the ``(B, T, d_model)`` input of that layer's FFN and routes ``(B, T)``;
* a named policy: ``"big"``, ``"small"``, ``"skip"`` or ``"random"`` (drawn per token and layer
  from ``probs = (p_skip, p_small, p_big)``; pass ``generator=`` to seed it).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from .reference import BIG, SKIP, SMALL

POLICIES = {"skip": SKIP, "small": SMALL, "big": BIG}
Routes = Union[str, torch.Tensor, Sequence[int], Callable]


# --------------------------------------------------------------------------- routes


def random_routes(n_layers: int, B: int, T: int, probs: Sequence[float],
                  device: torch.device,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(n_layers, B, T) int64 routes drawn from ``probs = (p_skip, p_small, p_big)``."""
    n = n_layers * B * T
    if n == 0:  # multinomial refuses to draw zero samples
        return torch.empty((n_layers, B, T), dtype=torch.int64, device=device)
    draws = torch.multinomial(torch.tensor([float(p) for p in probs]), n, replacement=True,
                              generator=generator)
    return draws.view(n_layers, B, T).to(device)


def resolve_routes(routes: Routes, n_layers: int, B: int, T: int, device: torch.device,
                   generator: Optional[torch.Generator] = None,
                   probs: Sequence[float] = (0.0, 0.5, 0.5)):
    """Turn any accepted routes form into an ``(n_layers, B, T)`` tensor or a router callable.

    A per-layer pattern comes back as an expanded view (no copy); a router comes back as is.
    """
    L = n_layers
    if callable(routes) and not isinstance(routes, torch.Tensor):
        return routes
    if isinstance(routes, str):
        if routes == "random":
            return random_routes(L, B, T, probs, device, generator)
        if routes not in POLICIES:
            raise ValueError(f"routes: unknown policy {routes!r}; expected one of "
                             f"{sorted(POLICIES) + ['random']}")
        return torch.full((L, B, T), POLICIES[routes], dtype=torch.int64, device=device)
    if isinstance(routes, (list, tuple)):
        # No dtype forced: a float pattern must fail the integer check, not be truncated.
        routes = torch.tensor(routes)
    if not isinstance(routes, torch.Tensor):
        raise TypeError(f"routes: expected a policy name, a tensor, a per-layer list or a "
                        f"router, got {type(routes).__name__}")
    if routes.shape == (L,):
        return routes.to(device).view(L, 1, 1).expand(L, B, T)
    if routes.shape != (L, B, T):
        raise ValueError(f"routes: expected shape ({L},) or ({L}, {B}, {T}) for tokens of "
                         f"shape ({B}, {T}), got {tuple(routes.shape)}")
    return routes.to(device)


def layer_routes(plan, i: int, x: torch.Tensor):
    """Layer ``i``'s ``(routes (B, T), gate or None)`` from a resolved plan and its FFN input."""
    if isinstance(plan, torch.Tensor):
        return plan[i], None
    r = plan(i, x)
    return r if isinstance(r, tuple) else (r, None)
