"""A checkpoint folder with ``SHA256SUMS`` (how the study ships its trained model,
``out/model``; tests/test_study.py checks that) is verified on every load."""
import os

import pytest
import torch

from duollm import DuoConfig, DuoLLM
from duollm.checkpoint import (SHA256SUMS, load_checkpoint, save_checkpoint,
                               verify_sha256sums, write_sha256sums)


def _ckpt(tmp_path):
    torch.manual_seed(0)
    model = DuoLLM(DuoConfig.from_name("tiny"))
    return model, save_checkpoint(str(tmp_path / "ck"), model, step=3)


def test_sha256sums_round_trip_and_sha256sum_format(tmp_path):
    import hashlib

    model, path = _ckpt(tmp_path)
    assert verify_sha256sums(path) is False  # nothing to check yet
    write_sha256sums(path)
    lines = open(os.path.join(path, SHA256SUMS)).read().splitlines()
    names = sorted(n for n in os.listdir(path) if n != SHA256SUMS)
    assert [ln.split("  ")[1] for ln in lines] == names  # every file, `sha256sum -c` format
    for ln in lines:
        digest, name = ln.split("  ")
        assert digest == hashlib.sha256(open(os.path.join(path, name), "rb").read()).hexdigest()
    assert verify_sha256sums(path) is True
    loaded, state = load_checkpoint(path)
    assert state["step"] == 3
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("damage", ["flip", "remove", "garble"])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, damage):
    _, path = _ckpt(tmp_path)
    write_sha256sums(path)
    weights = os.path.join(path, "model.safetensors")
    if damage == "flip":
        data = bytearray(open(weights, "rb").read())
        data[-1] ^= 1
        open(weights, "wb").write(bytes(data))
        match = "model.safetensors does not match its SHA-256"
    elif damage == "remove":
        os.remove(weights)
        match = "model.safetensors is listed in SHA256SUMS but missing"
    else:
        with open(os.path.join(path, SHA256SUMS), "a") as f:
            f.write("abc  meta.json\n")
        match = "malformed line"
    with pytest.raises(ValueError, match=match):
        load_checkpoint(path)


def test_write_sha256sums_refuses_a_folder_that_is_no_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        write_sha256sums(str(tmp_path))
