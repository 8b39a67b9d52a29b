"""Tests of duollm.checkpoint: bit-exact round trips, tied weights and atomic saves."""
import json
import os

import pytest
import torch

import duollm.checkpoint as ckpt_mod
from duollm import DuoConfig, DuoLLM
from duollm.checkpoint import load_checkpoint, load_into, read_meta, save_checkpoint



def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return DuoLLM(DuoConfig.from_name("tiny", n_layers=2, **overrides))


def _assert_same_model(a, b):
    assert a.config == b.config
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert ba.keys() == bb.keys()
    for name in ba:
        assert torch.equal(ba[name], bb[name]), name


def _train_steps(model, opt, n=2):
    for _ in range(n):
        x = torch.randint(0, 256, (2, 9))
        loss = model.token_losses(x, "big").mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_round_trip_bit_exact_with_tied_weights(tmp_path):
    model = _model()
    with torch.no_grad():  # make embed/lm_head distinguishable from a fresh init
        model.embed.weight.add_(0.5)
    path = save_checkpoint(tmp_path / "ck", model, step=7, extra={"note": "hi"})
    assert sorted(os.listdir(path)) == ["meta.json", "model.safetensors", "state.pt"]
    loaded, state = load_checkpoint(path)
    _assert_same_model(model, loaded)
    assert state["step"] == 7 and state["extra"] == {"note": "hi"}
    assert state["config"] == model.config
    # The tie survives: one tensor, stored once.
    assert loaded.lm_head.weight is loaded.embed.weight
    assert read_meta(path)["aliases"] == {"lm_head.weight": "embed.weight"}


def test_untied_round_trip(tmp_path):
    model = _model(tie_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    save_checkpoint(tmp_path / "ck", model)
    loaded, _ = load_checkpoint(tmp_path / "ck")
    _assert_same_model(model, loaded)
    assert loaded.lm_head.weight is not loaded.embed.weight
    assert read_meta(tmp_path / "ck")["aliases"] == {}


def test_optimizer_and_rng_round_trip(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train_steps(model, opt)
    gen = torch.Generator().manual_seed(5)
    torch.randint(10, (3,), generator=gen)
    save_checkpoint(tmp_path / "ck", model, opt, step=2, generator=gen)
    expected_draw = torch.randint(1000, (8,), generator=gen)
    expected_global = torch.rand(4)

    model2 = _model(seed=1)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    gen2 = torch.Generator().manual_seed(99)
    torch.rand(17)  # disturb the global RNG
    state = load_into(tmp_path / "ck", model2, opt2, generator=gen2, restore_rng=True)
    assert state["step"] == 2
    _assert_same_model(model, model2)
    assert torch.equal(torch.randint(1000, (8,), generator=gen2), expected_draw)
    assert torch.equal(torch.rand(4), expected_global)
    # Continuing both gives identical weights: the optimizer moments came back exactly.
    torch.manual_seed(3)
    _train_steps(model, opt)
    torch.manual_seed(3)
    _train_steps(model2, opt2)
    _assert_same_model(model, model2)


def test_load_into_rejects_other_shape(tmp_path):
    save_checkpoint(tmp_path / "ck", _model())
    other = DuoLLM(DuoConfig.from_name("tiny", n_layers=2, d_small=32))
    with pytest.raises(ValueError, match="config"):
        load_into(tmp_path / "ck", other)
    with pytest.raises(ValueError, match="optimizer"):
        load_into(tmp_path / "ck", _model(), torch.optim.SGD(_model().parameters(), lr=1))


def test_missing_and_incomplete(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "half")
    with pytest.raises(TypeError, match="extra"):
        save_checkpoint(tmp_path / "ck", _model(), extra={"x": object()})
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("fail_in", ["save_file", "save"])
def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch, fail_in):
    model = _model()
    path = tmp_path / "ck"
    save_checkpoint(path, model, step=1)
    before = {n: open(path / n, "rb").read() for n in os.listdir(path)}

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt("simulated crash mid-save")

    if fail_in == "save_file":
        monkeypatch.setattr(ckpt_mod, "save_file", boom)
    else:
        # Let the weights be written, then die writing the optimizer/RNG state.
        monkeypatch.setattr(ckpt_mod.torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, step=2)
    assert calls
    monkeypatch.undo()

    after = {n: open(path / n, "rb").read() for n in os.listdir(path)}
    assert after == before  # byte-for-byte the old checkpoint
    loaded, state = load_checkpoint(path)
    assert state["step"] == 1
    assert not torch.equal(loaded.embed.weight, model.embed.weight)
    assert os.listdir(tmp_path) == ["ck"]  # the temporary directory was cleaned up


def test_crash_between_renames_recovers_old(tmp_path):
    model = _model()
    path = tmp_path / "ck"
    save_checkpoint(path, model, step=1)
    real_replace = os.replace
    calls = []

    def replace_then_die(src, dst):
        calls.append((src, dst))
        real_replace(src, dst)
        if len(calls) == 1:  # the old one is set aside; die before the new one moves in
            raise SystemExit("power cut")

    ckpt_mod.os.replace = replace_then_die
    try:
        with pytest.raises(SystemExit):
            save_checkpoint(path, model, step=2)
    finally:
        ckpt_mod.os.replace = real_replace
    assert not path.exists()
    loaded, state = load_checkpoint(path)  # found the set-aside copy
    assert state["step"] == 1
    _assert_same_model(model, loaded)
    save_checkpoint(path, model, step=3)  # the next save cleans up the leftovers
    assert os.listdir(tmp_path) == ["ck"]
    assert load_checkpoint(path)[1]["step"] == 3


def test_meta_is_json_with_config(tmp_path):
    model = _model()
    save_checkpoint(tmp_path / "ck", model, step=0)
    with open(tmp_path / "ck" / "meta.json") as f:
        meta = json.load(f)
    assert DuoConfig.from_dict(meta["config"]) == model.config
    assert meta["format_version"] == ckpt_mod.FORMAT_VERSION


@pytest.mark.parametrize("aliases", [{"lm_head.weight": "embed.weight"},
                                     {"ghost.weight": "nowhere.weight"}, ["x"]])
def test_tampered_aliases_never_replace_a_stored_tensor(tmp_path, aliases):
    """An alias names a tied weight stored once; in an edited meta.json it used to overwrite
    the stored lm_head with the embedding, silently."""
    model = _model(tie_embeddings=False)
    save_checkpoint(tmp_path / "ck", model, step=0)
    meta_file = tmp_path / "ck" / "meta.json"
    meta = json.loads(meta_file.read_text())
    assert meta["aliases"] == {}
    meta_file.write_text(json.dumps({**meta, "aliases": aliases}))
    with pytest.raises(ValueError, match="alias"):
        load_checkpoint(tmp_path / "ck")


def test_tied_aliases_still_load(tmp_path):
    model = _model(tie_embeddings=True)
    save_checkpoint(tmp_path / "ck", model, step=0)
    assert read_meta(tmp_path / "ck")["aliases"]  # the tie is stored as an alias
    loaded, _ = load_checkpoint(tmp_path / "ck")
    _assert_same_model(model, loaded)
    assert loaded.lm_head.weight is loaded.embed.weight
