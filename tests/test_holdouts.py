"""The study's holdouts: prose from pydoc_data, code from this interpreter's own stdlib."""
import os
import sys

import pytest
import torch

from duollm.study import holdouts as H


def test_code_holdout_is_the_interpreter_stdlib():
    root = H.stdlib_dir()
    assert os.path.isfile(os.path.join(root, "os.py"))
    files = H.code_files(200_000)
    assert files and all(os.path.dirname(f) == root and f.endswith(".py") for f in files)
    assert files == sorted(files)
    assert sum(os.path.getsize(f) for f in files) <= max(200_000, os.path.getsize(files[0]))
    with open(files[0], "rb") as f:
        first = f.read()
    h = H.load_holdout("code", max_code_bytes=200_000)
    stream = torch.cat([h.train, h.val])
    # the stream starts with the first file's bytes, read now from the interpreter's files
    n = min(len(first), 2000)
    assert bytes(stream[:n].tolist()) == first[:n]
    assert "code" in h.name and root not in h.source  # no machine path in a report
    assert h.source == (f"the Python standard library ({len(files)} files, Python "
                        f"{sys.version_info.major}.{sys.version_info.minor})")


def test_prose_holdout_and_training_stream():
    p = H.load_holdout("prose")
    c = H.load_holdout("code", max_code_bytes=100_000)
    data = H.training_data([p, c])
    assert torch.equal(data.train, torch.cat([p.train, c.train]))
    assert torch.equal(data.val, p.val) and data.name == "prose+code"
    # no holdout byte is in a training part: train and val are disjoint slices of a stream
    assert p.train.numel() + p.val.numel() > 100_000


def test_windows_and_bad_input():
    w = H.windows(torch.arange(100), 4, 10)
    assert w.shape == (4, 10) and w[0, 0] == 0 and w[-1, -1] == 99
    with pytest.raises(ValueError, match="tokens"):
        H.windows(torch.arange(5), 2, 10)
    with pytest.raises(ValueError, match="name"):
        H.load_holdout("poetry")
    with pytest.raises(ValueError, match="max_bytes"):
        H.code_files(0)
