"""What the routed layer is measured against, all in plain PyTorch.

* ``dense_ffn`` — the big SwiGLU FFN on every token, the residual fused into the last GEMM
  (cuBLAS through torch on a GPU, MKL/oneDNN on the CPU): the layer routing replaces.
* ``naive_routing`` — routing as users write it: a boolean mask per path, ``index_select`` of
  its rows, the path's SwiGLU, ``index_add_`` back into a zero output.
* ``sorted_routing`` — the best plain PyTorch we can write: one stable sort of the routes, one
  gather, each path's GEMMs on a contiguous slice of the grouped rows, one scatter with the
  residual add fused (``index_add``). Differentiable through ordinary autograd.

Each has the ``duo_ffn`` signature ``(x, routes, params, residual=None, gate=None)`` with x
(N, d), routes (N,), params per path ``(w_gate, w_up, w_down)`` or None (skip), and computes
the same function as ``duollm.reference.duo_ffn`` (``dense_ffn`` when every route is the
widest path).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..reference import FFNWeights


def _swiglu(x: torch.Tensor, w_gate, w_up, w_down) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def widest(params: Sequence[Optional[FFNWeights]]) -> FFNWeights:
    """The path with the widest FFN (the big one): what the dense layer runs."""
    return max((w for w in params if w is not None), key=lambda w: w[0].shape[0])


def dense_ffn(x: torch.Tensor, routes: Optional[torch.Tensor],
              params: Sequence[Optional[FFNWeights]], residual: Optional[torch.Tensor] = None,
              gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The widest path's SwiGLU on every token (routes ignored): ``residual + gate * FFN(x)``.

    Without autograd it runs in place (SiLU-mul into the gate projection, residual added by
    ``addmm``), the fastest dense layer plain torch gives.
    """
    w_gate, w_up, w_down = widest(params)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, residual, gate, w_gate, w_up, w_down)):
        y = _swiglu(x, w_gate, w_up, w_down)
        if gate is not None:
            y = y * gate.to(y.dtype).unsqueeze(-1)
        return y if residual is None else residual + y
    h = torch.mm(x, w_gate.t())  # (N, width)
    F.silu(h, inplace=True).mul_(torch.mm(x, w_up.t()))
    if gate is not None:
        h.mul_(gate.to(h.dtype).unsqueeze(-1))
    if residual is None:
        return torch.mm(h, w_down.t())
    return torch.addmm(residual, h, w_down.t())


def naive_routing(x: torch.Tensor, routes: torch.Tensor,
                  params: Sequence[Optional[FFNWeights]], residual: Optional[torch.Tensor] = None,
                  gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Routing as commonly written: a mask and an ``index_select`` per path, ``index_add_``."""
    out = torch.zeros_like(x)
    for p, weights in enumerate(params):
        if weights is None:
            continue
        idx = (routes == p).nonzero().squeeze(1)  # (n_p,)
        y = _swiglu(x.index_select(0, idx), *weights)
        if gate is not None:
            y = y * gate.index_select(0, idx).to(y.dtype).unsqueeze(-1)
        out.index_add_(0, idx, y.to(out.dtype))
    return out if residual is None else residual + out


def sorted_routing(x: torch.Tensor, routes: torch.Tensor,
                   params: Sequence[Optional[FFNWeights]], residual: Optional[torch.Tensor] = None,
                   gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sort once, gather once, GEMMs on contiguous slices, scatter once (residual fused)."""
    P = len(params)
    perm = torch.sort(routes, stable=True).indices  # (N,) token ids grouped by path
    counts = torch.bincount(routes, minlength=P).tolist()  # the slices need host counts
    first = 0  # skip paths lead the sorted order in Duo (SKIP = 0); others are sliced out
    while first < P and params[first] is None:
        first += 1
    start = sum(counts[:first])
    rows = perm[start:]  # (R,) routed tokens
    xg = x.index_select(0, rows)  # (R, d)
    ys = []
    for p, part in zip(range(first, P), xg.split(counts[first:])):
        if params[p] is None:
            ys.append(torch.zeros_like(part))
        else:
            ys.append(_swiglu(part, *params[p]).to(x.dtype))
    yg = torch.cat(ys) if ys else xg
    if gate is not None:
        yg = yg * gate.index_select(0, rows).to(yg.dtype).unsqueeze(-1)
    base = torch.zeros_like(x) if residual is None else residual
    return base.index_add(0, rows, yg)
