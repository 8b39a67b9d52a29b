"""The new Triton kernels compile for an H100/H200 (sm_90) on a machine without a GPU:
``tests/triton_compile.py`` runs in a subprocess without the interpreter and compiles the
decode, persistent and one-launch grouping kernels and the refactored default-path
forward and backward kernels to cubin with the wheel's own ptxas,
including ints specialised to constants (an argument equal to 1), which the interpreter
never sees."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

HERE = Path(__file__).resolve().parent
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason=f"the triton wheel has no ptxas ({PTXAS})")
def test_new_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, str(HERE / "triton_compile.py")], env=env,
                          capture_output=True, text=True, timeout=600, cwd=HERE.parent)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("OK ") >= 12, proc.stdout
