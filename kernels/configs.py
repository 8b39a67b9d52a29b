"""GEMM launch configurations, chosen offline and committed as a table (no runtime
autotuning: a choice made at the first call would break CUDA-graph capture of that call, and
autotuning inside a captured region is impossible).

A key is ``(arch, kind, dtype, n_bucket, d, width)``; any field may be ``None`` (matches
anything). ``gemm_config`` returns the most specific matching entry: the one with the most
non-None fields, ties broken by order in ``TABLE`` (earlier wins). So a measured entry for one
shape (e.g. the paper's layer on sm90) is added above the generic ones without touching them.

* arch: ``"sm90"``-style compute capability of the device, or ``"interp"`` for the Triton
  interpreter (whose cost is per program and loop iteration: big blocks, few programs); the
  interpreter uses only its own entries, a GPU never uses them.
* kind: the kernel family: ``gateup``, ``down``, ``dx``, ``gateup_bwd``, ``wgrad``, ``wgrad2``,
  ``decode_gateup``, ``decode_down``.
* dtype: ``"fp64"``, ``"fp32"`` or ``"16"`` (fp16 and bf16).
* n_bucket: the token count's bucket, ``n_bucket(N)``: "decode" (N <= 64), "small" (<= 256),
  "mid" (< 2048), "large".
* d: the model width; width: the widest path of the launch (one launch serves every path of
  a layer with one configuration).

The generic entries are the configurations the kernels shipped with (measured on an H100:
``benchmarks/results/h100``). ``programs_per_sm`` sizes the persistent grids (fixed grid =
programs_per_sm x #SMs, every program loops over the device-side tile table).

``BWD_TABLE`` holds the backward entries of the ``DUOLLM_TRITON_BWD=1`` switch
(``kernels/ffn_gemm_bwd.py``): with ``bwd=True`` each replaces the ``TABLE`` entry of the same
key; with the switch off (the default) ``TABLE`` alone is read, as before the switch existed.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import torch

from ._common import interpreting


@dataclass(frozen=True)
class GemmConfig:
    """Block sizes and launch knobs of one kernel family."""

    BM: int
    BN: int
    BK: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 1

    def launch(self, group_m: bool = True) -> dict:
        """Keyword arguments of a kernel launch (``GROUP_M`` only where the kernel has it)."""
        kw = asdict(self)
        kw.pop("programs_per_sm")
        if not group_m:
            kw.pop("GROUP_M")
        return kw


Key = Tuple[Optional[str], Optional[str], Optional[str], Optional[str], Optional[int],
            Optional[int]]
C = GemmConfig

TABLE: Dict[Key, GemmConfig] = {
    # --- the interpreter: big blocks, few programs
    ("interp", "decode_gateup", None, None, None, None): C(64, 16, 64, 1, 4, 1, 1),
    ("interp", "decode_down", None, None, None, None): C(64, 16, 64, 1, 4, 1, 1),
    ("interp", None, None, None, None, None): C(64, 64, 64, 4, 4, 1, 1),
    # --- decode kernels (kernels/decode.py): BM is the weight-row tile (the wide side of
    # the MMA), BN the token tile (narrow side, >= 16 for tl.dot), BK the reduction step.
    # Unmeasured: first guesses sized to keep every SM streaming weights. The work lists
    # (decode.work_plan) split d (gate/up) and the widths (down) in equal pieces of BK
    # steps: BK = 64 gives d 2560 forty steps, so the paper's small path alone (20 row tiles
    # of 32) still makes 4 items per SM of an H100, and down pieces as narrow as 64 columns
    # (BM = 32: 80 d tiles). programs_per_sm is the most; fewer where the shared memory of
    # num_stages buffers does not fit (decode.programs_per_sm).
    (None, "decode_gateup", "16", None, None, None): C(32, 16, 64, 1, 4, 4, 2),
    (None, "decode_down", "16", None, None, None): C(32, 16, 64, 1, 4, 4, 2),
    (None, "decode_gateup", None, None, None, None): C(64, 16, 64, 1, 4, 3, 2),
    (None, "decode_down", None, None, None, None): C(64, 16, 64, 1, 4, 3, 2),
    # --- fp64 (rare): small tiles, 2 stages keep 5 fp64 tiles in shared memory
    (None, None, "fp64", None, None, None): C(64, 64, 32, 8, 4, 2, 2),
    (None, None, "fp32", None, None, None): C(64, 64, 32, 8, 4, 3, 2),
    # --- 16-bit, decode-sized N: few row tiles, so narrower column tiles give more programs
    # to stream the weights (the down GEMM has only cdiv(d, BN) programs per path)
    (None, "gateup", "16", "decode", None, None): C(64, 64, 64, 1, 4, 4, 2),
    (None, "down", "16", "decode", None, None): C(64, 64, 64, 1, 4, 4, 2),
    (None, "dx", "16", "decode", None, None): C(64, 64, 64, 1, 4, 4, 2),
    (None, "gateup", "16", "small", None, None): C(64, 64, 64, 1, 4, 4, 2),
    (None, "down", "16", "small", None, None): C(64, 64, 64, 1, 4, 4, 2),
    (None, "dx", "16", "small", None, None): C(64, 64, 64, 1, 4, 4, 2),
    # --- 16-bit, larger N: two fp32 accumulators per gate/up program (backward three)
    (None, "gateup", "16", "large", None, None): C(128, 128, 64, 8, 8, 3, 1),
    (None, "gateup", "16", None, None, None): C(64, 128, 64, 8, 8, 3, 1),
    (None, "gateup_bwd", "16", None, None, None): C(64, 128, 32, 8, 8, 4, 1),
    (None, "wgrad", "16", None, None, None): C(128, 128, 64, 1, 8, 3, 1),
    (None, "wgrad2", "16", None, None, None): C(128, 64, 64, 1, 8, 3, 1),
    (None, "dx", "16", "large", None, None): C(128, 128, 32, 8, 8, 4, 1),
    (None, "dx", "16", None, None, None): C(64, 128, 32, 8, 4, 4, 1),
    (None, "down", "16", "large", None, None): C(128, 128, 64, 8, 8, 4, 1),
    (None, "down", "16", None, None, None): C(64, 128, 64, 8, 4, 4, 1),
}

# DUOLLM_TRITON_BWD=1: BK = 64 (the K step of one 16-bit wgmma) where the default backward
# entries above have 32, with 3 stages instead of 4 so that the doubled stages fit the 227 KB
# a block may use on sm_90: gate/up backward stages x, dy (BM x BK) and Wg, Wu, Wd (BK x BN),
# 64 KB each in 16 bits; large dx stages dg, du and Wg, Wu, also 64 KB; 3 stages = 193 KB
# (4 would be 257 KB). Unmeasured; each key is one of TABLE's (tests/test_kernels_bwd_switch.py).
BWD_TABLE: Dict[Key, GemmConfig] = {
    (None, "gateup_bwd", "16", None, None, None): C(64, 128, 64, 8, 8, 3, 1),
    (None, "dx", "16", "large", None, None): C(128, 128, 64, 8, 8, 3, 1),
}


def n_bucket(n_rows: int) -> str:
    """The token-count bucket of ``n_rows`` (see the module docstring)."""
    if n_rows <= 64:
        return "decode"
    if n_rows <= 256:
        return "small"
    if n_rows < 2048:
        return "mid"
    return "large"


def dtype_key(dtype: torch.dtype) -> str:
    return {torch.float64: "fp64", torch.float32: "fp32"}.get(dtype, "16")


@functools.lru_cache(maxsize=None)
def _arch(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm{major}{minor}"


def arch_of(device: Optional[torch.device]) -> str:
    """``"interp"`` under the Triton interpreter, else the CUDA device's ``"smXY"``."""
    if interpreting() or device is None or device.type != "cuda":
        return "interp"
    return _arch(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=4096)
def _lookup(arch: str, kind: str, dtype: str, bucket: str, d: int, width: int,
            bwd: bool = False) -> GemmConfig:
    want = (arch, kind, dtype, bucket, d, width)
    best, best_score = None, -1
    # BWD_TABLE's keys are TABLE's: the merged dict keeps TABLE's order, so ties break alike
    for key, cfg in ({**TABLE, **BWD_TABLE} if bwd else TABLE).items():
        if (arch == "interp") != (key[0] == "interp"):
            continue  # the interpreter's entries are for it alone, and only for it
        if all(k is None or k == w for k, w in zip(key, want)):
            score = sum(k is not None for k in key)
            if score > best_score:
                best, best_score = cfg, score
    if best is None:
        raise KeyError(f"no GEMM config matches {want}")
    return best


def gemm_config(kind: str, dtype: torch.dtype, n_rows: int, device: Optional[torch.device],
                d: int = 0, width: int = 0, bwd: bool = False) -> GemmConfig:
    """The committed configuration of kernel family ``kind`` for these inputs; ``bwd``: with
    the backward switch's entries (``BWD_TABLE``)."""
    if bwd:
        return _lookup(arch_of(device), kind, dtype_key(dtype), n_bucket(n_rows), int(d),
                       int(width), True)
    return _lookup(arch_of(device), kind, dtype_key(dtype), n_bucket(n_rows), int(d),
                   int(width))
