"""Grouped SwiGLU GEMM kernels, forward: shared by ``swiglu_ffn`` (one path, no permutation)
and the routed layer ``duo_ffn`` (up to ``MAX_SLOTS`` paths per launch). The backward kernels
are in ``ffn_gemm_bwd.py``.

A launch serves up to ``MAX_SLOTS`` paths ("slots"). Each slot has a route index (its row
range in the grouped order comes from ``offsets`` in device memory), a width and its own
weight pointers. Inside a slot, (row tile, column tile) follow a grouped order (GROUP_M row
tiles share a sweep over the columns) so weight tiles are reused from L2. Nothing is read
back to the host, so a layer built from these launches can be captured in a CUDA graph.
Two ways to lay the tiles on programs (``persistent`` in the launchers):

* worst-case grid (the default): each slot's tiles occupy a contiguous program-id range
  sized for all N tokens on that path; programs past the path's real row count exit at once.
* persistent (``DUOLLM_TRITON_PERSISTENT=1``, see ``duo_ffn.py``): a fixed grid of
  ``programs_per_sm`` x #SMs programs (``configs.py``), each looping over the tile table that
  ``device_starts`` derives in its prologue from the real counts in ``offsets``: no empty
  programs, same grid for every routing, so still capturable.

Forward, two launches:
  1. ``_gateup_fwd_kernel``: h = silu(x[perm] Wg^T) * (x[perm] Wu^T) into a workspace in
     grouped row order (rows of x read through ``perm`` inside the loads; no gathered copy).
  2. ``_down_kernel``: out[perm[i]] = residual + gate * (h_i Wd^T); skip slots (width 0)
     write the residual; the scatter, gate and residual live in the epilogue. In DX mode
     (backward) it computes dx[perm[i]] = dg_i Wg + du_i Wu instead.
Accumulation is fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._common import (MAX_SLOTS, Slot, acc_dtypes, chunks, device_starts, int32_guard,
                      interpreting, num_sms, pad4, pick, precision, routes_widths, starts,
                      slot_tile, tile_mn, token_rows)
from .configs import gemm_config

__all__ = ["MAX_SLOTS", "Slot", "gateup_fwd", "down_fwd"]


# --------------------------------------------------------------------------- kernels


@triton.jit
def _gateup_tile(
    t, x_ptr, perm_ptr, offsets_ptr, h_ptr,
    wg0, wu0, wg1, wu1, wg2, wu2, wg3, wu3,
    N, P, d, stride_h, R0, R1, R2, R3, W0, W1, W2, W3, T1, T2, T3,
    NSLOT: tl.constexpr, ROUTED: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    """One (row tile, width tile) of h; nothing when ``t`` is past its slot's rows."""
    s, W, local, start, cnt = slot_tile(t, offsets_ptr, N, P, R0, R1, R2, R3, W0, W1, W2, W3,
                                        T1, T2, T3, NSLOT, ROUTED)
    m, n = tile_mn(local, cnt, tl.cdiv(W, BN), BM, GROUP_M)
    if m >= 0:
        wg_ptr = pick(s, wg0, wg1, wg2, wg3, NSLOT)
        wu_ptr = pick(s, wu0, wu1, wu2, wu3, NSLOT)
        i = m * BM + tl.arange(0, BM)
        rmask = i < cnt
        tok = token_rows(perm_ptr, start, i, rmask, ROUTED)
        ws = n * BN + tl.arange(0, BN)
        wmask = ws < W
        ks = tl.arange(0, BK)
        acc_g = tl.zeros((BM, BN), dtype=ACC)
        acc_u = tl.zeros((BM, BN), dtype=ACC)
        for k0 in range(0, d, BK):
            k = k0 + ks
            kmask = k < d
            a = tl.load(x_ptr + tok[:, None] * d + k[None, :],
                        mask=rmask[:, None] & kmask[None, :], other=0.0)   # (BM, BK), gathered
            bmask = kmask[:, None] & wmask[None, :]
            bg = tl.load(wg_ptr + ws[None, :] * d + k[:, None], mask=bmask, other=0.0)  # (BK, BN)
            bu = tl.load(wu_ptr + ws[None, :] * d + k[:, None], mask=bmask, other=0.0)
            if UPCAST:
                a = a.to(ACC)
                bg = bg.to(ACC)
                bu = bu.to(ACC)
            acc_g = tl.dot(a, bg, acc_g, input_precision=PREC, out_dtype=ACC)
            acc_u = tl.dot(a, bu, acc_u, input_precision=PREC, out_dtype=ACC)
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        row = (start + i).to(tl.int64)
        tl.store(h_ptr + row[:, None] * stride_h + ws[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=rmask[:, None] & wmask[None, :])


@triton.jit
def _gateup_fwd_kernel(
    x_ptr,        # (N, d) input rows, token order
    perm_ptr,     # (N,) token ids in grouped order (unused when not ROUTED)
    offsets_ptr,  # (P+1,) first grouped row of every route
    h_ptr,        # (N, stride_h) out: workspace, grouped row order
    wg0,          # (W_0, d) gate weight of slot 0
    wu0,          # (W_0, d) up weight of slot 0
    wg1,          # slot 1 (unused when NSLOT < 2), and so on
    wu1,
    wg2,
    wu2,
    wg3,
    wu3,
    N, P, d, stride_h,
    R0, R1, R2, R3,  # route index of each slot
    W0, W1, W2, W3,  # width of each slot
    T1, T2, T3,      # first tile of slots 1..3 (worst-case grid; ignored when PERSISTENT)
    NSLOT: tl.constexpr, ROUTED: tl.constexpr, PERSISTENT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    if PERSISTENT:
        # own names: a kernel argument that Triton specialised to a constant cannot be rebound
        U1, U2, U3, total = device_starts(offsets_ptr, N, P, R0, R1, R2, R3, W0, W1, W2, W3,
                                          NSLOT, BM, BN)
        for t in range(pid, total, tl.num_programs(0)):
            _gateup_tile(t, x_ptr, perm_ptr, offsets_ptr, h_ptr,
                         wg0, wu0, wg1, wu1, wg2, wu2, wg3, wu3,
                         N, P, d, stride_h, R0, R1, R2, R3, W0, W1, W2, W3, U1, U2, U3,
                         NSLOT, ROUTED, BM, BN, BK, GROUP_M, UPCAST, PREC, ACC)
    else:
        _gateup_tile(pid, x_ptr, perm_ptr, offsets_ptr, h_ptr,
                     wg0, wu0, wg1, wu1, wg2, wu2, wg3, wu3,
                     N, P, d, stride_h, R0, R1, R2, R3, W0, W1, W2, W3, T1, T2, T3,
                     NSLOT, ROUTED, BM, BN, BK, GROUP_M, UPCAST, PREC, ACC)


@triton.jit
def _down_tile(
    t, a1_ptr, a2_ptr, perm_ptr, offsets_ptr, out_ptr, res_ptr, gate_ptr,
    b10, b20, b11, b21, b12, b22, b13, b23,
    N, P, d, stride_h, R0, R1, R2, R3, W0, W1, W2, W3, T1, T2, T3,
    NSLOT: tl.constexpr, ROUTED: tl.constexpr, DX: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    """One (row tile, d tile) of the output; nothing when ``t`` is past its slot's rows."""
    s, W, local, start, cnt = slot_tile(t, offsets_ptr, N, P, R0, R1, R2, R3, W0, W1, W2, W3,
                                        T1, T2, T3, NSLOT, ROUTED)
    m, n = tile_mn(local, cnt, tl.cdiv(d, BN), BM, GROUP_M)
    if m >= 0:
        b1_ptr = pick(s, b10, b11, b12, b13, NSLOT)
        b2_ptr = pick(s, b20, b21, b22, b23, NSLOT)
        i = m * BM + tl.arange(0, BM)
        rmask = i < cnt
        tok = token_rows(perm_ptr, start, i, rmask, ROUTED)
        row = (start + i).to(tl.int64)
        cols = n * BN + tl.arange(0, BN)
        cmask = cols < d
        ks = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=ACC)
        for k0 in range(0, W, BK):  # W == 0 (skip path): no iterations
            k = k0 + ks
            kmask = k < W
            amask = rmask[:, None] & kmask[None, :]
            bmask = kmask[:, None] & cmask[None, :]
            a1 = tl.load(a1_ptr + row[:, None] * stride_h + k[None, :], mask=amask, other=0.0)
            if DX:   # B[k, n] = Wg[k, n]: (W, d) row-major
                b1 = tl.load(b1_ptr + k[:, None] * d + cols[None, :], mask=bmask, other=0.0)
            else:    # B[k, n] = Wd[n, k]: (d, W) row-major
                b1 = tl.load(b1_ptr + cols[None, :] * W + k[:, None], mask=bmask, other=0.0)
            if UPCAST:
                a1 = a1.to(ACC)
                b1 = b1.to(ACC)
            acc = tl.dot(a1, b1, acc, input_precision=PREC, out_dtype=ACC)
            if DX:
                a2 = tl.load(a2_ptr + row[:, None] * stride_h + k[None, :], mask=amask,
                             other=0.0)
                b2 = tl.load(b2_ptr + k[:, None] * d + cols[None, :], mask=bmask, other=0.0)
                if UPCAST:
                    a2 = a2.to(ACC)
                    b2 = b2.to(ACC)
                acc = tl.dot(a2, b2, acc, input_precision=PREC, out_dtype=ACC)
        omask = rmask[:, None] & cmask[None, :]
        optrs = tok[:, None] * d + cols[None, :]
        if not DX:
            if HAS_GATE:
                g = tl.load(gate_ptr + tok, mask=rmask, other=0.0).to(ACC)
                acc = acc * tl.where(W > 0, g, 0.0)[:, None]
            if HAS_RES:
                r = tl.load(res_ptr + optrs, mask=omask, other=0.0).to(ACC)
                acc = tl.where(W > 0, r + acc, r)  # a skip token gets the residual, never gate*0
        tl.store(out_ptr + optrs, acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _down_kernel(
    a1_ptr,       # (N, stride_h) workspace, grouped rows: h (forward) or dg (DX)
    a2_ptr,       # (N, stride_h) workspace: du (DX only)
    perm_ptr,     # (N,) token ids in grouped order
    offsets_ptr,  # (P+1,) first grouped row of every route
    out_ptr,      # (N, d) out: output (forward) or dx (DX), token order
    res_ptr,      # (N, d) residual, token order (HAS_RES)
    gate_ptr,     # (N,) per-token scale (HAS_GATE)
    b10,          # slot 0: Wd (d, W) (forward) or Wg (W, d) (DX)
    b20,          # slot 0: unused (forward) or Wu (W, d) (DX)
    b11,          # slot 1, and so on
    b21,
    b12,
    b22,
    b13,
    b23,
    N, P, d, stride_h,
    R0, R1, R2, R3,  # route index of each slot (P: the overflow bucket of bad routes)
    W0, W1, W2, W3,  # width 0 = a skip path: out = residual (forward), 0 (DX)
    T1, T2, T3,      # first tile of slots 1..3 (worst-case grid; ignored when PERSISTENT)
    NSLOT: tl.constexpr, ROUTED: tl.constexpr, DX: tl.constexpr, PERSISTENT: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    if PERSISTENT:
        U1, U2, U3, total = device_starts(offsets_ptr, N, P, R0, R1, R2, R3, d, d, d, d,
                                          NSLOT, BM, BN)
        for t in range(pid, total, tl.num_programs(0)):
            _down_tile(t, a1_ptr, a2_ptr, perm_ptr, offsets_ptr, out_ptr, res_ptr, gate_ptr,
                       b10, b20, b11, b21, b12, b22, b13, b23,
                       N, P, d, stride_h, R0, R1, R2, R3, W0, W1, W2, W3, U1, U2, U3,
                       NSLOT, ROUTED, DX, HAS_RES, HAS_GATE, BM, BN, BK, GROUP_M,
                       UPCAST, PREC, ACC)
    else:
        _down_tile(pid, a1_ptr, a2_ptr, perm_ptr, offsets_ptr, out_ptr, res_ptr, gate_ptr,
                   b10, b20, b11, b21, b12, b22, b13, b23,
                   N, P, d, stride_h, R0, R1, R2, R3, W0, W1, W2, W3, T1, T2, T3,
                   NSLOT, ROUTED, DX, HAS_RES, HAS_GATE, BM, BN, BK, GROUP_M,
                   UPCAST, PREC, ACC)


# --------------------------------------------------------------------------- launchers


def _grid(cfg, worst_tiles, persistent: bool, device: torch.device):
    """(grid, T1..T3) of a launch: the worst-case tile table, or a fixed persistent grid
    (never more programs than the worst case has tiles)."""
    firsts, total = starts(worst_tiles)
    if persistent:
        return max(1, min(total, cfg.programs_per_sm * num_sms(device))), firsts
    return total, firsts


@functools.lru_cache(maxsize=4096)
def _fwd_plan(kind: str, N: int, d: int, layout: Tuple[Tuple[int, int], ...],
              dtype: torch.dtype, device: torch.device, persistent: bool):
    """The launches of ``gateup_fwd`` / ``down_fwd`` for one shape, computed once: (config,
    [(slot indices, grid, T1..T3, routes, widths)] per launch of at most MAX_SLOTS slots).
    ``layout`` is the (route, width) of every slot."""
    cfg = gemm_config(kind, dtype, N, device, d, max(w for _, w in layout))
    idx = [i for i, (_, w) in enumerate(layout) if w > 0 or kind == "down"]
    if persistent and kind == "down":
        # A down tile costs its slot's width (the K loop): the paper's big and small tiles
        # differ 16:1. Programs take tiles p, p + grid, ... in slot order, so the widest
        # slots come first and the cheap tiles fill in at the end (heavy tiles first).
        idx.sort(key=lambda i: -layout[i][1])
    m_tiles = triton.cdiv(N, cfg.BM)
    launches = []
    for chunk in chunks(idx):
        cols = [layout[i][1] if kind == "gateup" else d for i in chunk]
        grid, firsts = _grid(cfg, [m_tiles * triton.cdiv(c, cfg.BN) for c in cols],
                             persistent, device)
        launches.append((tuple(chunk), grid, tuple(firsts),
                         tuple(pad4([layout[i][0] for i in chunk], 0)),
                         tuple(pad4([layout[i][1] for i in chunk], 0))))
    return cfg, launches


def _layout_of(slots: Sequence[Slot]) -> Tuple[Tuple[int, int], ...]:
    return tuple((s.route, s.width) for s in slots)


def gateup_fwd(x: torch.Tensor, perm: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
               slots: Sequence[Slot], h: torch.Tensor, num_paths: int = 1,
               persistent: bool = False) -> None:
    """Fill ``h`` (N, W_max) rows in grouped order with silu(x Wg^T) * (x Wu^T) per slot.

    x (N, d); perm (N,), offsets (P+1,) from the grouping, or None for one slot owning every
    row in token order; ``num_paths`` P; ``persistent`` picks the persistent grid."""
    N, d = x.shape
    routed = perm is not None
    persistent = persistent and routed
    for s in slots:
        int32_guard("weights", s.width, d)
    cfg, launches = _fwd_plan("gateup", N, d, _layout_of(slots), x.dtype, x.device, persistent)
    dummy = x
    for chunk, grid, firsts, routes, widths in launches:
        ptrs = []
        for i in pad4(chunk, None):
            ptrs += [dummy, dummy] if i is None else [slots[i].w_gate, slots[i].w_up]
        _gateup_fwd_kernel[(grid,)](
            x, perm if routed else dummy, offsets if routed else dummy, h, *ptrs,
            N, num_paths, d, h.stride(0), *routes, *widths, *firsts,
            NSLOT=len(chunk), ROUTED=routed, PERSISTENT=persistent, UPCAST=interpreting(),
            PREC=precision(x.dtype), ACC=acc_dtypes(x.dtype)[0], **cfg.launch())


def down_fwd(h: torch.Tensor, perm: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
             slots: Sequence[Slot], out: torch.Tensor, residual: Optional[torch.Tensor],
             gate: Optional[torch.Tensor], num_paths: int = 1,
             persistent: bool = False) -> None:
    """out[perm[i]] = residual + gate * (h_i Wd^T) per slot; skip slots (width 0, route P
    for the overflow bucket) write the residual (zeros without one)."""
    N, d = out.shape
    routed = perm is not None
    persistent = persistent and routed
    cfg, launches = _fwd_plan("down", N, d, _layout_of(slots), out.dtype, out.device,
                              persistent)
    dummy = out
    for chunk, grid, firsts, routes, widths in launches:
        ptrs = []
        for i in pad4(chunk, None):
            wd = None if i is None else slots[i].w_down
            ptrs += [dummy if wd is None else wd, dummy]
        _down_kernel[(grid,)](
            h, h, perm if routed else dummy, offsets if routed else dummy, out,
            residual if residual is not None else dummy, gate if gate is not None else dummy,
            *ptrs, N, num_paths, d, h.stride(0), *routes, *widths, *firsts,
            NSLOT=len(chunk), ROUTED=routed, DX=False, PERSISTENT=persistent,
            HAS_RES=residual is not None, HAS_GATE=gate is not None,
            UPCAST=interpreting(), PREC=precision(out.dtype), ACC=acc_dtypes(out.dtype)[0],
            **cfg.launch())


def dx_bwd(dg: torch.Tensor, du: torch.Tensor, perm: Optional[torch.Tensor],
           offsets: Optional[torch.Tensor], slots: Sequence[Slot], dx: torch.Tensor,
           num_paths: int = 1, bwd: bool = False) -> None:
    """dx[perm[i]] = dg_i Wg + du_i Wu per slot (dg, du (N, W_max) grouped rows); skip slots
    write zero rows. The down kernel in DX mode; ``bwd``: the configuration of the backward
    switch (``DUOLLM_TRITON_BWD``, ``configs.BWD_TABLE``)."""
    N, d = dx.shape
    routed = perm is not None
    cfg = gemm_config("dx", dx.dtype, N, dx.device, d, bwd=bwd)
    dummy = dx
    m_tiles = triton.cdiv(N, cfg.BM)
    for chunk in chunks(list(slots)):
        firsts, grid = starts([m_tiles * triton.cdiv(d, cfg.BN) for _ in chunk])
        ptrs = []
        for s in pad4(chunk, None):
            ptrs += [dummy, dummy] if s is None or s.width == 0 else [s.w_gate, s.w_up]
        routes, widths = routes_widths(chunk)
        _down_kernel[(grid,)](
            dg, du, perm if routed else dummy, offsets if routed else dummy, dx, dummy, dummy,
            *ptrs, N, num_paths, d, dg.stride(0), *routes, *widths, *firsts,
            NSLOT=len(chunk), ROUTED=routed, DX=True, PERSISTENT=False, HAS_RES=False,
            HAS_GATE=False, UPCAST=interpreting(), PREC=precision(dx.dtype),
            ACC=acc_dtypes(dx.dtype)[0], **cfg.launch())
