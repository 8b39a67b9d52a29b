"""The ``"cuda"`` backend of ``duollm.ops``: the compiled kernels of ``csrc/`` (``duollm._C``).

Each public function has the signature of the matching function in ``duollm.reference``;
inputs arrive validated by ``duollm.ops`` (this module does not check them again beyond what
the kernels need: contiguity, dtypes of the side inputs).

The kernels are wrapped as ``torch.library`` custom ops (namespace ``duollm_cuda``) with fake
(meta) implementations and autograd formulas, so ``torch.compile(fullgraph=True)`` traces
through ``group_tokens``, ``gather`` and ``scatter_combine`` and CUDA graphs can capture them
(none of them synchronises with the host). ``duo_ffn`` is the exception: see its docstring.

Importing this module needs ``duollm._C``; ``duollm.ops`` checks that before importing it.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .reference import FFNWeights, RouteGroups
from .checks import cannot_sync
from .torch_backend import STATIC_MAX, duo_static as static_duo_ffn

try:
    from . import _C
except ImportError as exc:  # fail loudly (docs/style.md): say what is missing and what to do
    raise ImportError(
        f"duollm.cuda_backend needs the compiled CUDA extension duollm._C, which cannot be "
        f"imported ({exc}). Build it on a machine with CUDA torch and nvcc: "
        f"`pip install --no-build-isolation -e .` without DUOLLM_SKIP_CUDA_BUILD=1; or use "
        f"backend='triton' or 'torch'.") from exc

_NS = "duollm_cuda"
_MAX_SKIP_PATH = 63  # the skip set travels to the kernel as a 64-bit mask over paths
_MAX_PATHS = 1024  # csrc/duollm.cuh kMaxPaths


# --------------------------------------------------------------------------- group_tokens


@torch.library.custom_op(f"{_NS}::group_tokens", mutates_args=())
def _group_tokens_op(routes: Tensor, num_paths: int
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    perm, inv, counts, offsets, routes_N = _C.group_tokens(routes, num_paths)
    return perm, inv, counts, offsets, routes_N


@_group_tokens_op.register_fake
def _(routes, num_paths):
    n = routes.shape[0]
    i64 = dict(dtype=torch.int64, device=routes.device)
    return (torch.empty(n, **i64), torch.empty(n, **i64), torch.empty(num_paths, **i64),
            torch.empty(num_paths + 1, **i64), torch.empty(n, **i64))


def group_tokens(routes: Tensor, num_paths: int) -> RouteGroups:
    """Stable counting sort of token ids by route, on the GPU, with no host sync.

    Args:
      routes: (N,) (or any shape, flattened) integer path per token in ``[0, num_paths)``.
      num_paths: P, at most 1024 here.
    Returns: ``RouteGroups`` (perm, inv (N,), counts (P,), offsets (P+1,), routes (N,) int64).
    A route outside ``[0, P)`` (only possible where ``duollm.ops`` cannot check, e.g. under
    graph capture) is never written out of bounds: such tokens sort after every path.
    """
    # Checked here as well as in _C: on the H100 build (torch 2.11+cu130) this one
    # TORCH_CHECK_VALUE in _C.group_tokens crashed the process instead of raising (the same
    # macro elsewhere raised as expected); a Python check never reaches it.
    if not 1 <= int(num_paths) <= _MAX_PATHS:
        raise ValueError(f"num_paths: the cuda backend supports 1 to {_MAX_PATHS} paths, "
                         f"got {num_paths}")
    perm, inv, counts, offsets, routes_N = _group_tokens_op(routes.reshape(-1).contiguous(),
                                                            int(num_paths))
    return RouteGroups(perm, inv, counts, offsets, routes_N)


# --------------------------------------------------------------------------- gather


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The RMSNorm arithmetic type (of weight, rstd): float64 rows stay float64, else float32."""
    return torch.promote_types(dtype, torch.float32)


@torch.library.custom_op(f"{_NS}::gather_fwd", mutates_args=())
def _gather_fwd_op(x: Tensor, perm: Tensor, inv: Tensor, weight: Optional[Tensor],
                   eps: float) -> Tuple[Tensor, Tensor]:
    out, rstd = _C.gather_fwd(x, perm, weight, eps)
    return out, rstd


@_gather_fwd_op.register_fake
def _(x, perm, inv, weight, eps):
    n_rstd = x.shape[0] if weight is not None else 0
    return torch.empty_like(x), x.new_empty(n_rstd, dtype=_norm_dtype(x.dtype))


@torch.library.custom_op(f"{_NS}::gather_bwd", mutates_args=())
def _gather_bwd_op(dy: Tensor, x: Tensor, perm: Tensor, inv: Tensor, weight: Optional[Tensor],
                   rstd: Optional[Tensor], need_dweight: bool) -> Tuple[Tensor, Tensor]:
    dx, dweight = _C.gather_bwd(dy, x, perm, inv, weight, rstd, need_dweight)
    return dx, dweight


@_gather_bwd_op.register_fake
def _(dy, x, perm, inv, weight, rstd, need_dweight):
    n_dw = dy.shape[1] if (weight is not None and need_dweight) else 0
    return torch.empty_like(dy), dy.new_empty(n_dw, dtype=_norm_dtype(dy.dtype))


def _gather_setup(ctx, inputs, output):
    x, perm, inv, weight, eps = inputs
    _, rstd = output
    norm = weight is not None
    # x and rstd are needed only by the RMSNorm backward.
    ctx.save_for_backward(x if norm else None, perm, inv, weight, rstd if norm else None)


def _gather_backward(ctx, dout, _drstd):
    x, perm, inv, weight, rstd = ctx.saved_tensors
    dout = dout.contiguous()
    need_dw = weight is not None and ctx.needs_input_grad[3]
    dx, dw = _gather_bwd_op(dout, dout if x is None else x, perm, inv, weight, rstd, need_dw)
    return dx, None, None, (dw if need_dw else None), None


_gather_fwd_op.register_autograd(_gather_backward, setup_context=_gather_setup)


def gather(x: Tensor, groups: RouteGroups, norm_weight: Optional[Tensor] = None,
           eps: float = 1e-6) -> Tensor:
    """Rows of ``x`` in grouped order, ``x[groups.perm]``, optionally RMS-normalised.

    One kernel (16-byte accesses where aligned); with ``norm_weight`` the RMSNorm is fused,
    its math in fp32 (fp64 for float64 rows) as in ``reference.rms_norm``. Backward: a gather
    by ``inv`` (or the RMSNorm backward, scattered by ``perm``) and a deterministic
    norm-weight gradient.

    Args:
      x: (N, d).  norm_weight: (d,) or None.
    Returns: (N, d), dtype of x.
    """
    w = None if norm_weight is None else norm_weight.to(_norm_dtype(x.dtype)).contiguous()
    out, _ = _gather_fwd_op(x.contiguous(), groups.perm.contiguous(), groups.inv.contiguous(),
                            w, float(eps))
    return out


# --------------------------------------------------------------------------- scatter_combine


@torch.library.custom_op(f"{_NS}::scatter_combine_fwd", mutates_args=())
def _scatter_combine_fwd_op(y: Tensor, perm: Tensor, inv: Tensor, routes: Tensor,
                            residual: Optional[Tensor], gate: Optional[Tensor], skip_mask: int,
                            num_paths: int) -> Tensor:
    return _C.scatter_combine_fwd(y, inv, routes, residual, gate, skip_mask, num_paths)


@_scatter_combine_fwd_op.register_fake
def _(y, perm, inv, routes, residual, gate, skip_mask, num_paths):
    return torch.empty_like(y)


@torch.library.custom_op(f"{_NS}::scatter_combine_bwd", mutates_args=())
def _scatter_combine_bwd_op(dout: Tensor, y: Tensor, perm: Tensor, routes: Tensor,
                            gate: Optional[Tensor], skip_mask: int, num_paths: int,
                            need_dy: bool, need_dgate: bool) -> Tuple[Tensor, Tensor]:
    dy, dgate = _C.scatter_combine_bwd(dout, y, perm, routes, gate, skip_mask, num_paths,
                                       need_dy, need_dgate)
    return dy, dgate


@_scatter_combine_bwd_op.register_fake
def _(dout, y, perm, routes, gate, skip_mask, num_paths, need_dy, need_dgate):
    dy = torch.empty_like(dout) if need_dy else dout.new_empty(0)
    return dy, dout.new_empty(dout.shape[0] if need_dgate else 0)


def _scatter_combine_setup(ctx, inputs, output):
    y, perm, inv, routes, residual, gate, skip_mask, num_paths = inputs
    ctx.skip_mask, ctx.num_paths = skip_mask, num_paths
    ctx.has_residual = residual is not None
    need_dgate = gate is not None and ctx.needs_input_grad[5]
    ctx.save_for_backward(y if need_dgate else None, perm, routes, gate)


def _scatter_combine_backward(ctx, dout):
    y, perm, routes, gate = ctx.saved_tensors
    dout = dout.contiguous()
    need_dy = ctx.needs_input_grad[0]
    need_dgate = gate is not None and ctx.needs_input_grad[5]
    dy = dgate = None
    if need_dy or need_dgate:
        dy, dgate = _scatter_combine_bwd_op(dout, dout if y is None else y, perm, routes, gate,
                                            ctx.skip_mask, ctx.num_paths, need_dy, need_dgate)
    return ((dy if need_dy else None), None, None, None,
            (dout if ctx.has_residual else None), (dgate if need_dgate else None), None, None)


_scatter_combine_fwd_op.register_autograd(_scatter_combine_backward,
                                          setup_context=_scatter_combine_setup)


def _skip_mask(skip_paths: Sequence[int]) -> int:
    """Bit p set for each skip path p, as the signed int64 the kernels take."""
    mask = 0
    for p in skip_paths:
        if not 0 <= int(p) <= _MAX_SKIP_PATH:
            raise ValueError(f"skip_paths: the cuda backend takes skip paths in "
                             f"[0, {_MAX_SKIP_PATH}], got {p}; use backend='torch' or "
                             f"'triton' for more paths")
        mask |= 1 << int(p)
    return mask - (1 << 64) if mask >= 1 << 63 else mask


def scatter_combine(y: Tensor, groups: RouteGroups, residual: Optional[Tensor] = None,
                    gate: Optional[Tensor] = None, skip_paths: Sequence[int] = ()) -> Tensor:
    """``out[t] = residual[t] + gate[t] * y[inv[t]]``; ``residual[t]`` for skip-path tokens.

    One pass over the tokens (route read per token, skip rows of ``y`` never read), math in
    fp32 (fp64 for float64), no atomics. Backward: ``dy`` rows gathered by ``perm`` and
    ``dgate`` as a row dot product in one kernel; ``dresidual`` is ``dout`` itself.

    Args:
      y: (N, d) grouped order.  residual: (N, d) token order or None.  gate: (N,) or None.
      skip_paths: path indices whose tokens skip (at most 63 here).
    Returns: (N, d) token order, dtype of y.
    """
    res = None if residual is None else residual.to(y.dtype).contiguous()  # (N, d)
    g = None if gate is None else gate.to(y.dtype).contiguous()  # (N,)
    return _scatter_combine_fwd_op(y.contiguous(), groups.perm.contiguous(),
                                   groups.inv.contiguous(), groups.routes.contiguous(), res, g,
                                   _skip_mask(skip_paths), groups.num_paths)


# --------------------------------------------------------------------------- swiglu_ffn / duo_ffn


# SwiGLU here is three cuBLAS GEMMs through torch.matmul and torch's elementwise silu/multiply
# with ordinary autograd: exactly the reference's expression, so it is the reference's function
# (the fused small-width kernel with the intermediate on chip is the triton backend's).
swiglu_ffn = reference.swiglu_ffn


def _needs_grad(x: Tensor, params, residual, gate) -> bool:
    if not torch.is_grad_enabled():
        return False
    tensors: List[Optional[Tensor]] = [x, residual, gate]
    for weights in params:
        if weights is not None:
            tensors.extend(weights)
    return any(t is not None and t.requires_grad for t in tensors)


def duo_ffn(x: Tensor, routes: Tensor, params: Sequence[Optional[FFNWeights]],
            residual: Optional[Tensor] = None, gate: Optional[Tensor] = None) -> Tensor:
    """The routed layer: group -> gather (one kernel) -> per-path SwiGLU on contiguous slices
    of the grouped rows -> scatter_combine with residual and gate (one kernel).

    **One host synchronisation above 64 tokens:** slicing the grouped rows per path needs the
    path offsets on the host, so a call on more than 64 tokens reads ``groups.offsets`` back
    once. Up to 64 tokens (decode), and at any size under graph capture or ``torch.compile``,
    every path instead runs on every row and masks keep each token's own result (the torch
    backend's static layer: no value read back, capturable; at decode the weight reads
    dominate, so the extra rows cost little). The triton backend is sync-free at every size.

    Without autograd (and autocast) the per-path down-projections write straight into one
    (N, d) buffer; otherwise the per-path outputs are concatenated (one extra copy of y).

    Args:
      x: (N, d).  routes: (N,) path per token.  params: per path (w_gate, w_up, w_down) or None
      (skip).  residual: (N, d) or None.  gate: (N,) or None.
    Returns: (N, d), dtype of x.
    """
    n, d = x.shape
    if n <= STATIC_MAX or cannot_sync():
        return static_duo_ffn(x, routes, params, residual, gate)
    groups = group_tokens(routes, len(params))
    x_g = gather(x, groups)  # (N, d) grouped order
    offsets = groups.offsets.tolist()  # the one host sync (see docstring)
    skip_paths = tuple(p for p, w in enumerate(params) if w is None)
    # Under autocast the GEMMs return a lower precision; y keeps x's dtype (as the reference).
    if _needs_grad(x, params, residual, gate) or torch.is_autocast_enabled(x.device.type):
        pieces = []
        for p, weights in enumerate(params):
            lo, hi = offsets[p], offsets[p + 1]
            if weights is None:  # rows of skip tokens are never read: any value will do
                if hi > lo:
                    pieces.append(x_g.new_zeros((hi - lo, d)))
            else:  # an empty path still joins the graph: its weights get zero gradients
                pieces.append(swiglu_ffn(x_g[lo:hi], *weights).to(x.dtype))  # (count_p, d)
        if offsets[-1] < n:  # out-of-range routes (unvalidated input): rows never read
            pieces.append(x_g.new_zeros((n - offsets[-1], d)))
        y = torch.cat(pieces) if pieces else torch.empty_like(x_g)  # (N, d) grouped
    else:
        y = torch.empty_like(x_g)  # (N, d) grouped; rows of skip tokens stay unwritten
        for p, weights in enumerate(params):
            lo, hi = offsets[p], offsets[p + 1]
            if weights is None or hi == lo:
                continue
            w_gate, w_up, w_down = weights
            rows = x_g[lo:hi]  # (count_p, d)
            h = F.silu(rows @ w_gate.t()) * (rows @ w_up.t())  # (count_p, width)
            torch.mm(h, w_down.t(), out=y[lo:hi])
    return scatter_combine(y, groups, residual, gate, skip_paths)
