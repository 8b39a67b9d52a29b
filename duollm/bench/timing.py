"""Timing: CUDA events on a GPU, interleaved ``perf_counter`` rounds on the CPU; device ceilings.

On the CPU the candidates of one configuration are timed round-robin (dense, baselines,
backends, dense, ...) so that load from other processes on a shared machine falls on all of
them alike and their *ratios* stay meaningful; each call's time is kept and summarised by the
median and quartiles. On a GPU each candidate is timed in its own block with one CUDA event
pair per call (median), the inputs rotating between a few sets.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch


@dataclass
class Stats:
    """Summary of one candidate's per-call times, in milliseconds."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    repeats: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> "Stats":
        ms = sorted(s * 1e3 for s in seconds)
        if not ms:
            return cls(math.nan, math.nan, math.nan, math.nan, math.nan, 0)
        if len(ms) == 1:
            q1 = q3 = ms[0]
        else:
            q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
        return cls(statistics.median(ms), q1, q3, ms[0], ms[-1], len(ms))

    def as_dict(self) -> Dict[str, float]:
        return dict(median_ms=self.median_ms, q1_ms=self.q1_ms, q3_ms=self.q3_ms,
                    min_ms=self.min_ms, max_ms=self.max_ms, repeats=self.repeats)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: Dict[str, Callable[[int], object]], device: torch.device,
                     repeats: int = 20, min_repeats: int = 3,
                     warmup: int = 2, budget_s: float = 10.0) -> Dict[str, List[float]]:
    """Per-call seconds of each candidate, timed round-robin (CPU; also works on a GPU).

    ``fns[name](i)`` runs the candidate on input set ``i`` (modulo the sets). Each round calls every
    candidate once, in an order rotated by the round, so no candidate always follows the same
    one. Stops after ``repeats`` rounds, or earlier once ``budget_s`` is spent (never before
    ``min_repeats``).
    """
    names = list(fns)
    for name in names:
        for i in range(warmup):
            fns[name](i)
    synchronize(device)
    times: Dict[str, List[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            synchronize(device)
            t0 = time.perf_counter()
            fns[name](r)
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
        if r + 1 >= min_repeats and time.perf_counter() - start > budget_s:
            break
    return times


def time_cuda(fn: Callable[[int], object], repeats: int = 100,
              min_repeats: int = 5, warmup_ms: float = 25.0,
              budget_s: float = 1.0) -> List[float]:
    """Per-call seconds of ``fn(i)`` on the current CUDA stream, from CUDA event pairs.

    Warm-up runs at least 2 calls and ``warmup_ms``; the number of timed calls is cut so the
    whole takes about ``budget_s`` (never below ``min_repeats``). One host sync at the end.
    """
    fn(0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(1)
    torch.cuda.synchronize()
    est = max(time.perf_counter() - t0, 1e-6)
    for i in range(max(1, int(warmup_ms / 1e3 / est))):
        fn(i)
    n = max(min_repeats, min(repeats, int(budget_s / est)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(n)]
    for i, (a, b) in enumerate(events):
        a.record()
        fn(i)
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) / 1e3 for a, b in events]


# --------------------------------------------------------------------------- the CPU allocator

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_cpu_allocator() -> bool:
    """Keep freed large blocks in glibc's heap instead of returning them to the OS.

    By default glibc serves every block of more than 32 MiB (and, until its adaptive threshold
    has grown, of more than 128 KiB) with a fresh ``mmap`` and unmaps it on free, so every
    large tensor is paid again in page faults when first written: measured here at about 2 us
    per 4 KiB page, i.e. ~4 ms for one 8 MiB activation, a large share of a routed layer's
    time. Raising the mmap and trim thresholds (what jemalloc/tcmalloc, recommended for
    PyTorch on the CPU, achieve by caching) lets freed blocks be reused. Applies process-wide,
    to the dense baseline as much as to the routed layers. Returns whether it was applied
    (glibc only).
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1 and ok
    return ok


# --------------------------------------------------------------------------- device ceilings


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> Dict[str, float]:
    """The device's measured copy bandwidth (GB/s, read + write) and matmul rate (TFLOP/s)."""
    out: Dict[str, float] = {}
    if device.type == "cuda":
        n_bytes, mm_n = 1 << 30, 8192
    else:
        n_bytes, mm_n = 1 << 27, 1024
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    a = torch.randn(mm_n, mm_n, device=device).to(dtype)
    b = torch.randn(mm_n, mm_n, device=device).to(dtype)
    c = torch.empty_like(a)
    if device.type == "cuda":
        t_copy = statistics.median(time_cuda(lambda i: dst.copy_(src), repeats=20, budget_s=0.5))
        t_mm = statistics.median(time_cuda(lambda i: torch.mm(a, b, out=c), repeats=30,
                                           budget_s=0.5))
    else:
        ts = time_interleaved({"copy": lambda i: dst.copy_(src),
                               "mm": lambda i: torch.mm(a, b, out=c)}, device,
                              repeats=10, budget_s=2.0)
        t_copy, t_mm = statistics.median(ts["copy"]), statistics.median(ts["mm"])
    out["copy_GBps"] = 2 * n_bytes / t_copy / 1e9
    out[f"matmul_TFLOPs_{str(dtype).replace('torch.', '')}"] = 2 * mm_n ** 3 / t_mm / 1e12
    out["matmul_size"] = mm_n
    return out
