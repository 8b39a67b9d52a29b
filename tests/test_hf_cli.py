"""``duollm convert`` and ``duollm train --hf``: option checks (exit 2) and real runs."""
import os

import pytest
import torch

import hf_models  # skips the module without transformers
from duollm import hf
from duollm.cli import main
from duollm.hf.train import MODEL_DIR

D_SMALL = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A plain Llama checkpoint folder whose vocabulary holds bytes (no tokenizer)."""
    path = tmp_path_factory.mktemp("ckpt") / "llama"
    hf_models.llama(vocab_size=256).save_pretrained(path)
    return str(path)


def _usage_error(capsys, argv, option):
    """Run ``argv``; expect exit 2 with one short message naming ``option``, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert option in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) <= 2, err
    return err


def test_convert_refuses_mistakes_before_any_work(tmp_path, capsys, checkpoint):
    out = str(tmp_path / "out")
    _usage_error(capsys, ["convert", str(tmp_path / "nope"), "--d-small", "8", "--out", out],
                 "no such folder")
    a_file = tmp_path / "file.txt"
    a_file.write_text("hi")
    _usage_error(capsys, ["convert", str(a_file), "--d-small", "8", "--out", out], "PATH")
    (tmp_path / "empty").mkdir()
    _usage_error(capsys, ["convert", str(tmp_path / "empty"), "--d-small", "8", "--out", out],
                 "config.json")
    _usage_error(capsys, ["convert", checkpoint, "--d-small", str(hf_models.D_FF), "--out",
                          out], "--d-small")
    _usage_error(capsys, ["convert", checkpoint, "--d-small", "0", "--out", out], "--d-small")
    _usage_error(capsys, ["convert", checkpoint, "--d-small", "8", "--out", str(a_file)],
                 "--out")
    _usage_error(capsys, ["convert", checkpoint, "--d-small", "8", "--init", "random",
                          "--calibration-tokens", "64", "--out", out], "--calibration-tokens")
    assert not os.path.exists(out)  # nothing was written


def test_convert_writes_a_model_that_computes_the_original(tmp_path, capsys, checkpoint):
    out = str(tmp_path / "conv")
    assert main(["convert", checkpoint, "--d-small", str(D_SMALL), "--calibration-tokens",
                 "64", "--out", out]) == 0
    assert "converted 3 layers" in capsys.readouterr().out
    model = hf.load_converted(out)
    assert hf.spec_of(model).d_small == D_SMALL and hf.spec_of(model).init == "prune"
    original = hf_models.llama(vocab_size=256)
    tokens = hf_models.tokens()
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, original(input_ids=tokens).logits)
    # A converted folder is not converted again.
    _usage_error(capsys, ["convert", out, "--d-small", "8", "--out", str(tmp_path / "x")],
                 "already a converted")


def test_convert_random_init_needs_no_calibration_option(tmp_path, capsys, checkpoint):
    """``--init random`` as the README writes it: the calibration default applies to prune
    only, so no ``--calibration-tokens 0`` is needed."""
    out = str(tmp_path / "conv")
    assert main(["convert", checkpoint, "--d-small", str(D_SMALL), "--init", "random",
                 "--out", out]) == 0
    assert "random" in capsys.readouterr().out
    model = hf.load_converted(out)
    assert hf.spec_of(model).init == "random"
    big = model.model.layers[0].mlp.big.gate_proj.weight
    small = model.model.layers[0].mlp.small.gate_proj.weight
    # Not a pruned copy: no small row equals any big row.
    assert not (small[:, None, :] == big[None, :, :]).all(-1).any()


def test_convert_dtype_bf16_loads_as_from_pretrained_gives_it(tmp_path, capsys, checkpoint):
    import transformers

    out = str(tmp_path / "bf16")
    assert main(["convert", checkpoint, "--d-small", str(D_SMALL), "--dtype", "bfloat16",
                 "--calibration-tokens", "0", "--out", out]) == 0
    model = hf.load_converted(out)
    assert model.model.layers[0].mlp.small.up_proj.weight.dtype == torch.bfloat16
    original = transformers.LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    tokens = hf_models.tokens(T=48)
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, original(input_ids=tokens).logits)


def test_convert_refuses_an_unsupported_checkpoint_with_exit_2(tmp_path, capsys):
    path = tmp_path / "phi3"
    hf_models.phi3().save_pretrained(path)
    capsys.readouterr()
    out = tmp_path / "out"
    # Refused after loading (the structure is known only then): transformers' loading bar
    # may precede the message, which is one line naming the layer and the reason.
    assert main(["convert", str(path), "--d-small", "8", "--calibration-tokens", "0", "--out",
                 str(out)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and "PATH" in last and "layer 0" in last and "gate_up" in last
    assert not out.exists()


def _train(path, out, *extra):
    return ["train", "--hf", path, "--steps", "2", "--batch-size", "2", "--seq-len", "16",
            "--eval-batches", "1", "--eval-every", "0", "--out", out, "--no-progress", *extra]


def test_train_hf_trains_checkpoints_and_resumes(tmp_path, capsys, checkpoint):
    out = str(tmp_path / "run")
    assert main(_train(checkpoint, out, "--d-small", str(D_SMALL), "--distill", "0.5")) == 0
    text = capsys.readouterr().out
    assert "small FFNs of width 8" in text and "small" in text.split("validation loss")[1]
    saved = hf.load_converted(os.path.join(out, "step_0000002", MODEL_DIR))
    assert hf.spec_of(saved).d_small == D_SMALL
    # The same folder again needs --resume; with it and more steps it continues.
    _usage_error(capsys, _train(checkpoint, out, "--d-small", str(D_SMALL)), "--resume")
    argv = _train(checkpoint, out, "--d-small", str(D_SMALL), "--resume")
    argv[argv.index("--steps") + 1] = "3"
    assert main(argv) == 0
    assert "resumed from" in capsys.readouterr().out
    assert os.path.isdir(os.path.join(out, "step_0000003"))


def test_train_hf_on_a_converted_folder_with_its_tokenizer(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    import transformers

    words = [f"w{i}" for i in range(1, hf_models.VOCAB)]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    conv = tmp_path / "conv"
    hf.save_converted(hf.convert(hf_models.llama(), D_SMALL), conv, tokenizer=tokenizer)
    text = tmp_path / "text.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(words[i] for i in torch.randint(0, len(words), (600,),
                                                                generator=g).tolist()))
    out = str(tmp_path / "run")
    _usage_error(capsys, _train(str(conv), out, "--d-small", "4"), "--d-small")
    _usage_error(capsys, _train(str(conv), out, "--init", "random"), "--init")
    _usage_error(capsys, _train(str(conv), out, "--data", "synthetic"), "--data")
    assert main(_train(str(conv), out, "--data", str(text))) == 0
    # The text went through the checkpoint's tokenizer: one id per word, 600 split 540/60
    # (bytes would be about six times as many).
    assert "540 training and 60 validation tokens" in capsys.readouterr().out


def test_train_hf_refuses_mistakes(tmp_path, capsys, checkpoint):
    out = str(tmp_path / "run")
    _usage_error(capsys, _train(checkpoint, out), "--d-small")  # a plain checkpoint needs it
    _usage_error(capsys, _train(str(tmp_path / "missing"), out, "--d-small", "8"), "--hf")
    _usage_error(capsys, _train(checkpoint, out, "--d-small", "8", "--distill", "-1"),
                 "--distill")
    _usage_error(capsys, _train(checkpoint, out, "--d-small", "8", "--fsdp"), "--fsdp")
    # The --hf options without --hf: a preset's run would ignore them.
    for extra in (["--d-small", "8"], ["--init", "random"], ["--distill", "0.5"]):
        argv = _train(checkpoint, out, *extra)
        del argv[1:3]  # drop --hf PATH
        _usage_error(capsys, argv, extra[0])
    small_vocab = tmp_path / "small_vocab"
    hf_models.llama().save_pretrained(small_vocab)  # 97 ids: no room for bytes
    capsys.readouterr()  # save_pretrained's progress bar
    _usage_error(capsys, _train(str(small_vocab), out, "--d-small", "8"), "256")
    assert not os.path.exists(out)


def test_convert_without_transformers_says_what_to_install(tmp_path):
    """No transformers: the parser still builds (hf_cli imports nothing of it) and convert
    exits 2 saying what to install, instead of an ImportError traceback."""
    import subprocess
    import sys

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"intermediate_size": 64}')
    (ckpt / "model.safetensors").write_bytes(b"")
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import importlib.util as u; orig = u.find_spec\n"
            "u.find_spec = lambda n, *a: None if n == 'transformers' else orig(n, *a)\n"
            "from duollm.cli import main\n"
            f"sys.exit(main(['convert', {str(ckpt)!r}, '--d-small', '8', '--out', "
            f"{str(tmp_path / 'out')!r}]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "pip install transformers" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()
