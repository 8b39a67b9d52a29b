"""The ``"torch"`` backend: the routed layer in fast plain PyTorch (the CPU's default path).

Same functions and signatures as ``duollm.reference`` (the spec, which the tests compare
against); inputs arrive validated by ``duollm.ops``. ``group_tokens`` is the reference's (a
stable sort, already cheap); the others are rewritten for speed:

* ``duo_ffn`` has three paths (docs/speed.md). Decode on the CPU (up to 16 tokens, route
  values on the host: ``duo_ffn_host``): each path's five kernels on its rows, no sort, no
  plan. Where values cannot be read for free (a GPU; ``torch.compile``; graph capture; the
  "device" check mode) up to 64 tokens, and any number while tracing or capturing: the static
  masked layer (every path on every row, ``torch.where``), which reads nothing back. Otherwise
  the sorted plan: one stable sort, the routed rows gathered once (``index_select``), each
  path's SwiGLU on a contiguous slice of the grouped rows (plain GEMMs at full efficiency),
  SiLU-mul in place, the residual add fused into the down GEMM (it accumulates onto the
  gathered residual rows), the grouped output back to token order by one gather with the
  inverse permutation. Skip tokens are never gathered into a GEMM nor computed: they cost one
  row copy of the residual. **The plan reads the per-path counts back to the host**
  (``.tolist()``): free on the CPU, one synchronisation on a GPU (above 64 tokens; the triton
  backend is the sync-free one at every size).
* ``one_path``: every token on one path (``DuoLLM``'s policies and patterns), the same
  arithmetic as ``duo_ffn`` gives those tokens.
* Gradients come from a hand-written ``autograd.Function``: the forward saves the grouped
  input and each path's two pre-activations (not the activations autograd would keep) and
  the backward recomputes SiLU, runs the six GEMMs per path on the same contiguous slices and
  scatters the input gradient once.
* Under autocast the layer falls back to ordinary differentiable ops on the same grouping, so
  autocast's casting rules apply as they would to user code.

Why it is fast on the CPU (profiled with ``torch.profiler`` and stage timers; see
``duollm.bench``): the reference's boolean masks cost a ``nonzero`` and a gather per path, a
full ``index_put`` per path and a zero-filled output; here the GEMMs are all that is left.
The remaining non-GEMM cost on the CPU is mostly the kernel's page faults on freshly
allocated large buffers (glibc returns big blocks to the OS on free), which is why the
inference path writes each path's output over its gathered input rows instead of a new buffer,
and the scatter-add, which is why the output is assembled in grouped order and gathered back.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import reference
from .checks import cannot_sync, check_mode
from .reference import FFNWeights, RouteGroups, group_tokens, rms_norm

__all__ = ["group_tokens", "gather", "scatter_combine", "swiglu_ffn", "duo_ffn", "one_path",
           "duo_ffn_host"]


def _wants_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _autocasting(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)


# --------------------------------------------------------------------------- gather / scatter


def gather(
    x: torch.Tensor,
    groups: RouteGroups,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Rows of ``x`` (N, d) in grouped order, optionally RMS-normalised (``norm_weight`` (d,)).

    ``index_select`` instead of advanced indexing: a plain row copy, about 3x faster on the CPU.
    """
    x_ND = x.index_select(0, groups.perm)
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
    """``out[t] = residual[t] + gate[t] * y[inv[t]]``; skip-path tokens get ``residual[t]``.

    Args: y (N, d) grouped order; residual (N, d) token order; gate (N,); skip_paths ints.
    Returns: (N, d) in token order, dtype of ``y``. A skipped token's row of ``y`` is never
    used (masked, not multiplied by zero, so a NaN there does not leak).
    """
    out = y.index_select(0, groups.inv)  # (N, d) token order
    in_place = not _wants_grad(y, residual, gate)
    if skip_paths:
        skip = groups.routes == skip_paths[0]
        for p in skip_paths[1:]:
            skip |= groups.routes == p
        skip = skip.unsqueeze(-1)  # (N, 1)
        out = out.masked_fill_(skip, 0) if in_place else out.masked_fill(skip, 0)
    scale = None if gate is None else gate.to(out.dtype).unsqueeze(-1)  # (N, 1)
    if residual is None:
        if scale is not None:
            out = out.mul_(scale) if in_place else out * scale
        return out
    residual = residual.to(out.dtype)
    if scale is not None:
        return torch.addcmul(residual, out, scale)
    return out.add_(residual) if in_place else residual + out


# --------------------------------------------------------------------------- one SwiGLU path


def _path_fwd(x_nd: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
              w_down: torch.Tensor, out_nd: torch.Tensor, gate_n: Optional[torch.Tensor],
              save: bool, residual: Optional[torch.Tensor] = None,
              rows: Optional[torch.Tensor] = None
              ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``out_nd = residual[rows] + gate_n * swiglu(x_nd)`` written into ``out_nd`` (n, d).

    No autograd. ``out_nd`` may alias ``x_nd`` (inference reuses the gathered rows' storage):
    ``x_nd`` is fully read by the first two GEMMs before anything writes. The residual rows
    are gathered straight into ``out_nd`` and the down GEMM accumulates onto them (beta = 1),
    so no scatter-add is needed later. Returns the pre-activations ``(g, u)`` (n, width) when
    ``save``, else ``(None, None)`` and they are overwritten.
    """
    g = torch.mm(x_nd, w_gate.t())  # (n, width)
    u = torch.mm(x_nd, w_up.t())  # (n, width)
    if save:
        h = F.silu(g).mul_(u)
    else:
        h = F.silu(g, inplace=True).mul_(u)
    if gate_n is not None:
        h.mul_(gate_n.unsqueeze(-1))  # gate rows on the narrower side of the down GEMM
    if residual is None:
        torch.mm(h, w_down.t(), out=out_nd)
    else:
        torch.index_select(residual, 0, rows, out=out_nd)
        out_nd.addmm_(h, w_down.t())
    return (g, u) if save else (None, None)


def _path_bwd(go_nd: torch.Tensor, x_nd: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
              w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
              gate_n: Optional[torch.Tensor], dx_nd: Optional[torch.Tensor],
              need_w: Tuple[bool, bool, bool], need_gate: bool):
    """Gradients of one path given the output gradient ``go_nd`` (n, d).

    Writes the input gradient into ``dx_nd`` (n, d) when given; returns
    ``(dw_gate, dw_up, dw_down, dgate_n)``, None where not needed.
    """
    s = torch.sigmoid(g)  # (n, width)
    act = g * s  # silu(g)
    h = act * u
    da = torch.mm(go_nd, w_down)  # (n, width): d(loss)/d(h * gate)
    dgate_n = None
    if gate_n is not None:
        if need_gate:
            dgate_n = (da * h).sum(-1)  # (n,)
        gate_col = gate_n.unsqueeze(-1)
        da.mul_(gate_col)
        h.mul_(gate_col)
    dw_down = torch.mm(go_nd.t(), h) if need_w[2] else None  # (d, width)
    du = da * act
    # silu'(g) = s * (1 + g * (1 - s)), built in place in s's storage.
    dsilu = torch.mul(g, 1 - s).add_(1).mul_(s)
    dg = da.mul_(u).mul_(dsilu)
    dw_gate = torch.mm(dg.t(), x_nd) if need_w[0] else None  # (width, d)
    dw_up = torch.mm(du.t(), x_nd) if need_w[1] else None
    if dx_nd is not None:
        torch.mm(dg, w_gate, out=dx_nd)
        dx_nd.addmm_(du, w_up)
    return dw_gate, dw_up, dw_down, dgate_n


class _SwiGLUFn(torch.autograd.Function):
    """SwiGLU on all rows; saves (x, g, u) and recomputes the activation in backward."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down):
        out = x.new_empty(x.shape[0], w_down.shape[0])  # (N, d)
        g, u = _path_fwd(x, w_gate, w_up, w_down, out, None, save=True)
        ctx.save_for_backward(x, g, u, w_gate, w_up, w_down)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go):
        x, g, u, w_gate, w_up, w_down = ctx.saved_tensors
        need_x, *need_w = ctx.needs_input_grad
        dx = torch.empty_like(x) if need_x else None
        dw_gate, dw_up, dw_down, _ = _path_bwd(go.contiguous(), x, g, u, w_gate, w_up, w_down,
                                               None, dx, tuple(need_w), False)
        return dx, dw_gate, dw_up, dw_down


def swiglu_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
               w_down: torch.Tensor) -> torch.Tensor:
    """SwiGLU FFN: x (N, d); w_gate, w_up (width, d); w_down (d, width). Returns (N, d)."""
    if _autocasting(x.device) or x.is_meta:
        return reference.swiglu_ffn(x, w_gate, w_up, w_down)
    x = x.contiguous()
    if _wants_grad(x, w_gate, w_up, w_down):
        return _SwiGLUFn.apply(x, w_gate, w_up, w_down)
    out = x.new_empty(x.shape[0], w_down.shape[0])
    _path_fwd(x, w_gate, w_up, w_down, out, None, save=False)
    return out


# --------------------------------------------------------------------------- the routed layer


class _Plan:
    """Where each path's rows lie after grouping (host-side, from the counts).

    ``perm`` (N,) lists the token ids grouped, skip paths first, and ``inv`` (N,) is its
    inverse; ``rows = perm[n_skip:]`` (R,) are the routed tokens and ``skip_rows`` the others;
    ``segments`` holds, per computed path, its index and the slice ``[a, b)`` of ``rows``.

    A route outside ``[0, P)`` (only possible when nothing checked the values:
    ``DUOLLM_CHECK_ROUTES=0``) counts as a skip: its token is grouped before every path and
    gets the residual. So the cost never depends on the route values (a route of 2**40 is not
    a 2**40-bin count) and no output row is left unwritten.
    """

    __slots__ = ("perm", "inv", "n_skip", "rows", "skip_rows", "segments")

    def __init__(self, routes: torch.Tensor, params: Sequence[Optional[FFNWeights]]):
        P = len(params)
        skip_paths = [p for p in range(P) if params[p] is None]
        computed = [p for p in range(P) if params[p] is not None]
        routes_N = routes.reshape(-1).to(torch.int64)
        order = skip_paths + computed  # skip paths first, so routed rows are one suffix
        valid = (routes_N >= 0) & (routes_N < P)
        if order == list(range(P)):
            key = torch.where(valid, routes_N + 1, 0)  # key 0: out of range, before all
        else:
            rank = torch.empty(P, dtype=torch.int64)
            rank[torch.tensor(order)] = torch.arange(1, P + 1)
            key = torch.where(valid, rank.to(routes_N.device)[routes_N.clamp(0, P - 1)], 0)
        perm = torch.sort(key, stable=True).indices  # (N,)
        # P + 1 bins whatever the values; a host sync on a GPU (docstring)
        counts = torch.bincount(key, minlength=P + 1).tolist()[1:]
        n_skip = perm.numel() - sum(counts[len(skip_paths):])
        inv = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(),
                                                                     device=perm.device))
        self.perm, self.inv, self.n_skip = perm, inv, n_skip
        self.rows, self.skip_rows = perm[n_skip:], perm[:n_skip]
        self.segments: List[Tuple[int, int, int]] = []
        a = 0
        for rank_p, p in enumerate(computed, start=len(skip_paths)):
            self.segments.append((p, a, a + counts[rank_p]))
            a += counts[rank_p]


def _duo_fwd(x: torch.Tensor, plan: _Plan, params, residual, gate_r, save: bool):
    """The routed layer's forward without autograd; returns (out, xg, saved pre-activations).

    The output is built in grouped order ``z`` (N, d) — skip rows first, each path's rows
    written once by its down GEMM on top of the gathered residual — and put back in token
    order by one gather, ``z[inv]``. Gathers (``index_select``) are the CPU's fastest row
    movers; the scatter-add this replaces (``index_add_``) parallelises badly (profiled: 4x
    an ``index_select`` on 2 threads, the largest non-GEMM cost).
    """
    N, d = x.shape
    ns = plan.n_skip
    if residual is not None:
        residual = residual.to(x.dtype)
    if ns == N:  # every token skips: one copy, no round trip through grouped order
        out = x.new_zeros(N, d) if residual is None else residual.clone()
        return out, x[:0], [(None, None) for _ in plan.segments]
    z = x.new_empty(N, d)  # (N, d) output, grouped order
    if save:
        xg = x.index_select(0, plan.rows)  # (R, d), kept for the backward
    else:  # inference: each path's input rows are overwritten by its output rows
        xg = torch.index_select(x, 0, plan.rows, out=z[ns:])
    if ns:
        if residual is not None:
            torch.index_select(residual, 0, plan.skip_rows, out=z[:ns])
        else:
            z[:ns].zero_()
    pre = []
    for p, a, b in plan.segments:
        if b == a:
            pre.append((None, None))
            continue
        gate_n = None if gate_r is None else gate_r[a:b]
        pre.append(_path_fwd(xg[a:b], *params[p], z[ns + a:ns + b], gate_n, save, residual,
                             plan.rows[a:b]))
    return z.index_select(0, plan.inv), xg, pre


class _DuoFFNFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, gate, plan, params_idx, *weights):
        params = _unflatten(params_idx, weights)
        gate_r = None if gate is None else gate.index_select(0, plan.rows).to(x.dtype)
        out, xg, pre = _duo_fwd(x, plan, params, residual, gate_r, save=True)
        ctx.plan, ctx.params_idx = plan, params_idx
        ctx.has_gate, ctx.gate_dtype = gate is not None, None if gate is None else gate.dtype
        ctx.residual_dtype = None if residual is None else residual.dtype
        flat_pre = [t for gu in pre for t in gu]
        ctx.save_for_backward(xg, gate_r, *weights, *flat_pre)
        ctx.n_weights = len(weights)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go):
        plan = ctx.plan
        saved = ctx.saved_tensors
        xg, gate_r = saved[0], saved[1]
        weights = saved[2:2 + ctx.n_weights]
        flat_pre = saved[2 + ctx.n_weights:]
        params = _unflatten(ctx.params_idx, weights)
        need_x, need_res, need_gate = ctx.needs_input_grad[:3]
        need_w = ctx.needs_input_grad[5:]
        go = go.contiguous()  # (N, d)
        N, d = go.shape
        go_g = go.index_select(0, plan.rows)  # (R, d) grouped
        ns = plan.n_skip
        dxz = go.new_empty(N, d) if need_x else None  # (N, d) input gradient, grouped order
        dxg = None if dxz is None else dxz[ns:]
        dgate_r = go.new_zeros(xg.shape[0]) if need_gate else None
        dweights: List[Optional[torch.Tensor]] = [None] * len(weights)
        for k, (p, a, b) in enumerate(plan.segments):
            j = 3 * ctx.params_idx.index(p)  # position of this path's weights in `weights`
            want = tuple(need_w[j:j + 3])
            if b == a:  # an empty path: zero weight gradients, as autograd would give
                for i in range(3):
                    if want[i]:
                        dweights[j + i] = torch.zeros_like(weights[j + i])
                continue
            g, u = flat_pre[2 * k], flat_pre[2 * k + 1]
            grads = _path_bwd(go_g[a:b], xg[a:b], g, u, *params[p],
                              None if gate_r is None else gate_r[a:b],
                              None if dxg is None else dxg[a:b], want, need_gate)
            for i in range(3):
                if want[i]:
                    dweights[j + i] = grads[i]
            if need_gate:
                dgate_r[a:b] = grads[3]
        dx = None
        if need_x:
            dxz[:ns].zero_()
            dx = dxz.index_select(0, plan.inv)
        dres = go.to(ctx.residual_dtype) if need_res else None
        dgate = None
        if need_gate:
            dgate = go.new_zeros(N).index_copy_(0, plan.rows, dgate_r).to(ctx.gate_dtype)
        return (dx, dres, dgate, None, None, *dweights)


def _flatten(params) -> Tuple[Tuple[int, ...], Tuple[torch.Tensor, ...]]:
    idx = tuple(p for p, w in enumerate(params) if w is not None)
    return idx, tuple(t for p in idx for t in params[p])


def _unflatten(params_idx, weights) -> dict:
    return {p: tuple(weights[3 * k:3 * k + 3]) for k, p in enumerate(params_idx)}


def _duo_ffn_plain(x, plan: _Plan, params, residual, gate):
    """Ordinary differentiable ops on the same grouping (used under autocast)."""
    xg = x.index_select(0, plan.rows)  # (R, d)
    ys = []
    for p, a, b in plan.segments:
        ys.append(reference.swiglu_ffn(xg[a:b], *params[p]).to(x.dtype))
    yg = torch.cat(ys) if ys else xg[:0]
    if gate is not None:
        yg = yg * gate.index_select(0, plan.rows).to(yg.dtype).unsqueeze(-1)
    base = x.new_zeros(x.shape) if residual is None else residual.to(x.dtype)
    return base.index_add(0, plan.rows, yg)


# Up to this many tokens the routes are read as a Python list on the CPU (decode): building
# the plan from it skips the sort, bincount and inverse permutation the general path needs.
_HOST_PLAN_MAX = 16
# Up to this many tokens on a device that cannot be read for free (a GPU, or the CPU in the
# "device" check mode) every path runs on every row and masks pick each token's result: no
# counts are read back, so no host synchronisation (decode's weight reads dominate there).
STATIC_MAX = 64


def _reads_free(device: torch.device) -> bool:
    """Whether route values on ``device`` may be read back here: on the CPU, unless the
    ``"device"`` check mode asks for the GPU's code path, and never while tracing/capturing."""
    if device.type != "cpu" or cannot_sync():
        return False
    return check_mode() != "device"


def _swiglu_rows(x: torch.Tensor, weights: FFNWeights, gate: Optional[torch.Tensor],
                 residual: Optional[torch.Tensor]) -> torch.Tensor:
    """``residual + gate * swiglu(x)`` for x (n, d) on one path, no autograd: 5 kernels."""
    w_gate, w_up, w_down = weights
    # F.linear, not mm(x, w.t()): the transposed view is made in C++, not by a Python call
    h = F.silu(F.linear(x, w_gate), inplace=True).mul_(F.linear(x, w_up))  # (n, W)
    if gate is not None:
        h.mul_(gate.to(h.dtype).unsqueeze(-1))
    if residual is None:
        return F.linear(h, w_down)
    return torch.addmm(residual, h, w_down.t())


def one_path(x: torch.Tensor, weights: FFNWeights, residual: Optional[torch.Tensor] = None,
             gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Every token on one path: ``residual + gate * swiglu(x)``, x (N, d) -> (N, d).

    The same arithmetic as ``duo_ffn`` gives those tokens (residual accumulated by the down
    GEMM), so a policy and the equivalent routes tensor agree bit for bit."""
    if (torch.is_grad_enabled() and _wants_grad(x, residual, gate, *weights)) or \
            x.is_meta or _autocasting(x.device):
        y = swiglu_ffn(x, *weights).to(x.dtype)
        if gate is not None:
            y = y * gate.to(y.dtype).unsqueeze(-1)
        return y if residual is None else residual + y
    return _swiglu_rows(x.contiguous(), weights, gate, residual)


def duo_ffn_host(x: torch.Tensor, vals: List[int], params: Sequence[Optional[FFNWeights]],
                 residual: Optional[torch.Tensor] = None,
                 gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``duo_ffn`` for a few CPU tokens whose routes ``vals`` (N ints, checked) were already
    read by ``duollm.ops``: x (N, d) -> (N, d). Autograd and autocast take ``duo_ffn``."""
    if (torch.is_grad_enabled() and (_wants_grad(x, residual, gate) or any(
            w is not None and _wants_grad(*w) for w in params))) or \
            torch.is_autocast_enabled("cpu"):  # x is on the CPU here
        return duo_ffn(x, torch.tensor(vals, device=x.device), params, residual, gate)
    return _duo_host_small(x.contiguous(), vals, params, residual, gate)


def _duo_host_small(x, vals: List[int], params, residual, gate) -> torch.Tensor:
    """The layer for a few tokens whose routes are known on the host (decode on the CPU)."""
    first = vals[0]
    if (len(vals) == 1 or all(v == first for v in vals)) and 0 <= first < len(params):
        # one path for all: no indexing (a route matching no path is a skip, below)
        w = params[first]
        if w is None:
            return x.new_zeros(x.shape) if residual is None else residual.clone()
        return _swiglu_rows(x, w, gate, residual)
    out = x.new_zeros(x.shape) if residual is None else residual.clone()  # (N, d)
    for p, w in enumerate(params):
        if w is None:
            continue
        idx = [t for t, v in enumerate(vals) if v == p]
        if not idx:
            continue
        rows = torch.tensor(idx, device=x.device)
        out.index_copy_(0, rows, _swiglu_rows(
            x.index_select(0, rows), w, None if gate is None else gate.index_select(0, rows),
            None if residual is None else residual.index_select(0, rows)))
    return out


def duo_static(x, routes, params, residual, gate) -> torch.Tensor:
    """Every path on every row, each token keeping its own path's result (masks); ordinary
    differentiable ops with static shapes: no value read back, traceable by
    ``torch.compile(fullgraph=True)`` and capturable in a CUDA graph. A route matching no
    path is a skip (the residual)."""
    out = x.new_zeros(x.shape) if residual is None else residual.to(x.dtype)  # (N, d)
    for p, w in enumerate(params):
        if w is None:
            continue
        y = reference.swiglu_ffn(x, *w).to(x.dtype)  # (N, d)
        if gate is not None:
            y = y * gate.to(y.dtype).unsqueeze(-1)
        out = torch.where((routes == p).unsqueeze(-1), out + y, out)  # NaN-safe masking
    return out


def duo_ffn(
    x: torch.Tensor,
    routes: torch.Tensor,
    params: Sequence[Optional[FFNWeights]],
    residual: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The routed layer: ``residual + gate * FFN_route(x)``, the FFN term zero on skip paths.

    Args:
      x: (N, d).  routes: (N,) path per token.  params: per path ``(w_gate, w_up, w_down)``
      or None (skip).  residual: (N, d) or None.  gate: (N,) or None.
    Returns: (N, d), dtype of x.

    Which path runs (docs/speed.md): on the CPU, up to 16 tokens without autograd read the
    routes as a list (no sort, no plan); more tokens take the sorted plan, which reads the
    per-path counts (free on the CPU). Where values cannot be read for free (a GPU, a
    capture, ``torch.compile``, the "device" check mode) up to 64 tokens, and any number
    while tracing or capturing, run the static masked layer (no read); more tokens on a GPU
    read the counts once (one synchronisation: the triton backend is the GPU's sync-free one).
    """
    if x.is_meta:
        return reference.duo_ffn(x, routes, params, residual, gate)
    N = x.shape[0]
    grad = torch.is_grad_enabled() and (_wants_grad(x, residual, gate) or any(
        w is not None and _wants_grad(*w) for w in params))
    if not _reads_free(x.device):
        if N <= STATIC_MAX or cannot_sync():
            return duo_static(x, routes, params, residual, gate)
    elif N <= _HOST_PLAN_MAX and N and not grad and not _autocasting(x.device):
        # residual arrives in x's dtype (duollm.ops checks it)
        return _duo_host_small(x.contiguous(), routes.tolist(), params, residual, gate)
    x = x.contiguous()
    plan = _Plan(routes, params)
    if _autocasting(x.device):
        return _duo_ffn_plain(x, plan, params, residual, gate)
    params_idx, weights = _flatten(params)
    if grad:
        return _DuoFFNFn.apply(x, residual, gate, plan, params_idx, *weights)
    gate_r = None if gate is None else gate.index_select(0, plan.rows).to(x.dtype)
    out, _, _ = _duo_fwd(x, plan, params, residual, gate_r, save=False)
    return out
