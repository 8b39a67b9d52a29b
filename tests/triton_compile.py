"""Compile Triton kernels for an NVIDIA GPU without one (``triton.compile`` to PTX and cubin
with the ptxas bundled in the triton wheel), so code that only the GPU compiler sees (types
of ints that Triton specialises to constants, shapes ``tl.dot`` accepts) is checked on any
machine. Run as a script WITHOUT ``TRITON_INTERPRET`` (the interpreter replaces the jit
functions); ``tests/test_kernels_compile.py`` does that in a subprocess.

    python tests/triton_compile.py [NAME ...]     # all variants by default; exit 1 on failure

Each variant is compiled the way the JIT specialises a launch at the paper's layer: every
pointer and every shape int that is a multiple of 16 there (``DIV16_INTS``: d, widths, strides,
split widths) carries the divisibility hint (``tt.divisibility = 16``), ints equal to 1 are
constants. Without the hints the compiler cannot prove aligned 16-byte loads and emits
unpipelined variants (no ``cp.async``, little shared memory) that the GPU never runs.

One line per variant: registers per thread, spilled (local) bytes, shared memory (Triton's
dynamic allocation plus the static one) and whether the PTX has asynchronous copies
(``cp.async`` or TMA). A variant FAILS on any spill or on shared memory over the sm_90
per-block limit (227 KB), as well as on a compile error.
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
SM90_SHARED_MAX = 227 * 1024  # bytes of shared memory one block may use on sm_90
# ints that are multiples of 16 at the paper's layer (d 2560, widths 640 / 10240): the JIT
# marks them divisible by 16 (token counts, routes, item counts stay unhinted)
DIV16_INTS = {"d", "stride_h", "stride_p", *(f"{p}{i}" for p in ("W", "K", "KC", "O")
                                             for i in range(4))}
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _div16_attr():
    """The attribute the JIT attaches to an argument divisible by 16, as this Triton spells it."""
    try:
        from triton.compiler.compiler import make_backend
        return make_backend(TARGET).parse_attr("D")
    except (ImportError, AttributeError):  # older spellings: the attribute itself
        return [["tt.divisibility", 16]]


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
    div16 = _div16_attr()
    attrs = {(i,): div16 for i, n in enumerate(names)
             if sig[n].startswith("*") or (sig[n] == "i32" and n in DIV16_INTS)}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs=attrs)
    return triton.compile(src, target=TARGET,
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def resources(k) -> dict:
    """Registers, local (spill) and static shared bytes of a compiled kernel (``cuobjdump
    -res-usage`` on its cubin), its dynamic shared memory and whether it copies asynchronously."""
    import re
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        out = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name],
                             capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage: no resource line in {out!r}")
    reg, stack, static, local = map(int, m.groups())
    ptx = k.asm["ptx"]
    return dict(regs=reg, spill=local + stack, shared=k.metadata.shared + static,
                async_copy="cp.async" in ptx or "cp.async.bulk" in ptx)


MMA = dict(UPCAST=False, PREC="tf32", ACC=tl.float32)


def variants():
    """(name, thunk) of every kernel variant checked."""
    dec, fwd, grp, bwd = _mod("decode"), _mod("ffn_gemm"), _mod("grouping"), _mod("ffn_gemm_bwd")
    i64 = {"routes_ptr": "*i64", "perm_ptr": "*i64", "offsets_ptr": "*i64"}
    group_ptrs = dict(routes_ptr="*i64", base_ptr="*i64", offsets_ptr="*i64",
                      counts_ptr="*i64", perm_ptr="*i64", inv_ptr="*i64", routes64_ptr="*i64",
                      flag_ptr="*i32")  # the route-error flag: GPU default ("device" mode)
    return [
        # decode at N = 1 (N, the small path's route 1 and the big path's most splits all
        # constants); the work table's splits are runtime values (kernels/decode.py)
        ("decode_gateup_n1", lambda: compile_kernel(
            dec._decode_gateup_kernel, dict(N=1, R0=1, KSM1=1, NSLOT=2, HAS_FLAG=True, BM=32,
                                            BN=16, BK=64, CH=8, **MMA),
            dict(i64, part_ptr="*fp32", cnt_ptr="*i32", plan_ptr="*i32", flag_ptr="*i32"),
            num_stages=4)),
        ("decode_gateup_n64_one_slot", lambda: compile_kernel(
            dec._decode_gateup_kernel, dict(KSM0=1, NSLOT=1, HAS_FLAG=False, BM=32, BN=64,
                                            BK=64, CH=2, **MMA),
            dict(i64, part_ptr="*fp32", cnt_ptr="*i32", plan_ptr="*i32", flag_ptr="*i32"),
            num_stages=4)),
        ("decode_down_n1", lambda: compile_kernel(
            dec._decode_down_kernel, dict(N=1, R0=1, NSLOT=2, HAS_RES=True, HAS_GATE=True,
                                          BM=32, BN=16, BK=64, CH=8, **MMA),
            dict(i64, part_ptr="*fp32", cnt_ptr="*i32", plan_ptr="*i32"), num_stages=4)),
        ("decode_down_n64_one_slot", lambda: compile_kernel(
            dec._decode_down_kernel, dict(E_max=1, NSLOT=1, HAS_RES=False, HAS_GATE=False,
                                          BM=32, BN=64, BK=64, CH=2, **MMA),
            dict(i64, part_ptr="*fp32", cnt_ptr="*i32", plan_ptr="*i32"), num_stages=4)),
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
        # DUOLLM_TRITON_BWD=1 (configs.BWD_TABLE): BK = 64 gate/up backward and large dx (3
        # stages: 4 would need 257 KB), the weight gradients with a split count per slot
        # (the paper's layer at 16K tokens on 132 SMs: small 3 / big 1 for dWd, 2 / 1 for
        # dWg and dWu, so the big slot's 1 is a constant)
        ("gateup_bwd_switch", lambda: compile_kernel(
            bwd._gateup_bwd_kernel, dict(R0=1, NSLOT=2, ROUTED=True, HAS_GATE=True, SPLIT=True,
                                         BM=64, BN=128, BK=64, GROUP_M=8, **MMA),
            dict(i64, dgp_ptr="*fp32"), 8, 3)),
        ("dx_large_switch", lambda: compile_kernel(
            fwd._down_kernel, dict(R1=1, NSLOT=3, ROUTED=True, DX=True, PERSISTENT=False,
                                   HAS_RES=False, HAS_GATE=False, BM=128, BN=128, BK=64,
                                   GROUP_M=8, **MMA), i64, 8, 3)),
        ("wgrad_per_path_switch", lambda: compile_kernel(
            bwd._wgrad_pp_kernel, dict(R0=1, S1=1, NSLOT=2, ROUTED=True, A_TOK=True,
                                       B_TOK=False, TWO=False, SPLIT=True, BM=128, BN=128,
                                       BK=64, **MMA),
            dict(i64, p1_ptr="*fp32", p2_ptr="*fp32"), 8, 3)),
        ("wgrad2_per_path_switch", lambda: compile_kernel(
            bwd._wgrad_pp_kernel, dict(R0=1, S1=1, NSLOT=2, ROUTED=True, A_TOK=False,
                                       B_TOK=True, TWO=True, SPLIT=True, BM=128, BN=64, BK=64,
                                       **MMA),
            dict(i64, p1_ptr="*fp32", p2_ptr="*fp32"), 8, 3)),
        ("group_one_launch", lambda: compile_kernel(
            grp._group_scatter_kernel, dict(BLOCK_N=4096, P_PAD=4, MODE=2, WRITE_INV=False,
                                            WRITE_ROUTES=False, HAS_FLAG=True), group_ptrs, 8,
            1)),
        # the default path's grouping of up to 4096 tokens in one block
        ("group_scatter_single_block_4096", lambda: compile_kernel(
            grp._group_scatter_kernel, dict(BLOCK_N=4096, P_PAD=4, MODE=0, WRITE_INV=False,
                                            WRITE_ROUTES=False, HAS_FLAG=True), group_ptrs, 16,
            1)),
        ("group_scatter_single_block_n1", lambda: compile_kernel(
            grp._group_scatter_kernel, dict(N=1, BLOCK_N=16, P_PAD=4, MODE=0, WRITE_INV=True,
                                            WRITE_ROUTES=True, HAS_FLAG=True), group_ptrs, 2,
            1)),
    ]


def main(argv) -> int:
    print(f"triton {triton.__version__}, target sm_{TARGET.arch} ({TARGET.warp_size}-thread "
          f"warps), divisibility hints as the JIT gives them")
    failed = 0
    for name, thunk in variants():
        if argv and name not in argv:
            continue
        t = time.time()
        try:
            k = thunk()
            r = resources(k)
            why = [w for w, bad in ((f"spills {r['spill']} B", r["spill"] > 0),
                                    (f"shared memory over the sm_90 limit "
                                     f"({SM90_SHARED_MAX} B)", r["shared"] > SM90_SHARED_MAX))
                   if bad]
            failed += bool(why)
            print(f"{'FAIL' if why else 'OK  '} {name} regs={r['regs']} spill={r['spill']} "
                  f"shared={r['shared']} async_copy={'yes' if r['async_copy'] else 'no'} "
                  f"({time.time() - t:.1f} s, {len(k.asm['cubin'])} B cubin)"
                  + (f": {'; '.join(why)}" if why else ""))
        except Exception:  # noqa: BLE001 - report every variant, then fail
            failed += 1
            print(f"FAIL {name}")
            traceback.print_exc()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
