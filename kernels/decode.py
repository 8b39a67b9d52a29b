"""Decode kernels of the routed layer (N <= ``DECODE_MAX_N`` tokens), behind a switch:
``DUOLLM_TRITON_DECODE=1`` (read once, at import of ``duo_ffn.py``), or
``duo_ffn(..., mode="decode")``. Not the default until a committed GPU measurement shows it
faster (see ``benchmarks/gpu_check.sh``).

At decode sizes the layer is a weight stream: every weight tile of a path with tokens is read
once, the tokens ride along. So the work is laid out over weight tiles, not token tiles:

1. ``_decode_gateup_kernel``: a work list of (slot, weight-row tile) for the slots that have
   tokens only, built on the device by every program from the routes (N <= 64 values:
   cheaper than a grouping launch, and no host sync), walked by a fixed grid of
   ``programs_per_sm`` x #SMs programs. A tile computes h^T = silu(Wg x^T) * (Wu x^T) for ALL
   tokens (BM weight rows on the wide side of the MMA, the tokens on the narrow side, padded
   to 16 for ``tl.dot``) and stores the columns of the tokens routed to its slot into h
   (N, W_max), token order. Grouping is folded in: there is no perm. A path too narrow to
   fill the machine with its weight-row tiles (the paper's small path: 20 tiles) also splits
   the reduction over d; its g and u partials are summed by the last arrival as below, which
   then applies the SiLU product and stores h.
2. ``_decode_down_kernel``: out^T = Wd h^T with the reduction over each slot's width split in
   ``S_s`` chunks (split-K), so a handful of d tiles still fill every SM. Work items are
   (d tile, split) over the active slots' splits; each writes an fp32 partial (the tokens of
   other slots masked to zero) and bumps a per-d-tile counter; the program that arrives last
   sums the partials in split order (a fixed order: deterministic whatever the arrival order)
   and writes out = residual + gate * sum for routed tokens and the residual for every other
   token (skip paths and out-of-range routes), in token order. It then resets the counter, so
   the counters need no clearing between calls (and a CUDA graph can replay it).

Two launches per layer, no host sync, grids fixed for a given N: capturable. The workspaces
(h, partials, counters of both kernels) are cached per (device, stream, shape) and reused:
two launches on the same stream are ordered, so reuse is safe; concurrent use of one layer
shape from two streams gets two workspaces.
"""
from __future__ import annotations

import functools
from typing import Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._common import (MAX_SLOTS, Slot, acc_dtypes, flag_routes, int32_guard, interpreting,
                      next_pow2, num_sms, pad4, pick, precision, routes_widths, slot_of)
from .configs import gemm_config

DECODE_MAX_N = 64

__all__ = ["DECODE_MAX_N", "decode_ok", "duo_ffn_decode"]


# --------------------------------------------------------------------------- jit helpers


@triton.jit
def _has(r, R, tmask):
    """Whether any of the (masked) routes ``r`` equals ``R``."""
    return tl.sum(((r == R) & tmask).to(tl.int32), axis=0) > 0


@triton.jit
def _active_prefix(routes_ptr, N, R0, R1, R2, R3, C0, C1, C2, C3,
                   NSLOT: tl.constexpr, BT: tl.constexpr):
    """Work items of each slot that has tokens (C_s items, 0 when the slot has none), as the
    first item of slots 1..3 and the total; also the routes tile (BT,) and its mask."""
    zero = tl.program_id(0) * 0  # makes ints Triton specialised to constants (== 1) tensors
    t = tl.arange(0, BT)
    tmask = t < N
    # compared in their own dtype: a narrowing cast could wrap a bad route onto a good one
    r = tl.load(routes_ptr + t, mask=tmask, other=0)
    a0 = tl.where(_has(r, R0, tmask), C0 + zero, zero)
    A1 = a0
    A2 = a0
    A3 = a0
    total = a0
    if NSLOT > 1:
        A2 = A1 + tl.where(_has(r, R1, tmask), C1 + zero, zero)
        A3 = A2
        total = A2
    if NSLOT > 2:
        A3 = A2 + tl.where(_has(r, R2, tmask), C2 + zero, zero)
        total = A3
    if NSLOT > 3:
        total = A3 + tl.where(_has(r, R3, tmask), C3 + zero, zero)
    return A1, A2, A3, total, r, tmask


# --------------------------------------------------------------------------- kernels


@triton.jit
def _decode_gateup_kernel(
    x_ptr,       # (N, d) input rows, token order
    routes_ptr,  # (N,) any integer dtype: path per token
    h_ptr,       # (N, stride_h) out: h in token order, columns [0, W_route) of each token
    part_ptr,    # (n_split_tiles, KS_max, 2, BM, BN) fp32 workspace: split-K partials of g, u
    cnt_ptr,     # (n_split_tiles,) int32 workspace: arrivals per split tile, zero between calls
    wg0,         # (W_0, d) gate weight of slot 0
    wu0,         # (W_0, d) up weight of slot 0
    wg1,         # slot 1 (unused when NSLOT < 2), and so on
    wu1,
    wg2,
    wu2,
    wg3,
    wu3,
    N, d, stride_h, KS_max,
    R0, R1, R2, R3,  # route index of each slot
    W0, W1, W2, W3,  # width of each slot (> 0)
    C0, C1, C2, C3,  # work items of each slot: weight-row tiles x K splits
    KS0, KS1, KS2, KS3,  # K splits of each slot (1: no split, h written at once)
    KC0, KC1, KC2, KC3,  # K (= d) columns per split, a multiple of BK
    G0, G1, G2, G3,  # first split-tile counter of each slot
    flag_ptr,    # () int32 error flag (HAS_FLAG): program 0 sets bit 1 for a route
    LO, P,       # outside [LO, P) (P: the layer's paths)
    NSLOT: tl.constexpr,
    HAS_FLAG: tl.constexpr,
    BM: tl.constexpr,  # weight rows per tile (wide side of the MMA)
    BN: tl.constexpr,  # token tile: next_pow2(N), at least 16 (narrow side)
    BK: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    A1, A2, A3, total, r, tmask = _active_prefix(routes_ptr, N, R0, R1, R2, R3,
                                                 C0, C1, C2, C3, NSLOT, BN)
    if HAS_FLAG:  # the routes are in registers already: one masked atomic, program 0 only
        flag_routes(flag_ptr, r, tmask & (pid == 0), LO, P)
    tt = tl.arange(0, BN)
    ks = tl.arange(0, BK)
    tile_off = tl.arange(0, BM)[:, None] * BN + tt[None, :]  # (BM, BN) offsets in a partial
    for t in range(pid, total, tl.num_programs(0)):
        s = slot_of(t, A1, A2, A3, NSLOT)
        local = t - pick(s, 0, A1, A2, A3, NSLOT)
        R = pick(s, R0, R1, R2, R3, NSLOT)
        W = pick(s, W0, W1, W2, W3, NSLOT)
        KS = pick(s, KS0, KS1, KS2, KS3, NSLOT)
        KC = pick(s, KC0, KC1, KC2, KC3, NSLOT)
        wg_ptr = pick(s, wg0, wg1, wg2, wg3, NSLOT)
        wu_ptr = pick(s, wu0, wu1, wu2, wu3, NSLOT)
        tile = local // KS
        q = local % KS
        ws = tile * BM + tl.arange(0, BM)
        wmask = ws < W
        k_lo = q * KC
        k_hi = tl.minimum(k_lo + KC, d)
        acc_g = tl.zeros((BM, BN), dtype=ACC)
        acc_u = tl.zeros((BM, BN), dtype=ACC)
        for k0 in range(k_lo, k_hi, BK):
            k = k0 + ks
            kmask = k < k_hi
            amask = wmask[:, None] & kmask[None, :]
            ag = tl.load(wg_ptr + ws[:, None] * d + k[None, :], mask=amask, other=0.0)  # (BM, BK)
            au = tl.load(wu_ptr + ws[:, None] * d + k[None, :], mask=amask, other=0.0)
            b = tl.load(x_ptr + tt[None, :].to(tl.int64) * d + k[:, None],
                        mask=kmask[:, None] & tmask[None, :], other=0.0)  # (BK, BN) = x^T
            if UPCAST:
                ag = ag.to(ACC)
                au = au.to(ACC)
                b = b.to(ACC)
            acc_g = tl.dot(ag, b, acc_g, input_precision=PREC, out_dtype=ACC)
            acc_u = tl.dot(au, b, acc_u, input_precision=PREC, out_dtype=ACC)
        last = KS == 1
        if KS > 1:
            # Split K (a narrow path alone would leave most SMs idle): partials of g and u,
            # summed in split order by the last arrival (as in _decode_down_kernel).
            gid = pick(s, G0, G1, G2, G3, NSLOT) + tile
            base = (gid * KS_max + q).to(tl.int64) * (2 * BM * BN)
            tl.store(part_ptr + base + tile_off, acc_g)
            tl.store(part_ptr + base + BM * BN + tile_off, acc_u)
            tl.debug_barrier()
            done = tl.atomic_add(cnt_ptr + gid, 1, sem="acq_rel", scope="gpu")
            last = done == KS - 1
            if last:
                tl.debug_barrier()
                acc_g = tl.zeros((BM, BN), dtype=ACC)
                acc_u = tl.zeros((BM, BN), dtype=ACC)
                for qq in range(0, KS):  # fixed order: deterministic
                    pb = (gid * KS_max + qq).to(tl.int64) * (2 * BM * BN)
                    acc_g += tl.load(part_ptr + pb + tile_off, cache_modifier=".cg")
                    acc_u += tl.load(part_ptr + pb + BM * BN + tile_off, cache_modifier=".cg")
                tl.atomic_xchg(cnt_ptr + gid, 0)
        if last:
            hT = acc_g * tl.sigmoid(acc_g) * acc_u  # (BM, BN): h^T of this weight tile
            mine = tmask & (r == R)
            tl.store(h_ptr + tt[None, :].to(tl.int64) * stride_h + ws[:, None],
                     hT.to(h_ptr.dtype.element_ty), mask=wmask[:, None] & mine[None, :])


@triton.jit
def _decode_down_kernel(
    h_ptr,       # (N, stride_h) h from _decode_gateup_kernel, token order
    routes_ptr,  # (N,) any integer dtype: path per token
    out_ptr,     # (N, d) out, token order
    res_ptr,     # (N, d) residual, token order (HAS_RES)
    gate_ptr,    # (N,) per-token scale (HAS_GATE)
    part_ptr,    # (n_dtiles, E_max, BM, BN) fp32 workspace: split-K partials
    cnt_ptr,     # (n_dtiles,) int32 workspace: arrivals per d tile, zero between calls
    wd0,         # (d, W_0) down weight of slot 0
    wd1,         # slot 1 (unused when NSLOT < 2), and so on
    wd2,
    wd3,
    N, d, stride_h, E_max,
    R0, R1, R2, R3,  # route index of each slot
    W0, W1, W2, W3,  # width of each slot (> 0)
    S0, S1, S2, S3,  # K splits of each slot
    K0, K1, K2, K3,  # width per split (a multiple of BK)
    NSLOT: tl.constexpr, HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr,
    BM: tl.constexpr,  # output columns (rows of Wd) per tile
    BN: tl.constexpr,  # token tile
    BK: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    B1, B2, B3, E, r, tmask = _active_prefix(routes_ptr, N, R0, R1, R2, R3,
                                             S0, S1, S2, S3, NSLOT, BN)
    # Tokens of a slot that is routed here; every other token gets the residual.
    routed = (r == R0)
    if NSLOT > 1:
        routed = routed | (r == R1)
    if NSLOT > 2:
        routed = routed | (r == R2)
    if NSLOT > 3:
        routed = routed | (r == R3)
    routed = routed & tmask
    E1 = tl.maximum(E, 1)  # no active slot: one item per d tile, which writes the residual
    n_dt = tl.cdiv(d, BM)
    tt = tl.arange(0, BN)
    ks = tl.arange(0, BK)
    tile = tl.arange(0, BM)[:, None] * BN + tt[None, :]  # (BM, BN) offsets in a partial
    for t in range(pid, n_dt * E1, tl.num_programs(0)):
        j = t // n_dt
        c = t % n_dt
        cols = c * BM + tl.arange(0, BM)
        cmask = cols < d
        acc = tl.zeros((BM, BN), dtype=ACC)
        if E > 0:
            s = slot_of(j, B1, B2, B3, NSLOT)
            q = j - pick(s, 0, B1, B2, B3, NSLOT)
            R = pick(s, R0, R1, R2, R3, NSLOT)
            W = pick(s, W0, W1, W2, W3, NSLOT)
            KS = pick(s, K0, K1, K2, K3, NSLOT)
            wd_ptr = pick(s, wd0, wd1, wd2, wd3, NSLOT)
            mine = tmask & (r == R)
            k_lo = q * KS
            k_hi = tl.minimum(k_lo + KS, W)
            for k0 in range(k_lo, k_hi, BK):
                k = k0 + ks
                kmask = k < k_hi
                a = tl.load(wd_ptr + cols[:, None] * W + k[None, :],
                            mask=cmask[:, None] & kmask[None, :], other=0.0)  # (BM, BK)
                b = tl.load(h_ptr + tt[None, :].to(tl.int64) * stride_h + k[:, None],
                            mask=kmask[:, None] & mine[None, :], other=0.0)  # (BK, BN) = h^T
                if UPCAST:
                    a = a.to(ACC)
                    b = b.to(ACC)
                acc = tl.dot(a, b, acc, input_precision=PREC, out_dtype=ACC)
        base = (c * E_max + j).to(tl.int64) * (BM * BN)
        tl.store(part_ptr + base + tile, acc)
        # Every thread's share of the partial is stored before the count (the barrier), and
        # the count releases them (gpu scope); the last of the E1 arrivals for this d tile
        # reduces, its acquire making every other program's partial visible (read from L2,
        # .cg, never a stale L1 line). The split-K semaphore of CUTLASS's stream-K, minus the
        # waiting: nobody spins, so no program can deadlock on another.
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + c, 1, sem="acq_rel", scope="gpu")
        if done == E1 - 1:
            tl.debug_barrier()
            tot = tl.zeros((BM, BN), dtype=ACC)
            for jj in range(0, E1):  # fixed order: bit-identical sums whoever arrives last
                tot += tl.load(part_ptr + (c * E_max + jj).to(tl.int64) * (BM * BN) + tile,
                               cache_modifier=".cg")
            optrs = tt[None, :].to(tl.int64) * d + cols[:, None]
            omask = cmask[:, None] & tmask[None, :]
            if HAS_GATE:
                g = tl.load(gate_ptr + tt, mask=tmask, other=0.0).to(ACC)
                tot = tot * g[None, :]
            if HAS_RES:
                res = tl.load(res_ptr + optrs, mask=omask, other=0.0).to(ACC)
                tot = tl.where(routed[None, :], res + tot, res)
            else:
                tot = tl.where(routed[None, :], tot, 0.0)
            tl.store(out_ptr + optrs, tot.to(out_ptr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(cnt_ptr + c, 0)


# --------------------------------------------------------------------------- launcher


def decode_ok(n_tokens: int, slots: Sequence[Slot]) -> bool:
    """Whether the decode kernels serve this call: 1..DECODE_MAX_N tokens and 1..MAX_SLOTS
    routed paths (more paths, or none, take the grouped path)."""
    routed = [s for s in slots if s.width > 0]
    return 1 <= n_tokens <= DECODE_MAX_N and 1 <= len(routed) <= MAX_SLOTS


_WORKSPACES: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _workspaces(device: torch.device, dtype: torch.dtype, n_rows: int, w_max: int,
                part_numel: int, n_dt: int):
    """(h (n_rows, w_max), partials, counters) for one layer shape, cached per stream.

    Inside a CUDA-graph capture nothing is cached: the zeroing of fresh counters is then a
    captured memset that runs at every replay, while a cached tensor would hold memory whose
    contents are undefined until the first replay."""
    acc = acc_dtypes(dtype)[1]

    def fresh():
        return (torch.empty((n_rows, w_max), dtype=dtype, device=device),
                torch.empty(part_numel, dtype=acc, device=device),
                torch.zeros(n_dt, dtype=torch.int32, device=device))

    if _capturing(device):
        return fresh()
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (device, stream, dtype, n_rows, w_max, part_numel, n_dt)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = _WORKSPACES[key] = fresh()
    return ws


def _splits(width: int, n_dt: int, bk: int, target: int) -> Tuple[int, int]:
    """(splits, width per split) of a slot's down-projection reduction: enough work items
    over the d tiles for the slot ALONE to fill ``target`` programs (so an all-small batch
    streams the small weights over every SM too), at most one split per BK columns, each
    split a multiple of BK wide and none empty."""
    s = max(1, min(triton.cdiv(target, n_dt), triton.cdiv(width, bk)))
    k = triton.cdiv(triton.cdiv(width, s), bk) * bk
    return triton.cdiv(width, k), k


@functools.lru_cache(maxsize=1024)
def _plan(N: int, d: int, widths: Tuple[int, ...], dtype: torch.dtype, dev: torch.device):
    """Launch metadata of one layer shape, computed once: (token tile, configs, the gate/up
    work list (items, (splits, split width) and first split-tile counter per slot, split
    tiles, most splits), d tiles, down (splits, split width) per slot, partials per d tile,
    grids)."""
    BN = max(16, next_pow2(N))
    cg = gemm_config("decode_gateup", dtype, N, dev, d, max(widths))
    cd = gemm_config("decode_down", dtype, N, dev, d, max(widths))
    sms = num_sms(dev)
    for w in widths:
        int32_guard("weights", w, d)
    tiles = tuple(triton.cdiv(w, cg.BM) for w in widths)
    # gate/up: split d too where a path's weight-row tiles alone cannot fill the machine
    gk = tuple(_splits(d, t, cg.BK, cg.programs_per_sm * sms) for t in tiles)
    g_first, n_gt = [], 0
    for t, (ks_, _) in zip(tiles, gk):
        g_first.append(n_gt)
        n_gt += t if ks_ > 1 else 0
    ks_max = max(ks_ for ks_, _ in gk)
    n_dt = triton.cdiv(d, cd.BM)
    sk = tuple(_splits(w, n_dt, cd.BK, cd.programs_per_sm * sms) for w in widths)
    e_max = sum(s for s, _ in sk)
    items = tuple(t * ks_ for t, (ks_, _) in zip(tiles, gk))
    grid_g = min(sum(items), cg.programs_per_sm * sms)
    grid_d = min(n_dt * e_max, cd.programs_per_sm * sms)
    gate_up = (items, gk, tuple(g_first), max(n_gt, 1), ks_max)
    return BN, cg, cd, gate_up, n_dt, sk, e_max, grid_g, grid_d


def duo_ffn_decode(x: torch.Tensor, routes: torch.Tensor, slots: Sequence[Slot],
                   residual: Optional[torch.Tensor], gate: Optional[torch.Tensor],
                   flag: Optional[torch.Tensor] = None, lo: int = 0,
                   num_paths: Optional[int] = None) -> torch.Tensor:
    """The routed layer for N <= DECODE_MAX_N tokens: two launches, no grouping.

    x (N, d) contiguous; routes (N,) any integer dtype (values matching no routed slot, skip
    paths and out-of-range ones alike, get the residual); slots: the routed paths
    (``decode_ok``); residual (N, d) or None; gate (N,) or None; flag: an int32 0-d error
    flag whose bit 1 is set if a route lies outside ``[lo, num_paths)`` (``num_paths``
    default: one past the last slot's route), or None. Returns (N, d)."""
    N, d = x.shape
    dev, dtype = x.device, x.dtype
    routed = [s for s in slots if s.width > 0]
    plan = _plan(N, d, tuple(s.width for s in routed), dtype, dev)
    BN, cg, cd, (items, gk, g_first, n_gt, ks_max), n_dt, sk, e_max, grid_g, grid_d = plan
    # sized by the token tile BN (16, 32 or 64), not N: a few workspaces serve every N
    h, part, cnt = _workspaces(dev, dtype, BN, max(s.width for s in routed),
                               n_dt * e_max * cd.BM * BN, n_dt)
    gpart, gcnt = _workspaces(dev, dtype, 0, 0, n_gt * ks_max * 2 * cg.BM * BN, n_gt)[1:]
    out = torch.empty_like(x)
    routes_t, widths = routes_widths(routed)
    dummy = x
    common = dict(NSLOT=len(routed), UPCAST=interpreting(), PREC=precision(dtype),
                  ACC=acc_dtypes(dtype)[0])

    ptrs = []
    for s in pad4(routed, None):
        ptrs += [dummy, dummy] if s is None else [s.w_gate, s.w_up]
    _decode_gateup_kernel[(grid_g,)](
        x, routes, h, gpart, gcnt, *ptrs, N, d, h.stride(0), ks_max, *routes_t, *widths,
        *pad4(items, 0), *pad4([k for k, _ in gk], 1), *pad4([c for _, c in gk], 0),
        *pad4(g_first, 0), flag if flag is not None else cnt, lo,
        num_paths if num_paths is not None else max(s.route for s in slots) + 1,
        HAS_FLAG=flag is not None, BM=cg.BM, BN=BN, BK=cg.BK, num_warps=cg.num_warps,
        num_stages=cg.num_stages, **common)

    wd = [s.w_down for s in routed]
    _decode_down_kernel[(grid_d,)](
        h, routes, out, residual if residual is not None else dummy,
        gate if gate is not None else dummy, part, cnt, *pad4(wd, dummy),
        N, d, h.stride(0), e_max, *routes_t, *widths, *pad4([s for s, _ in sk], 0),
        *pad4([k for _, k in sk], 0), HAS_RES=residual is not None,
        HAS_GATE=gate is not None, BM=cd.BM, BN=BN, BK=cd.BK, num_warps=cd.num_warps,
        num_stages=cd.num_stages, **common)
    return out
