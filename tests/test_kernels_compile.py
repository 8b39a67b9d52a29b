"""The new Triton kernels compile for an H100/H200 (sm_90) on a machine without a GPU:
``tests/triton_compile.py`` runs in a subprocess without the interpreter and compiles the
decode, persistent and one-launch grouping kernels, the refactored default-path
forward and backward kernels and the backward switch's (BK = 64, per-path splits) to cubin
with the wheel's own ptxas,
including ints specialised to constants (an argument equal to 1), which the interpreter
never sees, with the JIT's divisibility hints; no variant may spill or use more shared memory
than sm_90 has. The same check against Triton 3.6.0 (the GPU image's) runs when
``make compile-check-triton36`` has put it in build/triton36."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

HERE = Path(__file__).resolve().parent
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
# Triton 3.6.0, the GPU machine's, beside the locked one: `make compile-check-triton36`
TRITON36 = HERE.parent / "build" / "triton36"
N_VARIANTS = 17  # 4 of them the backward switch's (DUOLLM_TRITON_BWD)


def _compile_report(pythonpath=None):
    """Run tests/triton_compile.py (every variant) and return its report lines by variant."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(HERE / "triton_compile.py")], env=env,
                          capture_output=True, text=True, timeout=600, cwd=HERE.parent)
    # a failure names its variant and why (a spill, shared memory over the limit, an error)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = {ln.split()[1]: ln for ln in proc.stdout.splitlines() if ln.startswith("OK ")}
    assert len(lines) == N_VARIANTS, proc.stdout
    for name, ln in lines.items():
        # with the JIT's divisibility hints every GEMM is pipelined (asynchronous copies)
        assert "spill=0" in ln and "regs=" in ln and "shared=" in ln, ln
        if not name.startswith("group"):
            assert "async_copy=yes" in ln, ln
    return proc.stdout


@pytest.mark.skipif(not PTXAS.exists(), reason=f"the triton wheel has no ptxas ({PTXAS})")
def test_new_kernels_compile_for_sm90():
    _compile_report()


@pytest.mark.skipif(not (TRITON36 / "triton" / "__init__.py").exists(),
                    reason=f"Triton 3.6.0 (the GPU image's) is not set up in {TRITON36}: run "
                           f"`make compile-check-triton36` (needs the package index once)")
def test_kernels_compile_for_sm90_with_the_gpu_images_triton():
    out = _compile_report(TRITON36)
    assert out.startswith("triton 3.6.0"), out[:200]
