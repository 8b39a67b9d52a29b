"""The routed Duo FFN layer: ``out = residual + gate * FFN_route(x)`` per token.

One ``torch.library`` custom op per layer (``duollm::duo_ffn_fwd``, backward
``duollm::duo_ffn_bwd``); inside it the launchers are called directly (no nested custom-op
dispatch), and nothing is read back to the host.

Forward, default path (every N):

1. grouping (kernels/grouping.py): perm and offsets on the device (1 launch up to 4096
   tokens, else 3); inv and the widened routes are not written (the forward reads neither).
2. ``_gateup_fwd_kernel`` (kernels/ffn_gemm.py), one launch for every routed path: a
   heterogeneous grouped GEMM; rows of x read through ``perm`` inside the loads; h to a
   workspace (N, max width) in grouped order.
3. ``_down_kernel``, one launch for every path, skip paths included: out[perm[i]] =
   residual + gate * (h_i Wd^T), with the scatter, gate and residual in the epilogue; a skip
   path has width 0, runs no K loop and writes the residual (or zeros).

Routes outside ``[0, P)`` (``duollm.ops`` validates them on the device without a sync, so
the kernels must be safe on any value) are treated as a skip: the grouping puts them in the
first skip path's bucket, or, if the layer has none, in an overflow bucket served by an extra
width-0 slot; their output rows get the residual, their gradients are those of a skip token.

Switches (off by default: new GPU paths become the default only where a committed GPU
measurement shows them faster; ``benchmarks/gpu_check.sh`` measures both). Read once, when
this module is imported, or per call with ``duo_ffn(..., mode=...)``:

* ``DUOLLM_TRITON_DECODE=1`` (mode "decode"): N <= 64 takes ``kernels/decode.py`` (weight
  tiles of paths with tokens only, spread over all SMs, split-K down projection with a
  deterministic reduction fused with gate, residual and scatter; no grouping launch).
* ``DUOLLM_TRITON_PERSISTENT=1`` (mode "persistent"): the grouped GEMMs run on a fixed grid of
  ``programs_per_sm`` x #SMs programs looping over a tile table derived on the device from
  the counts (no empty programs), and the grouping takes one launch up to 65536 tokens.

Backward (``ffn_bwd`` in kernels/ffn_gemm_bwd.py) re-groups the routes, recomputes h per tile
and produces dx, every path's weight gradients (split over tokens, deterministic),
d(residual) (= dy) and d(gate) with 4 GEMM launches plus the grouping and a few small torch
reductions; it is the same whichever forward path ran. Its own switch,
``DUOLLM_TRITON_BWD=1`` (BK = 64 configurations, per-path weight-gradient splits), is read
there.
"""
from __future__ import annotations

import functools
import os
from typing import List, Optional, Sequence, Tuple, Union

import torch

from ._common import Slot, custom_op
from .decode import decode_ok, duo_ffn_decode
from .ffn_gemm import down_fwd, gateup_fwd
from .ffn_gemm_bwd import ffn_bwd
from .grouping import group_tokens_fwd

DEFAULT, DECODE, PERSISTENT = 0, 1, 2
_MODES = {"default": DEFAULT, "decode": DECODE, "persistent": PERSISTENT,
          "decode+persistent": DECODE | PERSISTENT}


def _env_mode() -> int:
    mode = DEFAULT
    for var, bit in (("DUOLLM_TRITON_DECODE", DECODE), ("DUOLLM_TRITON_PERSISTENT", PERSISTENT)):
        val = os.environ.get(var, "0")
        if val not in ("0", "1"):
            raise ValueError(f"{var}: expected 0 or 1, got {val!r}")
        if val == "1":
            mode |= bit
    return mode


ENV_MODE = _env_mode()  # the switches, read once
# ``duollm.ops.run_duo_ffn`` hands this backend the error flag and the raw routes: the kernels
# that read the routes anyway (the grouping, or decode's gate/up) set the flag's route bit
# with one masked atomic OR where a route lies outside [min_route, P), instead of the ~9 torch
# launches of a sanitising step before the layer.
FLAGS_ROUTES = True


def parse_mode(mode: Union[None, str, int]) -> int:
    """The path bits of ``mode``: None -> the environment's switches; a name in
    ("default", "decode", "persistent", "decode+persistent"); or the int bits."""
    if mode is None:
        return ENV_MODE
    if isinstance(mode, str):
        if mode not in _MODES:
            raise ValueError(f"mode: expected one of {sorted(_MODES)} or None, got {mode!r}")
        return _MODES[mode]
    if isinstance(mode, int) and 0 <= mode <= DECODE | PERSISTENT:
        return mode
    raise ValueError(f"mode: expected None, a name or 0..3, got {mode!r}")


@functools.lru_cache(maxsize=1024)
def _layout(widths: Tuple[int, ...]) -> Tuple[Optional[int], bool]:
    """(bucket of out-of-range routes: the first skip path, or None for the overflow bucket;
    whether the overflow bucket needs a slot of its own). Cached per layer shape."""
    skip = [p for p, w in enumerate(widths) if w <= 0]
    return (skip[0], False) if skip else (None, True)


def _slots(weights: Sequence[torch.Tensor], widths: Sequence[int]) -> List[Slot]:
    """One slot per path, in route order, plus the overflow slot (route P, width 0) when no
    path is a skip path. ``widths[p]`` is -1 for a skip path (None in params); ``weights``
    holds the other paths' triples in order (a width-0 triple acts as a skip path but still
    gets zero gradients)."""
    slots, j = [], 0
    for p, w in enumerate(widths):
        if w >= 0:
            triple = tuple(t.contiguous() for t in weights[3 * j:3 * j + 3])
            slots.append(Slot(p, w, triple))
            j += 1
        else:
            slots.append(Slot(p, 0, None))
    if _layout(tuple(max(w, 0) for w in widths))[1]:
        slots.append(Slot(len(widths), 0, None))
    return slots


def duo_ffn_fwd(x: torch.Tensor, routes: torch.Tensor, weights: Sequence[torch.Tensor],
                widths: Sequence[int], residual: Optional[torch.Tensor],
                gate: Optional[torch.Tensor], mode: int = DEFAULT,
                flag: Optional[torch.Tensor] = None, min_route: int = 0) -> torch.Tensor:
    """Forward launcher. x (N, d); routes (N,); weights: the routed paths' (w_gate, w_up,
    w_down) flattened in route order; widths (P,) with -1 for skip paths; residual (N, d) or
    None; gate (N,) or None; mode: path bits (``parse_mode``); flag: an int32 0-d tensor
    whose ``ROUTE_ERROR`` bit is set where a route lies outside ``[min_route, P)`` (or None).
    Returns (N, d) in x's dtype."""
    x = x.contiguous()
    N, d = x.shape
    if N == 0 or d == 0:
        return x.new_empty((N, d))
    P = len(widths)
    slots = _slots(weights, widths)
    routes = routes.reshape(-1).contiguous()
    residual = residual.contiguous() if residual is not None else None
    gate = gate.contiguous() if gate is not None else None
    if mode & DECODE and decode_ok(N, slots):
        return duo_ffn_decode(x, routes, slots, residual, gate, flag=flag, lo=min_route,
                              num_paths=P)
    persistent = bool(mode & PERSISTENT)
    bad, _ = _layout(tuple(max(w, 0) for w in widths))
    perm, _, _, offsets, _ = group_tokens_fwd(routes, P, bad_bucket=bad, write_inv=False,
                                              write_routes=False, one_launch=persistent,
                                              flag=flag, lo=min_route)
    routed = [s for s in slots if s.width > 0]
    if routed:
        h = torch.empty((N, max(s.width for s in routed)), dtype=x.dtype, device=x.device)
        gateup_fwd(x, perm, offsets, routed, h, P, persistent)
    else:
        h = x  # never read: every path is a skip path
    out = torch.empty_like(x)
    down_fwd(h, perm, offsets, slots, out, residual, gate, P, persistent)
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
    P = len(widths)
    slots = _slots(weights, widths)
    bad, _ = _layout(tuple(max(w, 0) for w in widths))
    perm, inv, _, offsets, _ = group_tokens_fwd(routes.reshape(-1), P, bad_bucket=bad,
                                                write_routes=False)
    gate = gate.contiguous() if gate is not None else None
    dx, grads, dgate = ffn_bwd(x, dy, gate, perm, offsets, inv, slots, P)
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
                gate: Optional[torch.Tensor], mode: int) -> torch.Tensor:
    # mode has no default: torch drops default-valued arguments from the autograd inputs
    return duo_ffn_fwd(x, routes, weights, widths, residual, gate, mode)


@_duo_ffn_op.register_fake
def _(x, routes, weights, widths, residual, gate, mode):
    return x.new_empty(x.shape)


# The same forward with the error flag: an op that mutates an input cannot carry an autograd
# formula, so with gradients it runs inside ``_FlaggedFn`` (backward: ``duo_ffn_bwd``).
@custom_op("duo_ffn_fwd_flagged", mutates_args=("flag",))
def _duo_ffn_flagged_op(x: torch.Tensor, routes: torch.Tensor, weights: List[torch.Tensor],
                        widths: List[int], residual: Optional[torch.Tensor],
                        gate: Optional[torch.Tensor], path_mode: int, flag: torch.Tensor,
                        min_route: int) -> torch.Tensor:
    # not "mode": torch's functionalisation of a mutating op passes a keyword of that name
    return duo_ffn_fwd(x, routes, weights, widths, residual, gate, path_mode, flag, min_route)


@_duo_ffn_flagged_op.register_fake
def _(x, routes, weights, widths, residual, gate, path_mode, flag, min_route):
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
    x, routes, weights, widths, residual, gate, _ = inputs
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
    return dx, None, dws, None, dres, dgate if ctx.has_gate else None, None


_duo_ffn_op.register_autograd(_backward, setup_context=_setup_context)


class _FlaggedFn(torch.autograd.Function):
    """``_duo_ffn_flagged_op`` with gradients: the backward of ``_duo_ffn_op``."""

    @staticmethod
    def forward(ctx, x, routes, residual, gate, flag, widths, mode, min_route, *weights):
        out = _duo_ffn_flagged_op(x, routes, list(weights), widths, residual, gate, mode,
                                  flag, min_route)
        _setup_context(ctx, (x, routes, list(weights), widths, residual, gate, mode), out)
        return out

    @staticmethod
    def backward(ctx, dy):
        dx, _, dws, _, dres, dgate, _ = _backward(ctx, dy)
        return (dx, None, dres, dgate, None, None, None, None, *dws)


def duo_ffn(x: torch.Tensor, routes: torch.Tensor, params, residual=None, gate=None,
            mode: Union[None, str, int] = None, flag: Optional[torch.Tensor] = None,
            min_route: int = 0):
    """The routed layer (Triton); same contract as ``duollm.reference.duo_ffn``.

    Args:
      x: (N, d).  routes: (N,) path per token (out-of-range values act as a skip).
      params: P entries, ``(w_gate (W_p, d), w_up (W_p, d), w_down (d, W_p))`` or None (skip).
      residual: (N, d) or None.  gate: (N,) or None.
      mode: which forward path (``parse_mode``; None: the environment's switches).
      flag: None, or an int32 0-d tensor on x's device (a ``duollm.checks.RouteErrors``
        flag): the kernel that reads the routes ORs ``ROUTE_ERROR`` (1) into it where a route
        lies outside ``[min_route, P)``; routes below ``min_route`` must name skip paths.
    Returns: (N, d), differentiable in x, every weight, residual and gate. Registered as
    ``torch.ops.duollm.duo_ffn_fwd`` (backward ``duollm::duo_ffn_bwd``).
    """
    if flag is not None and (not isinstance(flag, torch.Tensor) or flag.dtype != torch.int32
                             or flag.dim() != 0 or flag.device != x.device):
        raise ValueError(f"flag: expected an int32 0-d tensor on {x.device}, got "
                         f"{flag.dtype if isinstance(flag, torch.Tensor) else type(flag)}")
    if not isinstance(min_route, int) or not 0 <= min_route <= len(params) or \
            any(params[p] is not None for p in range(min_route)):
        raise ValueError(f"min_route: expected an int in [0, {len(params)}] below which "
                         f"every path is a skip path, got {min_route!r}")
    weights: List[torch.Tensor] = []
    widths: List[int] = []
    for p in params:
        if p is None:
            widths.append(-1)
        else:
            widths.append(int(p[0].shape[0]))
            weights.extend(p)
    if flag is None:
        return _duo_ffn_op(x, routes, weights, widths, residual, gate, parse_mode(mode))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, residual, gate, *weights)):
        return _FlaggedFn.apply(x, routes, residual, gate, flag, widths, parse_mode(mode),
                                min_route, *weights)
    return _duo_ffn_flagged_op(x, routes, weights, widths, residual, gate, parse_mode(mode),
                               flag, min_route)
