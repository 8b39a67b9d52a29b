"""Layers: ``RMSNorm``, ``SwiGLU`` and the routed ``DuoFFN``. They call only ``duollm.ops``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import ops
from .reference import BIG, SKIP, SMALL, rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


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

    def forward(self, x: torch.Tensor, routes: torch.Tensor,
                residual: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
                backend: Optional[str] = None) -> torch.Tensor:
        if not self.skip and isinstance(routes, torch.Tensor) and ops.route_checks_enabled():
            if routes.numel() and routes.device.type != "meta" and bool((routes == SKIP).any()):
                raise ValueError("routes: SKIP (0) given to a DuoFFN built with skip=False")
        return ops.duo_ffn(x, routes, self.params(), residual=residual, gate=gate,
                           backend=backend)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_big={self.big.width}, d_small={self.small.width}, "
                f"skip={self.skip}")
