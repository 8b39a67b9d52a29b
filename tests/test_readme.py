"""The README's "Drop into a Hugging Face model" example runs as written."""
import os
import re
import tempfile

import pytest

pytest.importorskip("transformers", reason="the HF example needs transformers")

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _section_code(title: str) -> str:
    """The first ```python block of the README section headed ``## title``."""
    text = open(README).read()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end >= 0 else len(text)]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, f"no python block in README section {title!r}"
    return match.group(1)


def test_hf_example_runs_as_written(tmp_path, monkeypatch):
    real = tempfile.mkdtemp  # the example's own bare mkdtemp() lands in tmp_path: no litter
    monkeypatch.setattr(tempfile, "mkdtemp",
                        lambda *a, **k: real(*a, **k) if a or k else str(tmp_path))
    code = _section_code("Drop into a Hugging Face model")
    namespace = {"__name__": "readme_example"}
    exec(compile(code, "README.md (Drop into a Hugging Face model)", "exec"), namespace)
    # What the example shows actually happened: the model converted, the sub-model exported.
    from duollm import hf

    assert hf.is_converted(namespace["model"]) and hf.is_converted(namespace["again"])
    assert set(namespace["result"].val_loss) == {"big", "small", "random"}
    assert namespace["llama"].config.num_hidden_layers == namespace["duo"].config.n_layers
    assert (tmp_path / "converted" / "duollm.json").is_file()
