"""Compile Triton kernels for an NVIDIA GPU without one (``triton.compile`` to PTX and cubin
with the ptxas bundled in the triton wheel), so code that only the GPU compiler sees (types
of ints that Triton specialises to constants, shapes ``tl.dot`` accepts) is checked on any
machine. Run as a script WITHOUT ``TRITON_INTERPRET`` (the interpreter replaces the jit
functions); ``tests/test_kernels_compile.py`` does that in a subprocess.

    python tests/triton_compile.py [NAME ...]     # all variants by default; exit 1 on failure
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
import time
import traceback

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("triton_compile.py: unset TRITON_INTERPRET (the interpreter has no compiler)")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # an H100/H200


def _mod(name):
    return importlib.import_module(f"duollm.kernels.{name}")


def compile_kernel(fn, const: dict, ptr_types: dict, num_warps=4, num_stages=3):
    """Compile ``fn`` with the constexpr values ``const`` (kernel constexprs, and runtime
    ints given as constants the way Triton specialises an argument equal to 1); pointer
    arguments get ``ptr_types[name]`` (default ``*bf16``), other arguments ``i32``."""
    names = list(inspect.signature(fn.fn).parameters)
    sig = {}
    for n in names:
        if n in const:
            sig[n] = "constexpr"
        elif n in ptr_types:
            sig[n] = ptr_types[n]
        elif n.endswith("_ptr") or n[:2] in ("wg", "wu", "wd") or n[:2] in ("b1", "b2"):
            sig[n] = "*bf16"
        else:
            sig[n] = "i32"
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()})
    return triton.compile(src, target=TARGET,
                          options=dict(num_warps=num_warps, num_stages=num_stages))


MMA = dict(UPCAST=False, PREC="tf32", ACC=tl.float32)


def variants():
    """(name, thunk) of every kernel variant checked."""
    dec, fwd, grp, bwd = _mod("decode"), _mod("ffn_gemm"), _mod("grouping"), _mod("ffn_gemm_bwd")
    i64 = {"routes_ptr": "*i64", "perm_ptr": "*i64", "offsets_ptr": "*i64"}
    group_ptrs = dict(routes_ptr="*i64", base_ptr="*i64", offsets_ptr="*i64",
                      counts_ptr="*i64", perm_ptr="*i64", inv_ptr="*i64", routes64_ptr="*i64",
                      flag_ptr="*i32")  # the route-error flag: GPU default ("device" mode)
    return [
        # decode at N = 1 (N, the small path's route 1 and its single split all constants)
        ("decode_gateup_n1", lambda: compile_kernel(
            dec._decode_gateup_kernel, dict(N=1, R0=1, KS1=1, NSLOT=2, HAS_FLAG=True, BM=32,
                                            BN=16, BK=128, **MMA),
            dict(i64, part_ptr="*fp32", cnt_ptr="*i32", flag_ptr="*i32"), num_stages=4)),
        ("decode_gateup_no_split", lambda: compile_kernel(
            dec._decode_gateup_kernel, dict(KS0=1, KS_max=1, NSLOT=1, HAS_FLAG=False, BM=32,
                                            BN=64, BK=128, **MMA),
            dict(i64, part_ptr="*fp32", cnt_ptr="*i32", flag_ptr="*i32"), num_stages=4)),
        ("decode_down_n1", lambda: compile_kernel(
            dec._decode_down_kernel, dict(N=1, R0=1, S0=1, NSLOT=2, HAS_RES=True,
                                          HAS_GATE=True, BM=64, BN=16, BK=128, **MMA),
            dict(i64, part_ptr="*fp32", cnt_ptr="*i32"), num_stages=4)),
        ("decode_down_n64_one_slot", lambda: compile_kernel(
            dec._decode_down_kernel, dict(E_max=1, NSLOT=1, HAS_RES=False, HAS_GATE=False,
                                          BM=64, BN=64, BK=128, **MMA),
            dict(i64, part_ptr="*fp32", cnt_ptr="*i32"), num_stages=4)),
        # persistent grouped GEMMs: (skip, small, big) with route 1 a constant
        ("gateup_persistent", lambda: compile_kernel(
            fwd._gateup_fwd_kernel, dict(R0=1, NSLOT=2, ROUTED=True, PERSISTENT=True, BM=128,
                                         BN=128, BK=64, GROUP_M=8, **MMA), i64, 8, 3)),
        ("down_persistent", lambda: compile_kernel(
            fwd._down_kernel, dict(R1=1, NSLOT=3, ROUTED=True, DX=False, PERSISTENT=True,
                                   HAS_RES=True, HAS_GATE=True, BM=128, BN=128, BK=64,
                                   GROUP_M=8, **MMA), i64, 8, 4)),
        # the default paths, after the refactor onto slot_tile (worst-case grids)
        ("gateup_default", lambda: compile_kernel(
            fwd._gateup_fwd_kernel, dict(R0=1, NSLOT=2, ROUTED=True, PERSISTENT=False, BM=64,
                                         BN=64, BK=64, GROUP_M=1, **MMA), i64, 4, 4)),
        ("down_dx_default", lambda: compile_kernel(
            fwd._down_kernel, dict(R1=1, NSLOT=3, ROUTED=True, DX=True, PERSISTENT=False,
                                   HAS_RES=False, HAS_GATE=False, BM=128, BN=128, BK=32,
                                   GROUP_M=8, **MMA), i64, 8, 4)),
        ("gateup_bwd", lambda: compile_kernel(
            bwd._gateup_bwd_kernel, dict(R0=1, NSLOT=2, ROUTED=True, HAS_GATE=True, SPLIT=True,
                                         BM=64, BN=128, BK=32, GROUP_M=8, **MMA),
            dict(i64, dgp_ptr="*fp32"), 8, 4)),
        ("wgrad2", lambda: compile_kernel(
            bwd._wgrad_kernel, dict(R0=1, NSLOT=2, ROUTED=True, A_TOK=False, B_TOK=True,
                                    TWO=True, SPLIT=True, BM=128, BN=64, BK=64, **MMA),
            dict(i64, p1_ptr="*fp32", p2_ptr="*fp32"), 8, 3)),
        ("group_one_launch", lambda: compile_kernel(
            grp._group_scatter_kernel, dict(BLOCK_N=4096, P_PAD=4, MODE=2, WRITE_INV=False,
                                            WRITE_ROUTES=False, HAS_FLAG=True), group_ptrs, 16,
            1)),
        ("group_scatter_single_block_n1", lambda: compile_kernel(
            grp._group_scatter_kernel, dict(N=1, BLOCK_N=16, P_PAD=4, MODE=0, WRITE_INV=True,
                                            WRITE_ROUTES=True, HAS_FLAG=True), group_ptrs, 2,
            1)),
    ]


def main(argv) -> int:
    failed = 0
    for name, thunk in variants():
        if argv and name not in argv:
            continue
        t = time.time()
        try:
            k = thunk()
            print(f"OK   {name} ({time.time() - t:.1f} s, {len(k.asm['cubin'])} B cubin, "
                  f"{k.metadata.shared} B shared memory)")
        except Exception:  # noqa: BLE001 - report every variant, then fail
            failed += 1
            print(f"FAIL {name}")
            traceback.print_exc()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
