"""The package surface: lazy public submodules, and what a bare ``import duollm`` loads."""
import importlib.util
import subprocess
import sys

import pytest

import duollm


def _run(code: str) -> str:
    """Run ``code`` in a fresh interpreter (a clean sys.modules) and return its stdout."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_bare_import_is_light():
    # transformers and matplotlib are optional or heavy: only duollm.hf / the report need them.
    loaded = _run("import sys, duollm; "
                  "print(' '.join(m for m in ('transformers', 'matplotlib', 'duollm.oracle', "
                  "'duollm.hf', 'duollm.study') if m in sys.modules))")
    assert loaded.split() == []


def test_submodule_after_bare_import():
    out = _run("import sys, duollm; f = duollm.oracle.search; "
               "print(f.__module__, 'transformers' in sys.modules)")
    assert out.split() == ["duollm.oracle", "False"]


@pytest.mark.parametrize("name", [n for n in duollm._LAZY_SUBMODULES if n != "hf"])
def test_every_lazy_submodule_resolves(name):
    mod = getattr(duollm, name)
    assert mod is sys.modules[f"duollm.{name}"]
    assert name in dir(duollm)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="transformers is not installed (pip install duollm[hf])")
def test_hf_is_lazy_and_resolves():
    if importlib.util.find_spec("duollm.hf") is None:
        pytest.skip("duollm.hf is not in this tree yet")
    out = _run("import sys, duollm; m = duollm.hf; "
               "print(m.__name__, 'transformers' in sys.modules)")
    assert out.split() == ["duollm.hf", "True"]


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        duollm.no_such_thing  # noqa: B018
    assert not hasattr(duollm, "no_such_thing")
