"""Layers: ``RMSNorm``, ``SwiGLU`` and the routed ``DuoFFN``. They call only ``duollm.ops``."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .reference import BIG, SKIP, SMALL, rms_norm


_INT_DTYPES = frozenset(ops.INT_DTYPES)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype == w.dtype and x.dtype in (torch.float32, torch.float64):
            # torch's fused kernel: the reference's arithmetic in x's own dtype (which is
            # already at least float32 here), one kernel instead of ten at decode
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)
        return rms_norm(x, w, self.eps)


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))`` with Llama's names and no biases."""

    def __init__(self, d_model: int, width: int):
        super().__init__()
        self.width = width
        self.gate_proj = nn.Linear(d_model, width, bias=False)
        self.up_proj = nn.Linear(d_model, width, bias=False)
        self.down_proj = nn.Linear(width, d_model, bias=False)

    @property
    def weights(self):
        return (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)

    def forward(self, x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        d = x.shape[-1]
        y = ops.swiglu_ffn(x.reshape(-1, d), *self.weights, backend=backend)  # (N, d)
        return y.reshape(x.shape)


class DuoFFN(nn.Module):
    """A big and a small SwiGLU FFN; each token goes to one of them or skips the layer.

    Args:
      d_model: model width.  d_big, d_small: the two FFN widths.
      skip: whether route ``SKIP`` is allowed.

    ``forward(x, routes)`` with x ``(..., d_model)`` and routes ``x.shape[:-1]`` (values
    ``SKIP=0, SMALL=1, BIG=2``) returns the FFN's contribution, zero rows for skipped tokens,
    so it drops in wherever an MLP was. ``residual=`` fuses the residual add; ``gate=``
    (``x.shape[:-1]``) scales each routed token's output (e.g. by a router probability).
    """

    num_paths = 3
    # Whose error flags record this layer's out-of-range routes (``duollm.checks.RouteErrors``):
    # None, the shared ones of ``duollm.ops``, for a standalone layer; ``DuoLLM`` sets its own
    # on each of its layers, so ``model.route_errors.check()`` reports that model's only.
    route_errors = None

    def __init__(self, d_model: int, d_big: int, d_small: int, skip: bool = True):
        super().__init__()
        self.d_model, self.skip = d_model, skip
        self.big = SwiGLU(d_model, d_big)
        self.small = SwiGLU(d_model, d_small)

    @property
    def widths(self):
        """Width of each path, indexed by route: ``(0, d_small, d_big)``."""
        return (0, self.small.width, self.big.width)

    def params(self):
        """Per-path weights in route order, None for the skip path (the ``duo_ffn`` layout)."""
        params = [None, None, None]
        params[SMALL] = self.small.weights
        params[BIG] = self.big.weights
        return tuple(params)

    def forward(self, x: torch.Tensor, routes, residual: Optional[torch.Tensor] = None,
                gate: Optional[torch.Tensor] = None,
                backend: Optional[str] = None) -> torch.Tensor:
        """``residual + gate * FFN_route(x)`` per token (see the class docstring).

        Args:
          x: (..., d_model), the weights' dtype and device.
          routes: x.shape[:-1] integer tensor (SKIP=0, SMALL=1, BIG=2), or an int: every
            token takes that path.
          residual: x.shape, x's dtype, or None.  gate: x.shape[:-1], float, or None.
        Returns: x.shape. Out-of-range routes raise at once on the CPU; on a GPU those tokens
        skip and ``duollm.ops.check_errors()`` raises (docs/speed.md).
        """
        params = self._params()
        self._check_call(params, x, routes, residual, gate)
        return ops.run_duo_ffn(x, routes, params, residual, gate, backend,
                               min_route=SKIP if self.skip else SMALL,
                               errors=self.route_errors)

    # Validation names the caller's arguments and compares them with the layer (docs/style.md).
    # What depends only on the layer's weights is checked once and cached: until the layer is
    # moved or cast as a whole (``_apply``) or one of its paths changes dtype (``ffn.small.half()``:
    # the key holds each path's dtype, two attribute reads instead of checking six weights).

    def _apply(self, *args, **kwargs):
        self._sig = None
        return super()._apply(*args, **kwargs)

    def _params(self):
        """``params()`` read through the module dicts: nn.Module attribute lookup costs about
        a microsecond per level, a dozen per call at decode."""
        mods = self._modules
        small, big = mods["small"]._modules, mods["big"]._modules
        return (None,
                (small["gate_proj"]._parameters["weight"], small["up_proj"]._parameters["weight"],
                 small["down_proj"]._parameters["weight"]),
                (big["gate_proj"]._parameters["weight"], big["up_proj"]._parameters["weight"],
                 big["down_proj"]._parameters["weight"]))

    def _layer_sig(self, params):
        key = (params[SMALL][0].dtype, params[BIG][0].dtype)
        sig = getattr(self, "_sig", None)
        if sig is None or sig[0] != key:
            ws = [(f"{name}.{proj}.weight", w) for name, p in (("small", params[SMALL]),
                                                             ("big", params[BIG]))
                  for proj, w in zip(("gate_proj", "up_proj", "down_proj"), p)]
            first = ws[0][1]
            for name, w in ws:
                if w.dtype != first.dtype or w.device != first.device:
                    raise TypeError(f"DuoFFN: its weights disagree: {name} is {w.dtype} on "
                                    f"{w.device}, small.gate_proj.weight is {first.dtype} on "
                                    f"{first.device}; cast the whole layer (e.g. .to())")
            sig = self._sig = (key, first.dtype, first.device)
        return sig[1], sig[2]

    def _check_call(self, params, x, routes, residual, gate) -> None:
        dtype, device = self._layer_sig(params)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor of shape (..., {self.d_model}), got "
                            f"{type(x).__name__}")
        if x.dtype != dtype:
            raise TypeError(f"x: has dtype {x.dtype}, but the layer's weights are {dtype}; "
                            f"cast x (or the layer) so that they match")
        if x.device != device:
            raise ValueError(f"x: is on {x.device}, but the layer's weights are on {device}")
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            got = "a scalar" if x.dim() < 1 else f"{x.shape[-1]}"
            raise ValueError(f"x: last dim is {got} (shape {tuple(x.shape)}), but the layer "
                             f"expects d_model={self.d_model}")
        lead = x.shape[:-1]
        if isinstance(routes, torch.Tensor):
            if routes.dtype not in _INT_DTYPES:
                raise TypeError(f"routes: expected an integer tensor (SKIP=0, SMALL=1, BIG=2), "
                                f"got dtype {routes.dtype}")
            if routes.shape != lead:
                raise ValueError(f"routes: has shape {tuple(routes.shape)}, but x of shape "
                                 f"{tuple(x.shape)} needs one route per token: "
                                 f"{tuple(lead)}")
            if routes.device != x.device:
                raise ValueError(f"routes: is on {routes.device}, but x is on {x.device}")
        elif not isinstance(routes, int) or isinstance(routes, bool):
            raise TypeError(f"routes: expected an integer tensor of shape {tuple(lead)} or an "
                            f"int, got {type(routes).__name__}")
        elif routes == SKIP and not self.skip:
            raise ValueError("routes: SKIP (0) given to a DuoFFN built with skip=False")
        if residual is not None:
            if not isinstance(residual, torch.Tensor):
                raise TypeError(f"residual: expected a tensor like x, got "
                                f"{type(residual).__name__}")
            if residual.shape != x.shape:
                raise ValueError(f"residual: has shape {tuple(residual.shape)}, but x has "
                                 f"{tuple(x.shape)}; they must match")
            if residual.dtype != x.dtype:  # the output is x's dtype: it would be rounded
                raise TypeError(f"residual: has dtype {residual.dtype}, but x (and the layer) "
                                f"are {x.dtype}")
            if residual.device != x.device:
                raise ValueError(f"residual: is on {residual.device}, but x is on {x.device}")
        if gate is not None:
            if not isinstance(gate, torch.Tensor) or not gate.dtype.is_floating_point:
                what = gate.dtype if isinstance(gate, torch.Tensor) else type(gate).__name__
                raise TypeError(f"gate: expected a float tensor of shape {tuple(lead)}, got "
                                f"{what}")
            if gate.shape != lead:
                raise ValueError(f"gate: has shape {tuple(gate.shape)}, but x of shape "
                                 f"{tuple(x.shape)} needs one gate per token: {tuple(lead)}")
            if gate.device != x.device:
                raise ValueError(f"gate: is on {gate.device}, but x is on {x.device}")

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_big={self.big.width}, d_small={self.small.width}, "
                f"skip={self.skip}")
