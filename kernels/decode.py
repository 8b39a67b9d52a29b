"""Decode kernels of the routed layer (N <= ``DECODE_MAX_N`` tokens), behind a switch:
``DUOLLM_TRITON_DECODE=1`` (read once, at import of ``duo_ffn.py``), or
``duo_ffn(..., mode="decode")``. Not the default until a committed GPU measurement shows it
faster (see ``benchmarks/gpu_check.sh``).

At decode sizes the layer is a weight stream: every weight tile of a path with tokens is read
once, the tokens ride along. So the work is laid out over weight tiles, not token tiles:

Both kernels walk a work list of EQUAL items, chosen per set of paths that have tokens (the
active mask, found on the device from the routes: N <= 64 values, cheaper than a grouping
launch, no host sync) from a small per-mask table made on the host (``work_plan``): at least
``MIN_ITEMS_PER_SM`` items per SM where the weights allow, every item the same bytes. A fixed
grid of ``programs_per_sm`` x #SMs programs (fewer per SM where the config's shared memory
does not fit) walks them; program p takes items p, p + used, ... where ``used`` is the fewest
programs that still take ceil(items / grid) each, so every working program reads the same
bytes within one item (``tests/test_decode_work.py`` checks this at the paper's layer).

1. ``_decode_gateup_kernel``: an item is (slot, weight-row tile of BM rows, one of KS equal
   pieces of d), KS the same for every active path. It computes the piece of
   h^T = silu(Wg x^T) * (Wu x^T) for ALL tokens (BM weight rows on the wide side of the MMA,
   the tokens on the narrow side, padded to 16 for ``tl.dot``). With KS = 1 it stores the
   columns of the tokens routed to its slot into h (N, W_max), token order: grouping is
   folded in, there is no perm. With KS > 1 it writes its g and u partials; the last arrival
   at the row tile sums them (below), applies the SiLU product and stores h.
2. ``_decode_down_kernel``: out^T = Wd h^T, an item is (d tile, one piece of K columns of a
   slot's width), K the same for every active path. Each writes an fp32 partial (the tokens of
   other slots masked to zero) and bumps a per-d-tile counter; the program that arrives last
   sums the partials and writes out = residual + gate * sum for routed tokens and the
   residual for every other token (skip paths and out-of-range routes), in token order.

The last arrival sums partials in a fixed order (deterministic whatever the arrival order),
CH of them loaded as one block and reduced with ``tl.sum`` (few dependent loads), then resets
its counter, so the counters need no clearing between calls and a CUDA graph can replay them.

Two launches per layer, no host sync, grids fixed for a given N: capturable. The workspaces
(h, partials) are cached per (device, stream, shape) and reused: two launches on the same
stream are ordered, so reuse is safe; concurrent use of one layer shape from two streams gets
two workspaces. The counters are allocated once, outside any capture (``_counters``): a
replayed graph runs no memset. The per-mask table is made by the first call of a shape, which
must come before any capture of it (a graph's warm-up).
"""
from __future__ import annotations

import functools
import math
from typing import Dict, List, Optional, Sequence, Tuple

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
def _active_mask(routes_ptr, N, R0, R1, R2, R3, NSLOT: tl.constexpr, BT: tl.constexpr):
    """Bit s set for each slot s that has tokens; also the routes tile (BT,) and its mask."""
    t = tl.arange(0, BT)
    tmask = t < N
    # compared in their own dtype: a narrowing cast could wrap a bad route onto a good one
    r = tl.load(routes_ptr + t, mask=tmask, other=0)
    m = _has(r, R0, tmask).to(tl.int32)
    if NSLOT > 1:
        m += _has(r, R1, tmask).to(tl.int32) * 2
    if NSLOT > 2:
        m += _has(r, R2, tmask).to(tl.int32) * 4
    if NSLOT > 3:
        m += _has(r, R3, tmask).to(tl.int32) * 8
    return m, r, tmask


@triton.jit
def _prefix(m, C0, C1, C2, C3, NSLOT: tl.constexpr):
    """Work items of each slot in mask ``m`` (C_s items, none for a slot without tokens), as
    the first item of slots 1..3 and the total."""
    zero = m * 0  # makes ints Triton specialised to constants (== 1) tensors
    a0 = tl.where((m & 1) != 0, C0 + zero, zero)
    A1 = a0
    A2 = a0
    A3 = a0
    total = a0
    if NSLOT > 1:
        A2 = A1 + tl.where((m & 2) != 0, C1 + zero, zero)
        A3 = A2
        total = A2
    if NSLOT > 2:
        A3 = A2 + tl.where((m & 4) != 0, C2 + zero, zero)
        total = A3
    if NSLOT > 3:
        total = A3 + tl.where((m & 8) != 0, C3 + zero, zero)
    return A1, A2, A3, total


@triton.jit
def _share(total):
    """(first item, stride) of this program over ``total`` equal items: the fewest programs
    that still take ceil(total / grid) items each, so every working program streams the
    same bytes (within one item); the others take none."""
    pid = tl.program_id(0)
    per = tl.maximum(tl.cdiv(total, tl.num_programs(0)), 1)
    used = tl.maximum(tl.cdiv(total, per), 1)
    return tl.where(pid < used, pid, total), used


@triton.jit
def _sum_partials(ptr, row, count, tile, CH: tl.constexpr, TILE: tl.constexpr, ACC):
    """Sum of ``count`` partial tiles at rows ``row``, ``row + 1``, ... (``TILE`` elements
    apart; ``tile``: the (BM, BN) offsets in one), CH partials loaded as one block and reduced
    with ``tl.sum``: few dependent loads, a fixed order (deterministic)."""
    j = tl.arange(0, CH)
    tot = tl.zeros(tile.shape, dtype=ACC)
    for j0 in range(0, count, CH):
        rows = (row + j0 + j).to(tl.int64) * TILE
        blk = tl.load(ptr + rows[:, None, None] + tile[None, :, :],
                      mask=(j0 + j < count)[:, None, None], other=0.0, cache_modifier=".cg")
        tot += tl.sum(blk, axis=0)
    return tot


# --------------------------------------------------------------------------- kernels


@triton.jit
def _decode_gateup_kernel(
    x_ptr,       # (N, d) input rows, token order
    routes_ptr,  # (N,) any integer dtype: path per token
    h_ptr,       # (N, stride_h) out: h in token order, columns [0, W_route) of each token
    part_ptr,    # fp32 workspace: split-K partials of g and u, (2, KSM_s, BM, BN) per row tile
    cnt_ptr,     # (n_tiles,) int32 workspace: arrivals per row tile, zero between calls
    plan_ptr,    # (2**NSLOT, 3) int32: per active-slot mask (KS, KC, down split width)
    wg0,         # (W_0, d) gate weight of slot 0
    wu0,         # (W_0, d) up weight of slot 0
    wg1,         # slot 1 (unused when NSLOT < 2), and so on
    wu1,
    wg2,
    wu2,
    wg3,
    wu3,
    N, d, stride_h,
    R0, R1, R2, R3,  # route index of each slot
    W0, W1, W2, W3,  # width of each slot (> 0)
    C0, C1, C2, C3,  # weight-row tiles of each slot
    G0, G1, G2, G3,  # first row tile (counter) of each slot
    PB0, PB1, PB2, PB3,  # first partial tile of each slot
    KSM0, KSM1, KSM2, KSM3,  # most splits of each slot (any mask)
    flag_ptr,    # () int32 error flag (HAS_FLAG): program 0 sets bit 1 for a route
    LO, P,       # outside [LO, P) (P: the layer's paths)
    NSLOT: tl.constexpr,
    HAS_FLAG: tl.constexpr,
    BM: tl.constexpr,  # weight rows per tile (wide side of the MMA)
    BN: tl.constexpr,  # token tile: next_pow2(N), at least 16 (narrow side)
    BK: tl.constexpr,
    CH: tl.constexpr,  # partials summed per block load by the last arrival
    UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    m, r, tmask = _active_mask(routes_ptr, N, R0, R1, R2, R3, NSLOT, BN)
    # every active path's row tiles split alike over d (KS splits of KC columns): equal items
    KS = tl.load(plan_ptr + m * 3)
    KC = tl.multiple_of(tl.load(plan_ptr + m * 3 + 1), 16)  # a multiple of BK (>= 16)
    A1, A2, A3, total = _prefix(m, C0 * KS, C1 * KS, C2 * KS, C3 * KS, NSLOT)
    first, step = _share(total)
    if HAS_FLAG:  # the routes are in registers already: one masked atomic, program 0 only
        flag_routes(flag_ptr, r, tmask & (pid == 0), LO, P)
    tt = tl.arange(0, BN)
    ks = tl.arange(0, BK)
    tile_off = tl.arange(0, BM)[:, None] * BN + tt[None, :]  # (BM, BN) offsets in a partial
    for t in range(first, total, step):
        s = slot_of(t, A1, A2, A3, NSLOT)
        local = t - pick(s, 0, A1, A2, A3, NSLOT)
        R = pick(s, R0, R1, R2, R3, NSLOT)
        W = pick(s, W0, W1, W2, W3, NSLOT)
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
            # Split K (enough equal items to keep every SM streaming): partials of g and u,
            # summed in split order by the last arrival (as in _decode_down_kernel).
            gid = pick(s, G0, G1, G2, G3, NSLOT) + tile
            ksm = pick(s, KSM0, KSM1, KSM2, KSM3, NSLOT)
            prow = pick(s, PB0, PB1, PB2, PB3, NSLOT) + tile * 2 * ksm
            base = (prow + q).to(tl.int64) * (BM * BN)
            tl.store(part_ptr + base + tile_off, acc_g)
            tl.store(part_ptr + base + ksm * BM * BN + tile_off, acc_u)
            tl.debug_barrier()
            done = tl.atomic_add(cnt_ptr + gid, 1, sem="acq_rel", scope="gpu")
            last = done == KS - 1
            if last:
                tl.debug_barrier()
                acc_g = _sum_partials(part_ptr, prow, KS, tile_off, CH, BM * BN, ACC)
                acc_u = _sum_partials(part_ptr, prow + ksm, KS, tile_off, CH, BM * BN, ACC)
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
    plan_ptr,    # (2**NSLOT, 3) int32: per active-slot mask (KS, KC, split width K)
    wd0,         # (d, W_0) down weight of slot 0
    wd1,         # slot 1 (unused when NSLOT < 2), and so on
    wd2,
    wd3,
    N, d, stride_h, E_max,
    R0, R1, R2, R3,  # route index of each slot
    W0, W1, W2, W3,  # width of each slot (> 0)
    NSLOT: tl.constexpr, HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr,
    BM: tl.constexpr,  # output columns (rows of Wd) per tile
    BN: tl.constexpr,  # token tile
    BK: tl.constexpr,
    CH: tl.constexpr,  # partials summed per block load by the last arrival
    UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    m, r, tmask = _active_mask(routes_ptr, N, R0, R1, R2, R3, NSLOT, BN)
    # every active path's reduction split in pieces of the same width K: equal items
    KS = tl.multiple_of(tl.load(plan_ptr + m * 3 + 2), 16)  # a multiple of BK (>= 16)
    B1, B2, B3, E = _prefix(m, tl.cdiv(W0, KS), tl.cdiv(W1, KS), tl.cdiv(W2, KS),
                            tl.cdiv(W3, KS), NSLOT)
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
    first, step = _share(n_dt * E1)
    for t in range(first, n_dt * E1, step):
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
            # fixed order: bit-identical sums whoever arrives last
            tot = _sum_partials(part_ptr, c * E_max, E1, tile, CH, BM * BN, ACC)
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


_WORKSPACES: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
_COUNTERS: Dict[Tuple, torch.Tensor] = {}
_TABLES: Dict[Tuple, torch.Tensor] = {}
SMEM_PER_SM_SM90 = 228 * 1024  # shared memory per SM of an H100/H200 (1 KB of it per block)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _stream_key(device: torch.device):
    return torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0


def _workspaces(device: torch.device, dtype: torch.dtype, n_rows: int, w_max: int,
                part_numel: int):
    """(h (n_rows, w_max), partials) for one layer shape, cached per stream; inside a
    CUDA-graph capture fresh ones from the graph's pool (written before read: no memset)."""
    acc = acc_dtypes(dtype)[1]

    def fresh():
        return (torch.empty((n_rows, w_max), dtype=dtype, device=device),
                torch.empty(part_numel, dtype=acc, device=device))

    if _capturing(device):
        return fresh()
    key = (device, _stream_key(device), dtype, n_rows, w_max, part_numel)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = _WORKSPACES[key] = fresh()
    return ws


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """(n,) int32 arrival counters, zero between calls (the last arrival resets its own).

    Allocated once, outside any capture, and kept: one set per stream for eager calls and
    one per device for captured graphs, made by the first eager call (a graph's warm-up), so
    a replayed graph runs no memset. Only a capture with no eager call before it on this
    device zeroes fresh counters inside the graph (a memset per replay). Two graphs holding
    decode layers must not be replayed concurrently on different streams."""
    capturing = _capturing(device)
    key = (device, "graph" if capturing else _stream_key(device), n)
    cnt = _COUNTERS.get(key)
    if cnt is None:
        cnt = torch.zeros(n, dtype=torch.int32, device=device)
        if capturing:
            return cnt
        _COUNTERS[key] = cnt
        gkey = (device, "graph", n)
        if gkey not in _COUNTERS:
            _COUNTERS[gkey] = torch.zeros(n, dtype=torch.int32, device=device)
    return cnt


def smem_bytes(kind: str, cfg, BN: int, elem: int) -> int:
    """Shared memory one decode program stages: ``num_stages`` buffers of its weight tiles
    (two for gate/up) and its (BK, BN) token tile."""
    mats = 2 if kind == "decode_gateup" else 1
    return cfg.num_stages * (mats * cfg.BM * cfg.BK + cfg.BK * BN) * elem


def programs_per_sm(kind: str, cfg, BN: int, elem: int, smem_per_sm: int) -> int:
    """Programs per SM of a decode grid: the config's ``programs_per_sm`` at most, fewer
    where their shared memory does not fit one SM together (each block also reserves 1 KB)."""
    fit = smem_per_sm // (smem_bytes(kind, cfg, BN, elem) + 1024)
    return max(1, min(cfg.programs_per_sm, fit))


def _divisors(n: int) -> List[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def work_plan(N: int, d: int, widths: Tuple[int, ...], cg, cd, sms: int, elem: int,
              smem_per_sm: int) -> dict:
    """The decode work lists of one layer shape for every set of paths that can have tokens
    (an active mask: bit s for slot s), made so that every item of a launch carries the same
    bytes and there are at least ``MIN_ITEMS_PER_SM`` per SM where the weights allow:

    * gate/up: an item is (row tile of BM rows, one of KS equal pieces of d); KS(mask) is the
      smallest divisor of d's BK steps that gives the active paths' row tiles that many items;
    * down: an item is (d tile of BM columns, one piece of K columns of a path's width), K the
      same for every active path, the widest multiple of BK dividing every active width that
      gives that many items.

    A program walks items ``first, first + used, ...`` (``_share``): the programs used all
    take ceil(items / grid) items but at most one. Returns the grids, tiles, per-mask table
    rows (KS, KC, K) and workspace sizes."""
    BN = max(16, next_pow2(N))
    pg = programs_per_sm("decode_gateup", cg, BN, elem, smem_per_sm)
    pd = programs_per_sm("decode_down", cd, BN, elem, smem_per_sm)
    want = MIN_ITEMS_PER_SM * sms
    tiles = tuple(triton.cdiv(w, cg.BM) for w in widths)
    steps = triton.cdiv(d, cg.BK)
    n_dt = triton.cdiv(d, cd.BM)
    table = [(1, steps * cg.BK, cd.BK)]  # mask 0: no path has tokens (residual only)
    for m in range(1, 1 << len(widths)):
        act = [i for i in range(len(widths)) if m >> i & 1]
        rows = sum(tiles[i] for i in act)
        ks = next((k for k in _divisors(steps) if rows * k >= want), steps)
        g = 0
        for i in act:
            g = math.gcd(g, widths[i])
        ks_d = [k for k in range(cd.BK, g + 1, cd.BK) if g % k == 0] or [cd.BK]
        fits = [k for k in ks_d if n_dt * sum(triton.cdiv(widths[i], k) for i in act) >= want]
        table.append((ks, steps // ks * cg.BK, max(fits) if fits else min(ks_d)))
    # partial tiles: 2 (g, u) x the most splits a slot gets in any mask, per row tile
    ksm = tuple(max(r[0] for m, r in enumerate(table) if m >> i & 1)
                for i in range(len(widths)))
    pb, acc = [], 0
    for t, k in zip(tiles, ksm):
        pb.append(acc)
        acc += t * 2 * k
    n_part_g = max(acc, 1)
    e_max = max(sum(triton.cdiv(w, r[2]) for w, b in zip(widths, range(len(widths)))
                    if m >> b & 1) for m, r in enumerate(table))
    first, acc = [], 0
    for t in tiles:
        first.append(acc)
        acc += t
    return dict(BN=BN, tiles=tiles, first=tuple(first), n_tiles=max(acc, 1), ksm=ksm,
                part_first=tuple(pb), n_part_g=n_part_g,
                n_dt=n_dt, e_max=max(e_max, 1), table=tuple(table),
                grid_g=pg * sms, grid_d=pd * sms,
                ch_g=max(1, min(8, 4096 // (cg.BM * BN))),
                ch_d=max(1, min(8, 4096 // (cd.BM * BN))))


def work_items(plan: dict, widths: Tuple[int, ...], d: int, cg, cd, mask: int, N: int,
               elem: int = 2):
    """(gate/up, down) lists of the bytes each program of the grid reads for the active
    ``mask``, as the kernels walk their items (weights and the token tile of each item):
    what ``tests/test_decode_work.py`` checks for balance."""
    ks, kc, k = plan["table"][mask]
    act = [i for i in range(len(widths)) if mask >> i & 1]
    g_items = [2 * min(cg.BM, widths[i] - r * cg.BM) * min(kc, d - q * kc) * elem
               + N * min(kc, d - q * kc) * elem
               for i in act for r in range(plan["tiles"][i]) for q in range(ks)]
    d_items = [min(cd.BM, d - c * cd.BM) * min(k, widths[i] - q * k) * elem
               + N * min(k, widths[i] - q * k) * elem
               for i in act for q in range(triton.cdiv(widths[i], k))
               for c in range(plan["n_dt"])]

    def share(items, grid):
        per = max(-(-len(items) // grid), 1)
        used = max(-(-len(items) // per), 1)
        return [sum(items[p::used]) for p in range(used)]

    return share(g_items, plan["grid_g"]), share(d_items, plan["grid_d"])


MIN_ITEMS_PER_SM = 4


@functools.lru_cache(maxsize=1024)
def _plan(N: int, d: int, widths: Tuple[int, ...], dtype: torch.dtype, dev: torch.device):
    """Configs and ``work_plan`` of one layer shape on ``dev``, computed once."""
    cg = gemm_config("decode_gateup", dtype, N, dev, d, max(widths))
    cd = gemm_config("decode_down", dtype, N, dev, d, max(widths))
    for w in widths:
        int32_guard("weights", w, d)
    smem = (torch.cuda.get_device_properties(dev).shared_memory_per_multiprocessor
            if dev.type == "cuda" and not interpreting() else 1 << 30)
    elem = torch.empty(0, dtype=dtype).element_size()
    return cg, cd, work_plan(N, d, widths, cg, cd, num_sms(dev), elem, smem)


def _table(dev: torch.device, table: Tuple[Tuple[int, int, int], ...]) -> torch.Tensor:
    """The per-mask table on ``dev``, made once outside any capture (a host copy inside one
    is not allowed)."""
    key = (dev, table)
    t = _TABLES.get(key)
    if t is None:
        if _capturing(dev):
            raise RuntimeError("duo_ffn decode path: run this layer shape once outside the "
                               "CUDA-graph capture first (its work table is made then)")
        t = _TABLES[key] = torch.tensor(table, dtype=torch.int32, device=dev)
    return t


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
    cg, cd, plan = _plan(N, d, tuple(s.width for s in routed), dtype, dev)
    BN, n_dt, e_max = plan["BN"], plan["n_dt"], plan["e_max"]
    table = _table(dev, plan["table"])
    # sized by the token tile BN (16, 32 or 64), not N: a few workspaces serve every N
    h, part = _workspaces(dev, dtype, BN, max(s.width for s in routed),
                          n_dt * e_max * cd.BM * BN)
    gpart = _workspaces(dev, dtype, 0, 0, plan["n_part_g"] * cg.BM * BN)[1]
    counters = _counters(dev, n_dt + plan["n_tiles"])
    cnt, gcnt = counters[:n_dt], counters[n_dt:]
    out = torch.empty_like(x)
    routes_t, widths = routes_widths(routed)
    dummy = x
    common = dict(NSLOT=len(routed), UPCAST=interpreting(), PREC=precision(dtype),
                  ACC=acc_dtypes(dtype)[0])

    ptrs = []
    for s in pad4(routed, None):
        ptrs += [dummy, dummy] if s is None else [s.w_gate, s.w_up]
    _decode_gateup_kernel[(plan["grid_g"],)](
        x, routes, h, gpart, gcnt, table, *ptrs, N, d, h.stride(0), *routes_t,
        *widths, *pad4(plan["tiles"], 0), *pad4(plan["first"], 0),
        *pad4(plan["part_first"], 0), *pad4(plan["ksm"], 1),
        flag if flag is not None else cnt, lo,
        num_paths if num_paths is not None else max(s.route for s in slots) + 1,
        HAS_FLAG=flag is not None, BM=cg.BM, BN=BN, BK=cg.BK, CH=plan["ch_g"],
        num_warps=cg.num_warps, num_stages=cg.num_stages, **common)

    wd = [s.w_down for s in routed]
    _decode_down_kernel[(plan["grid_d"],)](
        h, routes, out, residual if residual is not None else dummy,
        gate if gate is not None else dummy, part, cnt, table, *pad4(wd, dummy),
        N, d, h.stride(0), e_max, *routes_t, *widths, HAS_RES=residual is not None,
        HAS_GATE=gate is not None, BM=cd.BM, BN=BN, BK=cd.BK, CH=plan["ch_d"],
        num_warps=cd.num_warps, num_stages=cd.num_stages, **common)
    return out
