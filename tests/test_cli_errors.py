"""The command line as a user meets it (issue 11): every mistake is caught before any work,
reported in one or two lines naming the option, with exit status 2 and no traceback, and
nothing is left behind; Ctrl-C during ``train`` names the last checkpoint and the resume
command."""
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from duollm import cli, ops, usage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--no-progress"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh current folder holding the files the bad invocations point at."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "binary.dat").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    (tmp_path / "tiny.txt").write_text("abc")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "corpus.txt").write_text("hello world, " * 400)
    os.makedirs(tmp_path / "a_dir")
    os.makedirs(tmp_path / "empty_run")
    return tmp_path


def _tree(path):
    return sorted(os.path.relpath(os.path.join(d, f), path)
                  for d, dirs, files in os.walk(path) for f in files + dirs)


@pytest.fixture
def no_work(monkeypatch):
    """Make any training or measuring fail loudly: a checked mistake must stop before it."""
    def forbidden(*a, **k):
        raise AssertionError("work started despite a bad option")

    import duollm.bench.decode as decode
    import duollm.bench.model_bench as model_bench
    import duollm.bench.speedup as speedup
    import duollm.train as train_mod

    monkeypatch.setattr(train_mod, "train", forbidden)
    monkeypatch.setattr(speedup, "sweep", forbidden)
    monkeypatch.setattr(model_bench, "DuoLLM", forbidden)
    monkeypatch.setattr(decode, "layer_rows", forbidden)
    monkeypatch.setattr(decode, "model_rows", forbidden)
    monkeypatch.setattr(decode.llama_compare, "layer_pairs", forbidden)
    monkeypatch.setattr(decode.llama_compare, "model_pairs", forbidden)


# (argv, the option the message must name, a fragment of the message)
BAD = [
    (["train", "--steps", "0"], "--steps", ">= 1"),
    (["train", "--steps", "-3"], "--steps", ">= 1"),
    (["train", "--lr", "-1"], "--lr", ">= 0"),
    (["train", "--lr", "0"], "--lr", "--lr > 0"),
    (["train", "--min-lr", "1"], "--min-lr", "--min-lr <= --lr"),
    (["train", "--lr", "nan"], "--lr", "finite"),
    (["train", "--batch-size", "0"], "--batch-size", ">= 1"),
    (["train", "--seq-len", "0"], "--seq-len", ">= 1"),
    (["train", "--seq-len", "4096"], "--seq-len", "max_seq_len"),
    (["train", "--warmup", "-1"], "--warmup", ">= 0"),
    (["train", "--eval-batches", "0"], "--eval-batches", ">= 1"),
    (["train", "--eval-every", "-5"], "--eval-every", ">= 0"),
    (["train", "--weight-decay", "-0.1"], "--weight-decay", ">= 0"),
    (["train", "--grad-clip", "inf"], "--grad-clip", "finite"),
    (["train", "--seed", "-1"], "--seed", ">= 0"),
    (["train", "--val-fraction", "1.5"], "--val-fraction", "< 1"),
    (["train", "--val-fraction", "0"], "--val-fraction", "> 0"),
    (["train", "--p-big", "0.6"], "--p-big", "summing to 1"),
    (["train", "--p-skip", "-0.5", "--p-big", "1.0"], "--p-skip", "non-negative"),
    (["train", "--threads", "-1"], "--threads", ">= 0"),
    (["train", "--data", "missing.txt"], "--data", "no such file"),
    (["train", "--data", "empty.txt"], "--data", "is empty"),
    (["train", "--data", "binary.dat"], "--data", "binary"),
    (["train", "--data", "latin1.txt"], "--data", "not UTF-8"),
    (["train", "--data", "a_dir"], "--data", "folder"),
    (["train", "--data", "tiny.txt"], "--data", "too short"),
    (["train", "--data", "corpus.txt", "--seq-len", "100", "--val-fraction", "0.01"],
     "--seq-len", "validation split"),
    (["train", "--out", "a_file", "--steps", "60"], "--out", "is a file"),
    (["train", "--out", "a_file/run"], "--out", "is a file"),
    (["train", "--device", "cuda"], "--device", "this machine has: cpu"),
    (["train", "--device", "cuda:7"], "--device", "this machine has"),
    (["train", "--device", "tpu"], "--device", "cpu"),
    (["train", "--backend", "nope"], "--backend", "unknown backend"),
    (["train", "--backend", "cuda"], "--backend", "cannot run"),
    (["train", "--resume"], "--resume", "needs --out"),
    (["train", "--resume-if-present"], "--resume-if-present", "needs --out"),
    (["train", "--checkpoint-every", "5"], "--checkpoint-every", "needs --out"),
    (["train", "--out", "empty_run", "--resume"], "--resume", "no checkpoint"),
    (["train", "--out", "never_made", "--resume"], "--resume", "no checkpoint"),
    (["bench", "speedup", "--quick", "--backends", "triton"], "--backends", "cannot run"),
    (["bench", "speedup", "--quick", "--backends", "cuda"], "--backends", "cannot run"),
    (["bench", "speedup", "--quick", "--backends", "nope"], "--backends", "unknown"),
    (["bench", "speedup", "--quick", "--repeats", "0"], "--repeats", ">= 1"),
    (["bench", "speedup", "--quick", "--budget", "-1"], "--budget", "> 0"),
    (["bench", "speedup", "--quick", "--time-limit", "0"], "--time-limit", "> 0"),
    (["bench", "speedup", "--quick", "--tokens", "abc"], "--tokens", "abc"),
    (["bench", "speedup", "--quick", "--tokens", "0"], "--tokens", "positive"),
    (["bench", "speedup", "--quick", "--shapes", "huge"], "--shapes", "huge"),
    (["bench", "speedup", "--quick", "--mixes", "1:1:1"], "--mixes", "summing to 1"),
    (["bench", "speedup", "--quick", "--baselines", "fast"], "--baselines", "fast"),
    (["bench", "speedup", "--quick", "--out", "a_file"], "--out", "is a file"),
    (["bench", "speedup", "--quick", "--out", "x", "--commit-results"], "--commit-results",
     "either"),
    (["bench", "speedup", "--quick", "--threads", "-2"], "--threads", ">= 0"),
    (["bench", "speedup", "--device", "cuda"], "--device", "this machine has: cpu"),
    (["bench", "model", "--quick", "--phases", "fly"], "--phases", "fly"),
    (["bench", "model", "--quick", "--mixes", "bad"], "--mixes", "bad"),
    (["bench", "model", "--quick", "--batch", "0"], "--batch", ">= 1"),
    (["bench", "model", "--quick", "--backends", "cuda"], "--backends", "cannot run"),
    (["bench", "decode", "--quick", "--device", "cuda"], "--device", "this machine has"),
    (["bench", "decode", "--quick", "--shape", "huge"], "--shape", "huge"),
    (["bench", "decode", "--quick", "--mixes", "2:0:0"], "--mixes", "summing to 1"),
    (["bench", "decode", "--quick", "--mixes", ","], "--mixes", "comma-separated"),
    (["bench", "decode", "--quick", "--context", "-1"], "--context", ">= 0"),
    (["bench", "decode", "--quick", "--n-layers", "0"], "--n-layers", ">= 1"),
    (["bench", "decode", "--quick", "--repeats", "0"], "--repeats", ">= 1"),
    (["bench", "decode", "--quick", "--budget", "0"], "--budget", "> 0"),
    (["bench", "decode", "--quick", "--levels", ","], "--levels", "layer, model, llama"),
    (["bench", "decode", "--quick", "--levels", "llama", "--prefill", "4096"], "--prefill",
     "positions"),
    (["bench", "decode", "--levels", "llama", "--llama-shape", "2x3"], "--llama-shape",
     "LxDxBIGxSMALL"),
    (["bench", "report", "missing_results"], "FILES_OR_DIRS", "no such file"),
    (["bench", "report", "a_dir"], "FILES_OR_DIRS", "no result files"),
    (["study", "--quick", "--budgets", "9"], "--budgets", "9"),
    (["study", "--quick", "--threads", "-1"], "--threads", ">= 0"),
    (["study", "--device", "cuda"], "--device", "this machine has"),
    (["study", "--out", "a_file"], "--out", "is a file"),
]
if torch.cuda.is_available():  # these mistakes are about a machine without CUDA
    BAD = [b for b in BAD if "cuda" not in " ".join(b[0]) or "cuda:7" in b[0]]
if ops.is_available("triton", torch.device("cpu")):  # the interpreter (tests/conftest.py)
    BAD = [b for b in BAD if "triton" not in b[0]]


@pytest.mark.parametrize("argv,option,fragment", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_invocation_exits_2_naming_the_option(argv, option, fragment, workdir, no_work,
                                                  capsys):
    before = _tree(workdir)
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == usage.EXIT_USAGE, (out, err)
    command = " ".join(a for a in argv[:2] if not a.startswith("-")
                       and a in ("train", "study", "bench", "speedup", "model", "decode",
                                 "report"))
    first = err.strip().splitlines()[0]
    assert first.startswith(f"duollm {command}: error: "), err
    named = first[len(f"duollm {command}: error: "):].split(": ")[0]
    assert option in named.split("/"), err
    assert fragment in err, err
    assert len(err.strip().splitlines()) <= 2, err
    assert "Traceback" not in err + out
    assert _tree(workdir) == before  # nothing written, no folder made


def test_out_folder_of_another_run_needs_resume(workdir, capsys):
    out = str(workdir / "run")
    assert cli.main(["train", "--steps", "2", "--out", out] + SMALL) == 0
    capsys.readouterr()
    before = _tree(workdir)
    assert cli.main(["train", "--steps", "4", "--out", out] + SMALL) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "--resume" in err and "step_0000002" in err
    # A checkpoint of another model: refused before training, naming what differs.
    assert cli.main(["train", "--steps", "4", "--out", out, "--resume", "--p-skip", "0.5",
                     "--p-big", "0"] + SMALL) == 2
    err = capsys.readouterr().err
    assert err.startswith("duollm train: error: --resume:") and "p_skip" in err
    assert _tree(workdir) == before


def test_resume_if_present_and_the_resumed_line_without_progress(workdir, capsys):
    out = str(workdir / "run")
    argv = ["train", "--steps", "2", "--out", out, "--resume-if-present"] + SMALL
    assert cli.main(argv) == 0  # nothing to resume: starts afresh
    assert "resumed from" not in capsys.readouterr().out
    argv[2] = "4"
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "resumed from" in text and "at step 2" in text  # --no-progress still says it
    assert sorted(os.listdir(out)) == ["step_0000002", "step_0000004"]


def test_a_diverged_run_is_reported_without_a_traceback(workdir, capsys):
    code = cli.main(["train", "--lr", "1e9", "--min-lr", "0", "--grad-clip", "0", "--steps",
                     "6", "--eval-every", "1"] + SMALL)
    err = capsys.readouterr().err
    assert code == 1 and "training diverged" in err and "--lr" in err
    assert "Traceback" not in err


def test_debug_shows_the_traceback(workdir):
    with pytest.raises(usage.UsageError) as e:
        cli.main(["--debug", "train", "--steps", "0"])
    assert e.value.option == "--steps"


def test_a_bug_keeps_its_traceback(workdir, monkeypatch):
    import duollm.train as train_mod

    def broken(*a, **k):
        raise ValueError("an internal mistake")  # not a user's: must not become exit 2

    monkeypatch.setattr(train_mod, "train", broken)
    with pytest.raises(ValueError, match="internal mistake"):
        cli.main(["train", "--steps", "1"] + SMALL)


# --------------------------------------------------------------------------- the shared checks


def test_usage_checks_directly(tmp_path):
    with pytest.raises(usage.UsageError, match="expected an integer >= 1 and <= 3, got 4"):
        usage.check_int("--n", 4, low=1, high=3)
    with pytest.raises(usage.UsageError, match="expected an integer"):
        usage.check_int("--n", 1.5)
    assert usage.check_int("--n", "7", low=0) == 7
    with pytest.raises(usage.UsageError, match="> 0"):
        usage.check_float("--x", 0.0, low=0.0, low_open=True)
    assert usage.check_float("--x", "0.5", low=0, high=1) == 0.5
    assert usage.check_device("--device", "cpu") == torch.device("cpu")
    assert usage.check_device("--device", "auto").type in ("cpu", "cuda")
    assert usage.check_out_dir("--out", None) is None
    deep = tmp_path / "a" / "b" / "c"
    assert usage.check_out_dir("--out", str(deep)) == str(deep)
    assert not (tmp_path / "a").exists()  # creates nothing
    good = tmp_path / "ok.txt"
    good.write_text("\u00e9t\u00e9 " * 10)
    assert usage.check_data_file("--data", str(good)) == str(good)
    # A multi-byte character split across the read chunks is still valid UTF-8.
    big = tmp_path / "big.txt"
    big.write_bytes(b"a" * ((1 << 20) - 1) + "\u00e9".encode())
    assert usage.check_data_file("--data", str(big)) == str(big)


def test_options_of_maps_fields_to_flags():
    with pytest.raises(usage.UsageError) as e:
        with usage.options_of({"lr": "--lr", "min_lr": "--min-lr"}):
            raise ValueError("lr, min_lr: min_lr must be <= lr")
    assert e.value.option == "--lr/--min-lr"
    assert e.value.message == "--min-lr must be <= --lr"
    with pytest.raises(ValueError, match="other: boom"):  # not an option: passes through
        with usage.options_of({"lr": "--lr"}):
            raise ValueError("other: boom")


def test_thread_rule(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    usage.apply_thread_rule(None, "cpu", 64)
    usage.apply_thread_rule(None, "cpu", 512)   # wide: torch's choice
    usage.apply_thread_rule(3, "cpu", 64)       # asked: as asked
    usage.apply_thread_rule(0, "cpu", 64)       # 0: torch's choice
    usage.apply_thread_rule(None, "cuda", 64)   # not the CPU
    assert calls == [1, 3]
    with pytest.raises(usage.UsageError, match="--threads"):
        usage.apply_thread_rule(-1, "cpu", 64)


def test_show_progress_only_on_a_terminal(monkeypatch):
    class Fake:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    monkeypatch.setattr(sys, "stderr", Fake(False))
    assert not usage.show_progress(True)
    monkeypatch.setattr(sys, "stderr", Fake(True))
    assert usage.show_progress(True) and not usage.show_progress(False)


# --------------------------------------------------------------------------- real processes


def _duollm(*argv, cwd, timeout=180):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)  # as a user runs it: Triton needs a GPU then
    return subprocess.run([sys.executable, "-m", "duollm", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("argv,option", [
    (["train", "--steps", "0"], "--steps"),
    (["train", "--out", "a_file", "--steps", "60"], "--out"),
    pytest.param(["bench", "speedup", "--quick", "--backends", "triton"], "--backends",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs it")),
])
def test_real_exit_status_and_stderr(argv, option, workdir):
    before = _tree(workdir)
    proc = _duollm(*argv, cwd=workdir)
    assert proc.returncode == 2, proc.stderr
    assert f"error: {option}" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2
    assert _tree(workdir) == before


def _interrupt_after_first_checkpoint(argv, workdir, env):
    """Run ``python -m duollm *argv`` in ``workdir`` and send it SIGINT once ``run/`` holds a
    finished (renamed) checkpoint; returns ``(proc, stdout, stderr)``."""
    from duollm.train import latest_checkpoint

    proc = subprocess.Popen([sys.executable, "-m", "duollm", *argv], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while latest_checkpoint(str(workdir / "run")) is None:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, out, err


def test_ctrl_c_during_train_names_the_checkpoint_and_the_resume_command(workdir):
    from duollm.checkpoint import load_checkpoint
    from duollm.train import latest_checkpoint

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = ["train", "--steps", "100000", "--checkpoint-every", "2", "--out", "run",
            "--threads", "1"] + SMALL
    proc, out, err = _interrupt_after_first_checkpoint(argv, workdir, env)
    assert proc.returncode == usage.EXIT_INTERRUPTED, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    ckpt = latest_checkpoint(str(workdir / "run"))
    assert f"last checkpoint: {os.path.join('run', os.path.basename(ckpt))}" in err
    model, state = load_checkpoint(ckpt)  # whole and loadable
    assert state["step"] >= 2 and state["step"] % 2 == 0
    line = next(ln for ln in err.splitlines() if ln.startswith("resume with: "))
    assert shlex.split(line[len("resume with: "):]) == ["duollm"] + argv + ["--resume"]


# --------------------------------------------------------------------------- the thread rule, wired


class _Started(Exception):
    """Raised where a command's work would start: everything before it has run."""


@pytest.mark.parametrize("argv,threads", [
    (["train"] + SMALL, 1),                              # tiny preset, d_model 64: one thread
    (["train", "--threads", "3"] + SMALL, 3),
    (["train", "--preset", "small"] + SMALL, None),      # d_model 192: torch's choice
    (["study", "--quick"], 1),                           # progress asked, stderr no tty
    (["study", "--quick", "--threads", "2"], 2),
    (["bench", "speedup", "--quick"], 1),                # tiny shape
    (["bench", "speedup", "--quick", "--threads", "2"], 2),
    (["bench", "speedup", "--quick", "--shapes", "small"], None),  # d_model 512
])
def test_every_command_applies_the_thread_rule(argv, threads, workdir, monkeypatch):
    """train, study and bench set torch's threads by the one rule before their work, and
    study draws no progress bar into a pipe (stderr here is not a terminal)."""
    import duollm.bench.speedup as speedup
    import duollm.study.pipeline as pipeline
    import duollm.train as train_mod

    calls, progress = [], []

    def started(*a, **k):
        progress.append(k.get("progress"))
        raise _Started

    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(train_mod, "train", started)
    monkeypatch.setattr(pipeline, "run_study", started)
    monkeypatch.setattr(speedup, "sweep", started)
    with pytest.raises(_Started):
        cli.main(argv)
    assert calls == ([] if threads is None else [threads])
    if argv[0] == "study":
        assert progress == [False]


# --------------------------------------------------------------------------- issue 15: the HF
# commands' refusals, footguns and guesswork (engineer C)


def _every_parser(parser):
    """``parser`` and every sub-parser under it (depth first)."""
    import argparse

    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _every_parser(sub)


def test_no_help_says_default_none():
    parsers = list(_every_parser(cli.build_parser()))
    assert len(parsers) >= 10  # info, train, study (+ablations), bench (+5), convert
    for p in parsers:
        text = p.format_help()
        assert "(default: None)" not in text, p.prog
        assert "(default: False)" not in text, p.prog


def test_info_names_transformers_and_whether_duollm_hf_imports(monkeypatch, capsys):
    pytest.importorskip("transformers")
    import transformers

    assert cli.run_info(None) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("hf "))
    assert f"transformers {transformers.__version__}; duollm.hf imports" in line
    # A duollm.hf that cannot import: one line saying why, and info still exits 0.
    monkeypatch.setitem(sys.modules, "duollm.hf", None)
    assert cli.run_info(None) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("hf ")]
    assert len(lines) == 1 and "duollm.hf does NOT import: ModuleNotFoundError" in lines[0]
    monkeypatch.setattr(cli, "_version", lambda dist: "not installed")
    assert "transformers not installed" in cli.hf_status()
    assert "pip install transformers" in cli.hf_status()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Checkpoint folders: a plain Llama (byte vocabulary), one with biased MLPs and a GPT-2,
    which duollm.hf cannot convert."""
    transformers = pytest.importorskip("transformers")
    import hf_models

    root = tmp_path_factory.mktemp("hf_dirs")
    hf_models.llama(vocab_size=256).save_pretrained(root / "plain")
    hf_models.llama(vocab_size=256, mlp_bias=True).save_pretrained(root / "bias")
    config = transformers.GPT2Config(vocab_size=256, n_embd=32, n_layer=2, n_head=4,
                                     n_positions=64, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "gpt2")
    return root


HF_SMALL = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1",
            "--eval-every", "0", "--no-progress"]
STUDY_SMALL = ["--quick", "--steps", "0", "--no-synthetic-check", "--n-random", "5",
               "--budgets", "1"]

# argv ({hf} is the hf_dirs folder), the option the message names, fragments of it
HF_BAD = [
    (["train", "--hf", "{hf}/gpt2", "--d-small", "8", "--out", "run"] + HF_SMALL, "--hf",
     ["gpt2 cannot be converted", "no decoder layers"]),
    (["train", "--hf", "{hf}/bias", "--d-small", "8", "--out", "run"] + HF_SMALL, "--hf",
     ["cannot be converted", "has a bias"]),
    (["study", "--hf", "{hf}/gpt2", "--d-small", "8", "--out", "run"] + STUDY_SMALL, "--hf",
     ["cannot be converted", "no decoder layers"]),
    (["study", "--hf", "{hf}/bias", "--d-small", "8", "--out", "run"] + STUDY_SMALL, "--hf",
     ["cannot be converted", "has a bias"]),
    (["convert", "{hf}/bias", "--d-small", "8", "--out", "run"], "PATH",
     ["cannot be converted", "has a bias"]),
    (["train", "--hf", "{hf}/plain", "--d-small", "8"] + HF_SMALL, "--out",
     ["without it the run would be lost"]),
    (["train", "--hf", "{hf}/plain", "--d-small", "8", "--out", "{hf}/plain"] + HF_SMALL,
     "--out", ["is the checkpoint --hf reads"]),
    (["train", "--hf", "{hf}/plain", "--d-small", "8", "--out", "{hf}/plain/run"] + HF_SMALL,
     "--out", ["is inside the checkpoint --hf reads"]),
    (["study", "--hf", "{hf}/plain", "--d-small", "8", "--out", "{hf}/plain/study"]
     + STUDY_SMALL, "--out", ["inside the checkpoint --hf reads"]),
    (["study", "--data", "tiny.txt", "--quick", "--out", "run"], "--data", ["too short"]),
    (["study", "--data", "tiny.txt", "--out", "run"], "--data", ["too short", "1290 bytes"]),
    (["study", "--quick", "--out", "a_dir_full"], "--out", ["not empty", "--overwrite"]),
    (["study", "--quick", "--out", "a_run", "--overwrite"], "--out", ["holds a checkpoint"]),
    (["study", "--quick", "--overwrite"], "--overwrite", ["only applies with --out"]),
    (["train", "--hf", "{hf}/plain", "--d-small", "8", "--out", "run", "--data", "tiny.txt"],
     "--data", ["too short"]),
    (["train", "--hf", "{hf}/plain", "--d-small", "8", "--out", "run", "--data", "corpus.txt",
      "--seq-len", "100", "--val-fraction", "0.01"], "--seq-len", ["validation split"]),
    (["bench", "hf", "{hf}/plain", "--d-model", "64", "--out", "run"], "--d-model",
     ["with PATH the checkpoint fixes it"]),
    (["bench", "hf", "{hf}/plain", "--d-small", "88", "--out", "run"], "--d-small",
     ["below the MLP width 88"]),
    (["bench", "hf", "{hf}/gpt2", "--out", "run"], "PATH", ["cannot be converted"]),
    (["bench", "hf", "{hf}/plain", "--seq-len", "4096", "--out", "run"], "--seq-len",
     ["max_position_embeddings"]),
]


@pytest.mark.parametrize("argv,option,fragments", HF_BAD,
                         ids=[" ".join(b[0][:4]) + f" {b[1]}" for b in HF_BAD])
def test_hf_commands_refuse_before_any_work(argv, option, fragments, hf_dirs, workdir,
                                            no_work, monkeypatch, capsys):
    """Models convert refuses (GPT-2, a biased MLP), train --hf without --out or into its own
    checkpoint, a study text too short for its windows, a non-empty study --out: exit 2, one
    message naming the option, nothing loaded, trained or written (no empty folder either)."""
    import duollm.bench.hf_bench as hf_bench
    import duollm.study.pipeline as pipeline

    monkeypatch.setattr(pipeline, "run_study", lambda *a, **k: pytest.fail("study started"))
    monkeypatch.setattr(hf_bench, "load_source", lambda *a, **k: pytest.fail("bench loaded"))
    (workdir / "a_dir_full").mkdir()
    (workdir / "a_dir_full" / "notes.txt").write_text("mine")
    (workdir / "a_run" / "step_0000002").mkdir(parents=True)
    argv = [a.replace("{hf}", str(hf_dirs)) for a in argv]
    before, hf_before = _tree(workdir), _tree(hf_dirs)
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == usage.EXIT_USAGE, (out, err)
    command = " ".join(argv[:2]) if argv[0] == "bench" else argv[0]
    assert err.startswith(f"duollm {command}: error: {option}: "), err
    for fragment in fragments:
        assert fragment in err, err
    assert len(err.strip().splitlines()) <= 2 and "Traceback" not in err + out
    assert _tree(workdir) == before and _tree(hf_dirs) == hf_before


def test_convert_refuses_a_read_only_out_folder(hf_dirs, workdir, capsys):
    """An existing empty folder marked read-only is not replaced (root could replace it)."""
    ro = workdir / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code = cli.main(["convert", str(hf_dirs / "plain"), "--d-small", "8", "--out",
                         str(ro)])
        err = capsys.readouterr().err
        assert code == 2 and "--out" in err and "read-only" in err, err
        assert ro.is_dir() and os.stat(ro).st_mode & 0o777 == 0o555 and not os.listdir(ro)
    finally:
        ro.chmod(0o755)


def _resume_argv(hf, out, steps, *extra):
    argv = ["train", "--hf", hf, "--out", out, *HF_SMALL, *extra]
    argv[argv.index("--steps") + 1] = str(steps)
    return argv


def test_train_hf_resume_of_another_model_or_past_its_steps_is_refused(hf_dirs, workdir,
                                                                       capsys):
    plain = str(hf_dirs / "plain")
    assert cli.main(_resume_argv(plain, "run", 2, "--d-small", "8")) == 0
    out = capsys.readouterr().out
    assert "TokenData(" not in out and "training and" in out  # the data in words, no repr
    before = _tree(workdir)
    # Another d_small: named before any loading (it was a raw size mismatch after it).
    assert cli.main(_resume_argv(plain, "run", 3, "--d-small", "4", "--resume")) == 2
    err = capsys.readouterr().err
    assert err.startswith("duollm train: error: --resume: ") and "d_small 8 there, 4 here" in err
    # --steps below the checkpoint's step would train nothing: said, not done silently.
    assert cli.main(_resume_argv(plain, "run", 1, "--d-small", "8", "--resume")) == 2
    err = capsys.readouterr().err
    assert err.startswith("duollm train: error: --steps: ") and "at step 2" in err
    assert _tree(workdir) == before
    # The run folder itself is accepted as --hf: its newest complete step's model.
    (workdir / "run" / "step_0000009").mkdir()  # incomplete (no meta.json): not the newest
    assert cli.main(_resume_argv(str(workdir / "run"), "run2", 1)) == 0
    assert f"stage 1 on {os.path.join(str(workdir / 'run'), 'step_0000002', 'model')}" in \
        capsys.readouterr().out


def test_train_resume_past_its_steps_is_refused(workdir, capsys):
    assert cli.main(["train", "--steps", "2", "--out", "run"] + SMALL) == 0
    out = capsys.readouterr().out
    assert "TokenData(" not in out and "validation tokens" in out
    before = _tree(workdir)
    assert cli.main(["train", "--steps", "1", "--out", "run", "--resume"] + SMALL) == 2
    err = capsys.readouterr().err
    assert err.startswith("duollm train: error: --steps: ") and "step_0000002 is at step 2" in err
    assert _tree(workdir) == before
    # The same step count resumes (nothing to train, the loaded model validated): allowed.
    assert cli.main(["train", "--steps", "2", "--out", "run", "--resume"] + SMALL) == 0


def test_ctrl_c_during_train_hf_names_the_checkpoint_and_the_resume_command(
        hf_dirs, workdir, monkeypatch, capsys):
    """Ctrl-C after a checkpoint: exit 130, the last checkpoint and the exact command that
    resumes (as duollm train does); that command then continues the run."""
    from duollm import hf

    real = hf.train_small

    def interrupted(model, data, cfg, **kw):
        real(model, data, cfg, **kw)  # real checkpoints, then the user presses Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(hf, "train_small", interrupted)
    argv = _resume_argv(str(hf_dirs / "plain"), "run", 2, "--d-small", "8",
                        "--checkpoint-every", "1")
    assert cli.main(argv) == usage.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "duollm train --hf: interrupted (Ctrl-C)" in err and "Traceback" not in err
    assert f"last checkpoint: {os.path.join('run', 'step_0000002')} (step 2 of 2)" in err
    line = next(ln for ln in err.splitlines() if ln.startswith("resume with: "))
    resume = shlex.split(line[len("resume with: "):])
    assert resume == ["duollm"] + argv + ["--resume"]
    monkeypatch.setattr(hf, "train_small", real)
    resume[resume.index("--steps") + 1] = "3"
    assert cli.main(resume[1:]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert os.path.isdir(workdir / "run" / "step_0000003")


def test_loaders_accept_a_run_folder(hf_dirs, workdir, capsys):
    """load_checkpoint, hf.load_converted and hf.load_pretrained given a run folder (or a
    train --hf step folder) load its newest complete step, skipping an incomplete newer one."""
    from duollm import hf
    from duollm.checkpoint import load_checkpoint

    assert cli.main(["train", "--steps", "2", "--checkpoint-every", "1", "--out", "duo"]
                    + SMALL) == 0
    (workdir / "duo" / "step_0000007").mkdir()  # a save cut before its meta.json
    model, state = load_checkpoint(str(workdir / "duo"))
    assert state["step"] == 2
    want, _ = load_checkpoint(str(workdir / "duo" / "step_0000002"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 want.state_dict().values()))
    assert cli.main(_resume_argv(str(hf_dirs / "plain"), "hfrun", 2, "--d-small", "8",
                                 "--checkpoint-every", "1")) == 0
    capsys.readouterr()
    (workdir / "hfrun" / "step_0000005" / "model").mkdir(parents=True)  # incomplete
    step2 = workdir / "hfrun" / "step_0000002"
    want = hf.load_converted(step2 / "model")
    for path in (workdir / "hfrun", step2):
        for got in (hf.load_converted(path), hf.load_pretrained(path)[0]):
            assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(),
                                                         want.state_dict().values()))
    with pytest.raises(ValueError, match="path"):  # nothing to resolve: the loader's error
        hf.load_converted(workdir / "a_dir")


@pytest.mark.slow  # among the suite's slowest (30-75 s); make test stays short
def test_study_hf_run_folder_saves_its_model_names_it_and_prints_stages(hf_dirs, workdir,
                                                                        monkeypatch, capsys):
    """study --hf given a train --hf run folder, --steps 2, no --out and stdout a pipe: one
    line per stage, a default folder named after the model, the trained model saved there,
    and a report naming the model class and its validation losses."""
    import json

    from duollm import hf

    assert cli.main(_resume_argv(str(hf_dirs / "plain"), "hfrun", 2, "--d-small", "8")) == 0
    capsys.readouterr()
    argv = ["study", "--hf", "hfrun"] + STUDY_SMALL
    argv[argv.index("--steps") + 1] = "2"
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    name = "hf-hfrun-step_0000002-default-quick"
    stages = [ln for ln in out.splitlines() if ln.startswith("[study ")]
    assert len(stages) >= 8 and any("training the small FFNs" in ln for ln in stages)
    assert f"report: {os.path.join('runs', name, 'report.md')}" in out
    run = workdir / "runs" / name
    saved = hf.load_converted(run / "model")
    assert hf.spec_of(saved).d_small == 8
    trained_small = saved.model.layers[0].mlp.small.up_proj.weight
    start = hf.load_converted(workdir / "hfrun").model.layers[0].mlp.small.up_proj.weight
    assert not torch.equal(trained_small, start)  # the study's 2 steps, not the input's
    report = (run / "report.md").read_text()
    res = json.loads((run / "results.json").read_text())
    assert "Model `LlamaForCausalLM`" in report and "saved in `model/`" in report
    assert set(res["train_val_loss"]) == {"big", "small", "random"}
    assert f"big {res['train_val_loss']['big']:.4f}" in report
    # --steps 0: nothing trained or saved, the loaded model's losses are still reported.
    argv = ["study", "--hf", "hfrun", "--out", "zero", "--no-progress"] + STUDY_SMALL
    assert cli.main(argv) == 0
    assert "[study " not in capsys.readouterr().out  # --no-progress: no stage lines
    report = (workdir / "zero" / "report.md").read_text()
    assert "Validation loss of the loaded model (no training): big " in report
    assert not (workdir / "zero" / "model").exists()
    # Again into the same --out: refused; with --overwrite the study starts.
    assert cli.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    import duollm.study.pipeline as pipeline

    def started(*a, **k):
        raise _Started

    monkeypatch.setattr(pipeline, "run_study", started)
    with pytest.raises(_Started):
        cli.main(argv + ["--overwrite"])


# --------------------------------------------------------------------------- issue 15: duollm
# export (engineer B)


@pytest.fixture(scope="module")
def export_dirs(tmp_path_factory):
    """A DuoLLM run, a plain module's checkpoint, a plain HF folder, a converted folder and
    one that lost its duollm.json."""
    pytest.importorskip("transformers")
    import hf_models

    from duollm import DuoConfig, DuoLLM, hf
    from duollm.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("export_dirs")
    duo = DuoLLM(DuoConfig.from_name("tiny", n_layers=2))
    save_checkpoint(root / "run" / "step_0000004", duo, step=4)
    save_checkpoint(root / "module", torch.nn.Linear(2, 2))
    hf_models.llama().save_pretrained(root / "plain")
    hf.save_converted(hf.convert(hf_models.llama(), 8), root / "conv")
    # a byte vocabulary: without the refusal, convert and train --hf would run on it
    hf.save_converted(hf.convert(hf_models.llama(vocab_size=256), 8), root / "norecord")
    os.remove(root / "norecord" / "duollm.json")
    return root


EXPORT_BAD = [
    (["{x}/nowhere", "--out", "o"], "PATH", ["no such folder"]),
    (["a_file", "--out", "o"], "PATH", ["is a file"]),
    (["a_dir", "--out", "o"], "PATH", ["not a DuoLLM or converted checkpoint"]),
    (["{x}/plain", "--out", "o"], "PATH", ["plain Hugging Face checkpoint"]),
    (["{x}/norecord", "--out", "o"], "PATH", ["converted model's weights", "duollm.json"]),
    (["{x}/module", "--out", "o"], "PATH", ["holds no DuoConfig"]),
    (["{x}/run", "--which", "medium", "--out", "o"], "--which", ["big or small"]),
    (["{x}/run", "--out", "a_file"], "--out", ["is a file"]),
    (["{x}/conv", "--out", "full"], "--out", ["not empty"]),
    (["{x}/conv", "--out", "{x}/conv/inside"], "--out", ["inside the checkpoint PATH reads"]),
    (["{x}/run", "--out", "{x}/run/step_0000004/x"], "--out", ["inside the checkpoint"]),
]


@pytest.mark.parametrize("argv,option,fragments", EXPORT_BAD,
                         ids=[" ".join(b[0]) + f" {b[1]}" for b in EXPORT_BAD])
def test_export_refuses_before_any_work(argv, option, fragments, export_dirs, workdir,
                                        monkeypatch, capsys):
    """exit 2, one line naming the option, nothing loaded or written."""
    import duollm.checkpoint
    from duollm import hf

    def forbidden(*a, **k):
        raise AssertionError("a model was loaded or written despite a bad option")

    for module, name in ((duollm.checkpoint, "load_checkpoint"), (hf, "load_pretrained"),
                         (hf, "export")):
        monkeypatch.setattr(module, name, forbidden)
    (workdir / "full").mkdir()
    (workdir / "full" / "notes.txt").write_text("mine")
    argv = ["export"] + [a.replace("{x}", str(export_dirs)) for a in argv]
    before, dirs_before = _tree(workdir), _tree(export_dirs)
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == usage.EXIT_USAGE, (out, err)
    assert err.startswith(f"duollm export: error: {option}: "), err
    for fragment in fragments:
        assert fragment in err, err
    assert len(err.strip().splitlines()) <= 2 and "Traceback" not in err + out
    assert _tree(workdir) == before and _tree(export_dirs) == dirs_before


@pytest.mark.parametrize("argv,option", [
    (["convert", "{x}/norecord", "--d-small", "4", "--out", "o"], "PATH"),
    (["train", "--hf", "{x}/norecord", "--d-small", "4", "--out", "o", "--steps", "1"], "--hf"),
])
def test_a_converted_folder_without_its_record_is_not_converted_again(
        argv, option, export_dirs, workdir, no_work, capsys):
    argv = [a.replace("{x}", str(export_dirs)) for a in argv]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"duollm {argv[0]}: error: {option}: "), err
    assert "no duollm.json" in err and "mlp.small" in err
    assert not (workdir / "o").exists()


def test_export_of_a_tampered_converted_folder_exits_2(export_dirs, workdir, capsys):
    import shutil

    shutil.copytree(export_dirs / "conv", workdir / "bad")
    rec = workdir / "bad" / "duollm.json"
    rec.write_text(rec.read_text().replace('"float32"', '"float99"'))
    code = cli.main(["export", "bad", "--out", "o"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("duollm export: error: PATH: ") and "dtype" in err, err
    assert not (workdir / "o").exists()


def test_study_help_and_readme_give_the_same_demo_time():
    """The demo's time in ``duollm study --help`` is the README quickstart's measured one."""
    import re

    from duollm.study.cli import EPILOG

    readme = open(os.path.join(ROOT, "README.md")).read()
    quiet = re.search(r"\((\d+)m\d+s on 2 quiet CPU cores", readme)
    shared = re.search(r"about (\d+) minutes when other jobs share the cores", readme)
    assert quiet and shared, "the README quickstart no longer gives the demo's time"
    said = re.search(r"about (\d+) min on 2 quiet cores, (\d+) when shared", EPILOG)
    assert said and said.groups() == (quiet.group(1), shared.group(1))


@pytest.mark.slow  # a minute: the subprocess imports transformers; the handler itself is
# covered in-process by test_ctrl_c_during_train_hf_names_the_checkpoint_and_the_resume_command
def test_real_ctrl_c_during_train_hf(hf_dirs, workdir):
    """A real SIGINT to ``python -m duollm train --hf``: exit 130, no traceback, the last
    checkpoint (whole: it loads) and the exact resume command, as ``train`` does."""
    from duollm import hf
    from duollm.train import latest_checkpoint

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = _resume_argv(str(hf_dirs / "plain"), "run", 100000, "--d-small", "8",
                        "--checkpoint-every", "2", "--threads", "1")
    proc, out, err = _interrupt_after_first_checkpoint(argv, workdir, env)
    assert proc.returncode == usage.EXIT_INTERRUPTED, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "duollm train --hf: interrupted (Ctrl-C)" in err
    ckpt = latest_checkpoint(str(workdir / "run"))
    assert f"last checkpoint: {os.path.join('run', os.path.basename(ckpt))}" in err
    assert hf.spec_of(hf.load_converted(ckpt)).d_small == 8  # whole and loadable
    line = next(ln for ln in err.splitlines() if ln.startswith("resume with: "))
    assert shlex.split(line[len("resume with: "):]) == ["duollm"] + argv + ["--resume"]
