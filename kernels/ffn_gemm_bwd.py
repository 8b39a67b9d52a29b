"""Grouped SwiGLU GEMM kernels, backward (forward and the slot scheme: ``ffn_gemm.py``).

The backward recomputes h (it is never saved); four launches plus small torch reductions:
  1. ``_gateup_bwd_kernel`` (``gateup_bwd``): g, u, dh = (gate*dy)[perm] Wd recomputed per
     (rows, W) tile; writes gate*h, dg, du into workspaces and per-tile partials of d(gate).
  2. ``ffn_gemm._down_kernel`` in DX mode (``ffn_gemm.dx_bwd``): dx[perm[i]] = dg_i Wg + du_i Wu.
  3. ``_wgrad_kernel`` twice (``wgrad_bwd``): dWg, dWu (one launch, two accumulators) and
     dWd = dy^T (gate * h), each split over tokens into fp32 partials that are summed in a
     fixed order (deterministic, no atomics), so a path with few rows still fills the GPU.
For 16-bit inputs the workspaces read by step 3 carry a low part (v - round(v)) as well, so
the weight gradients are as exact as with fp32 intermediates (see ``ffn_bwd``).

Switch (off by default, unmeasured: it becomes the default only where a committed GPU
measurement shows it faster). ``DUOLLM_TRITON_BWD=1``, read once, at import (``ENV_BWD``), or
per call with ``ffn_bwd(..., bwd=True)``:

* 16-bit gate/up backward and dx at >= 2048 tokens take ``configs.BWD_TABLE``'s BK = 64 (the
  wgmma K step; 3 stages so the shared memory fits) instead of BK = 32;
* each path's weight gradient is split over tokens in its own number of slices
  (``_wgrad_pp_kernel``), so its fp32 partials take S_p x its weight's size, not the
  largest S of the launch (which doubles the big path's partials at the paper's layer).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._common import (Slot, acc_dtypes, chunks, interpreting, num_sms, pad4, pick, precision,
                      routes_widths, slot_tile, starts, tile_mn, token_rows)
from .configs import gemm_config
from .ffn_gemm import dx_bwd

__all__ = ["ffn_bwd", "gateup_bwd", "wgrad_bwd"]


def _env_bwd() -> bool:
    val = os.environ.get("DUOLLM_TRITON_BWD", "0")
    if val not in ("0", "1"):
        raise ValueError(f"DUOLLM_TRITON_BWD: expected 0 or 1, got {val!r}")
    return val == "1"


ENV_BWD = _env_bwd()  # the switch, read once


# --------------------------------------------------------------------------- kernels


@triton.jit
def _store_split(hi_ptr, lo_ptr, offs, v, mask, SPLIT: tl.constexpr):
    """Store fp32 ``v`` as hi = round(v) and, with SPLIT, lo = round(v - hi): hi + lo keeps
    ~2x the mantissa bits of the 16-bit dtype, for the weight-gradient sums."""
    hi = v.to(hi_ptr.dtype.element_ty)
    tl.store(hi_ptr + offs, hi, mask=mask)
    if SPLIT:
        tl.store(lo_ptr + offs, (v - hi.to(tl.float32)).to(lo_ptr.dtype.element_ty), mask=mask)


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
    wg0,          # (W_0, d) gate weight of slot 0
    wu0,          # (W_0, d) up weight of slot 0
    wd0,          # (d, W_0) down weight of slot 0
    wg1,          # slot 1 (unused when NSLOT < 2), and so on
    wu1,
    wd1,
    wg2,
    wu2,
    wd2,
    wg3,
    wu3,
    wd3,
    N, P, d, stride_h, stride_p,
    R0, R1, R2, R3,
    W0, W1, W2, W3,
    T1, T2, T3,
    NSLOT: tl.constexpr, ROUTED: tl.constexpr, HAS_GATE: tl.constexpr, SPLIT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    s, W, local, start, cnt = slot_tile(pid, offsets_ptr, N, P, R0, R1, R2, R3, W0, W1, W2, W3,
                                        T1, T2, T3, NSLOT, ROUTED)
    m, n = tile_mn(local, cnt, tl.cdiv(W, BN), BM, GROUP_M)
    if m < 0:
        return
    wg_ptr = pick(s, wg0, wg1, wg2, wg3, NSLOT)
    wu_ptr = pick(s, wu0, wu1, wu2, wu3, NSLOT)
    wd_ptr = pick(s, wd0, wd1, wd2, wd3, NSLOT)

    i = m * BM + tl.arange(0, BM)
    rmask = i < cnt
    tok = token_rows(perm_ptr, start, i, rmask, ROUTED)
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
def _wgrad_tile(a1_ptr, a2_ptr, b_ptr, a1lo_ptr, a2lo_ptr, blo_ptr, perm_ptr, p1_ptr, p2_ptr,
                d, stride_h, S, W, local, start, cnt, off,
                ROUTED: tl.constexpr, A_TOK: tl.constexpr, B_TOK: tl.constexpr,
                TWO: tl.constexpr, SPLIT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                ACC: tl.constexpr):
    """One program of a weight gradient (arguments as in ``_wgrad_kernel``): tile ``local`` of
    a slot whose rows are split in ``S`` slices; its partials start at element ``off``."""
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
        tok = token_rows(perm_ptr, start, i, kmask, ROUTED)
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
    poff = off + split.to(tl.int64) * Ma * Nb + ms[:, None].to(tl.int64) * Nb + ns[None, :]
    pmask = mmask[:, None] & nmask[None, :]
    tl.store(p1_ptr + poff, acc1, mask=pmask)
    if TWO:
        tl.store(p2_ptr + poff, acc2, mask=pmask)


@triton.jit
def _wgrad_kernel(
    a1_ptr,       # A rows: workspace (N, stride_h) grouped, or (N, d) token order if A_TOK
    a2_ptr,       # second A (TWO): workspace, same layout as a1
    b_ptr,        # B rows: (N, d) token order if B_TOK, else workspace (N, stride_h)
    a1lo_ptr,     # low parts of the workspace operands (SPLIT): A1, A2 or B, whichever
    a2lo_ptr,     #   is the workspace
    blo_ptr,      #   (the two others are unused)
    perm_ptr,     # (N,) token ids in grouped order
    offsets_ptr,  # (P+1,)
    p1_ptr,       # fp32 partials of C1 = A1^T B, per slot [S, M_s, N_s] at offset O_s
    p2_ptr,       # fp32 partials of C2 = A2^T B (TWO)
    N, P, d, stride_h, S,
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
    s, W, local, start, cnt = slot_tile(pid, offsets_ptr, N, P, R0, R1, R2, R3, W0, W1, W2, W3,
                                        T1, T2, T3, NSLOT, ROUTED)
    off = pick(s, O0, O1, O2, O3, NSLOT).to(tl.int64)
    _wgrad_tile(a1_ptr, a2_ptr, b_ptr, a1lo_ptr, a2lo_ptr, blo_ptr, perm_ptr, p1_ptr, p2_ptr,
                d, stride_h, S, W, local, start, cnt, off, ROUTED, A_TOK, B_TOK, TWO, SPLIT,
                BM, BN, BK, UPCAST, PREC, ACC)


@triton.jit
def _wgrad_pp_kernel(
    a1_ptr, a2_ptr, b_ptr, a1lo_ptr, a2lo_ptr, blo_ptr, perm_ptr, offsets_ptr, p1_ptr, p2_ptr,
    N, P, d, stride_h,
    S0, S1, S2, S3,  # token slices of each slot (DUOLLM_TRITON_BWD=1; else _wgrad_kernel's S)
    R0, R1, R2, R3,
    W0, W1, W2, W3,
    T1, T2, T3,
    O0, O1, O2, O3,
    NSLOT: tl.constexpr, ROUTED: tl.constexpr,
    A_TOK: tl.constexpr, B_TOK: tl.constexpr, TWO: tl.constexpr, SPLIT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    # _wgrad_kernel with one split count per slot: slot s has S_s x its output tiles
    # programs, and its partials [S_s, M_s, N_s] start at O_s.
    pid = tl.program_id(0)
    s, W, local, start, cnt = slot_tile(pid, offsets_ptr, N, P, R0, R1, R2, R3, W0, W1, W2, W3,
                                        T1, T2, T3, NSLOT, ROUTED)
    off = pick(s, O0, O1, O2, O3, NSLOT).to(tl.int64)
    S = pick(s, S0, S1, S2, S3, NSLOT)
    _wgrad_tile(a1_ptr, a2_ptr, b_ptr, a1lo_ptr, a2lo_ptr, blo_ptr, perm_ptr, p1_ptr, p2_ptr,
                d, stride_h, S, W, local, start, cnt, off, ROUTED, A_TOK, B_TOK, TWO, SPLIT,
                BM, BN, BK, UPCAST, PREC, ACC)





# --------------------------------------------------------------------------- launchers


def _split_count(out_tiles: int, n_rows: int, bk: int, device: torch.device) -> int:
    """Token slices for a weight gradient: enough programs to fill the GPU twice over."""
    target = 2 * num_sms(device)
    return max(1, min(triton.cdiv(target, max(out_tiles, 1)), triton.cdiv(n_rows, 4 * bk), 64))


def wgrad_plan(shapes: Sequence[Tuple[int, int]], n_rows: int, cfg, device: torch.device,
               per_path: bool = False) -> Tuple[List[int], List[int], List[int], int]:
    """Token slices of one weight-gradient launch over slots with outputs ``shapes``
    ((M_s, N_s) each): (split count per slot, programs per slot, element offset of each
    slot's fp32 partials [S_s, M_s, N_s], the partial buffer's total elements).

    Default: every slot takes the launch's largest split count (``_wgrad_kernel``'s one S);
    ``per_path`` (``DUOLLM_TRITON_BWD=1``): each slot keeps its own (``_wgrad_pp_kernel``)."""
    out_tiles = [triton.cdiv(ma, cfg.BM) * triton.cdiv(nb, cfg.BN) for ma, nb in shapes]
    splits = [_split_count(t, n_rows, cfg.BK, device) for t in out_tiles]
    if not per_path:
        splits = [max(splits)] * len(splits)
    offs, tot = [], 0
    for S, (ma, nb) in zip(splits, shapes):
        offs.append(tot)
        tot += S * ma * nb
    return splits, [S * t for S, t in zip(splits, out_tiles)], offs, tot


def gateup_bwd(x: torch.Tensor, dy: torch.Tensor, gate: Optional[torch.Tensor],
               perm: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
               slots: Sequence[Slot], num_paths: int = 1, bwd: bool = False):
    """Recompute h per routed slot and form the gate/up gradients.

    x, dy (N, d) token order; gate (N,) or None; ``bwd``: the backward switch's configuration
    (``configs.BWD_TABLE``). Returns (h, dg, du, lo, dgp): the
    workspaces (N, W_max) in grouped rows (h already times the gate), ``lo`` the three low
    parts for 16-bit inputs (else the workspaces themselves), and dgp (N, column tiles) the
    partials of d(gate) in grouped rows (zero rows for tokens of no routed slot)."""
    N, d = x.shape
    routed = perm is not None
    dtype, dummy = x.dtype, x
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
    cfg = gemm_config("gateup_bwd", dtype, N, x.device, d, w_max, bwd=bwd)
    n_wt = triton.cdiv(w_max, cfg.BN)
    has_gate = gate is not None
    dgp = torch.zeros((N, n_wt) if has_gate else (1, 1), dtype=acc_dtypes(dtype)[1],
                      device=x.device)
    m_tiles = triton.cdiv(N, cfg.BM)
    for chunk in chunks(list(slots)):
        firsts, grid = starts([m_tiles * triton.cdiv(s.width, cfg.BN) for s in chunk])
        ptrs = []
        for s in pad4(chunk, None):
            ptrs += [dummy] * 3 if s is None else [s.w_gate, s.w_up, s.w_down]
        routes, widths = routes_widths(chunk)
        _gateup_bwd_kernel[(grid,)](
            x, dy, gate if has_gate else dummy, perm if routed else dummy,
            offsets if routed else dummy, h, dg, du, *lo, dgp, *ptrs,
            N, num_paths, d, w_max, dgp.stride(0), *routes, *widths, *firsts,
            NSLOT=len(chunk), ROUTED=routed, HAS_GATE=has_gate, SPLIT=split,
            UPCAST=interpreting(), PREC=precision(dtype), ACC=acc_dtypes(dtype)[0],
            **cfg.launch())
    return h, dg, du, lo, dgp


def wgrad_bwd(x: torch.Tensor, dy: torch.Tensor, h: torch.Tensor, dg: torch.Tensor,
              du: torch.Tensor, lo: Sequence[torch.Tensor], perm: Optional[torch.Tensor],
              offsets: Optional[torch.Tensor], slots: Sequence[Slot], num_paths: int = 1,
              bwd: bool = False) -> Dict[int, List[Optional[torch.Tensor]]]:
    """Weight gradients of every routed slot, ``{id(slot): [dWg, dWu, dWd]}``: dWg = dg^T x,
    dWu = du^T x, dWd = dy^T (gate * h), split over tokens into fp32 partials summed in a
    fixed order. Workspaces as returned by ``gateup_bwd``. ``bwd``: split counts per slot
    (``wgrad_plan``)."""
    N, d = x.shape
    routed = perm is not None
    dtype, dummy = x.dtype, x
    split = lo[0] is not h
    acc_t, acc_torch = acc_dtypes(dtype)
    grads = {id(s): [None, None, None] for s in slots}
    for chunk in chunks(list(slots)):
        for which in ("gateup", "down"):
            a_tok = which == "down"   # dWd = (gate*dy)^T h; dWg/dWu = dg^T x, du^T x
            cfg = gemm_config("wgrad" if a_tok else "wgrad2", dtype, N, x.device, d)
            shapes = [((d, s.width) if a_tok else (s.width, d)) for s in chunk]
            splits, tiles, offs, tot = wgrad_plan(shapes, N, cfg, x.device, per_path=bwd)
            firsts, grid = starts(tiles)
            p1 = torch.empty(tot, dtype=acc_torch, device=x.device)
            p2 = torch.empty(tot if not a_tok else 1, dtype=acc_torch, device=x.device)
            routes, widths = routes_widths(chunk)
            args = (dy if a_tok else dg, du, h if a_tok else x, lo[1], lo[2], lo[0],
                    perm if routed else dummy, offsets if routed else dummy, p1, p2,
                    N, num_paths, d, h.stride(0))
            rest = (*routes, *widths, *firsts, *pad4(offs, 0))
            kw = dict(NSLOT=len(chunk), ROUTED=routed, A_TOK=a_tok, B_TOK=not a_tok,
                      TWO=not a_tok, SPLIT=split, UPCAST=interpreting(),
                      PREC=precision(dtype), ACC=acc_t, **cfg.launch(group_m=False))
            if bwd:
                _wgrad_pp_kernel[(grid,)](*args, *pad4(splits, 1), *rest, **kw)
            else:  # every slot has the largest S
                _wgrad_kernel[(grid,)](*args, splits[0], *rest, **kw)
            for s, (ma, nb), o, S in zip(chunk, shapes, offs, splits):
                part = p1[o:o + S * ma * nb].view(S, ma, nb)
                if a_tok:
                    grads[id(s)][2] = part.sum(0).to(dtype)
                else:
                    grads[id(s)][0] = part.sum(0).to(dtype)
                    grads[id(s)][1] = p2[o:o + S * ma * nb].view(S, ma, nb).sum(0).to(dtype)
    return grads


def ffn_bwd(x: torch.Tensor, dy: torch.Tensor, gate: Optional[torch.Tensor],
            perm: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
            inv: Optional[torch.Tensor], slots: Sequence[Slot], num_paths: int = 1,
            bwd: Optional[bool] = None
            ) -> Tuple[torch.Tensor, List[Tuple[torch.Tensor, ...]], Optional[torch.Tensor]]:
    """Gradients of ``gate * swiglu_route(x)``, h recomputed, for every slot (skip slots,
    width 0, only get zero rows of dx). ``bwd``: the backward switch (None: ``ENV_BWD``,
    from ``DUOLLM_TRITON_BWD``; see the module docstring).

    x, dy (N, d) token order; gate (N,) or None; perm, inv (N,) and offsets (P+1,) from
    ``group_tokens``, or all None for the plain op (one slot owning every row).
    Returns (dx (N, d); per routed slot (dWg, dWu, dWd); dgate (N,) in the accumulation
    dtype, or None).
    """
    if bwd is None:
        bwd = ENV_BWD
    if not isinstance(bwd, bool):
        raise TypeError(f"bwd: expected None or a bool, got {type(bwd).__name__}")
    routed = perm is not None
    routed_slots = [s for s in slots if s.width > 0]
    h, dg, du, lo, dgp = gateup_bwd(x, dy, gate, perm, offsets, routed_slots, num_paths, bwd)
    dx = torch.empty_like(x)
    dx_bwd(dg, du, perm, offsets, list(slots), dx, num_paths, bwd)
    grads = wgrad_bwd(x, dy, h, dg, du, lo, perm, offsets, routed_slots, num_paths, bwd)
    dgate = None
    if gate is not None:
        dgate_rows = dgp.sum(1)  # (N,) grouped rows; rows of skip tokens were never written
        dgate = dgate_rows[inv] if routed else dgate_rows
    return dx, [tuple(grads[id(s)]) for s in routed_slots], dgate
