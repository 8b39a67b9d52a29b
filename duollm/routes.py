"""Routes forms and their resolution, below ``duollm.model`` and ``duollm.stack`` (both use it;
``duollm.stack`` re-exports every name here).

Routes forms (shared by ``DuoLLM.forward``, ``duollm.hf.routing`` and ``RoutedStack.forward``):

* a ``(n_layers, B, T)`` integer tensor: one route per token per layer;
* a ``(n_layers,)`` tensor or list: one route per layer for every token (a pattern);
* a router: any callable ``router(layer, hidden) -> routes`` (or ``(routes, gate)``) with
  ``hidden`` the ``(B, T, d_model)`` input of that layer's FFN and routes ``(B, T)``;
* a named policy: ``"big"``, ``"small"``, ``"skip"`` or ``"random"`` (drawn per token and layer
  from ``probs = (p_skip, p_small, p_big)``; pass ``generator=`` to seed it);
* ``"router"``: the router saved with the model (``attach_router``; ``duollm.router_io`` saves
  and loads it with a checkpoint or a converted folder). Callers that hold the model replace
  it with ``use_saved_router(model, routes)`` before resolving.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from .reference import BIG, SKIP, SMALL

POLICIES = {"skip": SKIP, "small": SMALL, "big": BIG}
Routes = Union[str, torch.Tensor, Sequence[int], Callable]
SAVED_ROUTER = "router"  # the routes name of the router saved with the model
ROUTER_ATTR = "duollm_router"  # where attach_router keeps it on the model


# --------------------------------------------------------------------------- saved router


def attach_router(model, router: Optional[Callable]) -> None:
    """Make ``router`` the model's saved router (``routes="router"``); None detaches it.

    Kept as a plain attribute, not a submodule: the model's state dict, parameters and
    checkpoints of the weights stay exactly those of the model (``duollm.router_io`` stores the
    router beside them)."""
    if router is not None and (not callable(router) or isinstance(router, torch.Tensor)):
        raise TypeError(f"router: expected a router callable(layer, hidden) -> routes, got "
                        f"{type(router).__name__}")
    object.__setattr__(model, ROUTER_ATTR, router)


def attached_router(model) -> Optional[Callable]:
    """The router attached to ``model`` (or to the model of a stack), or None."""
    router = model.__dict__.get(ROUTER_ATTR) if hasattr(model, "__dict__") else None
    if router is None and hasattr(model, "model") and hasattr(model.model, "__dict__"):
        router = model.model.__dict__.get(ROUTER_ATTR)
    return router


def use_saved_router(model, routes: Routes) -> Routes:
    """``routes``, with the name ``"router"`` replaced by the model's saved router (moved to
    the device of the model's first parameter); ValueError when it has none."""
    if not (isinstance(routes, str) and routes == SAVED_ROUTER):
        return routes
    router = attached_router(model)
    if router is None:
        raise ValueError("routes: 'router' needs a router saved with the model; none is "
                         "attached (train one with `duollm train-router`, load the model with "
                         "duollm.checkpoint.load_checkpoint / duollm.hf.load_converted, or "
                         "call duollm.routes.attach_router(model, router))")
    owner = model.model if not isinstance(model, torch.nn.Module) and hasattr(
        model, "model") else model
    if isinstance(router, torch.nn.Module) and isinstance(owner, torch.nn.Module):
        param = next(owner.parameters(), None)
        rparam = next(router.parameters(), None)
        if param is not None and rparam is not None and rparam.device != param.device:
            router.to(param.device)
    return router


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
        if routes == SAVED_ROUTER:
            raise ValueError("routes: 'router' names the router saved with a model; pass the "
                             "model's routes through use_saved_router(model, routes) first")
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
