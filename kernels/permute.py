"""``gather`` (rows into grouped order, optionally fused with RMSNorm) and ``scatter_combine``
(rows back into token order, scaled by a gate and added to the residual).

Both are row permutations (top-1 routing), so every output row is written by exactly one
program: deterministic, no atomics. A program owns ``BLOCK_M`` rows and walks d in
``BLOCK_D``-wide vectorised chunks (masked, so any d works); row offsets are int64, so
``rows * d >= 2**31`` is safe. Row indices read from ``perm``/``inv`` are bounds-checked, so a
corrupt index drops a row instead of touching memory it does not own.

Kernels, top to bottom:
  _gather_fwd_kernel          out[i] = norm(src[idx[i]]): gather forward (idx = perm) and,
                              without norm, the gather backward dx[t] = dy[inv[t]] (idx = inv).
  _gather_norm_bwd_kernel     RMSNorm backward in token order, dx[t] from dy[inv[t]], plus
                              per-program partial sums of d norm_weight (summed by torch).
  _scatter_combine_fwd_kernel out[t] = residual[t] + gate[t] * y[inv[t]] (skip tokens: residual).
  _scatter_combine_bwd_kernel dy[inv[t]] = gate[t] * dout[t], dgate[t] = <dout[t], y[inv[t]]>.

Bytes per op (N rows of d elements of e bytes): gather N*d*e read + N*d*e written (+ the
index); scatter_combine N*d*e per tensor read (y, residual) + N*d*e written. Near copy
bandwidth is the target.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from duollm.reference import RouteGroups

from ._common import acc_dtype, custom_op, interpreting, next_pow2, num_sms, rows_view, \
    unused_grad, vec_view


@triton.jit
def _gather_fwd_kernel(
    src_ptr,  # (N, d) rows to gather, row stride stride_src
    idx_ptr,  # (N,) int64: source row of each output row
    w_ptr,  # (d,) RMSNorm weight (read only if HAS_NORM)
    out_ptr,  # (N, d) out, contiguous
    N,
    d,
    stride_src,
    eps,
    HAS_NORM: tl.constexpr,
    ACC: tl.constexpr,  # accumulation dtype (float32, or float64 for float64 inputs)
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr,  # BLOCK_D >= d: a row is one chunk
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    src = tl.load(idx_ptr + rows, mask=row_ok, other=0)
    src_ok = row_ok & (src >= 0) & (src < N)
    src_row = src_ptr + src.to(tl.int64)[:, None] * stride_src  # (BLOCK_M, 1)
    out_row = out_ptr + rows.to(tl.int64)[:, None] * d
    cols = tl.arange(0, BLOCK_D)
    if HAS_NORM:
        if SINGLE_D:  # the whole row fits: one read
            m = src_ok[:, None] & (cols[None, :] < d)
            x = tl.load(src_row + cols[None, :], mask=m, other=0.0).to(ACC)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / d + eps)
            w = tl.load(w_ptr + cols, mask=cols < d, other=0.0).to(ACC)
            y = x * rstd[:, None] * w[None, :]
            tl.store(out_row + cols[None, :], y.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & (cols[None, :] < d))
        else:  # two passes over d: sum of squares, then normalise
            sumsq = tl.zeros((BLOCK_M,), dtype=ACC)
            for d0 in range(0, d, BLOCK_D):
                c = d0 + cols
                m = src_ok[:, None] & (c[None, :] < d)
                x = tl.load(src_row + c[None, :], mask=m, other=0.0).to(ACC)
                sumsq += tl.sum(x * x, axis=1)
            rstd = 1.0 / tl.sqrt(sumsq / d + eps)
            for d0 in range(0, d, BLOCK_D):
                c = d0 + cols
                m = src_ok[:, None] & (c[None, :] < d)
                x = tl.load(src_row + c[None, :], mask=m, other=0.0).to(ACC)
                w = tl.load(w_ptr + c, mask=c < d, other=0.0).to(ACC)
                y = x * rstd[:, None] * w[None, :]
                tl.store(out_row + c[None, :], y.to(out_ptr.dtype.element_ty),
                         mask=row_ok[:, None] & (c[None, :] < d))
    else:  # a plain copy of raw values: bitwise exact
        for d0 in range(0, d, BLOCK_D):
            c = d0 + cols
            x = tl.load(src_row + c[None, :], mask=src_ok[:, None] & (c[None, :] < d), other=0)
            tl.store(out_row + c[None, :], x.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & (c[None, :] < d))


@triton.jit
def _gather_norm_bwd_kernel(
    dy_ptr,  # (N, d) grad of the gathered rows, grouped order, row stride stride_dy
    inv_ptr,  # (N,) int64: grouped row of each token
    x_ptr,  # (N, d) the input rows, token order, row stride stride_x
    w_ptr,  # (d,) RMSNorm weight
    dx_ptr,  # (N, d) out, token order, contiguous
    dw_ptr,  # (num_programs, d) ACC out: this program's share of d norm_weight
    N,
    d,
    stride_dy,
    stride_x,
    eps,
    rows_per_program,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr,  # BLOCK_D >= d: a row is one chunk, dw accumulates in registers
):
    # y = x * rstd * w  =>  dx = rstd * g - x * rstd^3 * <g, x> / d  with g = dy * w,
    # d w = sum over rows of dy * x * rstd.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    dw_row = dw_ptr + pid.to(tl.int64) * d
    dw_acc = tl.zeros((BLOCK_D,), dtype=ACC)  # used if SINGLE_D
    if not SINGLE_D:
        for d0 in range(0, d, BLOCK_D):
            c = d0 + cols
            tl.store(dw_row + c, tl.zeros((BLOCK_D,), dtype=ACC), mask=c < d)
    for r0 in range(pid * rows_per_program, (pid + 1) * rows_per_program, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        src = tl.load(inv_ptr + rows, mask=row_ok, other=0)
        src_ok = row_ok & (src >= 0) & (src < N)
        dy_row = dy_ptr + src.to(tl.int64)[:, None] * stride_dy
        x_row = x_ptr + rows.to(tl.int64)[:, None] * stride_x
        dx_row = dx_ptr + rows.to(tl.int64)[:, None] * d
        if SINGLE_D:
            cm = cols[None, :] < d
            x = tl.load(x_row + cols[None, :], mask=row_ok[:, None] & cm, other=0.0).to(ACC)
            dy = tl.load(dy_row + cols[None, :], mask=src_ok[:, None] & cm, other=0.0).to(ACC)
            w = tl.load(w_ptr + cols, mask=cols < d, other=0.0).to(ACC)
            g = dy * w[None, :]
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / d + eps)
            c1 = rstd * rstd * rstd * tl.sum(g * x, axis=1) / d
            dx = rstd[:, None] * g - x * c1[:, None]
            tl.store(dx_row + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & cm)
            dw_acc += tl.sum(dy * x * rstd[:, None], axis=0)
        else:
            sumsq = tl.zeros((BLOCK_M,), dtype=ACC)
            sgx = tl.zeros((BLOCK_M,), dtype=ACC)
            for d0 in range(0, d, BLOCK_D):
                c = d0 + cols
                cm = c[None, :] < d
                x = tl.load(x_row + c[None, :], mask=row_ok[:, None] & cm, other=0.0).to(ACC)
                dy = tl.load(dy_row + c[None, :], mask=src_ok[:, None] & cm, other=0.0).to(ACC)
                w = tl.load(w_ptr + c, mask=c < d, other=0.0).to(ACC)
                sumsq += tl.sum(x * x, axis=1)
                sgx += tl.sum(dy * w[None, :] * x, axis=1)
            rstd = 1.0 / tl.sqrt(sumsq / d + eps)
            c1 = rstd * rstd * rstd * sgx / d
            for d0 in range(0, d, BLOCK_D):
                c = d0 + cols
                cm = c[None, :] < d
                x = tl.load(x_row + c[None, :], mask=row_ok[:, None] & cm, other=0.0).to(ACC)
                dy = tl.load(dy_row + c[None, :], mask=src_ok[:, None] & cm, other=0.0).to(ACC)
                w = tl.load(w_ptr + c, mask=c < d, other=0.0).to(ACC)
                dx = rstd[:, None] * dy * w[None, :] - x * c1[:, None]
                tl.store(dx_row + c[None, :], dx.to(dx_ptr.dtype.element_ty),
                         mask=row_ok[:, None] & cm)
                # This program's own row of the partial buffer: no other program touches it.
                part = tl.load(dw_row + c, mask=c < d, other=0.0)
                tl.store(dw_row + c, part + tl.sum(dy * x * rstd[:, None], axis=0), mask=c < d)
    if SINGLE_D:
        tl.store(dw_row + cols, dw_acc, mask=cols < d)


@triton.jit
def _skip_rows(
    routes_ptr,  # (N,) int64: path per token
    rows,
    row_ok,
    SKIP_MASK: tl.constexpr,  # bit p set = path p skips the layer
):
    r = tl.load(routes_ptr + rows, mask=row_ok, other=-1)
    in_range = (r >= 0) & (r < 63)
    bits = tl.full(r.shape, SKIP_MASK, tl.int64) >> tl.where(in_range, r, 0)
    return in_range & ((bits & 1) != 0)


@triton.jit
def _scatter_combine_fwd_kernel(
    y_ptr,  # (N, d) FFN rows, grouped order, row stride stride_y
    inv_ptr,  # (N,) int64: grouped row of each token
    routes_ptr,  # (N,) int64: path per token (read only if SKIP_MASK)
    res_ptr,  # (N, d) residual, token order, row stride stride_res (if HAS_RESIDUAL)
    gate_ptr,  # (N,) per-token scale, token order (if HAS_GATE)
    out_ptr,  # (N, d) out, token order, contiguous, y's dtype
    N,
    d,
    stride_y,
    stride_res,
    SKIP_MASK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_GATE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    src = tl.load(inv_ptr + rows, mask=row_ok, other=0)
    read_y = row_ok & (src >= 0) & (src < N)
    if SKIP_MASK != 0:
        read_y = read_y & ~_skip_rows(routes_ptr, rows, row_ok, SKIP_MASK)
    if HAS_GATE:  # cast to y's dtype first, as the reference does
        g = tl.load(gate_ptr + rows, mask=row_ok, other=0.0)
        g = g.to(y_ptr.dtype.element_ty).to(ACC)
    y_row = y_ptr + src.to(tl.int64)[:, None] * stride_y
    res_row = res_ptr + rows.to(tl.int64)[:, None] * stride_res
    out_row = out_ptr + rows.to(tl.int64)[:, None] * d
    cols = tl.arange(0, BLOCK_D)
    for d0 in range(0, d, BLOCK_D):
        c = d0 + cols
        cm = c[None, :] < d
        acc = tl.load(y_row + c[None, :], mask=read_y[:, None] & cm, other=0.0).to(ACC)
        if HAS_GATE:
            acc = acc * g[:, None]
        if HAS_RESIDUAL:
            acc += tl.load(res_row + c[None, :], mask=row_ok[:, None] & cm, other=0.0).to(ACC)
        tl.store(out_row + c[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & cm)


@triton.jit
def _scatter_combine_bwd_kernel(
    dout_ptr,  # (N, d) grad of the output, token order, row stride stride_dout
    inv_ptr,  # (N,) int64: grouped row of each token
    routes_ptr,  # (N,) int64: path per token (read only if SKIP_MASK)
    gate_ptr,  # (N,) per-token scale (if HAS_GATE)
    y_ptr,  # (N, d) FFN rows, grouped order, row stride stride_y (if NEED_DGATE)
    dy_ptr,  # (N, d) out, grouped order, contiguous, dout's dtype (if NEED_DY)
    dgate_ptr,  # (N,) ACC out (if NEED_DGATE)
    N,
    d,
    stride_dout,
    stride_y,
    SKIP_MASK: tl.constexpr,
    HAS_GATE: tl.constexpr,
    NEED_DY: tl.constexpr,
    NEED_DGATE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    src = tl.load(inv_ptr + rows, mask=row_ok, other=0)
    src_ok = row_ok & (src >= 0) & (src < N)
    routed = src_ok
    if SKIP_MASK != 0:
        routed = routed & ~_skip_rows(routes_ptr, rows, row_ok, SKIP_MASK)
    g = tl.full((BLOCK_M,), 1.0, ACC)
    if HAS_GATE:
        g = tl.load(gate_ptr + rows, mask=row_ok, other=0.0)
        g = g.to(dout_ptr.dtype.element_ty).to(ACC)
    g = tl.where(routed, g, 0.0)  # skip tokens: zero rows of dy
    dout_row = dout_ptr + rows.to(tl.int64)[:, None] * stride_dout
    y_row = y_ptr + src.to(tl.int64)[:, None] * stride_y
    dy_row = dy_ptr + src.to(tl.int64)[:, None] * d
    dgate = tl.zeros((BLOCK_M,), dtype=ACC)
    cols = tl.arange(0, BLOCK_D)
    for d0 in range(0, d, BLOCK_D):
        c = d0 + cols
        cm = c[None, :] < d
        do = tl.load(dout_row + c[None, :], mask=row_ok[:, None] & cm, other=0.0).to(ACC)
        if NEED_DY:
            tl.store(dy_row + c[None, :], (do * g[:, None]).to(dy_ptr.dtype.element_ty),
                     mask=src_ok[:, None] & cm)
        if NEED_DGATE:
            y = tl.load(y_row + c[None, :], mask=routed[:, None] & cm, other=0.0).to(ACC)
            dgate += tl.sum(do * y, axis=1)
    if NEED_DGATE:
        tl.store(dgate_ptr + rows, dgate, mask=row_ok)


# --------------------------------------------------------------------------- launchers


def _row_config(n: int, d: int, block_d: Optional[int] = None):
    """Knobs for the row kernels: BLOCK_D covers the row up to 8192 elements (so RMSNorm reads
    a row once), BLOCK_M packs short rows into a tile of about 4096 elements on a GPU; the
    interpreter prefers fewer, bigger programs."""
    if block_d is None:
        block_d = min(next_pow2(d), 8192)
    tile = 1 << 16 if interpreting() else 4096
    block_m = max(1, min(next_pow2(n), tile // block_d, 64))
    num_warps = max(1, min(16, block_m * block_d // 512))
    return dict(BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps)


def gather_fwd(x: torch.Tensor, perm: torch.Tensor, norm_weight: Optional[torch.Tensor] = None,
               eps: float = 1e-6, block_d: Optional[int] = None) -> torch.Tensor:
    """``x[perm]`` (N, d), each row RMS-normalised with ``norm_weight`` (d,) when given.

    Also the backward of an un-normalised gather: ``gather_fwd(dy, inv) == dy[inv]``.
    ``block_d`` overrides the chunk width (tests use it to exercise the loop over d).
    """
    x = rows_view(x)
    n, d = x.shape
    out = x.new_empty((n, d))
    if out.numel() == 0:
        return out
    perm = vec_view(perm)
    w = vec_view(norm_weight) if norm_weight is not None else perm
    cfg = _row_config(n, d, block_d)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]),)
    _gather_fwd_kernel[grid](x, perm, w, out, n, d, x.stride(0), float(eps),
                             HAS_NORM=norm_weight is not None, ACC=acc_dtype(x),
                             SINGLE_D=cfg["BLOCK_D"] >= d, **cfg)
    return out


def gather_norm_bwd(dy: torch.Tensor, x: torch.Tensor, inv: torch.Tensor,
                    norm_weight: torch.Tensor, eps: float = 1e-6,
                    block_d: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backward of the RMSNorm-fused gather: (dx (N, d) in x's dtype, dw (d,) in the
    weight's dtype). dw is summed per program in a fixed order, then across programs by torch:
    deterministic for a given device."""
    dy, x = rows_view(dy), rows_view(x)
    n, d = x.shape
    dx = x.new_empty((n, d))
    if dx.numel() == 0:
        return dx, torch.zeros_like(norm_weight)
    inv, w = vec_view(inv), vec_view(norm_weight)
    acc = acc_dtype(x)
    cfg = _row_config(n, d, block_d)
    row_blocks = triton.cdiv(n, cfg["BLOCK_M"])
    programs = min(row_blocks, 4 * num_sms(x.device))
    rows_per_program = triton.cdiv(row_blocks, programs) * cfg["BLOCK_M"]
    programs = triton.cdiv(n, rows_per_program)
    dw = torch.empty((programs, d), device=x.device,
                     dtype=torch.float64 if acc == tl.float64 else torch.float32)
    _gather_norm_bwd_kernel[(programs,)](dy, inv, x, w, dx, dw, n, d, dy.stride(0),
                                         x.stride(0), float(eps), rows_per_program, ACC=acc,
                                         SINGLE_D=cfg["BLOCK_D"] >= d, **cfg)
    return dx, dw.sum(0).to(norm_weight.dtype)


def _skip_mask(skip_paths: Sequence[int]) -> int:
    mask = 0
    for p in skip_paths:
        if not 0 <= int(p) < 63:
            raise ValueError(f"skip_paths: {p} is not a path index in [0, 63)")
        mask |= 1 << int(p)
    return mask


def scatter_combine_fwd(y: torch.Tensor, inv: torch.Tensor, routes: torch.Tensor,
                        residual: Optional[torch.Tensor] = None,
                        gate: Optional[torch.Tensor] = None, skip_mask: int = 0,
                        block_d: Optional[int] = None) -> torch.Tensor:
    """``out[t] = residual[t] + gate[t] * y[inv[t]]`` (N, d) in y's dtype; a token whose path
    has its bit set in ``skip_mask`` gets ``residual[t]`` (or 0) and its y row is not read."""
    y = rows_view(y)
    n, d = y.shape
    out = y.new_empty((n, d))
    if out.numel() == 0:
        return out
    inv, routes = vec_view(inv), vec_view(routes)
    res = rows_view(residual) if residual is not None else y
    g = vec_view(gate) if gate is not None else inv
    cfg = _row_config(n, d, block_d)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]),)
    _scatter_combine_fwd_kernel[grid](y, inv, routes, res, g, out, n, d, y.stride(0),
                                      res.stride(0), SKIP_MASK=skip_mask,
                                      HAS_RESIDUAL=residual is not None,
                                      HAS_GATE=gate is not None, ACC=acc_dtype(y),
                                      **cfg)
    return out


def scatter_combine_bwd(dout: torch.Tensor, inv: torch.Tensor, routes: torch.Tensor,
                        gate: Optional[torch.Tensor], y: Optional[torch.Tensor],
                        skip_mask: int, need_dy: bool = True,
                        block_d: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dy (N, d) grouped order in dout's dtype, dgate (N,) in the gate's dtype).

    dgate is computed when both ``gate`` and ``y`` are given, dy when ``need_dy``; a gradient
    not computed comes back as an empty tensor."""
    dout = rows_view(dout)
    n, d = dout.shape
    need_dgate = gate is not None and y is not None
    dy = dout.new_empty((n, d)) if need_dy else unused_grad(dout)
    acc = acc_dtype(dout)
    dgate = (torch.zeros(n, device=dout.device, dtype=torch.float64 if acc == tl.float64
                         else torch.float32) if need_dgate else unused_grad(dout))
    if n * d > 0 and (need_dy or need_dgate):
        y = rows_view(y) if need_dgate else dout
        inv, routes = vec_view(inv), vec_view(routes)
        g = vec_view(gate) if gate is not None else inv
        cfg = _row_config(n, d, block_d)
        grid = (triton.cdiv(n, cfg["BLOCK_M"]),)
        # Unused pointers get a live tensor of the right kind (never an empty one).
        _scatter_combine_bwd_kernel[grid](dout, inv, routes, g, y, dy if need_dy else dout,
                                          dgate if need_dgate else inv, n, d,
                                          dout.stride(0), y.stride(0), SKIP_MASK=skip_mask,
                                          HAS_GATE=gate is not None, NEED_DY=need_dy,
                                          NEED_DGATE=need_dgate, ACC=acc, **cfg)
    return dy, dgate.to(gate.dtype) if need_dgate else dgate


# --------------------------------------------------------------------------- torch.library


@custom_op("gather_fwd")
def _gather_fwd_op(x: torch.Tensor, perm: torch.Tensor, inv: torch.Tensor,
                   norm_weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    return gather_fwd(x, perm, norm_weight, eps)


@_gather_fwd_op.register_fake
def _(x, perm, inv, norm_weight, eps):
    return x.new_empty(x.shape)


@custom_op("gather_norm_bwd")
def _gather_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, inv: torch.Tensor,
                        norm_weight: torch.Tensor, eps: float
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    return gather_norm_bwd(dy, x, inv, norm_weight, eps)


@_gather_norm_bwd_op.register_fake
def _(dy, x, inv, norm_weight, eps):
    return x.new_empty(x.shape), norm_weight.new_empty(norm_weight.shape)


def _gather_setup_context(ctx, inputs, output):
    x, perm, inv, norm_weight, eps = inputs
    ctx.save_for_backward(x if norm_weight is not None else None, perm, inv, norm_weight)
    ctx.eps = eps


def _gather_backward(ctx, dy):
    x, perm, inv, norm_weight = ctx.saved_tensors
    if norm_weight is None:
        # The inverse permutation is a gather by inv: dx = dy[inv] (the same op, reversed).
        return torch.ops.duollm.gather_fwd(dy, inv, perm, None, ctx.eps), None, None, None, None
    dx, dw = torch.ops.duollm.gather_norm_bwd(dy, x, inv, norm_weight, ctx.eps)
    return dx, None, None, dw, None


_gather_fwd_op.register_autograd(_gather_backward, setup_context=_gather_setup_context)


@custom_op("scatter_combine_fwd")
def _scatter_combine_fwd_op(y: torch.Tensor, inv: torch.Tensor, routes: torch.Tensor,
                            residual: Optional[torch.Tensor], gate: Optional[torch.Tensor],
                            skip_mask: int) -> torch.Tensor:
    return scatter_combine_fwd(y, inv, routes, residual, gate, skip_mask)


@_scatter_combine_fwd_op.register_fake
def _(y, inv, routes, residual, gate, skip_mask):
    return y.new_empty(y.shape)


@custom_op("scatter_combine_bwd")
def _scatter_combine_bwd_op(dout: torch.Tensor, inv: torch.Tensor, routes: torch.Tensor,
                            gate: Optional[torch.Tensor], y: Optional[torch.Tensor],
                            skip_mask: int, need_dy: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return scatter_combine_bwd(dout, inv, routes, gate, y, skip_mask, need_dy)


@_scatter_combine_bwd_op.register_fake
def _(dout, inv, routes, gate, y, skip_mask, need_dy):
    dy = dout.new_empty(dout.shape) if need_dy else unused_grad(dout)
    need_dgate = gate is not None and y is not None
    return dy, gate.new_empty(gate.shape) if need_dgate else unused_grad(dout)


def _scatter_setup_context(ctx, inputs, output):
    y, inv, routes, residual, gate, skip_mask = inputs
    ctx.need_dgate = gate is not None and ctx.needs_input_grad[4]
    ctx.save_for_backward(y if ctx.need_dgate else None, inv, routes, gate)
    ctx.skip_mask = skip_mask
    ctx.residual_dtype = None if residual is None else residual.dtype


def _scatter_backward(ctx, dout):
    y, inv, routes, gate = ctx.saved_tensors
    need_dy = ctx.needs_input_grad[0]
    dy = dgate = None
    if need_dy or ctx.need_dgate:
        dy, dgate = torch.ops.duollm.scatter_combine_bwd(dout, inv, routes, gate, y,
                                                         ctx.skip_mask, need_dy)
    dres = dout.to(ctx.residual_dtype) if ctx.needs_input_grad[3] else None
    return (dy if need_dy else None, None, None, dres,
            dgate if ctx.need_dgate else None, None)


_scatter_combine_fwd_op.register_autograd(_scatter_backward,
                                          setup_context=_scatter_setup_context)


# --------------------------------------------------------------------------- public API


def gather(x: torch.Tensor, groups: RouteGroups, norm_weight: Optional[torch.Tensor] = None,
           eps: float = 1e-6) -> torch.Tensor:
    """Rows of ``x`` in grouped order, ``x[groups.perm]``, optionally RMS-normalised.

    Args:
      x: (N, d) float tensor in token order.
      groups: ``RouteGroups`` from ``group_tokens``.
      norm_weight: (d,) or None; when given each row is ``rms_norm(row) * norm_weight``
        (float32 math, cast back to x's dtype).
    Returns: (N, d) in grouped order, x's dtype. Differentiable in x and norm_weight.
    """
    return torch.ops.duollm.gather_fwd(x, groups.perm, groups.inv, norm_weight, float(eps))


def scatter_combine(y: torch.Tensor, groups: RouteGroups,
                    residual: Optional[torch.Tensor] = None,
                    gate: Optional[torch.Tensor] = None,
                    skip_paths: Sequence[int] = ()) -> torch.Tensor:
    """Grouped rows back in token order: ``out[t] = residual[t] + gate[t] * y[inv[t]]``, and
    ``out[t] = residual[t]`` (or 0) for a token on a path in ``skip_paths``.

    Args:
      y: (N, d) in grouped order.
      residual: (N, d) in token order (y's dtype) or None.
      gate: (N,) in token order, any float dtype (cast to y's), or None.
      skip_paths: path indices whose tokens skip the layer (their y rows are never read).
    Returns: (N, d) in token order, y's dtype. Differentiable in y, residual and gate.
    """
    return torch.ops.duollm.scatter_combine_fwd(y, groups.inv, groups.routes, residual, gate,
                                                _skip_mask(skip_paths))
