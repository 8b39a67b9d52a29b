"""The CUDA sources build without a GPU (docs/kernels.md): every ``csrc/*.cu`` compiles on
its own with nvcc, only ``csrc/bindings.cpp`` sees torch or Python headers, and setup.py says
why it skips the extension where it cannot build it. Runs in CI on the CPU."""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(p.name for p in CSRC.glob("*.cu"))
# What torch's CUDAExtension adds to every nvcc command: the kernels must compile with them.
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr"]
TORCH_OR_PYTHON_INCLUDE = re.compile(
    r'^\s*#\s*include\s*[<"](torch/|ATen/|c10/|caffe2/|pybind11/|Python\.h)', re.M)


def _nvcc():
    found = shutil.which("nvcc")
    if found is None and os.environ.get("CUDA_HOME"):
        candidate = pathlib.Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"
        found = str(candidate) if candidate.exists() else None
    return found


@pytest.fixture(scope="session")
def nvcc_builds(tmp_path_factory):
    """Compile each .cu file once: {name: (command, returncode, log)}."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc is not on PATH (nor in $CUDA_HOME/bin): the CUDA sources are "
                    "compile-checked only where the CUDA toolkit is installed")
    out_dir = tmp_path_factory.mktemp("nvcc")
    builds = {}
    for name in CU_FILES:
        cmd = [nvcc, "-std=c++17", "-arch=sm_90", *TORCH_NVCC_FLAGS, "-c", str(CSRC / name),
               "-o", str(out_dir / (name + ".o"))]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        builds[name] = (" ".join(cmd), proc.returncode, proc.stdout + proc.stderr)
    return builds


@pytest.mark.parametrize("name", CU_FILES)
def test_cu_file_compiles_standalone(name, nvcc_builds):
    cmd, rc, log = nvcc_builds[name]
    assert rc == 0, f"{cmd}\nfailed:\n{log}"
    ours = [line for line in log.splitlines() if "warning" in line and str(CSRC) in line]
    assert not ours, f"{cmd}\nwarnings in csrc:\n" + "\n".join(ours)


def test_only_bindings_includes_torch_or_python_headers():
    sources = sorted(p for p in CSRC.iterdir() if p.suffix in (".cu", ".cuh", ".cpp", ".h"))
    offenders = [p.name for p in sources
                 if p.name != "bindings.cpp" and TORCH_OR_PYTHON_INCLUDE.search(p.read_text())]
    assert not offenders, f"only csrc/bindings.cpp may include torch/Python headers: {offenders}"
    bindings = (CSRC / "bindings.cpp").read_text()
    assert TORCH_OR_PYTHON_INCLUDE.search(bindings)
    modules = [p.name for p in sources if "PYBIND11_MODULE" in p.read_text()]
    assert modules == ["bindings.cpp"], f"one binding file expected, found {modules}"


def test_local_includes_exist():
    for p in sorted(CSRC.glob("*.c*")) + sorted(CSRC.glob("*.cuh")):
        for inc in re.findall(r'^\s*#\s*include\s*"([^"]+)"', p.read_text(), re.M):
            assert (CSRC / inc).exists(), f"{p.name} includes missing {inc}"


def _setup_stderr(env_extra):
    env = dict(os.environ, **env_extra)
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_setup_skip_env_says_so():
    assert "DUOLLM_SKIP_CUDA_BUILD=1" in _setup_stderr({"DUOLLM_SKIP_CUDA_BUILD": "1"})


@pytest.mark.skipif(torch.version.cuda is not None, reason="torch has CUDA here: the extension "
                    "is built, so there is no CPU-build message to check")
def test_setup_cpu_torch_says_so():
    err = _setup_stderr({"DUOLLM_SKIP_CUDA_BUILD": "0"})
    assert "has no CUDA" in err and "duollm._C" in err
