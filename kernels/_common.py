"""Helpers shared by the kernel files: the custom-op convention, knobs that depend on where a
kernel runs (GPU or interpreter), and small launcher utilities.

Custom-op convention: every op is ``torch.library.custom_op`` in the ``duollm`` namespace
(``duollm::<op>_fwd`` / ``duollm::<op>_bwd``), with a ``register_fake`` meta function and,
for differentiable ops, ``register_autograd`` wiring the backward op, so that
``torch.compile(fullgraph=True)`` sees one opaque node per kernel launch and no graph breaks.
Custom ops cannot return None or alias an input: an output that is not needed is returned as
an empty tensor (``unused_grad``) and the Python wrapper maps it back to None.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

NAMESPACE = "duollm"


def custom_op(name: str, **kwargs):
    """``torch.library.custom_op("duollm::<name>", mutates_args=())`` as a decorator."""
    kwargs.setdefault("mutates_args", ())
    return torch.library.custom_op(f"{NAMESPACE}::{name}", **kwargs)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    """The smallest power of two >= max(n, 1)."""
    return triton.next_power_of_2(max(int(n), 1))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in for the interpreter."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else
                         torch.cuda.current_device())
    return 4


def acc_dtype(*tensors: Optional[torch.Tensor]):
    """The Triton accumulation dtype for these inputs: float64 if any is float64, else float32.

    Half-precision inputs are always upcast after loading (the interpreter cannot do bf16
    arithmetic, and fp32 accumulation is what the reference does)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return tl.float64
    return tl.float32


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` (N, d) with unit stride along d, copying only if needed; kernels take the row
    stride (``t.stride(0)``) as an argument, so row-sliced or row-broadcast views go through
    without a copy (kernels only ever read them)."""
    if t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] <= 1):
        return t
    return t.contiguous()


def vec_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor with unit stride (a copy only when it is strided)."""
    t = t.reshape(-1)
    return t if t.stride(0) == 1 or t.numel() <= 1 else t.contiguous()


def unused_grad(like: torch.Tensor) -> torch.Tensor:
    """The placeholder a backward op returns for a gradient nobody asked for."""
    return like.new_empty(0)


def precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32/fp64 inputs get true products (torch's default matmul
    does not use TF32 either); 16-bit inputs use the tensor cores."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def acc_dtypes(dtype: torch.dtype):
    """(Triton, torch) accumulation dtype: float64 for float64 inputs, else float32."""
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def int32_guard(name: str, width: int, d: int) -> None:
    """Weight tiles are addressed with int32 offsets (``row * d``, fewer registers than
    int64): refuse a weight whose ``width * d`` does not fit instead of reading wrong memory."""
    if int(width) * int(d) >= 2 ** 31:
        raise ValueError(f"{name}: width * d = {int(width) * int(d)} >= 2**31 elements; the "
                         f"triton kernels address weights with int32 offsets (split the "
                         f"path or use the torch backend)")


# --------------------------------------------------------------------------- slot helpers
# A launch of the grouped GEMMs serves up to four paths ("slots"); these helpers, shared by
# the forward (ffn_gemm.py) and backward (ffn_gemm_bwd.py) kernels, map a tile index to its
# slot and the slot's rows.


@triton.jit
def pick(s, a0, a1, a2, a3, NSLOT: tl.constexpr):
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
def slot_of(t, T1, T2, T3, NSLOT: tl.constexpr):
    """Slot owning tile ``t`` given the slots' first tile ids (slot 0 starts at 0)."""
    s = t * 0
    if NSLOT > 1:
        s += (t >= T1).to(tl.int32)
    if NSLOT > 2:
        s += (t >= T2).to(tl.int32)
    if NSLOT > 3:
        s += (t >= T3).to(tl.int32)
    return s


@triton.jit
def rows_of(offsets_ptr, R, N, P, ROUTED: tl.constexpr):
    """(first grouped row (int64), row count (int32)) of bucket ``R``; ``R == P`` is the
    overflow bucket of out-of-range routes, which ends at row N."""
    if ROUTED:
        # "+ 0 * program_id": R, P or N may be ints Triton specialised to constants (== 1)
        zero = tl.program_id(0) * 0
        R = R + zero
        start = tl.load(offsets_ptr + R)
        end = tl.where(R < P + zero, tl.load(offsets_ptr + tl.minimum(R + 1, P + zero)),
                       N + zero)
        cnt = (end - start).to(tl.int32)
    else:
        zero = tl.program_id(0) * 0
        start = zero
        cnt = zero + N
    return start.to(tl.int64), cnt


@triton.jit
def slot_tile(t, offsets_ptr, N, P, R0, R1, R2, R3, W0, W1, W2, W3, T1, T2, T3,
              NSLOT: tl.constexpr, ROUTED: tl.constexpr):
    """The prologue every grouped-GEMM kernel shares: tile ``t`` -> (slot, its width, the
    tile's index inside the slot, the slot's first grouped row, its row count)."""
    s = slot_of(t, T1, T2, T3, NSLOT)
    R = pick(s, R0, R1, R2, R3, NSLOT)
    W = pick(s, W0, W1, W2, W3, NSLOT)
    local = t - pick(s, 0, T1, T2, T3, NSLOT)
    start, cnt = rows_of(offsets_ptr, R, N, P, ROUTED)
    return s, W, local, start, cnt


@triton.jit
def device_starts(offsets_ptr, N, P, R0, R1, R2, R3, C0, C1, C2, C3,
                  NSLOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """First tile of slots 1..3 and the total tile count, from the real row counts in
    ``offsets`` (device memory): slot s has cdiv(rows_s, BM) * cdiv(C_s, BN) tiles. This is
    the tile table of a persistent launch: no tile is idle, and the grid stays fixed."""
    _, c0 = rows_of(offsets_ptr, R0, N, P, True)
    T1 = tl.cdiv(c0, BM) * tl.cdiv(C0 + c0 * 0, BN)
    T2 = T1
    T3 = T1
    total = T1
    if NSLOT > 1:
        _, c1 = rows_of(offsets_ptr, R1, N, P, True)
        T2 = T1 + tl.cdiv(c1, BM) * tl.cdiv(C1 + c1 * 0, BN)
        T3 = T2
        total = T2
    if NSLOT > 2:
        _, c2 = rows_of(offsets_ptr, R2, N, P, True)
        T3 = T2 + tl.cdiv(c2, BM) * tl.cdiv(C2 + c2 * 0, BN)
        total = T3
    if NSLOT > 3:
        _, c3 = rows_of(offsets_ptr, R3, N, P, True)
        total = T3 + tl.cdiv(c3, BM) * tl.cdiv(C3 + c3 * 0, BN)
    return T1, T2, T3, total


@triton.jit
def tile_mn(local, cnt, n_tiles, BM: tl.constexpr, GROUP_M: tl.constexpr):
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
def token_rows(perm_ptr, start, i, mask, ROUTED: tl.constexpr):
    """Token ids (int64) of grouped rows ``start + i``."""
    if ROUTED:
        tok = tl.load(perm_ptr + start + i, mask=mask, other=0)
    else:
        tok = start + i
    return tok.to(tl.int64)


@triton.jit
def flag_routes(flag_ptr, r, mask, LO, P):
    """OR ``ROUTE_ERROR`` (1) into the int32 error flag at ``flag_ptr`` if any route of
    ``r`` (where ``mask``) lies outside ``[LO, P)``: one masked atomic per program, nothing
    written when every route is good (``duollm.checks.RouteErrors``; the kernels already send
    such tokens to a skip path, this only records them)."""
    bad = mask & ((r < LO) | (r >= P))
    n_bad = tl.sum(bad.to(tl.int32), axis=0)
    tl.atomic_or(flag_ptr, 1, mask=n_bad > 0)


# --------------------------------------------------------------------------- slot tables


class Slot:
    """One path of a launch: route index, width, and its weights (None for a skip path)."""

    __slots__ = ("route", "width", "w_gate", "w_up", "w_down")

    def __init__(self, route: int, width: int, weights):
        self.route, self.width = route, width
        self.w_gate, self.w_up, self.w_down = weights if weights is not None else (None,) * 3


MAX_SLOTS = 4


def pad4(vals, fill) -> list:
    """``vals`` padded to ``MAX_SLOTS`` entries with ``fill``."""
    return list(vals) + [fill] * (MAX_SLOTS - len(vals))


def chunks(slots) -> list:
    """``slots`` in launches of at most ``MAX_SLOTS``."""
    return [list(slots[i:i + MAX_SLOTS]) for i in range(0, len(slots), MAX_SLOTS)]


def starts(tiles):
    """First tile id of slots 1..3 (huge where absent) and the total: the host-side tile
    table of a worst-case grid."""
    firsts, acc = [], 0
    for t in tiles:
        firsts.append(acc)
        acc += t
    firsts = firsts[1:] + [2 ** 30] * (MAX_SLOTS - len(firsts))
    return firsts[:MAX_SLOTS - 1], acc


def routes_widths(slots):
    """(route index, width) of every slot, padded to ``MAX_SLOTS``."""
    return pad4([s.route for s in slots], 0), pad4([s.width for s in slots], 0)
