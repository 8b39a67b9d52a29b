"""The model's own tokenizer, end to end (issue 17): a BPE tokenizer built here (nothing is
downloaded) travels with a random Llama through ``duollm convert``, ``train --hf`` and its
checkpoints, and ``study --hf`` on a checkpoint reads text with it, says so, and gets another
loss than the same model reading bytes (the case of a folder without a tokenizer, which warns).
"""
import json
import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
pytest.importorskip("transformers")
import hf_models  # noqa: E402
from local_tokenizer import VOCAB, build_tokenizer  # noqa: E402

from duollm.cli import main  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """plain Llama + tokenizer -> convert -> train --hf (2 steps): the last step's model."""
    root = tmp_path_factory.mktemp("chain")
    tok = build_tokenizer(root / "tok")
    hf_models.llama(vocab_size=VOCAB).save_pretrained(root / "plain")
    for name in os.listdir(tok):
        shutil.copy(os.path.join(tok, name), root / "plain")
    assert main(["convert", str(root / "plain"), "--d-small", "16", "--out",
                 str(root / "conv")]) == 0
    assert all((root / "conv" / f).is_file() for f in TOKENIZER_FILES)
    return root


def _train_hf(folder, out, capsys):
    rc = main(["train", "--hf", str(folder), "--steps", "2", "--batch-size", "2", "--seq-len",
               "16", "--eval-batches", "1", "--eval-every", "0", "--no-progress", "--out",
               str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured


def _val_loss(text):
    line = next(ln for ln in text.splitlines() if ln.startswith("big "))
    return float(line.split()[1])


def test_train_hf_uses_and_saves_the_tokenizer(trained, tmp_path, capsys):
    out = _train_hf(trained / "conv", tmp_path / "run", capsys)
    assert "tokenizer: conv (" in out.out and f"vocabulary {VOCAB})" in out.out
    assert "warning" not in out.err
    step = tmp_path / "run" / "step_0000002" / "model"
    assert all((step / f).is_file() for f in TOKENIZER_FILES)  # the checkpoint carries it
    # The same model without its tokenizer reads bytes, and says so.
    bare = tmp_path / "bare"
    shutil.copytree(trained / "conv", bare)
    for f in TOKENIZER_FILES:
        os.remove(bare / f)
    out_b = _train_hf(bare, tmp_path / "run_b", capsys)
    assert "holds no tokenizer" in out_b.err and "UTF-8 bytes" in out_b.err
    assert "tokenizer:" not in out_b.out
    assert _val_loss(out_b.out) != _val_loss(out.out)
    assert not any((tmp_path / "run_b" / "step_0000002" / "model" / f).exists()
                   for f in TOKENIZER_FILES)


def _study(folder, out, capsys):
    rc = main(["study", "--quick", "--hf", str(folder), "--steps", "0", "--out", str(out),
               "--no-synthetic-check", "--n-random", "2", "--router-steps", "2",
               "--oracle-batch", "4", "--budgets", "1", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    res = json.loads((out / "results.json").read_text())
    return captured, {h["name"]: h["all_big"]["estimate"] for h in res["holdouts"]}


@pytest.mark.slow
def test_study_hf_on_a_train_hf_checkpoint_uses_its_tokenizer(trained, tmp_path, capsys):
    _train_hf(trained / "conv", tmp_path / "run", capsys)
    model = tmp_path / "run" / "step_0000002" / "model"
    out, losses = _study(model, tmp_path / "study", capsys)
    assert "tokenizer: model (" in out.out and "holds no tokenizer" not in out.err
    bare = tmp_path / "bare"
    shutil.copytree(model, bare)
    for f in TOKENIZER_FILES:
        os.remove(bare / f)
    out_b, losses_b = _study(bare, tmp_path / "study_b", capsys)
    assert "holds no tokenizer" in out_b.err and "tokenizer:" not in out_b.out
    # the same weights on the same text: the tokenizer's ids give another loss than bytes
    for name, loss in losses.items():
        assert loss != pytest.approx(losses_b[name], abs=1e-3), name
