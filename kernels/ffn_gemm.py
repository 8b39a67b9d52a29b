"""Grouped SwiGLU GEMM kernels shared by ``swiglu_ffn`` (one path, no permutation) and the
routed layer ``duo_ffn`` (up to ``MAX_SLOTS`` paths per launch).

A launch serves up to ``MAX_SLOTS`` paths ("slots"). Each slot has a route index (its row
range in the grouped order comes from ``offsets`` in device memory), a width and its own
weight pointers; its tiles occupy a contiguous program-id range sized by the worst case (all
N tokens on that path), and tiles past the path's real row count exit at once. Nothing is
read back to the host, so a layer built from these launches can be captured in a CUDA graph.
Inside a slot, (row tile, column tile) follow a grouped order (GROUP_M row tiles share a
sweep over the columns) so weight tiles are reused from L2.

Forward, two launches:
  1. ``_gateup_fwd_kernel``: h = silu(x[perm] Wg^T) * (x[perm] Wu^T) into a workspace in
     grouped row order (rows of x read through ``perm`` inside the loads; no gathered copy).
  2. ``_down_kernel``: out[perm[i]] = residual + gate * (h_i Wd^T), skip paths write the
     residual; the scatter, gate and residual live in the epilogue.

Backward recomputes h (it is never saved), four launches:
  3. ``_gateup_bwd_kernel``: g, u, dh = (gate*dy)[perm] Wd recomputed per (rows, W) tile;
     writes gate*h, dg, du into workspaces and per-tile partials of d(gate).
  4. ``_down_kernel`` (DX mode): dx[perm[i]] = dg_i Wg + du_i Wu.
  5. ``_wgrad_kernel`` twice: dWg, dWu (one launch, two accumulators) and dWd = dy^T
     (gate * h), each split over tokens into fp32 partials that are summed in a fixed order
     (deterministic, no atomics), so a path with few rows still fills the GPU.
For 16-bit inputs the workspaces read by step 5 carry a low part (v - round(v)) as well, so
the weight gradients are as exact as with fp32 intermediates (see ``ffn_bwd``).
Accumulation is fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._common import interpreting as _interpreting, num_sms as _num_sms

MAX_SLOTS = 4


# --------------------------------------------------------------------------- jit helpers


@triton.jit
def _pick(s, a0, a1, a2, a3, NSLOT: tl.constexpr):
    """The ``s``-th of up to four per-slot values (pointers or ints)."""
    # "+ s * 0" turns ints that Triton specialised to constexpr (e.g. 1) into tensors, so
    # every branch yields the same type.
    r = a0 + s * 0
    if NSLOT > 1:
        if s == 1:
            r = a1 + s * 0
    if NSLOT > 2:
        if s == 2:
            r = a2 + s * 0
    if NSLOT > 3:
        if s == 3:
            r = a3 + s * 0
    return r


@triton.jit
def _slot_of(pid, T1, T2, T3, NSLOT: tl.constexpr):
    """Slot owning program ``pid`` given the slots' first program ids (slot 0 starts at 0)."""
    s = pid * 0
    if NSLOT > 1:
        s += (pid >= T1).to(tl.int32)
    if NSLOT > 2:
        s += (pid >= T2).to(tl.int32)
    if NSLOT > 3:
        s += (pid >= T3).to(tl.int32)
    return s


@triton.jit
def _rows_of(offsets_ptr, R, N, ROUTED: tl.constexpr):
    """(first grouped row, row count) of route ``R``, read from device memory."""
    if ROUTED:
        start = tl.load(offsets_ptr + R)
        cnt = (tl.load(offsets_ptr + R + 1) - start).to(tl.int32)
    else:
        zero = tl.program_id(0) * 0
        start = zero
        cnt = zero + N
    return start.to(tl.int64), cnt


@triton.jit
def _tile_mn(local, cnt, n_tiles, BM: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped (L2-friendly) order of a slot's (row tile, column tile); m < 0 when idle."""
    m_tiles = tl.cdiv(cnt, BM)
    width = GROUP_M * n_tiles
    group = local // width
    first_m = group * GROUP_M
    size_m = tl.minimum(m_tiles - first_m, GROUP_M)
    size_m = tl.maximum(size_m, 1)
    m = first_m + (local % width) % size_m
    n = (local % width) // size_m
    m = tl.where(local < m_tiles * n_tiles, m, -1)
    return m, n


@triton.jit
def _token_rows(perm_ptr, start, i, mask, ROUTED: tl.constexpr):
    """Token ids (int64) of grouped rows ``start + i``."""
    if ROUTED:
        tok = tl.load(perm_ptr + start + i, mask=mask, other=0)
    else:
        tok = start + i
    return tok.to(tl.int64)


@triton.jit
def _store_split(hi_ptr, lo_ptr, offs, v, mask, SPLIT: tl.constexpr):
    """Store fp32 ``v`` as hi = round(v) and, with SPLIT, lo = round(v - hi): hi + lo keeps
    ~2x the mantissa bits of the 16-bit dtype, for the weight-gradient sums."""
    hi = v.to(hi_ptr.dtype.element_ty)
    tl.store(hi_ptr + offs, hi, mask=mask)
    if SPLIT:
        tl.store(lo_ptr + offs, (v - hi.to(tl.float32)).to(lo_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _gateup_fwd_kernel(
    x_ptr,        # (N, d) input rows, token order
    perm_ptr,     # (N,) token ids in grouped order (unused when not ROUTED)
    offsets_ptr,  # (P+1,) first grouped row of every route
    h_ptr,        # (N, stride_h) workspace, grouped row order
    wg0, wu0, wg1, wu1, wg2, wu2, wg3, wu3,  # (W_s, d) gate/up weights of each slot
    N, d, stride_h,
    R0, R1, R2, R3,  # route index of each slot
    W0, W1, W2, W3,  # width of each slot
    T1, T2, T3,      # first program id of slots 1..3
    NSLOT: tl.constexpr, ROUTED: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    s = _slot_of(pid, T1, T2, T3, NSLOT)
    R = _pick(s, R0, R1, R2, R3, NSLOT)
    W = _pick(s, W0, W1, W2, W3, NSLOT)
    local = pid - _pick(s, 0, T1, T2, T3, NSLOT)
    start, cnt = _rows_of(offsets_ptr, R, N, ROUTED)
    m, n = _tile_mn(local, cnt, tl.cdiv(W, BN), BM, GROUP_M)
    if m < 0:
        return  # past this path's rows: the worst-case grid's excess
    wg_ptr = _pick(s, wg0, wg1, wg2, wg3, NSLOT)
    wu_ptr = _pick(s, wu0, wu1, wu2, wu3, NSLOT)

    i = m * BM + tl.arange(0, BM)
    rmask = i < cnt
    tok = _token_rows(perm_ptr, start, i, rmask, ROUTED)
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
def _down_kernel(
    a1_ptr,       # (N, stride_h) workspace, grouped rows: h (forward) or dg (DX)
    a2_ptr,       # (N, stride_h) workspace: du (DX only)
    perm_ptr,     # (N,) token ids in grouped order
    offsets_ptr,  # (P+1,) first grouped row of every route
    out_ptr,      # (N, d) output, token order
    res_ptr,      # (N, d) residual, token order (HAS_RES)
    gate_ptr,     # (N,) per-token scale (HAS_GATE)
    b10, b20, b11, b21, b12, b22, b13, b23,  # per slot: Wd (d, W), unused | Wg (W, d), Wu (W, d)
    N, d, stride_h,
    R0, R1, R2, R3,
    W0, W1, W2, W3,  # width 0 = a skip path: out = residual (forward), 0 (DX)
    T1, T2, T3,
    NSLOT: tl.constexpr, ROUTED: tl.constexpr, DX: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    s = _slot_of(pid, T1, T2, T3, NSLOT)
    R = _pick(s, R0, R1, R2, R3, NSLOT)
    W = _pick(s, W0, W1, W2, W3, NSLOT)
    local = pid - _pick(s, 0, T1, T2, T3, NSLOT)
    start, cnt = _rows_of(offsets_ptr, R, N, ROUTED)
    m, n = _tile_mn(local, cnt, tl.cdiv(d, BN), BM, GROUP_M)
    if m < 0:
        return
    b1_ptr = _pick(s, b10, b11, b12, b13, NSLOT)
    b2_ptr = _pick(s, b20, b21, b22, b23, NSLOT)

    i = m * BM + tl.arange(0, BM)
    rmask = i < cnt
    tok = _token_rows(perm_ptr, start, i, rmask, ROUTED)
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
            a2 = tl.load(a2_ptr + row[:, None] * stride_h + k[None, :], mask=amask, other=0.0)
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
def _gateup_bwd_kernel(
    x_ptr,        # (N, d) input rows, token order
    dy_ptr,       # (N, d) output gradient, token order
    gate_ptr,     # (N,) per-token scale (HAS_GATE)
    perm_ptr,     # (N,) token ids in grouped order
    offsets_ptr,  # (P+1,)
    h_ptr,        # (N, stride_h) out: recomputed gate * h, grouped rows (for dWd)
    dg_ptr,       # (N, stride_h) out: d(gate pre-activation)
    du_ptr,       # (N, stride_h) out: d(up pre-activation)
    hlo_ptr,      # (N, stride_h) out (SPLIT): low parts, v - float(hi) in the same dtype
    dglo_ptr,     # (N, stride_h) out (SPLIT)
    dulo_ptr,     # (N, stride_h) out (SPLIT)
    dgp_ptr,      # (N, stride_p) out fp32: per-column-tile partials of <dy, ffn(x)> (HAS_GATE)
    wg0, wu0, wd0, wg1, wu1, wd1, wg2, wu2, wd2, wg3, wu3, wd3,  # per slot weights
    N, d, stride_h, stride_p,
    R0, R1, R2, R3,
    W0, W1, W2, W3,
    T1, T2, T3,
    NSLOT: tl.constexpr, ROUTED: tl.constexpr, HAS_GATE: tl.constexpr, SPLIT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    s = _slot_of(pid, T1, T2, T3, NSLOT)
    R = _pick(s, R0, R1, R2, R3, NSLOT)
    W = _pick(s, W0, W1, W2, W3, NSLOT)
    local = pid - _pick(s, 0, T1, T2, T3, NSLOT)
    start, cnt = _rows_of(offsets_ptr, R, N, ROUTED)
    m, n = _tile_mn(local, cnt, tl.cdiv(W, BN), BM, GROUP_M)
    if m < 0:
        return
    wg_ptr = _pick(s, wg0, wg1, wg2, wg3, NSLOT)
    wu_ptr = _pick(s, wu0, wu1, wu2, wu3, NSLOT)
    wd_ptr = _pick(s, wd0, wd1, wd2, wd3, NSLOT)

    i = m * BM + tl.arange(0, BM)
    rmask = i < cnt
    tok = _token_rows(perm_ptr, start, i, rmask, ROUTED)
    ws = n * BN + tl.arange(0, BN)
    wmask = ws < W
    ks = tl.arange(0, BK)
    acc_g = tl.zeros((BM, BN), dtype=ACC)
    acc_u = tl.zeros((BM, BN), dtype=ACC)
    acc_d = tl.zeros((BM, BN), dtype=ACC)  # dy @ Wd[:, ws] (without the gate)
    for k0 in range(0, d, BK):
        k = k0 + ks
        kmask = k < d
        amask = rmask[:, None] & kmask[None, :]
        bmask = kmask[:, None] & wmask[None, :]
        a = tl.load(x_ptr + tok[:, None] * d + k[None, :], mask=amask, other=0.0)
        e = tl.load(dy_ptr + tok[:, None] * d + k[None, :], mask=amask, other=0.0)
        bg = tl.load(wg_ptr + ws[None, :] * d + k[:, None], mask=bmask, other=0.0)
        bu = tl.load(wu_ptr + ws[None, :] * d + k[:, None], mask=bmask, other=0.0)
        bd = tl.load(wd_ptr + k[:, None] * W + ws[None, :], mask=bmask, other=0.0)
        if UPCAST:
            a = a.to(ACC)
            e = e.to(ACC)
            bg = bg.to(ACC)
            bu = bu.to(ACC)
            bd = bd.to(ACC)
        acc_g = tl.dot(a, bg, acc_g, input_precision=PREC, out_dtype=ACC)
        acc_u = tl.dot(a, bu, acc_u, input_precision=PREC, out_dtype=ACC)
        acc_d = tl.dot(e, bd, acc_d, input_precision=PREC, out_dtype=ACC)
    sg = tl.sigmoid(acc_g)
    silu = acc_g * sg
    h = silu * acc_u
    dh = acc_d
    if HAS_GATE:
        # d(gate) = <dy, ffn(x)> = <dy Wd, h>, reduced over this W tile here, over tiles later.
        gsum = tl.sum(acc_d * h, axis=1)
        g = tl.load(gate_ptr + tok, mask=rmask, other=0.0).to(ACC)
        dh = dh * g[:, None]
        hg = h * g[:, None]  # dWd = dy^T (gate * h): the gate rides on h, not on dy
        tl.store(dgp_ptr + (start + i).to(tl.int64) * stride_p + n, gsum, mask=rmask)
    else:
        hg = h
    dg = dh * acc_u * sg * (1.0 + acc_g * (1.0 - sg))
    du = dh * silu
    row = (start + i).to(tl.int64)
    optrs = row[:, None] * stride_h + ws[None, :]
    omask = rmask[:, None] & wmask[None, :]
    _store_split(h_ptr, hlo_ptr, optrs, hg, omask, SPLIT)
    _store_split(dg_ptr, dglo_ptr, optrs, dg, omask, SPLIT)
    _store_split(du_ptr, dulo_ptr, optrs, du, omask, SPLIT)


@triton.jit
def _wgrad_kernel(
    a1_ptr,       # A rows: workspace (N, stride_h) grouped, or (N, d) token order if A_TOK
    a2_ptr,       # second A (TWO): workspace, same layout as a1
    b_ptr,        # B rows: (N, d) token order if B_TOK, else workspace (N, stride_h)
    a1lo_ptr,     # low parts of the workspace operands (SPLIT): A1, A2 or B, whichever
    a2lo_ptr,     #   is the workspace
    blo_ptr,
    perm_ptr,     # (N,) token ids in grouped order
    offsets_ptr,  # (P+1,)
    p1_ptr,       # fp32 partials of C1 = A1^T B, per slot [S, M_s, N_s] at offset O_s
    p2_ptr,       # fp32 partials of C2 = A2^T B (TWO)
    N, d, stride_h, S,
    R0, R1, R2, R3,
    W0, W1, W2, W3,
    T1, T2, T3,
    O0, O1, O2, O3,  # element offset of each slot's partials
    NSLOT: tl.constexpr, ROUTED: tl.constexpr,
    A_TOK: tl.constexpr, B_TOK: tl.constexpr, TWO: tl.constexpr, SPLIT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    # C (M_s, N_s) = sum over a slot's rows r of A[r, :M_s]^T B[r, :N_s]; the row (token)
    # dimension is split in S slices so that small outputs still get many programs.
    pid = tl.program_id(0)
    s = _slot_of(pid, T1, T2, T3, NSLOT)
    R = _pick(s, R0, R1, R2, R3, NSLOT)
    W = _pick(s, W0, W1, W2, W3, NSLOT)
    local = pid - _pick(s, 0, T1, T2, T3, NSLOT)
    O = _pick(s, O0, O1, O2, O3, NSLOT).to(tl.int64)
    start, cnt = _rows_of(offsets_ptr, R, N, ROUTED)
    if A_TOK:
        Ma = d
        Nb = W
    else:
        Ma = W
        Nb = d
    n_t = tl.cdiv(Nb, BN)
    m_t = tl.cdiv(Ma, BM)
    split = local // (m_t * n_t)
    t = local % (m_t * n_t)
    m = t // n_t
    n = t % n_t
    chunk = tl.cdiv(tl.cdiv(cnt, S), BK) * BK  # rows per slice, from the device count
    r_lo = split * chunk
    r_hi = tl.minimum(r_lo + chunk, cnt)

    ms = m * BM + tl.arange(0, BM)
    mmask = ms < Ma
    ns = n * BN + tl.arange(0, BN)
    nmask = ns < Nb
    ks = tl.arange(0, BK)
    acc1 = tl.zeros((BM, BN), dtype=ACC)
    acc2 = tl.zeros((BM, BN), dtype=ACC)
    for r0 in range(r_lo, r_hi, BK):
        i = r0 + ks
        kmask = i < r_hi
        tok = _token_rows(perm_ptr, start, i, kmask, ROUTED)
        row = (start + i).to(tl.int64)
        amask = mmask[:, None] & kmask[None, :]
        bmask = kmask[:, None] & nmask[None, :]
        if A_TOK:
            a_off = tok[None, :] * d + ms[:, None]
        else:
            a_off = row[None, :] * stride_h + ms[:, None]
        if B_TOK:
            b_off = tok[:, None] * d + ns[None, :]
        else:
            b_off = row[:, None] * stride_h + ns[None, :]
        a1 = tl.load(a1_ptr + a_off, mask=amask, other=0.0)  # (BM, BK)
        b = tl.load(b_ptr + b_off, mask=bmask, other=0.0)    # (BK, BN)
        if UPCAST:
            a1 = a1.to(ACC)
            b = b.to(ACC)
        acc1 = tl.dot(a1, b, acc1, input_precision=PREC, out_dtype=ACC)
        if SPLIT:  # the workspace operand's low part: one more product per accumulator
            if A_TOK:
                blo = tl.load(blo_ptr + b_off, mask=bmask, other=0.0)
                if UPCAST:
                    blo = blo.to(ACC)
                acc1 = tl.dot(a1, blo, acc1, input_precision=PREC, out_dtype=ACC)
            else:
                a1lo = tl.load(a1lo_ptr + a_off, mask=amask, other=0.0)
                if UPCAST:
                    a1lo = a1lo.to(ACC)
                acc1 = tl.dot(a1lo, b, acc1, input_precision=PREC, out_dtype=ACC)
        if TWO:
            a2 = tl.load(a2_ptr + a_off, mask=amask, other=0.0)
            if UPCAST:
                a2 = a2.to(ACC)
            acc2 = tl.dot(a2, b, acc2, input_precision=PREC, out_dtype=ACC)
            if SPLIT:
                a2lo = tl.load(a2lo_ptr + a_off, mask=amask, other=0.0)
                if UPCAST:
                    a2lo = a2lo.to(ACC)
                acc2 = tl.dot(a2lo, b, acc2, input_precision=PREC, out_dtype=ACC)
    poff = O + split.to(tl.int64) * Ma * Nb + ms[:, None].to(tl.int64) * Nb + ns[None, :]
    pmask = mmask[:, None] & nmask[None, :]
    tl.store(p1_ptr + poff, acc1, mask=pmask)
    if TWO:
        tl.store(p2_ptr + poff, acc2, mask=pmask)


# --------------------------------------------------------------------------- launchers


def _gemm_config(dtype: torch.dtype, n_rows: int, kind: str) -> dict:
    """Block sizes of one kernel family ("gateup", "gateup_bwd", "down", "dx", "wgrad",
    "wgrad2").

    The interpreter gets big blocks (its cost is per program and loop iteration). On a GPU,
    16-bit inputs use 128-row tiles once there are enough rows to fill the machine (64
    below); the gate/up kernels keep two (backward: three) fp32 accumulators per program, so
    their tiles are 128 x 128 per accumulator with 8 warps (backward 64 x 128). The shared
    memory of every choice fits an H100 with margin (at most ~150 KiB of the 227 KiB). No autotuning: a tuned choice
    made at the first call would break CUDA-graph capture of that call.
    """
    if _interpreting():
        return dict(BM=64, BN=64, BK=64, GROUP_M=4, num_warps=4, num_stages=1)
    if dtype == torch.float64:  # rare; small tiles, 2 stages keep 5 fp64 tiles in shared
        return dict(BM=64, BN=64, BK=32, GROUP_M=8, num_warps=4, num_stages=2)
    if dtype == torch.float32:
        return dict(BM=64, BN=64, BK=32, GROUP_M=8, num_warps=4, num_stages=3)
    bm = 128 if n_rows >= 2048 else 64
    if n_rows <= 256 and kind in ("gateup", "down", "dx"):
        # decode-sized: few row tiles, so narrower column tiles give more programs to stream
        # the weights (the down GEMM has only cdiv(d, BN) programs per path)
        return dict(BM=64, BN=64, BK=64, GROUP_M=1, num_warps=4, num_stages=4)
    if kind == "gateup":
        return dict(BM=bm, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=3)
    if kind == "gateup_bwd":  # five tiles per stage: x, dy, Wg, Wu, Wd
        return dict(BM=64, BN=128, BK=32, GROUP_M=8, num_warps=8, num_stages=4)
    if kind == "wgrad":
        return dict(BM=128, BN=128, BK=64, GROUP_M=1, num_warps=8, num_stages=3)
    if kind == "wgrad2":  # two accumulators (dWg and dWu share the x tile)
        return dict(BM=128, BN=64, BK=64, GROUP_M=1, num_warps=8, num_stages=3)
    if kind == "dx":   # the down kernel in DX mode streams two A and two B tiles
        return dict(BM=bm, BN=128, BK=32, GROUP_M=8, num_warps=8 if bm == 128 else 4,
                    num_stages=4)
    return dict(BM=bm, BN=128, BK=64, GROUP_M=8, num_warps=8 if bm == 128 else 4,
                num_stages=4)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (torch's default matmul does not use TF32 either).
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _acc(dtype: torch.dtype):
    """(Triton, torch) accumulation dtype: float64 for float64 inputs, else float32."""
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


class Slot:
    """One path of a launch: route index, width, and its weights (None for a skip path)."""

    __slots__ = ("route", "width", "w_gate", "w_up", "w_down")

    def __init__(self, route: int, width: int, weights):
        self.route, self.width = route, width
        self.w_gate, self.w_up, self.w_down = weights if weights is not None else (None,) * 3


def _pad4(vals: Sequence, fill) -> List:
    return list(vals) + [fill] * (MAX_SLOTS - len(vals))


def _chunks(slots: Sequence[Slot]) -> List[List[Slot]]:
    return [list(slots[i:i + MAX_SLOTS]) for i in range(0, len(slots), MAX_SLOTS)]


def _starts(tiles: Sequence[int]) -> Tuple[List[int], int]:
    """First program id of slots 1..3 (huge where absent) and the total grid."""
    starts, acc = [], 0
    for t in tiles:
        starts.append(acc)
        acc += t
    firsts = starts[1:] + [2 ** 30] * (MAX_SLOTS - len(starts))
    return firsts[:MAX_SLOTS - 1], acc


def _common(slots: Sequence[Slot]) -> Tuple[List[int], List[int]]:
    return _pad4([s.route for s in slots], 0), _pad4([s.width for s in slots], 0)


def gateup_fwd(x: torch.Tensor, perm: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
               slots: Sequence[Slot], h: torch.Tensor) -> None:
    """Fill ``h`` (N, W_max) rows in grouped order with silu(x Wg^T) * (x Wu^T) per slot."""
    N, d = x.shape
    cfg = _gemm_config(x.dtype, N, "gateup")
    routed = perm is not None
    dummy = x
    for chunk in _chunks([s for s in slots if s.width > 0]):
        m_tiles = triton.cdiv(N, cfg["BM"])
        firsts, grid = _starts([m_tiles * triton.cdiv(s.width, cfg["BN"]) for s in chunk])
        ptrs = []
        for s in _pad4(chunk, None):
            ptrs += [dummy, dummy] if s is None else [s.w_gate, s.w_up]
        routes, widths = _common(chunk)
        _gateup_fwd_kernel[(grid,)](
            x, perm if routed else dummy, offsets if routed else dummy, h, *ptrs,
            N, d, h.stride(0), *routes, *widths, *firsts,
            NSLOT=len(chunk), ROUTED=routed, UPCAST=_interpreting(),
            PREC=_precision(x.dtype), ACC=_acc(x.dtype)[0], **cfg)


def down_fwd(h: torch.Tensor, perm: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
             slots: Sequence[Slot], out: torch.Tensor, residual: Optional[torch.Tensor],
             gate: Optional[torch.Tensor]) -> None:
    """out[perm[i]] = residual + gate * (h_i Wd^T) per slot; skip slots write the residual."""
    N, d = out.shape
    cfg = _gemm_config(out.dtype, N, "down")
    routed = perm is not None
    dummy = out
    for chunk in _chunks(list(slots)):
        m_tiles = triton.cdiv(N, cfg["BM"])
        n_tiles = triton.cdiv(d, cfg["BN"])
        firsts, grid = _starts([m_tiles * n_tiles for _ in chunk])
        ptrs = []
        for s in _pad4(chunk, None):
            ptrs += [dummy if s is None or s.w_down is None else s.w_down, dummy]
        routes, widths = _common(chunk)
        _down_kernel[(grid,)](
            h, h, perm if routed else dummy, offsets if routed else dummy, out,
            residual if residual is not None else dummy, gate if gate is not None else dummy,
            *ptrs, N, d, h.stride(0), *routes, *widths, *firsts,
            NSLOT=len(chunk), ROUTED=routed, DX=False,
            HAS_RES=residual is not None, HAS_GATE=gate is not None,
            UPCAST=_interpreting(), PREC=_precision(out.dtype), ACC=_acc(out.dtype)[0], **cfg)


def _split_count(out_tiles: int, n_rows: int, bk: int, device: torch.device) -> int:
    """Token slices for a weight gradient: enough programs to fill the GPU twice over."""
    target = 2 * _num_sms(device)
    return max(1, min(triton.cdiv(target, max(out_tiles, 1)), triton.cdiv(n_rows, 4 * bk), 64))


def ffn_bwd(x: torch.Tensor, dy: torch.Tensor, gate: Optional[torch.Tensor],
            perm: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
            inv: Optional[torch.Tensor], slots: Sequence[Slot]):
    """Gradients of ``gate * swiglu_route(x)``, h recomputed, for every slot (skip slots,
    width 0, only get zero rows of dx).

    x, dy (N, d) token order; gate (N,) or None; perm, inv (N,) and offsets (P+1,) from
    ``group_tokens``, or all None for the plain op (one slot owning every row).
    Returns (dx (N, d); per routed slot (dWg, dWu, dWd); dgate (N,) in the accumulation
    dtype, or None).
    """
    N, d = x.shape
    routed = perm is not None
    all_slots = list(slots)
    slots = [s for s in all_slots if s.width > 0]
    dtype = x.dtype
    dummy = x
    interp, prec = _interpreting(), _precision(dtype)
    w_max = max([s.width for s in slots], default=1)
    # Workspaces hold the input dtype (what the tensor-core GEMMs reading them need). For
    # 16-bit dtypes each also gets a low part (v - hi): rounding dg, du and h once to 16 bits
    # before the weight-gradient sums costs accuracy beyond torch's own on elements where
    # the sum cancels; hi + lo products make the weight gradients as exact as fp32
    # intermediates, for 3 more GEMMs of the 8 in the backward.
    split = dtype in (torch.float16, torch.bfloat16)
    h = torch.empty((N, w_max), dtype=dtype, device=x.device)
    dg = torch.empty_like(h)
    du = torch.empty_like(h)
    lo = [torch.empty_like(h) for _ in range(3)] if split else [h, dg, du]
    cfg = _gemm_config(dtype, N, "gateup_bwd")
    n_wt = triton.cdiv(w_max, cfg["BN"])
    has_gate = gate is not None
    dgp = torch.zeros((N, n_wt) if has_gate else (1, 1), dtype=_acc(dtype)[1], device=x.device)
    m_tiles = triton.cdiv(N, cfg["BM"])
    for chunk in _chunks(slots):
        firsts, grid = _starts([m_tiles * triton.cdiv(s.width, cfg["BN"]) for s in chunk])
        ptrs = []
        for s in _pad4(chunk, None):
            ptrs += [dummy] * 3 if s is None else [s.w_gate, s.w_up, s.w_down]
        routes, widths = _common(chunk)
        _gateup_bwd_kernel[(grid,)](
            x, dy, gate if has_gate else dummy, perm if routed else dummy,
            offsets if routed else dummy, h, dg, du, *lo, dgp, *ptrs,
            N, d, w_max, dgp.stride(0), *routes, *widths, *firsts,
            NSLOT=len(chunk), ROUTED=routed, HAS_GATE=has_gate, SPLIT=split,
            UPCAST=interp, PREC=prec, ACC=_acc(dtype)[0], **cfg)

    # dx = dg Wg + du Wu, scattered to token order; skip slots write zero rows.
    dx = torch.empty_like(x)
    cfg = _gemm_config(dtype, N, "dx")
    m_tiles = triton.cdiv(N, cfg["BM"])
    for chunk in _chunks(all_slots):
        firsts, grid = _starts([m_tiles * triton.cdiv(d, cfg["BN"]) for _ in chunk])
        ptrs = []
        for s in _pad4(chunk, None):
            ptrs += [dummy, dummy] if s is None or s.width == 0 else [s.w_gate, s.w_up]
        routes, widths = _common(chunk)
        _down_kernel[(grid,)](
            dg, du, perm if routed else dummy, offsets if routed else dummy, dx, dummy, dummy,
            *ptrs, N, d, w_max, *routes, *widths, *firsts,
            NSLOT=len(chunk), ROUTED=routed, DX=True, HAS_RES=False, HAS_GATE=False,
            UPCAST=interp, PREC=prec, ACC=_acc(dtype)[0], **cfg)

    # Weight gradients, split over tokens into fp32 partials summed in a fixed order.
    grads = {id(s): [None, None, None] for s in slots}
    for chunk in _chunks(slots):
        for which in ("gateup", "down"):
            a_tok = which == "down"   # dWd = (gate*dy)^T h; dWg/dWu = dg^T x, du^T x
            cfg = _gemm_config(dtype, N, "wgrad" if a_tok else "wgrad2")
            cfg.pop("GROUP_M")
            bm, bn, bk = cfg["BM"], cfg["BN"], cfg["BK"]
            shapes = [((d, s.width) if a_tok else (s.width, d)) for s in chunk]
            splits = [_split_count(triton.cdiv(ma, bm) * triton.cdiv(nb, bn), N, bk, x.device)
                      for ma, nb in shapes]
            S = max(splits)
            tiles = [S * triton.cdiv(ma, bm) * triton.cdiv(nb, bn) for ma, nb in shapes]
            firsts, grid = _starts(tiles)
            offs, tot = [], 0
            for ma, nb in shapes:
                offs.append(tot)
                tot += S * ma * nb
            p1 = torch.empty(tot, dtype=_acc(dtype)[1], device=x.device)
            p2 = torch.empty(tot if not a_tok else 1, dtype=_acc(dtype)[1], device=x.device)
            routes, widths = _common(chunk)
            _wgrad_kernel[(grid,)](
                dy if a_tok else dg, du, h if a_tok else x, lo[1], lo[2], lo[0],
                perm if routed else dummy, offsets if routed else dummy, p1, p2,
                N, d, w_max, S, *routes, *widths, *firsts, *_pad4(offs, 0),
                NSLOT=len(chunk), ROUTED=routed, A_TOK=a_tok, B_TOK=not a_tok, TWO=not a_tok,
                SPLIT=split, UPCAST=interp, PREC=prec, ACC=_acc(dtype)[0], **cfg)
            for s, (ma, nb), o in zip(chunk, shapes, offs):
                part = p1[o:o + S * ma * nb].view(S, ma, nb)
                if a_tok:
                    grads[id(s)][2] = part.sum(0).to(dtype)
                else:
                    grads[id(s)][0] = part.sum(0).to(dtype)
                    grads[id(s)][1] = p2[o:o + S * ma * nb].view(S, ma, nb).sum(0).to(dtype)

    dgate = None
    if has_gate:
        dgate_rows = dgp.sum(1)  # (N,) grouped rows; rows of skip tokens were never written
        dgate = dgate_rows[inv] if routed else dgate_rows
    return dx, [tuple(grads[id(s)]) for s in slots], dgate
