"""``duollm study --hf``: the checkpoint folder is checked before any work: a plain checkpoint
needs ``--d-small``, budgets are checked against the checkpoint's own layer count, and options
that do not apply are refused rather than silently ignored."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
pytest.importorskip("transformers")
import hf_models  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from duollm import hf as H

    root = tmp_path_factory.mktemp("study_hf")
    plain = hf_models.llama(vocab_size=256)
    plain.save_pretrained(root / "plain")
    H.convert(plain, 16)
    H.save_converted(plain, root / "converted")
    (root / "empty").mkdir()
    return root


@pytest.mark.parametrize("folder, extra, option, words", [
    ("plain", [], "--hf", "--d-small"),
    ("plain", ["--d-small", "0"], "--d-small", ""),
    ("plain", ["--d-small", str(10 ** 6)], "--d-small", ""),
    ("converted", ["--d-small", "8"], "--d-small", "already converted"),
    ("converted", ["--budgets", str(hf_models.N_LAYERS)], "--budgets",
     f"{hf_models.N_LAYERS} layers"),
    ("converted", ["--preset", "tiny"], "--preset", "--hf"),
    ("empty", [], "--hf", "config.json"),
])
def test_bad_hf_options_fail_before_any_work(folders, folder, extra, option, words, tmp_path,
                                             capsys):
    from duollm.cli import main

    out = tmp_path / "never"
    rc = main(["study", "--quick", "--hf", str(folders / folder), "--steps", "0", "--out",
               str(out)] + extra)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert option in err and words in err
    assert "Traceback" not in err
    assert not out.exists()


def test_d_small_without_hf_is_refused(tmp_path, capsys):
    from duollm.cli import main

    rc = main(["study", "--quick", "--d-small", "8", "--out", str(tmp_path / "never")])
    assert rc == 2 and "--d-small" in capsys.readouterr().err


def test_plain_checkpoint_with_d_small_is_converted_and_studied(folders, tmp_path):
    import json

    from duollm.cli import main

    out = tmp_path / "run"
    rc = main(["study", "--quick", "--hf", str(folders / "plain"), "--d-small", "16", "--steps",
               "0", "--out", str(out), "--no-synthetic-check", "--n-random", "5",
               "--no-progress", "--budgets", "1"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["n_layers"] == hf_models.N_LAYERS
