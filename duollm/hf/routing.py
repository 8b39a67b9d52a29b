"""Routing a converted Hugging Face model: ``HFDuoFFN`` and the ``routing`` context manager.

A converted model's MLPs are ``HFDuoFFN`` modules. Outside any ``routing(...)`` block each one
computes exactly the original MLP (all-big) through the original projection modules, so the
model is the model it was. Inside ``with routing(model, routes):`` every MLP call of that model
reads the active routes from a ``contextvars.ContextVar`` keyed by the model's conversion record
(never module attributes), so an exception inside the block, nested blocks, other threads and
other converted models all see the routing they should. See ``docs/hf.md``.

Because the routes are looked up per MLP call, ``model.generate`` routes every decode step
(the KV cache stays valid: only FFNs route, attention is untouched).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..modules import DuoFFN, SwiGLU
from ..reference import BIG, SKIP, SMALL
from ..stack import POLICIES, Routes, random_routes, resolve_routes, use_saved_router

# Where ``convert`` records what it did on the model (``spec_of`` reads it back).
SPEC_ATTR = "duollm_hf"


@dataclass(eq=False)  # identity equality and hash: each converted model is its own key
class HFDuoSpec:
    """What ``convert`` did to a model, stored on it as ``model.duollm_hf``.

    Fields: ``d_small`` (small path width), ``skip`` (route SKIP allowed), ``probs``
    (``(p_skip, p_small, p_big)`` of the ``"random"`` policy), ``init`` (``"prune"`` or
    ``"random"``: how the small paths started), ``n_layers``, ``d_model``, ``d_big``.
    """

    d_small: int
    skip: bool
    probs: Tuple[float, float, float]
    init: str
    n_layers: int
    d_model: int
    d_big: int

    def __post_init__(self):
        # The converted model's error flags (docs/hf.md): its routed layers record bad routes
        # here; the ``routing`` block raises from them when it exits.
        self.route_errors = ops.RouteErrors("a converted Hugging Face model")

    def to_dict(self) -> Dict:
        return {"d_small": self.d_small, "skip": self.skip, "probs": list(self.probs),
                "init": self.init, "n_layers": self.n_layers, "d_model": self.d_model,
                "d_big": self.d_big}


def spec_of(model) -> HFDuoSpec:
    """The ``HFDuoSpec`` of a converted model; TypeError naming ``model`` otherwise."""
    spec = getattr(model, SPEC_ATTR, None)
    if not isinstance(spec, HFDuoSpec):
        raise TypeError(f"model: {type(model).__name__} is not converted; call "
                        f"duollm.hf.convert(model, d_small) first")
    return spec


def is_converted(model) -> bool:
    """Whether ``model`` was converted by ``duollm.hf.convert``."""
    return isinstance(getattr(model, SPEC_ATTR, None), HFDuoSpec)


def wrap_swiglu(gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear) -> SwiGLU:
    """A ``SwiGLU`` holding the given ``nn.Linear`` modules themselves (no copies)."""
    mod = SwiGLU.__new__(SwiGLU)
    nn.Module.__init__(mod)
    mod.width = gate_proj.out_features
    mod.gate_proj, mod.up_proj, mod.down_proj = gate_proj, up_proj, down_proj
    return mod


class HFDuoFFN(DuoFFN):
    """A converted HF MLP: ``.big`` holds the original projections, ``.small`` is new.

    Called like the HF MLP, ``forward(x)`` with x ``(B, T, d_model)`` returns the FFN output
    under the model's active ``routing`` (zeros for skipped tokens), or the original MLP's output
    outside any routing. Called like a ``DuoFFN``, ``forward(x, routes, residual=, gate=,
    backend=)`` routes explicitly (what ``RoutedStack.ffn`` does).
    """

    def __init__(self, big: SwiGLU, small: SwiGLU, skip: bool, layer_idx: int,
                 spec: HFDuoSpec):
        nn.Module.__init__(self)  # not DuoFFN.__init__: it would allocate a second big path
        self.d_model, self.skip = big.gate_proj.in_features, skip
        self.big, self.small = big, small
        self.layer_idx = layer_idx
        self.spec = spec

    @property
    def route_errors(self):
        """The converted model's error flags (``HFDuoSpec.route_errors``)."""
        return self.spec.route_errors

    def forward(self, x: torch.Tensor, routes: Optional[torch.Tensor] = None,
                residual: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
                backend: Optional[str] = None) -> torch.Tensor:
        if routes is not None:
            return super().forward(x, routes, residual, gate, backend)
        active = _ACTIVE.get()
        if active:
            plan = active.get(self.spec)
            if plan is not None:
                return plan.apply(self, x)
        # Not routed: the original MLP's own expression on its own modules (bit-exact).
        b = self.big
        return b.down_proj(F.silu(b.gate_proj(x)) * b.up_proj(x))


# --------------------------------------------------------------------------- the routing


_ACTIVE: contextvars.ContextVar[Optional[Dict[HFDuoSpec, "_Plan"]]] = contextvars.ContextVar(
    "duollm_hf_routing", default=None)


@dataclass
class _Plan:
    """The routes of one ``routing`` block, resolved as far as possible before any call.

    Exactly one of: ``layer_ints`` (a policy or a per-layer pattern: one route per layer),
    ``random`` (draw per call), ``tokens`` ((L, B, T) tensor), ``router`` (callable).
    """

    spec: HFDuoSpec
    backend: Optional[str]
    generator: Optional[torch.Generator]
    layer_ints: Optional[List[int]] = None
    random: bool = False
    tokens: Optional[torch.Tensor] = None
    router: Optional[Callable] = None

    def apply(self, ffn: HFDuoFFN, x: torch.Tensor) -> torch.Tensor:
        i = ffn.layer_idx
        if self.layer_ints is not None:
            return _uniform(ffn, x, self.layer_ints[i], self.backend)
        B, T = x.shape[0], x.shape[1]
        if self.router is not None:
            r = self.router(i, x)
            r, gate = r if isinstance(r, tuple) and len(r) == 2 else (r, None)
            if not isinstance(r, torch.Tensor):  # None would re-enter this plan: no recursion
                name = getattr(self.router, "__qualname__", None) or type(self.router).__name__
                raise TypeError(f"routes: the router {name} returned {type(r).__name__} for "
                                f"layer {i}; a router returns a routes tensor (B, T) or a "
                                f"(routes, gate) pair")
            return ffn(x, r, gate=gate, backend=self.backend)
        if self.random:
            r = random_routes(1, B, T, self.spec.probs, x.device, self.generator)[0]
        else:
            if x.dim() != 3:
                raise ValueError(f"routes: a per-token routes tensor needs (B, T, d) MLP "
                                 f"inputs, got shape {tuple(x.shape)}")
            try:
                r = resolve_routes(self.tokens, self.spec.n_layers, B, T, x.device)[i]
            except ValueError as e:
                raise ValueError(f"{e}. A per-token routes tensor serves one forward of "
                                 f"exactly that shape (not generate: use a policy, a "
                                 f"pattern or a router there)") from None
        return ffn(x, r, backend=self.backend)


def _uniform(ffn: HFDuoFFN, x: torch.Tensor, route: int, backend: Optional[str]):
    """Every token of the layer on one path, without grouping.

    With no backend named, the path runs the HF MLP's own expression on its Linear modules:
    all-big is then bit-exact with the unconverted model and all-small costs what an
    unconverted model of width d_small would (no op dispatch or checks per call)."""
    if route == SKIP:
        return torch.zeros_like(x)
    mod = ffn.big if route == BIG else ffn.small
    if backend is None:
        return mod.down_proj(F.silu(mod.gate_proj(x)) * mod.up_proj(x))
    return mod(x, backend=backend)


def _build_plan(spec: HFDuoSpec, routes: Routes, backend: Optional[str],
                generator: Optional[torch.Generator]) -> _Plan:
    plan = _Plan(spec, backend, generator)
    L = spec.n_layers
    if callable(routes) and not isinstance(routes, torch.Tensor):
        plan.router = routes
        return plan
    if isinstance(routes, str):
        if routes == "random":
            if spec.probs[SKIP] > 0 and not spec.skip:
                raise ValueError("routes: 'random' draws SKIP but the model was converted "
                                 "with skip=False")
            plan.random = True
            return plan
        if routes not in POLICIES:
            raise ValueError(f"routes: unknown policy {routes!r}; expected one of "
                             f"{sorted(POLICIES) + ['random']}")
        routes = [POLICIES[routes]] * L
    if isinstance(routes, (list, tuple)):
        routes = torch.tensor(routes)  # no dtype forced: a float pattern must fail below
    if not isinstance(routes, torch.Tensor):
        raise TypeError(f"routes: expected a policy name, a tensor, a per-layer list or a "
                        f"router, got {type(routes).__name__}")
    if routes.dtype.is_floating_point or routes.dtype == torch.bool or routes.is_complex():
        raise TypeError(f"routes: expected integer routes, got dtype {routes.dtype}")
    if routes.dim() == 1 and routes.shape[0] == L:
        values = routes.tolist()
        plan.layer_ints = values
    elif routes.dim() == 3 and routes.shape[0] == L:
        plan.tokens = routes
        values = torch.unique(routes).tolist() if routes.numel() else []
    else:
        raise ValueError(f"routes: expected shape ({L},) or ({L}, B, T), got "
                         f"{tuple(routes.shape)}")
    bad = [v for v in values if v not in (SKIP, SMALL, BIG)]
    if bad:
        raise ValueError(f"routes: values must lie in [0, 3), found {bad[0]}")
    if not spec.skip and SKIP in values:
        raise ValueError("routes: SKIP (0) given to a model converted with skip=False")
    return plan


@contextlib.contextmanager
def routing(model, routes: Routes, *, backend: Optional[str] = None,
            generator: Optional[torch.Generator] = None) -> Iterator:
    """Route every FFN of the converted ``model`` by ``routes`` inside the ``with`` block.

    ``routes``: any form ``DuoLLM.forward`` takes (``docs/routes-and-budgets.md``): a policy
    (``"big"``, ``"small"``, ``"skip"``, ``"random"`` drawn per call from the conversion's
    ``probs`` with ``generator``), ``"router"`` (the router saved with the model), an
    ``(n_layers,)`` pattern, an ``(n_layers, B, T)`` per-token tensor (for one forward of
    exactly that ``(B, T)``), or a router ``router(layer, hidden)
    -> routes (B, T)`` or ``(routes, gate)`` called once per layer per forward with that layer's
    FFN input ``hidden (B, T, d_model)``. ``backend``: the ``duollm.ops`` backend of the routed
    FFNs (None: all-big runs the original expression, other routes the default backend).

    Works with ``model(...)`` and ``model.generate(...)``. The previous routing comes back on
    exit, exception or not. Yields the model.

    Routes are read when an MLP runs, so anything that re-runs MLPs later (gradient
    checkpointing recomputes them in ``backward``) must run inside the same block; ``"random"``
    with an explicit ``generator`` then draws new routes on recompute (the default generator's
    state is restored by checkpointing, an explicit one is not).
    """
    spec = spec_of(model)
    if backend is not None and backend != "auto" and backend not in ops.backends():
        raise ValueError(f"backend: unknown backend {backend!r}; expected 'auto' or one of "
                         f"{sorted(ops.backends())}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got "
                        f"{type(generator).__name__}")
    plan = _build_plan(spec, use_saved_router(model, routes), backend, generator)
    errors = spec.route_errors
    errors.source = f"{type(model).__name__} at {id(model):#x} (converted)"
    token = _ACTIVE.set({**(_ACTIVE.get() or {}), spec: plan})
    try:
        yield model
    finally:
        _ACTIVE.reset(token)
    # Only after a block that ended normally (an exception in flight is never masked): bad
    # routes the device recorded without a sync (GPU; DUOLLM_CHECK_ROUTES=device) raise here.
    # One read per device flag of this model; none at all where none was ever made.
    errors.check()


def active_routes(model) -> Optional[Routes]:
    """The routes of the innermost ``routing`` block active for ``model`` here, or None."""
    plan = (_ACTIVE.get() or {}).get(spec_of(model))
    if plan is None:
        return None
    if plan.layer_ints is not None:
        return list(plan.layer_ints)
    if plan.random:
        return "random"
    return plan.tokens if plan.tokens is not None else plan.router
