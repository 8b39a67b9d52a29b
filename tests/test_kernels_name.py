"""The repository's ``kernels/`` folder is ``duollm.kernels``; a probe for a top-level
``kernels`` package (transformers looks for Hugging Face's hub-kernels package that way) must
neither compile our kernels a second time nor mistake them for that package."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_top_level_kernels_import_is_empty():
    pytest.importorskip("triton")
    code = ("import sys, kernels; "
            "print(sorted(m for m in sys.modules if m.startswith('kernels.')), "
            "hasattr(kernels, 'duo_ffn'), hasattr(kernels, '__version__'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "False", "False"]


def test_transformers_probe_finds_no_hub_kernels_in_a_checkout():
    pytest.importorskip("transformers")
    code = ("from transformers.utils.import_utils import is_kernels_available; "
            "print(is_kernels_available())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
