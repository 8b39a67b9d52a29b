"""The routed Duo FFN layer: ``out = residual + gate * FFN_route(x)`` per token.

Launches (forward), none of which reads anything back to the host:

1. ``group_tokens`` (kernels/grouping.py): perm, inv, offsets on the device.
2. ``_gateup_fwd_kernel`` (kernels/ffn_gemm.py), one launch for every routed path: a
   heterogeneous grouped GEMM whose program-id range is split into per-path slots, each sized
   for the worst case (all N tokens on that path) with its own width and weight pointers. A
   program reads its path's row range from ``offsets`` and exits at once when its row tile is
   past the path's count. Rows of x are read through ``perm`` inside the loads (no gathered
   copy); h = silu(x Wg^T) * (x Wu^T) goes to a workspace (N, max width) in grouped order.
3. ``_down_kernel``, one launch for every path, skip paths included: out[perm[i]] =
   residual + gate * (h_i Wd^T), with the scatter, gate and residual in the epilogue; a skip
   path has width 0, runs no K loop and writes the residual (or zeros).

So the layer is the grouping (1 launch when N fits one block, else 3) plus 2 GEMM launches
for up to 4 paths (more paths: 2 more per 4), and can be captured in a CUDA graph: grids
depend on N and the widths only. Tokens whose route is out of range (possible only where
``duollm.ops`` cannot check the values, e.g. under capture) belong to no path: their output
rows are left unwritten, and every access stays in bounds.

Backward (``ffn_bwd`` in kernels/ffn_gemm.py) re-groups the routes, recomputes h per tile and
produces dx, every path's weight gradients (split over tokens, deterministic), d(residual)
(= dy) and d(gate) with 4 GEMM launches plus the grouping and a few small torch reductions.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ._common import custom_op
from .grouping import group_tokens
from .ffn_gemm import Slot, down_fwd, ffn_bwd, gateup_fwd


def _slots(weights: Sequence[torch.Tensor], widths: Sequence[int]) -> List[Slot]:
    """One slot per path, in route order. ``widths[p]`` is -1 for a skip path (None in
    params); ``weights`` holds the other paths' triples in order (a width-0 triple acts as a
    skip path but still gets zero gradients)."""
    slots, j = [], 0
    for p, w in enumerate(widths):
        if w >= 0:
            triple = tuple(t.contiguous() for t in weights[3 * j:3 * j + 3])
            slots.append(Slot(p, w, triple))
            j += 1
        else:
            slots.append(Slot(p, 0, None))
    return slots


def duo_ffn_fwd(x: torch.Tensor, routes: torch.Tensor, weights: Sequence[torch.Tensor],
                widths: Sequence[int], residual: Optional[torch.Tensor],
                gate: Optional[torch.Tensor]) -> torch.Tensor:
    """Forward launcher. x (N, d); routes (N,); weights: the routed paths' (w_gate, w_up,
    w_down) flattened in route order; widths (P,) with -1 for skip paths; residual (N, d) or
    None; gate (N,) or None. Returns (N, d) in x's dtype."""
    x = x.contiguous()
    N, d = x.shape
    if N == 0 or d == 0:
        return x.new_empty((N, d))
    slots = _slots(weights, widths)
    groups = group_tokens(routes.reshape(-1), len(widths))
    residual = residual.contiguous() if residual is not None else None
    gate = gate.contiguous() if gate is not None else None
    routed = [s for s in slots if s.width > 0]
    if routed:
        h = torch.empty((N, max(s.width for s in routed)), dtype=x.dtype, device=x.device)
        gateup_fwd(x, groups.perm, groups.offsets, routed, h)
    else:
        h = x  # never read: every path is a skip path
    out = torch.empty_like(x)
    down_fwd(h, groups.perm, groups.offsets, slots, out, residual, gate)
    return out


def duo_ffn_bwd(dy: torch.Tensor, x: torch.Tensor, routes: torch.Tensor,
                weights: Sequence[torch.Tensor], widths: Sequence[int],
                gate: Optional[torch.Tensor]):
    """Backward launcher: (dx (N, d), weight grads in ``weights`` order, dgate (N,) fp32 or
    None). d(residual) is dy itself and is formed by the caller."""
    x, dy = x.contiguous(), dy.contiguous()
    N, d = x.shape
    if N == 0 or d == 0:
        return (torch.zeros_like(x), [torch.zeros_like(w) for w in weights],
                None if gate is None else torch.zeros(N, dtype=torch.float32, device=x.device))
    slots = _slots(weights, widths)
    groups = group_tokens(routes.reshape(-1), len(widths))
    gate = gate.contiguous() if gate is not None else None
    dx, grads, dgate = ffn_bwd(x, dy, gate, groups.perm, groups.offsets, groups.inv, slots)
    grads = iter(grads)
    dws = []
    for s in slots:
        if s.w_gate is not None:
            dws += (list(next(grads)) if s.width > 0 else
                    [torch.zeros_like(s.w_gate), torch.zeros_like(s.w_up),
                     torch.zeros_like(s.w_down)])
    return dx, dws, dgate


# --------------------------------------------------------------------------- torch.library


@custom_op("duo_ffn_fwd")
def _duo_ffn_op(x: torch.Tensor, routes: torch.Tensor, weights: List[torch.Tensor],
                widths: List[int], residual: Optional[torch.Tensor],
                gate: Optional[torch.Tensor]) -> torch.Tensor:
    return duo_ffn_fwd(x, routes, weights, widths, residual, gate)


@_duo_ffn_op.register_fake
def _(x, routes, weights, widths, residual, gate):
    return x.new_empty(x.shape)


@custom_op("duo_ffn_bwd")
def _duo_ffn_bwd_op(dy: torch.Tensor, x: torch.Tensor, routes: torch.Tensor,
                    weights: List[torch.Tensor], widths: List[int],
                    gate: Optional[torch.Tensor]) -> List[torch.Tensor]:
    dx, dws, dgate = duo_ffn_bwd(dy, x, routes, weights, widths, gate)
    # custom ops return no None: an absent gate gets an empty placeholder
    return [dx, *dws, dgate.to(gate.dtype) if gate is not None else x.new_empty(0)]


@_duo_ffn_bwd_op.register_fake
def _(dy, x, routes, weights, widths, gate):
    return [x.new_empty(x.shape), *[w.new_empty(w.shape) for w in weights],
            gate.new_empty(gate.shape) if gate is not None else x.new_empty(0)]


def _setup_context(ctx, inputs, output):
    x, routes, weights, widths, residual, gate = inputs
    ctx.widths = list(widths)
    ctx.n_weights = len(weights)
    ctx.has_gate = gate is not None
    ctx.res_dtype = residual.dtype if residual is not None else None
    ctx.save_for_backward(x, routes, *weights, *([gate] if gate is not None else []))


def _backward(ctx, dy):
    saved = ctx.saved_tensors
    x, routes = saved[0], saved[1]
    weights = list(saved[2:2 + ctx.n_weights])
    gate = saved[2 + ctx.n_weights] if ctx.has_gate else None
    grads = _duo_ffn_bwd_op(dy, x, routes, weights, ctx.widths, gate)
    dx, dws, dgate = grads[0], list(grads[1:1 + ctx.n_weights]), grads[-1]
    dres = dy.to(ctx.res_dtype) if ctx.res_dtype is not None else None
    return dx, None, dws, None, dres, dgate if ctx.has_gate else None


_duo_ffn_op.register_autograd(_backward, setup_context=_setup_context)


def duo_ffn(x: torch.Tensor, routes: torch.Tensor, params, residual=None, gate=None):
    """The routed layer (Triton); same contract as ``duollm.reference.duo_ffn``.

    Args:
      x: (N, d).  routes: (N,) path per token.
      params: P entries, ``(w_gate (W_p, d), w_up (W_p, d), w_down (d, W_p))`` or None (skip).
      residual: (N, d) or None.  gate: (N,) or None.
    Returns: (N, d), differentiable in x, every weight, residual and gate. Registered as
    ``torch.ops.duollm.duo_ffn_fwd`` (backward ``duollm::duo_ffn_bwd``).
    """
    weights: List[torch.Tensor] = []
    widths: List[int] = []
    for p in params:
        if p is None:
            widths.append(-1)
        else:
            widths.append(int(p[0].shape[0]))
            weights.extend(p)
    return _duo_ffn_op(x, routes, weights, widths, residual, gate)
