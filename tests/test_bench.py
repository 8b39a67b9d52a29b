"""``duollm.bench``: FLOP accounting by hand, the baselines against the reference, and the
``duollm bench speedup --quick`` / ``duollm bench report`` commands end to end (CPU)."""
import csv
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from duollm import reference as R
from duollm.bench import accounting as acc
from duollm.bench.baselines import dense_ffn, naive_routing, sorted_routing
from duollm.reference import BIG, SKIP, SMALL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------- accounting


def test_flops_by_hand_small_shape():
    small = acc.SHAPES["small"]  # d 512, big 2048, small 128
    # Dense: 4096 tokens x 3 GEMMs x 2 x 512 x 2048.
    assert acc.dense_flops(small, 4096) == 4096 * 6 * 512 * 2048 == 25_769_803_776
    # 1/12 of 4096 tokens: 341 big, 3755 small; router 2 x 512 x 3 per token.
    assert acc.exact_counts(acc.MIXES["1/12"], 4096) == (341, 3755, 0)
    routed = acc.routed_flops(small, 341, 3755, 4096)
    assert routed == 341 * 6_291_456 + 3755 * 393_216 + 4096 * 3072 == 3_634_495_488
    assert acc.ideal_speedup(small, 341, 3755, 4096) == pytest.approx(7.0903, abs=1e-4)
    # (0.25, 0.5, 0.25): 1024 big, 2048 small, 1024 skip (the router still runs on them).
    assert acc.exact_counts(acc.MIXES["quarter-skip"], 4096) == (1024, 2048, 1024)
    assert acc.routed_flops(small, 1024, 2048, 4096) == 7_260_340_224
    assert acc.ideal_speedup(small, 1024, 2048, 4096) == pytest.approx(3.5494, abs=1e-4)


def test_flops_by_hand_paper_shape():
    paper = acc.SHAPES["paper"]  # d 2560, big 10240, small 640
    per_big = 6 * 2560 * 10240  # 157,286,400
    assert acc.dense_flops(paper, 1) == per_big == 157_286_400
    # All big: the router's 15,360 FLOPs make the ideal slightly below 1.
    assert acc.ideal_speedup(paper, 1, 0, 1) == pytest.approx(157_286_400 / 157_301_760)
    # All small: big/small = 16, less the router: 157,286,400 / (9,830,400 + 15,360).
    assert acc.ideal_speedup(paper, 0, 16, 16) == pytest.approx(15.9751, abs=1e-4)
    # All skip: only the router runs, 6 d d_big / (2 d 3) = d_big.
    assert acc.ideal_speedup(paper, 0, 0, 64) == pytest.approx(10240.0)


def test_exact_counts_sum_and_zero_fractions():
    half = acc.MIXES["half"]
    assert acc.exact_counts(half, 1) == (1, 0, 0)  # a tie goes to the bigger path
    assert acc.exact_counts(half, 3) == (2, 1, 0)
    assert acc.exact_counts(acc.MIXES["quarter-skip"], 16) == (4, 8, 4)
    assert acc.exact_counts(acc.MIXES["1/12"], 1) == (0, 1, 0)
    assert acc.exact_counts(acc.MIXES["skip"], 5) == (0, 0, 5)
    for n in (0, 1, 7, 16, 1000):
        for mix in acc.MIXES.values():
            counts = acc.exact_counts(mix, n)
            assert sum(counts) == n
            for c, p in zip(counts, (mix.p_big, mix.p_small, mix.p_skip)):
                assert abs(c - p * n) < 1 and (p > 0 or c == 0)


def test_draw_routes_exact_and_shuffled():
    gen = torch.Generator().manual_seed(0)
    r = acc.draw_routes(acc.MIXES["quarter-skip"], 400, gen)
    assert r.dtype == torch.int64
    assert torch.bincount(r, minlength=3).tolist() == [100, 200, 100]
    assert not torch.equal(r, torch.sort(r).values)  # shuffled


def test_parse_mix_and_shape():
    assert acc.parse_mix("1/12:11/12:0").p_big == pytest.approx(1 / 12)
    assert acc.parse_mix("quarter-skip") == acc.MIXES["quarter-skip"]
    assert acc.parse_shape("64:256:16").d_big == 256
    with pytest.raises(ValueError, match="mix"):
        acc.parse_mix("0.5:0.6:0")
    with pytest.raises(ValueError, match="shape"):
        acc.parse_shape("huge")
    assert acc.parse_tokens("1,16k") == [1, 16384]


# --------------------------------------------------------------------------- baselines


def _layer(N=29, d=12, seed=0, routes=None, widths=(0, 5, 9)):
    gen = torch.Generator().manual_seed(seed)
    def w(*s):
        return (torch.randn(*s, generator=gen, dtype=torch.float64) / s[1] ** .5)
    params = tuple(None if k == 0 else (w(k, d), w(k, d), w(d, k)) for k in widths)
    x = torch.randn(N, d, generator=gen, dtype=torch.float64)
    res = torch.randn(N, d, generator=gen, dtype=torch.float64)
    gate = torch.rand(N, generator=gen, dtype=torch.float64) + .5
    if routes is None:
        routes = torch.randint(0, len(widths), (N,), generator=gen)
    return x, routes, params, res, gate


def _grads(fn, x, routes, params, res, gate):
    leaves = [x, res, gate] + [t for p in params if p is not None for t in p]
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    x_, res_, gate_, ws = leaves[0], leaves[1], leaves[2], leaves[3:]
    it = iter(ws)
    p_ = tuple(None if p is None else (next(it), next(it), next(it)) for p in params)
    out = fn(x_, routes, p_, res_, gate_)
    wsum = torch.randn(out.shape, generator=torch.Generator().manual_seed(9),
                       dtype=out.dtype)
    grads = torch.autograd.grad((out * wsum).sum(), leaves, allow_unused=True)
    return out, [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]


@pytest.mark.parametrize("baseline", [naive_routing, sorted_routing])
@pytest.mark.parametrize("routes", [None, torch.full((29,), SKIP), torch.full((29,), SMALL),
                                    torch.tensor([BIG, SKIP] * 14 + [BIG])])
def test_routing_baselines_match_reference(baseline, routes):
    case = _layer(routes=routes)
    out_ref, g_ref = _grads(R.duo_ffn, *case)
    out, g = _grads(baseline, *case)
    torch.testing.assert_close(out, out_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)
    x, r, p, res, gate = case
    with torch.no_grad():
        torch.testing.assert_close(baseline(x, r, p, res), R.duo_ffn(x, r, p, res))
        torch.testing.assert_close(baseline(x, r, p), R.duo_ffn(x, r, p))


def test_sorted_baseline_with_a_skip_path_not_first():
    case = _layer(widths=(4, 0, 6))
    torch.testing.assert_close(sorted_routing(*case), R.duo_ffn(*case))


def test_dense_baseline_is_the_all_big_layer():
    x, _, params, res, gate = _layer()
    all_big = torch.full((x.shape[0],), BIG)
    out_ref, g_ref = _grads(R.duo_ffn, x, all_big, params, res, gate)
    out, g = _grads(dense_ffn, x, all_big, params, res, gate)
    torch.testing.assert_close(out, out_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # the in-place path
        torch.testing.assert_close(dense_ffn(x, None, params, res, gate), out_ref)
        torch.testing.assert_close(dense_ffn(x, None, params), R.swiglu_ffn(x, *params[BIG]))


# --------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``duollm bench speedup --quick`` as a user runs it, without ``--out``: its results go
    to ``runs/bench/<device>/`` under the current folder, nowhere else."""
    from duollm.bench.results import device_slug

    cwd = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("DUOLLM_CHECK_ROUTES", None)  # the default mode, as a user has it
    committed = os.path.join(ROOT, "benchmarks", "results")
    before = sorted(os.walk(committed))
    proc = subprocess.run([sys.executable, "-m", "duollm", "bench", "speedup", "--quick",
                           "--threads", "1"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.walk(committed)) == before  # the committed results are left alone
    out = cwd / "runs" / "bench" / device_slug(torch.device("cpu"))
    assert sorted(os.listdir(cwd)) == ["runs"] and os.listdir(out)
    return out


def test_speedup_quick_writes_results_and_plots(quick_run):
    (js,) = glob.glob(str(quick_run / "speedup-float32-*.json"))
    (cs,) = glob.glob(str(quick_run / "speedup-float32-*.csv"))
    pngs = glob.glob(str(quick_run / "*.png"))
    assert any(p.endswith("-speedup.png") for p in pngs)
    assert any(p.endswith("-efficiency.png") for p in pngs)
    data = json.load(open(js))
    env, rows = data["env"], data["rows"]
    for key in ("device", "torch", "triton", "git_sha", "dtype", "timestamp", "shapes",
                "backends", "baselines"):
        assert key in env, key
    assert env["dtype"] == "float32" and "torch" in env["backends"]
    assert env["route_checks"] == "eager"  # measured in the default mode a user gets
    impls = {r["impl"] for r in rows}
    assert {"dense", "naive", "sorted", "reference", "torch"} <= impls
    mixes = {r["mix"] for r in rows}
    assert mixes == set(acc.MIXES)
    for r in rows:
        assert r.get("error") is None, r
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        n_big, n_small = r["n_big"], r["n_small"]
        if r["impl"] != "dense":
            shape = acc.Shape("tiny", r["d_model"], r["d_big"], r["d_small"])
            assert r["ideal"] == pytest.approx(acc.ideal_speedup(shape, n_big, n_small,
                                                                 r["n_tokens"]))
            assert r["efficiency"] == pytest.approx(r["realised"] / r["ideal"])
    with open(cs) as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_report_renders_markdown(quick_run, tmp_path):
    from duollm.bench.__main__ import main

    out = tmp_path / "report.md"
    assert main(["report", str(quick_run), "--out", str(out)]) == 0
    text = out.read_text()
    assert "## speedup" in text and "| impl |" in text.replace("impl |", "impl |")
    assert "realised" in text and "efficiency" in text
    lines = [ln for ln in text.splitlines() if ln.startswith("| ") and "quarter-skip" in ln]
    assert len(lines) == 2 * 5  # two token counts x (dense, naive, sorted, reference, torch)
    summary = main(["report", str(quick_run), "--summary", "--impls", "torch"])
    assert summary == 0


def test_report_of_nothing_is_an_error(tmp_path):
    from duollm.bench.__main__ import main

    assert main(["report", str(tmp_path)]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("cmd", ["decode", "model"])
def test_decode_and_model_quick(cmd, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "duollm", "bench", cmd, "--quick", "--out",
                           str(tmp_path), "--threads", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert glob.glob(str(tmp_path / f"{cmd}-*.json")) and glob.glob(str(tmp_path / "*.png"))


def test_default_out_dir_is_not_the_committed_results():
    from duollm.bench.results import ROOT as PKG_ROOT
    from duollm.bench.results import committed_results_dir, default_out_dir

    cpu = torch.device("cpu")
    assert default_out_dir(cpu).startswith(os.path.join("runs", "bench", ""))
    assert committed_results_dir(cpu).startswith(os.path.join(PKG_ROOT, "benchmarks",
                                                              "results", ""))


def test_report_reads_kernel_microbenchmarks(tmp_path):
    """``benchmarks/ops/bench_kernels.py`` writes ``{"meta", "rows"}``; the report reads it."""
    from duollm.bench.report import render

    data = {"meta": {"device": "Some GPU", "dtype": "torch.bfloat16", "git_sha": "abc"},
            "rows": [{"name": "gather", "ms": 0.0625, "N": 16384, "d": 2560, "impl": "triton",
                      "gbps": 2707.4, "frac_of_copy": 0.912, "error": None},
                     {"name": "duo_ffn", "ms": 4.87, "N": 16384, "impl": "torch",
                      "mix": "1/12", "ideal_speedup": 9.5, "realized_speedup": 4.75,
                      "efficiency": 0.5, "error": None}]}
    (tmp_path / "kernels.json").write_text(json.dumps(data))
    (tmp_path / "other.json").write_text(json.dumps({"env": {"kind": "hf", "device": "cpu",
                                                              "dtype": "float32"},
                                                      "rows": [{"model": "m", "tok_s": 12.5}]}))
    text = render([str(tmp_path)])
    assert "## kernels" in text and "## hf" in text
    gather = next(ln for ln in text.splitlines() if "| gather |" in ln)
    assert "Some GPU" in gather and "bfloat16" in gather and "91.2%" in gather
    assert "2560" in gather
    duo = next(ln for ln in text.splitlines() if "| duo_ffn |" in ln)
    assert "50.0%" in duo and "4.75" in duo
    assert "12.5" in next(ln for ln in text.splitlines() if "| m |" in ln)


def test_commit_results_resolves_to_the_committed_folder():
    """``--commit-results`` alone passes the shared pre-check and every command's
    ``resolve_out_dir`` then writes into ``benchmarks/results/<device>/``."""
    import argparse

    from duollm.bench import _check_common
    from duollm.bench.common import resolve_out_dir
    from duollm.bench.results import committed_results_dir
    from duollm.usage import UsageError

    cpu = torch.device("cpu")
    for cmd in ("speedup", "decode", "model", "hf"):
        args = argparse.Namespace(bench_command=cmd, commit_results=True, out=None,
                                  device="cpu", quick=False, threads=None)
        _check_common(args)
        assert args.out is None
        assert resolve_out_dir(args, cpu) == committed_results_dir(cpu)
    args = argparse.Namespace(bench_command="speedup", commit_results=True, out="x",
                              device="cpu", quick=False, threads=None)
    with pytest.raises(UsageError, match="--out DIR or --commit-results"):
        _check_common(args)


def test_route_checks_mode_of_a_bench_run(monkeypatch):
    """The bench measures the route-check mode a user gets unless ``--route-checks MODE``
    names another; the mode is recorded; a bad DUOLLM_CHECK_ROUTES is a usage error."""
    from duollm import ops
    from duollm.bench.common import add_device_args, setup_run
    from duollm.usage import UsageError

    import argparse

    parser = argparse.ArgumentParser()
    add_device_args(parser)
    cpu = torch.device("cpu")
    monkeypatch.delenv("DUOLLM_CHECK_ROUTES", raising=False)
    args = parser.parse_args(["--no-malloc-tune"])
    assert setup_run(args, cpu)["route_checks"] == "eager"
    assert "DUOLLM_CHECK_ROUTES" not in os.environ  # the default is left as it is
    args = parser.parse_args(["--no-malloc-tune", "--route-checks", "0"])
    assert setup_run(args, cpu)["route_checks"] == "off" and not ops.route_checks_enabled()
    args = parser.parse_args(["--no-malloc-tune", "--route-checks"])  # bare: the default on
    assert setup_run(args, cpu)["route_checks"] == "eager"
    assert parser.parse_args(["--route-checks", "sync"]).route_checks == "sync"
    monkeypatch.setenv("DUOLLM_CHECK_ROUTES", "bogus")
    with pytest.raises(UsageError, match="--route-checks: the environment's "
                                         "DUOLLM_CHECK_ROUTES='bogus'"):
        setup_run(parser.parse_args(["--no-malloc-tune"]), cpu)
