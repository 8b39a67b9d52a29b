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


def test_ctrl_c_during_train_names_the_checkpoint_and_the_resume_command(workdir):
    from duollm.checkpoint import load_checkpoint
    from duollm.train import latest_checkpoint

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = ["train", "--steps", "100000", "--checkpoint-every", "2", "--out", "run",
            "--threads", "1"] + SMALL
    proc = subprocess.Popen([sys.executable, "-m", "duollm", *argv], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while latest_checkpoint(str(workdir / "run")) is None:  # a finished (renamed) one
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
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
    hf.save_converted(hf.convert(hf_models.llama(), 8), root / "norecord")
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


def test_export_of_a_tampered_converted_folder_exits_2(export_dirs, workdir, capsys):
    import shutil

    shutil.copytree(export_dirs / "conv", workdir / "bad")
    rec = workdir / "bad" / "duollm.json"
    rec.write_text(rec.read_text().replace('"float32"', '"float99"'))
    code = cli.main(["export", "bad", "--out", "o"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("duollm export: error: PATH: ") and "dtype" in err, err
    assert not (workdir / "o").exists()
