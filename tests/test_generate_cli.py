"""``duollm generate`` and ``duollm train-router``: the text equals the library's generate, the
realised mix and FLOPs are the routes' own counts, streaming on a terminal only, and every bad
option exits 2 naming it before anything is loaded or written."""
import io
import os

import pytest
import torch

from duollm import BIG, SKIP, SMALL, DuoConfig, DuoLLM
from duollm.checkpoint import load_checkpoint, save_checkpoint
from duollm.cli import main
from duollm.config import router_flops, swiglu_flops
from duollm.routers import route_and_loss
from duollm.routes import attached_router


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A byte-level DuoLLM checkpoint with a router trained by ``duollm train-router``."""
    path = str(tmp_path_factory.mktemp("gen") / "ck")
    torch.manual_seed(0)
    cfg = DuoConfig(n_layers=3, d_model=32, n_heads=2, vocab_size=256, d_big=64, d_small=8,
                    max_seq_len=64)
    model = DuoLLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
    save_checkpoint(path, model, step=1)
    assert main(["train-router", "--checkpoint", path, "--budget", "0.4", "--steps", "3",
                 "--batch-size", "2", "--seq-len", "16", "--calibration-tokens", "340",
                 "--no-progress", "--device", "cpu"]) == 0
    return path


def _text(prompt: str, ids) -> str:
    return prompt + bytes(ids).decode("utf-8", errors="replace") + "\n"


def _run(capsys, *argv):
    code = main(["generate", *argv, "--device", "cpu"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_router_saves_a_calibrated_router(ckpt):
    model, _ = load_checkpoint(ckpt)
    router = attached_router(model)
    assert router is not None and router.paths == (SMALL, BIG)
    assert router.calibration["budget"] == 0.4 and router.calibration["tokens"] > 0
    assert abs(router.calibration["realised"] - 0.4) < 0.1


@pytest.mark.parametrize("routes,policy", [("big", "big"), ("small", "small"),
                                           ("2,1,0", [BIG, SMALL, SKIP]),
                                           ("big,skip,small", [BIG, SKIP, SMALL])])
def test_piped_text_equals_generate_and_the_mix_is_the_pattern(capsys, ckpt, routes, policy):
    code, out, err = _run(capsys, "--checkpoint", ckpt, "--prompt", "The model", "--routes",
                          routes, "--max-new-tokens", "7")
    assert code == 0
    model, _ = load_checkpoint(ckpt)
    prompt = torch.tensor([list(b"The model")])
    ref = model.generate(prompt, 7, routes=policy)[0, 9:].tolist()
    assert out == _text("The model", ref)
    assert "\x1b" not in out and "\r" not in out  # plain text when piped
    pattern = [2] * 3 if policy == "big" else [1] * 3 if policy == "small" else policy
    names = {2: "big 1.000", 1: "small 1.000", 0: "skip 1.000"}
    for i, r in enumerate(pattern):
        assert names[r] in next(line for line in err.splitlines()
                                if line.strip().startswith(f"layer {i:>2}:"))
    realised = sum(swiglu_flops(32, {2: 64, 1: 8, 0: 0}[r]) for r in pattern)
    assert f"{realised / 1e6:.3f} M realised vs {3 * swiglu_flops(32, 64) / 1e6:.3f} M" in err
    assert "tokens/s" in err and "over 15 token positions" in err  # 9 prompt + 6 fed back


def test_router_routes_text_mix_and_flops_are_the_routers(capsys, ckpt):
    code, out, err = _run(capsys, "--checkpoint", ckpt, "--prompt", "abc", "--routes",
                          "router", "--max-new-tokens", "9")
    assert code == 0
    model, _ = load_checkpoint(ckpt)
    prompt = torch.tensor([list(b"abc")])
    full = model.generate(prompt, 9, routes="router")
    assert out == _text("abc", full[0, 3:].tolist())
    # The routes of the no-cache forward over every position the FFNs ran on.
    _, routes = route_and_loss(model, attached_router(model), full)  # (L, 1, 11)
    counts = torch.stack([(routes == k).sum((1, 2)) for k in range(3)], 1).double()  # (L, 3)
    shares = counts / counts.sum(1, keepdim=True)
    for i in range(3):
        line = next(ln for ln in err.splitlines() if ln.strip().startswith(f"layer {i:>2}:"))
        assert f"big {shares[i, 2]:.3f}  small {shares[i, 1]:.3f}" in line
    per = torch.tensor([0.0, swiglu_flops(32, 8), swiglu_flops(32, 64)], dtype=torch.float64)
    realised = float((shares @ per).sum()) + 3 * router_flops(32, 2)
    assert f"{realised / 1e6:.3f} M realised (router included)" in err


def test_random_routes_count_their_draws(capsys, ckpt):
    code, _, err = _run(capsys, "--checkpoint", ckpt, "--prompt", "xy", "--routes", "random",
                        "--max-new-tokens", "30")
    assert code == 0
    shares = [float(ln.split("big ")[1].split()[0]) for ln in err.splitlines()
              if ln.strip().startswith("layer")]
    assert len(shares) == 3 and all(0.15 < s < 0.85 for s in shares)  # p_big = 0.5, 31 draws


class _Terminal(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = []

    def isatty(self):
        return True

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


def test_streams_token_by_token_on_a_terminal(monkeypatch, capsys, ckpt):
    term = _Terminal()
    monkeypatch.setattr("sys.stdout", term)
    assert main(["generate", "--checkpoint", ckpt, "--prompt", "ab", "--max-new-tokens", "6",
                 "--device", "cpu"]) == 0
    model, _ = load_checkpoint(ckpt)
    ref = model.generate(torch.tensor([list(b"ab")]), 6)[0, 2:].tolist()
    assert term.getvalue() == _text("ab", ref)
    assert len(term.writes) >= 4  # the prompt, then pieces as they came, then the newline


@pytest.mark.parametrize("argv,option", [
    (["--routes", "medium"], "--routes"),
    (["--routes", "2,1"], "--routes"),
    (["--routes", "2,1,3"], "--routes"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "80"], "--max-new-tokens"),
    (["--temperature", "-1"], "--temperature"),
    (["--prompt", ""], "--prompt"),
    (["--backend", "fortran"], "--backend"),
    (["--cuda-graph"], "--cuda-graph"),
])
def test_bad_options_exit_2_naming_the_option(capsys, ckpt, argv, option):
    base = {"--prompt": "hi"}
    args = ["generate", "--checkpoint", ckpt, "--device", "cpu"]
    if "--prompt" not in argv:
        args += ["--prompt", base["--prompt"]]
    assert main(args + argv) == 2
    err = capsys.readouterr().err
    assert f"error: {option}: " in err and "Traceback" not in err


def test_bad_model_folders_exit_2(capsys, tmp_path, ckpt):
    assert main(["generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "x"]) == 2
    assert "error: --checkpoint: no such folder" in capsys.readouterr().err
    bare = str(tmp_path / "bare")
    model, _ = load_checkpoint(ckpt)
    from duollm.routes import attach_router

    attach_router(model, None)
    save_checkpoint(bare, model)
    assert main(["generate", "--checkpoint", bare, "--prompt", "x", "--routes", "router"]) == 2
    assert "error: --routes: router: " in capsys.readouterr().err
    assert main(["generate", "--hf", str(tmp_path), "--prompt", "x"]) == 2
    assert "error: --hf: " in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # neither or both folders: argparse names them
        main(["generate", "--prompt", "x"])
    assert e.value.code == 2 and "--checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "x", "--checkpoint", ckpt, "--hf", ckpt])
    assert e.value.code == 2


def test_train_router_bad_options_exit_2_and_leave_the_folder(capsys, tmp_path, ckpt):
    before = sorted(os.listdir(ckpt))
    for argv, option in ((["--budget", "1.5"], "--budget"), (["--budget", "0"], "--budget"),
                         (["--budget", "0.3", "--steps", "0"], "--steps"),
                         (["--budget", "0.3", "--seq-len", "64"], "--seq-len"),
                         (["--budget", "0.3", "--seq-len", "16", "--data",
                           str(tmp_path / "no.txt")], "--data")):
        assert main(["train-router", "--checkpoint", ckpt, "--device", "cpu", *argv]) == 2
        assert f"error: {option}: " in capsys.readouterr().err
    assert sorted(os.listdir(ckpt)) == before


def test_generate_on_a_converted_hf_folder(capsys, tmp_path):
    H = pytest.importorskip("tests.hf_models")
    from duollm import hf, router_io
    from duollm.routers import train_router

    model = hf.convert(H.llama(vocab_size=256), 16, init="prune")
    stream = torch.randint(0, 256, (600,), generator=torch.Generator().manual_seed(0))
    router, _ = train_router(model, stream, target_big=0.3, steps=2, batch_size=2, seq_len=16)
    hf.save_converted(model, tmp_path / "conv")
    router_io.write_router(str(tmp_path / "conv"), router)
    for routes in ("small", "router"):
        code, out, err = _run(capsys, "--hf", str(tmp_path / "conv"), "--prompt", "Hi",
                              "--routes", routes, "--max-new-tokens", "5")
        assert code == 0, err
        prompt = torch.tensor([list(b"Hi")])
        with torch.no_grad(), hf.routing(model, router if routes == "router" else routes):
            ref = model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                 pad_token_id=0)
        assert out == _text("Hi", ref[0, 2:].tolist())
        assert ("router included" in err) == (routes == "router")
    code, _, err = _run(capsys, "--hf", str(tmp_path / "conv"), "--prompt", "Hi",
                        "--cuda-graph")
    assert code == 2 and "error: --cuda-graph: " in err


def test_a_run_folder_means_its_newest_step(capsys, tmp_path, ckpt):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ckpt, run / "step_0000001")
    code, out, _ = _run(capsys, "--checkpoint", str(run), "--prompt", "ab", "--routes",
                        "router", "--max-new-tokens", "3")
    assert code == 0
    model, _ = load_checkpoint(ckpt)
    ref = model.generate(torch.tensor([list(b"ab")]), 3, routes="router")[0, 2:].tolist()
    assert out == _text("ab", ref)
