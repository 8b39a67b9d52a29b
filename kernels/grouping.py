"""``group_tokens``: a stable counting sort of token ids by route, on the device, with no
host synchronisation (the result's sizes are known from the input's shape alone).

Three passes over N tokens in blocks of ``BLOCK_N`` and P paths (padded to ``P_PAD``):

1. ``_group_hist_kernel`` (grid = blocks): each block's token count per path.
2. ``_group_scan_kernel`` (one program): the exclusive scan over blocks, per path, giving
   each block its first slot inside every path, plus ``counts`` and ``offsets``.
3. ``_group_scatter_kernel`` (grid = blocks): a token's slot is
   ``offsets[p] + (earlier blocks' tokens on p) + (earlier tokens of its block on p)``, the last
   term a cumsum over the block's one-hot route matrix, which keeps the sort stable. It writes
   ``inv[t]`` and ``perm[slot]`` (a permutation, so no two tokens share a slot) and the int64
   routes.

When all tokens fit one block (up to 4096 tokens for P = 3: decode, small batches) pass 3
alone does everything: one launch. With ``one_launch`` (the persistent layer path) pass 3
alone serves up to ``ONE_LAUNCH_BLOCKS`` blocks (65536 tokens for P = 3): every program
histograms all N routes itself, trading N extra reads per program (from L2) for two launches.
Bytes moved per token: the route read twice (once with one block), 24 written (perm, inv and
the int64 routes); plus 12 * P_PAD bytes per block for the histogram and scan.

Routes outside ``[0, P)`` (possible when ``duollm.ops`` cannot validate them, e.g. under
CUDA-graph capture) go to an extra bucket ``P`` after all real paths: they count in no path,
occupy ``perm[offsets[P]:]``, and perm/inv stay a full permutation, so every later kernel
indexing by them stays in bounds.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from duollm.reference import RouteGroups

from ._common import custom_op, flag_routes, interpreting, next_pow2

MAX_PATHS = 63  # paths are also encoded as bits of an int64 skip mask (see permute.py)
ONE_LAUNCH_BLOCKS = 16  # one_launch: at most this many programs, each reading all N routes


@triton.jit
def _route_bucket(r, P, BAD):
    """Bucket of each route value: the route itself when in [0, P), else bucket ``BAD`` (the
    overflow bucket P, or a skip path the caller names)."""
    valid = (r >= 0) & (r < P)
    return tl.where(valid, r, BAD).to(tl.int32)


@triton.jit
def _group_hist_kernel(
    routes_ptr,  # (N,) any integer dtype: path per token
    hist_ptr,  # (num_blocks, P_PAD) int32 out: tokens per bucket in each block
    N,
    P,
    BAD,  # bucket of out-of-range routes
    BLOCK_N: tl.constexpr,
    P_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    bucket = _route_bucket(tl.load(routes_ptr + offs, mask=mask, other=0), P, BAD)
    cols = tl.arange(0, P_PAD)
    onehot = ((bucket[:, None] == cols[None, :]) & mask[:, None]).to(tl.int32)
    tl.store(hist_ptr + pid * P_PAD + cols, tl.sum(onehot, axis=0))


@triton.jit
def _store_counts_offsets(
    total,  # (P_PAD,) int64: tokens per bucket
    counts_ptr,  # (P,) int64 out
    offsets_ptr,  # (P+1,) int64 out
    P,
    P_PAD: tl.constexpr,
):
    cols = tl.arange(0, P_PAD)
    start = tl.cumsum(total, axis=0) - total
    tl.store(counts_ptr + cols, total, mask=cols < P)
    # offsets[P] is the start of the overflow bucket: the number of routed tokens.
    tl.store(offsets_ptr + cols, start, mask=cols <= P)
    return start


@triton.jit
def _group_scan_kernel(
    hist_ptr,  # (num_blocks, P_PAD) int32: tokens per bucket in each block
    base_ptr,  # (num_blocks, P_PAD) int64 out: tokens of the same bucket in earlier blocks
    counts_ptr,  # (P,) int64 out
    offsets_ptr,  # (P+1,) int64 out
    num_blocks,
    P,
    BLOCK_B: tl.constexpr,
    P_PAD: tl.constexpr,
):
    cols = tl.arange(0, P_PAD)
    carry = tl.zeros((P_PAD,), dtype=tl.int64)
    for b0 in range(0, num_blocks, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        mask = blocks[:, None] < num_blocks
        idx = blocks[:, None] * P_PAD + cols[None, :]
        h = tl.load(hist_ptr + idx, mask=mask, other=0).to(tl.int64)
        tl.store(base_ptr + idx, tl.cumsum(h, axis=0) - h + carry[None, :], mask=mask)
        carry += tl.sum(h, axis=0)
    _store_counts_offsets(carry, counts_ptr, offsets_ptr, P, P_PAD)


@triton.jit
def _group_scatter_kernel(
    routes_ptr,  # (N,) any integer dtype: path per token
    base_ptr,  # (num_blocks, P_PAD) int64: first slot of each block inside each bucket
    offsets_ptr,  # (P+1,) int64: first slot of each bucket (written here if MODE != 1)
    counts_ptr,  # (P,) int64 out if MODE != 1
    perm_ptr,  # (N,) int64 out: token id at each slot
    inv_ptr,  # (N,) int64 out (WRITE_INV): slot of each token
    routes64_ptr,  # (N,) int64 out (WRITE_ROUTES): the routes, widened
    flag_ptr,  # () int32 error flag (HAS_FLAG): bit 1 set if a route is outside [LO, P)
    N,
    P,
    BAD,  # bucket of out-of-range routes
    LO,  # lowest valid route (HAS_FLAG)
    num_blocks,
    BLOCK_N: tl.constexpr,
    P_PAD: tl.constexpr,
    MODE: tl.constexpr,  # 0: one block; 1: after hist + scan; 2: each program scans itself
    WRITE_INV: tl.constexpr,
    WRITE_ROUTES: tl.constexpr,
    HAS_FLAG: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    r = tl.load(routes_ptr + offs, mask=mask, other=0)
    if HAS_FLAG:
        flag_routes(flag_ptr, r, mask, LO, P)
    if WRITE_ROUTES:
        tl.store(routes64_ptr + offs, r.to(tl.int64), mask=mask)
    cols = tl.arange(0, P_PAD)
    onehot = (_route_bucket(r, P, BAD)[:, None] == cols[None, :]) & mask[:, None]
    oh = onehot.to(tl.int32)
    # Rank among the block's earlier tokens of the same bucket: what makes the sort stable.
    rank = tl.sum(tl.where(onehot, tl.cumsum(oh, axis=0) - oh, 0), axis=1)
    if MODE == 0:
        start = _store_counts_offsets(tl.sum(oh, axis=0).to(tl.int64), counts_ptr,
                                      offsets_ptr, P, P_PAD)
    elif MODE == 1:
        start = (tl.load(offsets_ptr + cols, mask=cols <= P, other=0)
                 + tl.load(base_ptr + pid * P_PAD + cols))
    else:
        # One launch for any block count: every program histograms all N routes itself
        # (N reads per program, from L2), so no second pass waits for a scan; used up to
        # a few blocks, where that costs less than two more launches.
        total = tl.zeros((P_PAD,), dtype=tl.int64)
        before = tl.zeros((P_PAD,), dtype=tl.int64)
        for b in range(0, num_blocks):
            o = b * BLOCK_N + tl.arange(0, BLOCK_N)
            m = o < N
            rb = tl.load(routes_ptr + o, mask=m, other=0)
            hb = tl.sum(((_route_bucket(rb, P, BAD)[:, None] == cols[None, :])
                         & m[:, None]).to(tl.int64), axis=0)
            total += hb
            before += tl.where(b < pid, hb, 0)
        first = tl.cumsum(total, axis=0) - total
        if pid == 0:
            _store_counts_offsets(total, counts_ptr, offsets_ptr, P, P_PAD)
        start = first + before
    # Every valid token has exactly one bucket in [0, P], so slot lies in [0, N), N < 2**31
    # (int32 keeps the tile's registers down).
    slot = tl.sum(tl.where(onehot, start.to(tl.int32)[None, :], 0), axis=1) + rank
    if WRITE_INV:
        tl.store(inv_ptr + offs, slot.to(tl.int64), mask=mask)
    tl.store(perm_ptr + slot, offs.to(tl.int64), mask=mask)


def _group_config(n: int, num_paths: int, block_n: Optional[int] = None):
    """Knobs. Up to 16384 one-hot elements (4096 tokens for Duo's P = 3) one program does
    everything in one launch (decode and small batches are latency-bound); beyond, blocks of
    4096 elements on a GPU (the interpreter prefers fewer, bigger programs)."""
    p_pad = next_pow2(num_paths + 1)
    single_tile, tile = 1 << 14, (1 << 14 if interpreting() else 1 << 12)
    if block_n is None:
        fits = next_pow2(n) * p_pad <= single_tile
        block_n = max(16, next_pow2(n) if fits else tile // p_pad)
    num_blocks = triton.cdiv(n, block_n)
    block_b = max(2, min(next_pow2(num_blocks), tile // p_pad))
    return dict(BLOCK_N=block_n, P_PAD=p_pad, BLOCK_B=block_b, num_blocks=num_blocks,
                num_warps=max(2, min(16, block_n * p_pad // 1024)))


def group_tokens_fwd(routes: torch.Tensor, num_paths: int, block_n: Optional[int] = None,
                     bad_bucket: Optional[int] = None, write_inv: bool = True,
                     write_routes: bool = True, one_launch: bool = False,
                     flag: Optional[torch.Tensor] = None, lo: int = 0
                     ) -> Tuple[torch.Tensor, ...]:
    """Launch the grouping kernels.

    Args:
      routes: (...) any integer dtype, flattened; values outside ``[0, num_paths)`` are put
        after all paths (see the module docstring), or into path ``bad_bucket``.
      num_paths: P, 1 <= P <= MAX_PATHS.
      block_n: tokens per program (a power of two); None picks it (tests pass small blocks
        to exercise the multi-block scan).
      bad_bucket: where out-of-range routes go: None for the overflow bucket P, else a path
        index (the routed layer names a skip path, whose tokens get the residual too); the
        counts then include those tokens.
      write_inv, write_routes: False leaves ``inv`` / ``routes_N`` unwritten (the forward of
        the routed layer reads neither).
      one_launch: group any N (up to ``ONE_LAUNCH_BLOCKS`` blocks) in one launch, each
        program scanning all routes itself, instead of three launches.
      flag: an int32 0-d tensor (a ``duollm.checks.RouteErrors`` flag) whose bit 1 the
        scatter pass sets where a route lies outside ``[lo, num_paths)``, or None.
    Returns: (perm, inv, counts, offsets, routes_N), all int64, as in ``RouteGroups``.
    """
    if not 1 <= num_paths <= MAX_PATHS:
        raise ValueError(f"num_paths: the triton backend supports 1 to {MAX_PATHS} paths, "
                         f"got {num_paths}")
    bad = num_paths if bad_bucket is None else int(bad_bucket)
    if not 0 <= bad <= num_paths:
        raise ValueError(f"bad_bucket: expected a path index in [0, {num_paths}] or None, "
                         f"got {bad_bucket}")
    routes = routes.reshape(-1)
    if routes.dtype.is_floating_point or routes.dtype.is_complex or routes.dtype == torch.bool:
        raise TypeError(f"routes: expected an integer dtype, got {routes.dtype}")
    routes = routes.contiguous()
    n, dev = routes.numel(), routes.device
    if n >= 2 ** 31:  # token ids and slots are int32 inside the kernels
        raise ValueError(f"routes: the triton backend groups fewer than 2**31 tokens, got {n}")
    perm = torch.empty(n, dtype=torch.int64, device=dev)
    inv = torch.empty(n if write_inv else 0, dtype=torch.int64, device=dev)
    routes_N = torch.empty(n if write_routes else 0, dtype=torch.int64, device=dev)
    counts = torch.empty(num_paths, dtype=torch.int64, device=dev)
    offsets = torch.empty(num_paths + 1, dtype=torch.int64, device=dev)
    if n == 0:
        counts.zero_()
        offsets.zero_()
        return perm, inv, counts, offsets, routes_N
    cfg = _group_config(n, num_paths, block_n)
    nb, p_pad, warps = cfg["num_blocks"], cfg["P_PAD"], cfg["num_warps"]
    flags = dict(P_PAD=p_pad, WRITE_INV=write_inv, WRITE_ROUTES=write_routes,
                 HAS_FLAG=flag is not None)
    fl = flag if flag is not None else offsets  # any live tensor when there is no flag
    if one_launch:
        # the single-block tile size (or the caller's): few programs, each scanning all N
        bn = block_n or max(16, (1 << 14) // p_pad)
        nb1 = triton.cdiv(n, bn)
        if 1 < nb1 <= ONE_LAUNCH_BLOCKS:
            _group_scatter_kernel[(nb1,)](routes, offsets, offsets, counts, perm, inv,
                                          routes_N, fl, n, num_paths, bad, lo, nb1, BLOCK_N=bn,
                                          MODE=2,
                                          # 16 warps spill at 4096 x 4 (128 registers
                                          # each); 8 do not (tests/triton_compile.py)
                                          num_warps=max(4, min(8, bn * p_pad // 1024)),
                                          **flags)
            return perm, inv, counts, offsets, routes_N
    if nb == 1:
        _group_scatter_kernel[(1,)](routes, offsets, offsets, counts, perm, inv, routes_N,
                                    fl, n, num_paths, bad, lo, 1, BLOCK_N=cfg["BLOCK_N"],
                                    MODE=0,
                                    num_warps=warps, **flags)
        return perm, inv, counts, offsets, routes_N
    hist = torch.empty((nb, p_pad), dtype=torch.int32, device=dev)
    base = torch.empty((nb, p_pad), dtype=torch.int64, device=dev)
    _group_hist_kernel[(nb,)](routes, hist, n, num_paths, bad, BLOCK_N=cfg["BLOCK_N"],
                              P_PAD=p_pad, num_warps=warps)
    _group_scan_kernel[(1,)](hist, base, counts, offsets, nb, num_paths,
                             BLOCK_B=cfg["BLOCK_B"], P_PAD=p_pad, num_warps=4)
    _group_scatter_kernel[(nb,)](routes, base, offsets, counts, perm, inv, routes_N, fl, n,
                                 num_paths, bad, lo, nb, BLOCK_N=cfg["BLOCK_N"], MODE=1,
                                 num_warps=warps, **flags)
    return perm, inv, counts, offsets, routes_N


# --------------------------------------------------------------------------- torch.library


@custom_op("group_tokens")
def _group_tokens_op(routes: torch.Tensor, num_paths: int
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                torch.Tensor]:
    return group_tokens_fwd(routes, num_paths)


@_group_tokens_op.register_fake
def _(routes, num_paths):
    n = routes.numel()
    new = lambda *shape: routes.new_empty(shape, dtype=torch.int64)  # noqa: E731
    return new(n), new(n), new(num_paths), new(num_paths + 1), new(n)


def group_tokens(routes: torch.Tensor, num_paths: int) -> RouteGroups:
    """Stable counting sort of token ids by route; see ``duollm.reference.group_tokens``.

    Args:
      routes: (...) integer tensor of path indices in ``[0, num_paths)``; flattened.
      num_paths: P (at most ``MAX_PATHS``).
    Returns: ``RouteGroups`` with perm, inv (N,), counts (P,), offsets (P+1,), routes (N,),
    all int64 on the routes' device, computed without a host synchronisation.
    """
    return RouteGroups(*torch.ops.duollm.group_tokens(routes.reshape(-1), num_paths))
