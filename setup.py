"""Installs ``duollm`` (with the top-level ``kernels/`` as ``duollm.kernels``) and, where torch
has CUDA and nvcc is found, the CUDA extension ``duollm._C`` built from ``csrc/``.

Set ``DUOLLM_SKIP_CUDA_BUILD=1`` to skip the extension. Install with
``pip install --no-build-isolation -e .`` so the build sees the torch you already have.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
TRANSFORMERS = "transformers>=5.17,<6"  # the Makefile's TRANSFORMERS default matches


def cuda_extension():
    """The ``duollm._C`` extension, or None with the reason printed."""
    if os.environ.get("DUOLLM_SKIP_CUDA_BUILD", "0") == "1":
        print("duollm: DUOLLM_SKIP_CUDA_BUILD=1, the CUDA backend (duollm._C) is not built",
              file=sys.stderr)
        return None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("duollm: torch is not importable at build time (use --no-build-isolation); "
              "the CUDA backend (duollm._C) is not built", file=sys.stderr)
        return None
    if torch.version.cuda is None or (CUDA_HOME is None and shutil.which("nvcc") is None):
        # pip shows this only with -v; `duollm info` says the same after any install.
        print(f"duollm: torch {torch.__version__} has no CUDA or nvcc is missing; the CUDA "
              "backend (duollm._C) is not built (the torch and triton backends still work; "
              "`duollm info` reports this)", file=sys.stderr)
        return None
    sources = sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/*.cpp"))
    if not sources:
        return None
    ext = CUDAExtension(
        "duollm._C", sources,
        # No -std flag: torch's extension builder picks the standard its headers need.
        extra_compile_args={"cxx": ["-O3"],
                            "nvcc": ["-O3", "--use_fast_math",
                                     "-gencode=arch=compute_90,code=sm_90"]})
    return ext, BuildExtension


ext = cuda_extension()
setup(
    name="duollm",
    version="0.1.0",
    description="Triton and CUDA kernels for adaptive computation in transformer FFN layers "
                "(Duo-LLM), with the research framework around them",
    long_description=open(os.path.join(ROOT, "README.md")).read()
    if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["duollm", "duollm.*"]) + ["duollm.kernels"],
    package_dir={"duollm": "duollm", "duollm.kernels": "kernels"},
    # The ranges users install with: what the suite has passed with (README "Versions").
    # make test pins exact versions inside them (constraints.txt); make test-oldest and make
    # test-latest run the suite at either end.
    install_requires=["torch>=2.11", "numpy", "safetensors", "tqdm", "matplotlib"],
    extras_require={
        "triton": ["triton>=3.6"],
        # duollm.hf wraps transformers models; import duollm works without it. 5.17 is the
        # oldest release the suite passed with; 6 may rename what duollm.hf relies on.
        "hf": [TRANSFORMERS],
        "test": ["pytest", "hypothesis", "pytest-benchmark", TRANSFORMERS, "ruff"],
        "bench": ["pytest-benchmark", "matplotlib"],
    },
    entry_points={"console_scripts": ["duollm = duollm.cli:main"]},
    ext_modules=[ext[0]] if ext else [],
    cmdclass={"build_ext": ext[1]} if ext else {},
)
