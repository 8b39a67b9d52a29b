"""duollm.hf export (DuoLLM -> HF Llama) and save/load of converted HF models."""
import json

import hf_models as H
import pytest
import torch

from duollm import DuoConfig, DuoLLM

hf = pytest.importorskip("duollm.hf")
transformers = pytest.importorskip("transformers")


def _duo(tie=True, seed=0):
    # Awkward on purpose: 3 heads of 16, non-default theta and eps, odd vocabulary.
    config = DuoConfig(n_layers=2, d_model=48, n_heads=3, vocab_size=61, d_big=100, d_small=20,
                       max_seq_len=64, rope_theta=500.0, norm_eps=1e-6, tie_embeddings=tie)
    torch.manual_seed(seed)
    model = DuoLLM(config).eval()
    with torch.no_grad():  # larger weights than the init, so every part moves the logits
        for p in model.parameters():
            p.mul_(3.0)
    return model


def _load_llama(path):
    model, info = transformers.LlamaForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    return model.eval()


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("which", ["big", "small"])
def test_export_round_trip_gives_the_duo_logits(tmp_path, tie, which):
    duo = _duo(tie)
    path = hf.export(duo, tmp_path / "out", which)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    llama = _load_llama(path)
    t = torch.randint(0, 61, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = duo(t, which)
        out = llama(t).logits
        other = duo(t, "small" if which == "big" else "big")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (other - ref).abs().max() > 1e-2  # the two sub-models differ: which is honoured
    assert llama.config.tie_word_embeddings == tie
    # Decoding with the KV cache agrees too (positions of cached keys).
    with torch.no_grad():
        mine = duo.generate(t[:, :5], 6, which)
        theirs = llama.generate(t[:, :5], max_new_tokens=6, do_sample=False)
    assert torch.equal(mine, theirs)


def test_export_refuses_bad_input_and_existing_folders(tmp_path):
    duo = _duo()
    with pytest.raises(ValueError, match="which"):
        hf.export(duo, tmp_path / "a", "medium")
    with pytest.raises(TypeError, match="duo_model"):
        hf.export(H.llama(), tmp_path / "a")
    assert not (tmp_path / "a").exists()
    hf.export(duo, tmp_path / "a", "big")
    with pytest.raises(FileExistsError, match="overwrite"):
        hf.export(duo, tmp_path / "a", "small")
    hf.export(duo, tmp_path / "a", "small", overwrite=True)
    assert _load_llama(tmp_path / "a").config.intermediate_size == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary left behind


def test_a_failed_write_leaves_no_folder(tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        hf.export(_duo(), tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def _equal_models(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("family", ["llama_gqa", "qwen3"])
def test_save_load_converted_is_bit_exact(tmp_path, family):
    model = hf.convert(H.FAMILIES[family](), 20, init="random", skip=False,
                       probs=(0.0, 0.25, 0.75))
    with torch.no_grad():  # small paths that differ from any fresh init
        for layer in model.model.layers:
            layer.mlp.small.up_proj.weight.add_(0.5)
    hf.save_converted(model, tmp_path / "conv")
    loaded = hf.load_converted(tmp_path / "conv")
    assert type(loaded) is type(model) and hf.is_converted(loaded)
    _equal_models(model, loaded)
    a, b = hf.spec_of(model), hf.spec_of(loaded)
    assert a.to_dict() == b.to_dict() and b.skip is False and b.probs == (0.0, 0.25, 0.75)
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    t = H.tokens()
    with torch.no_grad():
        for routes in ("big", "small", [1, 2, 1]):
            with hf.routing(model, routes):
                ref = model(t).logits
            with hf.routing(loaded, routes):
                assert torch.equal(loaded(t).logits, ref)
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        with hf.routing(model, "random", generator=g1):
            ref = model(t).logits
        with hf.routing(loaded, "random", generator=g2):
            assert torch.equal(loaded(t).logits, ref)


def test_save_load_keeps_bf16(tmp_path):
    model = hf.convert(H.llama(dtype=torch.bfloat16), 16)
    hf.save_converted(model, tmp_path / "bf")
    record = json.loads((tmp_path / "bf" / "duollm.json").read_text())
    assert record["dtype"] == "bfloat16" and record["d_small"] == 16
    loaded = hf.load_converted(tmp_path / "bf")
    assert loaded.model.layers[0].mlp.small.gate_proj.weight.dtype == torch.bfloat16
    _equal_models(model, loaded)


@pytest.mark.parametrize("how", ["from_pretrained", "cast"])
def test_bf16_save_load_gives_the_same_logits(tmp_path, how):
    """RoPE's inv_freq is a non-persistent buffer, rebuilt by the loader: from_pretrained in
    bf16 keeps it float32, ``.to(bfloat16)`` rounds it. Either way the loaded model must compute
    the saved one's logits bit for bit (state dicts alone do not show the difference)."""
    if how == "from_pretrained":
        H.llama(dtype=torch.bfloat16).save_pretrained(tmp_path / "plain")
        model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "plain")
    else:
        model = H.llama(dtype=torch.bfloat16)
    inv_freq = model.model.rotary_emb.inv_freq.dtype
    assert inv_freq == (torch.float32 if how == "from_pretrained" else torch.bfloat16)
    hf.convert(model, 16)
    hf.save_converted(model, tmp_path / "conv")
    loaded = hf.load_converted(tmp_path / "conv")
    assert loaded.model.rotary_emb.inv_freq.dtype == inv_freq
    t = H.tokens(T=48)  # long enough for the rounded frequencies to move the logits
    with torch.no_grad():
        for routes in ("big", "small"):
            with hf.routing(model, routes):
                ref = model(t).logits
            with hf.routing(loaded, routes):
                assert torch.equal(loaded(t).logits, ref), routes


def test_save_refuses_an_unconverted_model(tmp_path):
    with pytest.raises(TypeError, match="convert"):
        hf.save_converted(H.llama(), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(H.VOCAB)}
    vocab["[UNK]"] = 0
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_load_pretrained_reads_converted_and_plain_folders(tmp_path):
    plain = H.qwen2()
    plain.save_pretrained(tmp_path / "plain")
    t = H.tokens()
    with torch.no_grad():
        ref = plain(t).logits
    with pytest.raises(ValueError, match="d_small"):
        hf.load_pretrained(tmp_path / "plain")
    model, tok = hf.load_pretrained(tmp_path / "plain", 16, init="random")
    assert tok is None and hf.is_converted(model) and hf.spec_of(model).d_small == 16
    assert hf.spec_of(model).init == "random"
    with torch.no_grad():
        assert torch.equal(model(t).logits, ref)

    hf.save_converted(model, tmp_path / "conv")
    again, tok = hf.load_pretrained(tmp_path / "conv")
    assert tok is None
    _equal_models(model, again)


def test_load_pretrained_brings_the_tokenizer(tmp_path):
    # A Llama config: transformers picks the saved generic tokenizer for it as is.
    model = hf.convert(H.llama(), 8)
    tokenizer = _tokenizer()
    hf.save_converted(model, tmp_path / "conv", tokenizer=tokenizer)
    again, tok = hf.load_pretrained(tmp_path / "conv")
    _equal_models(model, again)
    assert tok is not None and tok("w5 w7")["input_ids"] == tokenizer("w5 w7")["input_ids"] \
        == [5, 7]
    with pytest.raises(ValueError, match="d_small"):
        hf.load_pretrained(tmp_path / "conv", 16)
    with pytest.raises(ValueError, match="not a folder"):
        hf.load_pretrained(tmp_path / "missing", 8)


def test_load_converted_refuses_a_foreign_record(tmp_path):
    model = hf.convert(H.llama(), 8)
    hf.save_converted(model, tmp_path / "c")
    rec = tmp_path / "c" / "duollm.json"
    rec.write_text(json.dumps({**json.loads(rec.read_text()), "format": "other"}))
    with pytest.raises(ValueError, match="record"):
        hf.load_converted(tmp_path / "c")
