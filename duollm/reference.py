"""The specification of every duollm op, in plain PyTorch.

Each function here is short, obvious and differentiable through ordinary autograd. It is
what every backend (the tuned torch backend included), test and benchmark is compared
against. Speed is not a goal of this file; clarity is.

Conventions (docs/ops.md):

* A routes tensor holds one path index per token; with the Duo paths, ``SKIP = 0``,
  ``SMALL = 1``, ``BIG = 2``.
* A layer has ``P`` paths with widths ``(w_0, ..., w_{P-1})``; a path of width 0 (``None``
  in ``params``) is a skip path: its tokens pass through unchanged.
* "Grouped order" is the order of ``RouteGroups.perm``: token ids sorted by path, ascending
  inside a path.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

SKIP, SMALL, BIG = 0, 1, 2

FFNWeights = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (w_gate, w_up, w_down)


class RouteGroups(NamedTuple):
    """Routing metadata computed once per layer by ``group_tokens`` and passed to every op.

    Fields (N tokens, P paths), all on the routes' device:
      perm:    (N,) int64, token ids grouped by path, ascending inside a path.
      inv:     (N,) int64, position of each token in ``perm`` (``perm[inv[t]] == t``).
      counts:  (P,) int64, tokens per path.
      offsets: (P+1,) int64, exclusive prefix sum of ``counts``; path p owns
               ``perm[offsets[p]:offsets[p+1]]``.
      routes:  (N,) int64, the flattened routes the groups were built from.
    """

    perm: torch.Tensor
    inv: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    routes: torch.Tensor

    @property
    def num_paths(self) -> int:
        return self.counts.numel()


def group_tokens(routes: torch.Tensor, num_paths: int) -> RouteGroups:
    """Stable counting sort of token ids by route.

    Args:
      routes: (...) integer tensor of path indices in ``[0, num_paths)``; flattened.
      num_paths: P.
    """
    routes_N = routes.reshape(-1).to(torch.int64)
    perm = torch.sort(routes_N, stable=True).indices
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    counts = torch.bincount(routes_N, minlength=num_paths)
    offsets = torch.zeros(num_paths + 1, dtype=torch.int64, device=routes_N.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return RouteGroups(perm, inv, counts, offsets, routes_N)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim, computed in at least float32 and cast back (the Llama
    convention); float64 stays float64 so that gradcheck and float64 references are exact."""
    acc = torch.promote_types(x.dtype, torch.float32)
    x_acc = x.to(acc)
    y = x_acc * torch.rsqrt(x_acc.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(acc)).to(x.dtype)


def gather(
    x: torch.Tensor,
    groups: RouteGroups,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Rows of ``x`` in grouped order: ``x[perm]``, optionally RMS-normalised.

    Args:
      x: (N, d).
      norm_weight: (d,) or None; when given, each gathered row is ``rms_norm(row) * weight``.
    Returns: (N, d) in grouped order.
    """
    x_ND = x[groups.perm]
    if norm_weight is not None:
        x_ND = rms_norm(x_ND, norm_weight, eps)
    return x_ND


def scatter_combine(
    y: torch.Tensor,
    groups: RouteGroups,
    residual: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    skip_paths: Sequence[int] = (),
) -> torch.Tensor:
    """Put grouped rows back in token order, scaled and added to the residual.

    ``out[t] = residual[t] + gate[t] * y[inv[t]]`` for a routed token and ``out[t] = residual[t]``
    for a token whose path is in ``skip_paths`` (its row of ``y`` is never read). A missing
    residual counts as zero and a missing gate as one.

    Args:
      y: (N, d) in grouped order.
      residual: (N, d) in token order, or None.
      gate: (N,) per-token scale in token order, or None.
      skip_paths: the path indices whose tokens skip the layer.
    Returns: (N, d) in token order, dtype of ``y``.
    """
    out = y[groups.inv]
    if gate is not None:
        out = out * gate.unsqueeze(-1).to(out.dtype)
    if skip_paths:
        skip = torch.zeros_like(groups.routes, dtype=torch.bool)
        for p in skip_paths:
            skip |= groups.routes == p
        out = torch.where(skip.unsqueeze(-1), torch.zeros_like(out), out)
    if residual is not None:
        out = residual.to(out.dtype) + out
    return out


def swiglu_ffn(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """SwiGLU FFN with ``nn.Linear``-layout weights.

    Args:
      x: (N, d); w_gate, w_up: (width, d); w_down: (d, width).
    Returns: (N, d) = ``(silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T``.
    """
    return (F.silu(x @ w_gate.t()) * (x @ w_up.t())) @ w_down.t()


def duo_ffn(
    x: torch.Tensor,
    routes: torch.Tensor,
    params: Sequence[Optional[FFNWeights]],
    residual: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The whole routed layer, written with masks so it checks the grouped ops independently.

    Args:
      x: (N, d) FFN input (already normalised).
      routes: (N,) path index per token.
      params: P entries, each ``(w_gate, w_up, w_down)`` or None for a skip path.
      residual: (N, d) or None; added to every token's output.
      gate: (N,) or None; scales each routed token's FFN output.
    Returns: (N, d): ``residual + gate * FFN_route(x)``, the FFN term zero for skipped tokens.
    """
    routes_N = routes.reshape(-1)
    out = torch.zeros_like(x)
    for p, weights in enumerate(params):
        if weights is None:
            continue
        mask = routes_N == p
        # Under autocast the GEMMs return a lower precision; the layer's output keeps x's dtype.
        y = swiglu_ffn(x[mask], *weights).to(out.dtype)
        if gate is not None:
            y = y * gate[mask].unsqueeze(-1).to(y.dtype)
        out = out.index_put((mask,), y)
    if residual is not None:
        out = residual.to(out.dtype) + out
    return out


def gate_residual(y: torch.Tensor, residual: Optional[torch.Tensor],
                  gate: Optional[torch.Tensor]) -> torch.Tensor:
    """One path's FFN output ``y`` (N, d) combined as ``scatter_combine`` combines a routed
    row: ``residual + gate[:, None] * y`` (either term optional). Updates ``y`` in place where
    autograd allows (the backends' single-path fast paths share this epilogue)."""
    in_place = not (torch.is_grad_enabled() and (y.requires_grad or (
        residual is not None and residual.requires_grad)))
    if gate is not None:
        g = gate.to(y.dtype).unsqueeze(-1)
        if residual is not None:
            return torch.addcmul(residual, y, g)
        return y.mul_(g) if in_place else y * g
    if residual is None:
        return y
    return y.add_(residual) if in_place else residual + y

