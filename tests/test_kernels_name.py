"""The repository's ``kernels/`` folder is ``duollm.kernels``. Imported as a top-level ``kernels``
(the checkout root on sys.path: ``python -m ...`` or a script run from the checkout) it must not
stand in for another distribution of that name, such as Hugging Face's ``kernels``, which
transformers imports; and with no such distribution it must do no harm.

Every check runs in a subprocess started in the checkout root, as a user would.
"""
import importlib.machinery
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = os.path.join(ROOT, "kernels", "__init__.py")


def _run(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, *args, "-c", code] if code else
                         [sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _installed_kernels_origin():
    """The origin of an installed ``kernels`` distribution (not this checkout's), or None."""
    spec = importlib.util.find_spec("kernels")  # the test process runs from any folder
    if spec is None or spec.origin is None or os.path.realpath(spec.origin) == OURS:
        path = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != ROOT]
        spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.origin is None or os.path.realpath(spec.origin) == OURS:
        return None
    return os.path.realpath(spec.origin)


needs_hub_kernels = pytest.mark.skipif(
    _installed_kernels_origin() is None,
    reason="no installed 'kernels' distribution (Hugging Face's comes with transformers>=5.25)")


@needs_hub_kernels
def test_from_the_root_kernels_is_the_installed_distribution():
    pytest.importorskip("transformers")
    code = ("import os, sys, transformers.activations, kernels, duollm.hf, duollm.kernels; "
            "print(os.path.realpath(kernels.__file__)); "
            "print(os.path.realpath(duollm.kernels.__file__)); "
            "print(hasattr(duollm.kernels, 'duo_ffn'), kernels is duollm.kernels, "
            "hasattr(kernels, 'duo_ffn'))")
    lines = _run(code).stdout.split("\n")
    assert lines[0] == _installed_kernels_origin()
    assert lines[1] == OURS
    assert lines[2].split() == ["True", "False", "False"]


@needs_hub_kernels
def test_from_the_root_transformers_finds_the_hub_kernels_package():
    pytest.importorskip("transformers")
    code = ("from transformers.utils.import_utils import is_kernels_available; "
            "from transformers.integrations.hub_kernels import CUDAProperties; "
            "print(is_kernels_available())")
    assert _run(code).stdout.strip() == "True"


@needs_hub_kernels
def test_from_the_root_duollm_convert_runs(tmp_path):
    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import hf_models
    finally:
        sys.path.pop(0)
    src = tmp_path / "llama"
    hf_models.llama().save_pretrained(src)
    out = tmp_path / "converted"
    run = _run("", "-m", "duollm", "convert", str(src), "--d-small", "8",
               "--calibration-tokens", "0", "--out", str(out))
    assert os.path.exists(out / "duollm.json"), run.stdout
    assert os.path.exists(out / "config.json")


def test_without_a_distribution_top_level_kernels_is_empty():
    """Simulate a machine without any other ``kernels``: the path search that looks past the
    checkout finds nothing. The import then defines nothing, loads none of our kernel modules
    (nothing compiled twice) and leaves duollm.kernels working."""
    pytest.importorskip("triton")
    code = ("import importlib.machinery as m, sys\n"
            "find = m.PathFinder.find_spec\n"
            "def hidden(name, path=None, target=None):\n"
            "    if name == 'kernels' and path is not None:\n"
            "        return None\n"
            "    return find(name, path, target)\n"
            "m.PathFinder.find_spec = hidden\n"
            "import kernels\n"
            "print(sorted(k for k in sys.modules if k.startswith('kernels.')), "
            "hasattr(kernels, 'duo_ffn'), hasattr(kernels, '__version__'))\n"
            "import duollm.kernels\n"
            "print(hasattr(duollm.kernels, 'duo_ffn'), duollm.kernels is not kernels)\n")
    lines = _run(code).stdout.split("\n")
    assert lines[0].split() == ["[]", "False", "False"]
    assert lines[1].split() == ["True", "True"]


def test_duollm_kernels_is_our_triton_backend_from_anywhere(tmp_path):
    pytest.importorskip("triton")
    code = ("import os, duollm.kernels as k; print(os.path.realpath(k.__file__), "
            "callable(k.duo_ffn), callable(k.group_tokens))")
    for cwd in (ROOT, str(tmp_path)):
        out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                             text=True, timeout=120,
                             env={**os.environ, "TRITON_INTERPRET": "1"})
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.split() == [OURS, "True", "True"]
