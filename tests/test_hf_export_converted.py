"""Converted HF models through folders (issue 15): a save_converted folder that plain
transformers loads as the original model, old-layout folders, a converted folder without its
record, tampered records and weights, writers killed mid-save, and export of a converted
model's all-big / all-small sub-model as a plain checkpoint of its own class."""
import json
import os
import subprocess
import sys
import textwrap

import hf_models as H
import pytest
import safetensors.torch
import torch

hf = pytest.importorskip("duollm.hf")
transformers = pytest.importorskip("transformers")

D_SMALL = 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _converted(family="llama_gqa", seed=0):
    """(original logits, converted model) with small paths no fresh init would give."""
    model = H.FAMILIES[family](seed)
    t = H.tokens()
    with torch.no_grad():
        ref = model(t).logits
    hf.convert(model, D_SMALL, init="random")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.small.up_proj.weight.add_(0.5)
    return ref, model


def _equal_models(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _small_keys(model):
    return {k for k in model.state_dict() if ".mlp.small." in k}


def _logits(model, routes=None):
    t = H.tokens()
    with torch.no_grad():
        if routes is None:
            return model(t).logits
        with hf.routing(model, routes):
            return model(t).logits


# --------------------------------------------------------------------------- item 7


@pytest.mark.parametrize("family", ["llama_gqa", "qwen3", "mistral"])
def test_plain_from_pretrained_of_a_converted_folder_is_the_original(tmp_path, family):
    ref, model = _converted(family)
    hf.save_converted(model, tmp_path / "conv")
    cls = type(model)
    plain, info = cls.from_pretrained(tmp_path / "conv", output_loading_info=True)
    assert info["missing_keys"] == set() and info["mismatched_keys"] == set()
    # the small paths are the only thing transformers skips (its usual unexpected-keys notice)
    assert info["unexpected_keys"] == _small_keys(model) != set()
    assert not hf.is_converted(plain)
    assert torch.equal(_logits(plain.eval()), ref)
    auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "conv")
    assert type(auto) is cls and torch.equal(_logits(auto.eval()), ref)
    # ... and duollm still loads both paths bit-exactly
    loaded = hf.load_converted(tmp_path / "conv")
    _equal_models(model, loaded)
    for routes in ("big", "small", [1, 2, 1]):
        assert torch.equal(_logits(loaded, routes), _logits(model, routes))


def test_folders_of_the_old_layout_still_load(tmp_path):
    """Version 1 stored every weight under its converted name (mlp.big.*)."""
    _, model = _converted()
    hf.save_converted(model, tmp_path / "v1")
    safetensors.torch.save_model(model, str(tmp_path / "v1" / "model.safetensors"),
                                 metadata={"format": "pt"})
    rec = tmp_path / "v1" / "duollm.json"
    rec.write_text(json.dumps({**json.loads(rec.read_text()), "version": 1}))
    keys = safetensors.torch.load_file(tmp_path / "v1" / "model.safetensors").keys()
    assert any(".mlp.big." in k for k in keys)
    loaded = hf.load_converted(tmp_path / "v1")
    _equal_models(model, loaded)
    assert torch.equal(_logits(loaded, "small"), _logits(model, "small"))


# --------------------------------------------------------------------------- item 6


@pytest.mark.parametrize("layout", ["current", "old"])
def test_load_pretrained_refuses_a_converted_folder_without_its_record(tmp_path, layout):
    _, model = _converted()
    hf.save_converted(model, tmp_path / "conv")
    if layout == "old":
        safetensors.torch.save_model(model, str(tmp_path / "conv" / "model.safetensors"))
    (tmp_path / "conv" / "duollm.json").unlink()
    with pytest.raises(ValueError, match=r"converted.*duollm\.json") as e:
        hf.load_pretrained(tmp_path / "conv", D_SMALL)
    assert "mlp.small" in str(e.value) or "mlp.big" in str(e.value)
    # from_pretrained gives the original only when the big paths sit under their own names
    assert ("from_pretrained" in str(e.value)) == (layout == "current")


def test_converted_weight_names_tells_converted_from_plain_folders(tmp_path):
    from duollm.hf.export import converted_weight_names

    H.llama().save_pretrained(tmp_path / "plain")
    assert converted_weight_names(tmp_path / "plain") == []
    _, model = _converted()
    hf.save_converted(model, tmp_path / "conv")
    assert converted_weight_names(tmp_path / "conv") == sorted(_small_keys(model))


# --------------------------------------------------------------------------- item 12: records


@pytest.mark.parametrize("field,value", [
    ("dtype", "int8"), ("dtype", "floatx"), ("dtype", 5),
    ("buffer_dtypes", "float32"), ("buffer_dtypes", {"model.rotary_emb.inv_freq": "nope"}),
    ("buffer_dtypes", {"no.such.buffer": "float32"}),
    ("model_class", "LlamaConfig"), ("model_class", 7), ("model_class", "os"),
    # a real model class of another config than config.json's (was an AttributeError)
    ("model_class", "GPT2LMHeadModel"), ("model_class", "MistralForCausalLM"),
    ("d_small", "8"), ("d_small", 500), ("skip", "yes"), ("probs", [1, 2]),
    ("init", "zero"), ("n_layers", 7), ("d_big", True),
])
def test_a_tampered_record_is_refused_naming_the_field(tmp_path, field, value):
    _, model = _converted()
    hf.save_converted(model, tmp_path / "c")
    rec = tmp_path / "c" / "duollm.json"
    rec.write_text(json.dumps({**json.loads(rec.read_text()), field: value}))
    with pytest.raises(ValueError, match="duollm.json") as e:
        hf.load_converted(tmp_path / "c")
    assert field in str(e.value)


def test_weights_of_another_dtype_than_recorded_are_refused_not_cast(tmp_path):
    _, model = _converted()
    hf.save_converted(model, tmp_path / "c")
    rec = tmp_path / "c" / "duollm.json"
    rec.write_text(json.dumps({**json.loads(rec.read_text()), "dtype": "bfloat16"}))
    with pytest.raises(ValueError, match="float32"):
        hf.load_converted(tmp_path / "c")


def test_missing_or_foreign_weights_are_refused(tmp_path):
    _, model = _converted()
    hf.save_converted(model, tmp_path / "c")
    file = tmp_path / "c" / "model.safetensors"
    tensors = safetensors.torch.load_file(file)
    dropped = dict(tensors)
    del dropped["model.layers.1.mlp.small.down_proj.weight"]
    safetensors.torch.save_file(dropped, file)
    with pytest.raises(ValueError, match="lacks.*small.down_proj"):
        hf.load_converted(tmp_path / "c")
    safetensors.torch.save_file({**tensors, "model.extra.weight": torch.zeros(2)}, file)
    with pytest.raises(ValueError, match="model.extra.weight"):
        hf.load_converted(tmp_path / "c")


# --------------------------------------------------------------------------- item 12: kills

_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, os.path.join({root!r}, "tests"))
    import safetensors.torch, torch
    import hf_models as H
    from duollm import hf
    from duollm.train import TrainConfig
    from duollm.hf.train import save_stage1, small_modules
    phase, target = sys.argv[1], sys.argv[2]
    model = hf.convert(H.llama(), 8)
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    if phase == "rename":  # the old folder set aside, the new one not yet in place
        real = os.rename
        calls = []
        def rename(src, dst):
            calls.append(src)
            real(src, dst)
            if len(calls) == 1:
                die()
        os.rename = rename
    else:
        safetensors.torch.save_file = die
    if phase == "stage1":
        save_stage1(target, model, small_modules(model), None, 3, torch.Generator(),
                    TrainConfig(out_dir=target), 0.0, [], "data")
    else:
        hf.save_converted(model, target, overwrite=True)
""")


def _kill_a_writer(phase, target):
    script = _KILLED_WRITER.format(root=ROOT)
    proc = subprocess.run([sys.executable, "-c", script, phase, str(target)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == -9, proc.stderr[-2000:]


@pytest.mark.parametrize("phase", ["write", "rename"])
def test_leftovers_of_killed_writers_go_with_the_next_write(tmp_path, phase):
    _, model = _converted()
    target = tmp_path / "conv"
    if phase == "rename":
        hf.save_converted(model, target)
    _kill_a_writer(phase, target)
    hidden = [e for e in os.listdir(tmp_path) if e.startswith(".conv.")]
    assert hidden, os.listdir(tmp_path)  # the kill really left something behind
    hf.save_converted(model, target, overwrite=True)
    assert os.listdir(tmp_path) == ["conv"]
    _equal_models(model, hf.load_converted(target))


def test_leftovers_of_a_killed_stage1_save_go_with_the_next_save(tmp_path):
    from duollm.hf.train import save_stage1, small_modules
    from duollm.train import TrainConfig

    run = tmp_path / "run"
    _kill_a_writer("stage1", run)
    assert [e for e in os.listdir(run) if e.startswith(".step_0000003.tmp-")]
    _, model = _converted()
    save_stage1(str(run), model, small_modules(model), None, 4, torch.Generator(),
                TrainConfig(out_dir=str(run)), 0.0, [], "data")
    assert os.listdir(run) == ["step_0000004"]


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("family", ["llama_gqa", "qwen3", "mistral"])
@pytest.mark.parametrize("which", ["big", "small"])
def test_export_of_a_converted_model_gives_its_routed_logits(tmp_path, family, which):
    ref, model = _converted(family)
    path = hf.export(model, tmp_path / "out", which)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    cls = type(model)
    plain, info = cls.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    plain.eval()
    assert not hf.is_converted(plain)
    want = D_SMALL if which == "small" else H.D_FF
    assert plain.config.intermediate_size == want
    assert plain.model.layers[0].mlp.gate_proj.weight.shape == (want, H.D_MODEL)
    assert torch.equal(_logits(plain), _logits(model, which))
    if which == "big":
        assert torch.equal(_logits(plain), ref)  # all-big is the original model
    else:
        assert not torch.equal(_logits(plain), ref)
    t = H.tokens()
    with torch.no_grad(), hf.routing(model, which):
        mine = model.generate(t[:, :5], max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        theirs = plain.generate(t[:, :5], max_new_tokens=5, do_sample=False)
    assert torch.equal(mine, theirs)
    # the converted model itself is left as it was
    assert hf.is_converted(model) and model.config.intermediate_size == H.D_FF


def test_export_of_a_converted_model_refuses_bad_input(tmp_path):
    _, model = _converted()
    with pytest.raises(ValueError, match="which"):
        hf.export(model, tmp_path / "a", "skip")
    with pytest.raises(TypeError, match="converted"):
        hf.export(H.llama(), tmp_path / "a", "small")
    assert not (tmp_path / "a").exists()
    hf.export(model, tmp_path / "a", "small")
    with pytest.raises(FileExistsError, match="overwrite"):
        hf.export(model, tmp_path / "a", "big")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "a").intermediate_size == D_SMALL
