"""Tests of the duollm command line (in-process through cli.main, and once as a console)."""
import importlib.util
import os
import subprocess
import sys
import types

import pytest

from duollm import cli

_real_find_spec = importlib.util.find_spec



def _run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("info", "train", "study", "bench"):
        assert name in out


@pytest.mark.parametrize("command", ["info", "train", "study", "bench"])
def test_subcommand_help(capsys, command):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"duollm {command}" in out and len(out) > 150


def test_train_help_lists_the_knobs(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--preset", "--data", "--steps", "--batch-size", "--seq-len", "--lr",
                 "--p-big", "--p-small", "--p-skip", "--device", "--out", "--resume",
                 "--seed", "--backend", "--amp"):
        assert flag in out, flag


def test_no_command_prints_help(capsys):
    code, out, _ = _run(capsys)
    assert code == 2 and "usage: duollm" in out


def test_info(capsys):
    code, out, _ = _run(capsys, "info")
    assert code == 0
    import torch

    assert torch.__version__ in out and "duollm" in out
    for backend in ("torch", "triton", "cuda"):
        assert f"  {backend}" in out
    assert "torch   available" in out
    if not torch.cuda.is_available():
        assert "cpu only" in out and "cuda    unavailable: " in out
    # Whether the CUDA extension is built is said plainly (pip hides setup.py's message).
    ext = next(ln for ln in out.splitlines() if ln.startswith("cuda ext"))
    assert ("NOT built" in ext) == (importlib.util.find_spec("duollm._C") is None)
    if torch.version.cuda is None:
        assert "has no CUDA" in ext


def test_train_prints_three_losses(capsys, tmp_path):
    code, out, _ = _run(capsys, "train", "--preset", "tiny", "--steps", "3", "--batch-size",
                        "2", "--seq-len", "32", "--eval-batches", "1", "--no-progress",
                        "--out", str(tmp_path / "run"))
    assert code == 0
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("big", "small", "random"):
            rows[parts[0]] = float(parts[1])
    assert set(rows) == {"big", "small", "random"}
    assert all(0 < v < 6 for v in rows.values())
    assert os.path.isdir(tmp_path / "run" / "step_0000003")


def test_train_resume_from_cli(capsys, tmp_path):
    out = str(tmp_path / "run")
    common = ["train", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1",
              "--no-progress", "--out", out]
    assert cli.main(common + ["--steps", "2"]) == 0
    first = capsys.readouterr().out
    assert cli.main(common + ["--steps", "4", "--resume"]) == 0
    second = capsys.readouterr().out
    assert "validation loss" in first and "validation loss" in second
    assert sorted(os.listdir(out)) == ["step_0000002", "step_0000004"]
    from duollm.checkpoint import read_meta

    meta = read_meta(os.path.join(out, "step_0000004"))
    assert meta["step"] == 4 and [h["step"] for h in meta["extra"]["history"]] == [2, 4]


def test_train_bad_argument_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--preset", "huge"])
    assert e.value.code == 2
    assert "--preset" in capsys.readouterr().err


def test_missing_external_module_reports_clearly(capsys, monkeypatch):
    monkeypatch.setitem(cli.EXTERNAL, "nothing", ("duollm.no_such_module", "a missing tool"))
    code, _, err = _run(capsys, "nothing")
    assert code == 2 and "duollm.no_such_module" in err and "not available" in err


def test_external_module_without_hooks_reports_clearly(capsys, monkeypatch):
    monkeypatch.setitem(cli.EXTERNAL, "hookless", ("duollm.data", "no hooks here"))
    code, _, err = _run(capsys, "hookless")
    assert code == 2 and "add_cli" in err


def test_external_module_hooks(capsys, monkeypatch):
    mod = types.ModuleType("duollm_fake_tool")
    mod.add_cli = lambda p: p.add_argument("--level", type=int, default=1)
    mod.run_cli = lambda args: 40 + args.level
    monkeypatch.setitem(sys.modules, "duollm_fake_tool", mod)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "duollm_fake_tool"
                        else _real_find_spec(name, *a))
    monkeypatch.setitem(cli.EXTERNAL, "fake", ("duollm_fake_tool", "a fake tool"))
    code, _, _ = _run(capsys, "fake", "--level", "2")
    assert code == 42


def test_existing_but_broken_external_module_is_not_swallowed(monkeypatch, tmp_path):
    (tmp_path / "duollm_broken_tool.py").write_text("raise RuntimeError('broken on import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.EXTERNAL, "broken", ("duollm_broken_tool", "a broken tool"))
    with pytest.raises(RuntimeError, match="broken on import"):
        cli.main(["info"])


def test_console_entry_points():
    # `python -m duollm` goes through duollm/__main__.py.
    proc = subprocess.run([sys.executable, "-m", "duollm", "--version"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("duollm ")
