"""The study pipeline: `duollm study --quick` end to end, the paper's token oracle read from
the pattern table against brute force and against duollm.oracle, and option validation."""
import dataclasses
import itertools
import json

import pytest
import torch

from duollm.reference import BIG, SKIP, SMALL
from duollm.study import results as R
from duollm.study import stages as St
from duollm.study.report import plot_names


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from duollm.cli import main

    out = tmp_path_factory.mktemp("study") / "run"
    rc = main(["study", "--quick", "--out", str(out), "--no-progress", "--n-random", "10"])
    assert rc == 0
    return out


def test_study_quick_writes_report_and_every_plot(quick_run, capsys):
    out = quick_run
    res = json.loads((out / "results.json").read_text())
    names = [h["name"] for h in res["holdouts"]]
    assert names == ["prose", "code"]
    report = (out / "report.md").read_text()
    for name in plot_names(names, synthetic=True):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"({name})" in report, name
    assert "## Holdout: prose" in report and "## Holdout: code" in report
    assert "base='pattern'" in report and "base='big'" in report
    assert report.count("| greedy | ") == 2 and report.count("| beam (width 4) | ") == 2
    rows = [r for r in report.splitlines() if r.startswith("| 4a, ") or r.startswith("| 2d, ")]
    assert rows and all(any(f"**{o}**" in r for o in (
        "holds", "does not hold", "not resolved", "not testable",
        "not distinguishable from selection")) for r in rows)
    # verdicts.json beside report.md: one entry per verdict with the fields
    verdicts = json.loads((out / "verdicts.json").read_text())
    assert verdicts == res["verdicts"]
    keys = {(v["figure"], v["holdout"]) for v in verdicts}
    assert {("4a", "prose"), ("4c", "code"), ("2d", "prose"), ("3d", "code"),
            ("5/6", "synthetic")} <= keys
    for v in verdicts:
        assert {"figure", "holdout", "claim", "criterion", "setting", "estimate", "interval",
                "null_estimate", "vs_null", "p", "p_holm", "verdict"} <= set(v)
        assert set(v["setting"]) == {"ours", "paper", "why"}
        if v["verdict"] == "not testable":
            assert v["reason"]  # the measured reason
        else:
            assert all(p["interval"] is not None for p in v["parts"])
    assert "Holm-corrected together" in report and "| Holm p |" in report


def test_results_json_has_the_typed_fields(quick_run):
    res = json.loads((quick_run / "results.json").read_text())
    assert set(f.name for f in dataclasses.fields(R.StudyResult)) == set(res)
    L = res["config"]["n_layers"]
    for h in res["holdouts"]:
        assert set(f.name for f in dataclasses.fields(R.HoldoutResult)) == set(h)
        assert h["n_selection"] + h["n_evaluation"] == h["n_sequences"]
        curves = {c["name"]: c for c in h["curves"]}
        assert set(curves) == {"oracle", "fixed", "random", "oracle_context_big", "router"}
        for name in ("oracle", "fixed", "random", "oracle_context_big"):
            assert len(curves[name]["points"]) == L + 1
        # the oracle picks per token among the fixed patterns: never worse than the best one
        for o, f in zip(curves["oracle"]["points"], curves["fixed"]["points"]):
            assert o["estimate"] <= f["estimate"] + 1e-9
        # k = L: one pattern (all big) for every method
        assert curves["oracle"]["points"][L]["estimate"] == pytest.approx(
            h["all_big"]["estimate"])
        for iv in (h["all_big"], h["oracle_vs_random"]["interval"]):
            assert iv["low"] <= iv["estimate"] <= iv["high"]
        assert h["capacity"]["verdict"]["outcome"] in ("holds", "does not hold",
                                                       "not resolved")
        for r in h["routers"]:
            assert r["realised_big"] + r["realised_small"] + r["realised_skip"] == \
                pytest.approx(1.0)
    printed_keys = res["timings"]
    assert "total_s" in printed_keys


def test_run_study_returns_typed_result_with_known_kinds(tmp_path):
    from duollm.study import run_study

    res = run_study(data="synthetic", quick=True, steps=5, router_steps=2, n_random=5,
                    out=str(tmp_path / "syn"), progress=False, synthetic_check=False,
                    budgets=[1, 2])
    assert isinstance(res, R.StudyResult) and res.synthetic is None
    h = res.holdouts[0]
    assert isinstance(h, R.HoldoutResult) and h.name == "synthetic"
    assert set(h.difficulty.by_kind) >= {"noise", "compute"}
    assert h.capacity.budgets == [1, 2]
    assert (tmp_path / "syn" / "report.md").is_file()


def _tiny_model(skip=True):
    from duollm.config import DuoConfig
    from duollm.model import DuoLLM

    torch.manual_seed(0)
    cfg = DuoConfig.from_name("tiny", n_layers=3, d_model=32, n_heads=2, d_big=64, d_small=8,
                              skip=skip)
    return DuoLLM(cfg).eval()


def _brute(model, tokens, patterns):
    """(n, B, T-1): each pattern run over the whole sequence with the plain forward."""
    with torch.no_grad():
        return torch.stack([model.token_losses(tokens, list(p)) for p in patterns]).double()


def test_table_oracle_equals_brute_force_and_duollm_oracle():
    from duollm import oracle as O

    model = _tiny_model()
    tokens = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(1))
    tab = St.pattern_table(model, tokens)
    pats = list(itertools.product((SKIP, SMALL, BIG), repeat=3))
    brute = _brute(model, tokens, pats)
    order = [tab.index(p) for p in pats]
    assert torch.allclose(tab.losses[order], brute, atol=1e-5)
    n_big = torch.tensor([sum(x == BIG for x in p) for p in pats])
    n_small = torch.tensor([sum(x == SMALL for x in p) for p in pats])
    n_skip = torch.tensor([sum(x == SKIP for x in p) for p in pats])
    for k in range(4):
        # big/small only, exactly k
        m = (n_big == k) & (n_skip == 0)
        want = brute[m].min(0).values
        got, idx = tab.oracle(tab.mask(k))
        assert torch.allclose(got, want, atol=1e-5)
        # the chosen pattern realises the loss at every position
        routes = tab.routes(idx)
        for b in range(tokens.shape[0]):
            for t in range(tokens.shape[1] - 1):
                p = routes[b, t].tolist()
                assert abs(brute[pats.index(tuple(p)), b, t] - got[b, t]) < 1e-5
        lib = O.search(model, tokens, O.Exactly(k), "token", base="pattern")
        assert torch.allclose(lib.loss.double(), got, atol=1e-5)
        # big-or-skip and the full 3^L oracle with exactly k big
        bos = brute[(n_big == k) & (n_small == 0)].min(0).values
        assert torch.allclose(tab.oracle(tab.mask(k, small=False, skip=True))[0], bos,
                              atol=1e-5)
        full = brute[n_big == k].min(0).values
        assert torch.allclose(tab.oracle(tab.mask(k, skip=True))[0], full, atol=1e-5)


def test_position_budget_holds_per_position():
    model = _tiny_model()
    tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    tab = St.pattern_table(model, tokens)
    kc, sched = St.schedules(3, 8)
    assert sched["increasing"] == sched["decreasing"][::-1]
    assert sum(sched["decreasing"]) / 8 == pytest.approx(kc, abs=0.5)
    res = St.position_budget(tab, n_boot=50, seed=0)
    for name, ks in sched.items():
        m = (tab.n_big[:, None] == torch.tensor(ks)[None]) & (tab.n_skip == 0)[:, None]
        _, idx = tab.oracle(m)
        routes = tab.routes(idx)  # (B, T-1, L)
        assert ((routes == BIG).sum(-1) == torch.tensor(ks)[None]).all()
        assert ((routes == SKIP).sum(-1) == 0).all()
        assert res.loss[name].estimate == pytest.approx(float(
            tab.oracle(m)[0].mean(1).mean()))


def test_difficulty_stage_reports_the_library_rank_overlap():
    """The study's difficulty shares are duollm.difficulty.rank_overlap's (the function
    behind gain_overlap) on the evaluation tokens: recomputed here from the table."""
    from duollm.difficulty import rank_overlap

    n, T, L = 6, 9, 2
    pats = torch.tensor(list(itertools.product((SMALL, BIG), repeat=L)))
    losses = torch.rand(len(pats), n, T - 1, generator=torch.Generator().manual_seed(0)) + 1
    tab = St.PatternLosses(pats, losses)
    d = St.difficulty(tab, torch.zeros(n, T, dtype=torch.int64), n_boot=20, seed=0)
    small = losses[tab.index([SMALL] * L)].double()
    want = rank_overlap(small, small - tab.oracle(tab.mask(None))[0], 0.75, low=0.5)
    assert d.overlap.estimate == pytest.approx(want.top_overlap)
    assert d.high_loss_low_gain.estimate == pytest.approx(want.high_loss_low_gain)
    assert d.low_loss_high_gain.estimate == pytest.approx(want.low_loss_high_gain)
    assert d.spearman.estimate == pytest.approx(want.spearman)


def test_rank_overlap_on_tensors_known_answers():
    from duollm.difficulty import rank_overlap

    loss = torch.arange(100.0).reshape(4, 25)  # any shape: flattened
    same = rank_overlap(loss, loss * 2)
    assert same.top_overlap == 1.0 and same.high_loss_low_gain == 0.0
    assert same.low_loss_high_gain == 0.0 and same.spearman == pytest.approx(1.0)
    rev = rank_overlap(loss, -loss)
    assert rev.top_overlap == 0.0 and rev.high_loss_low_gain == 1.0
    assert rev.low_loss_high_gain == 1.0 and rev.spearman == pytest.approx(-1.0)
    # low=0.5: bottom halves; reversed rankings put every top-gain token in the bottom half
    # by loss, half of the bottom-half-loss group (25 of 50)
    half = rank_overlap(loss, -loss, low=0.5)
    assert half.n_low == 50 and half.low_loss_high_gain == pytest.approx(0.5)
    assert half.high_loss_low_gain == 1.0
    with pytest.raises(ValueError, match="gain"):
        rank_overlap(loss, loss[:2])
    with pytest.raises(ValueError, match="low"):
        rank_overlap(loss, loss, low=1.0)


@pytest.mark.parametrize("argv, option", [
    (["--budgets", "9"], "--budgets"),
    (["--budgets", "x"], "--budgets"),
    (["--device", "tpu"], "--device"),
    (["--data", "/nonexistent/file.txt"], "--data"),
    (["--steps", "0"], "--steps"),
    (["--n-random", "0"], "--n-random"),
    (["--preset", "huge"], "--preset"),
    (["--hf", "/nonexistent"], "--hf"),
    (["--full"], "--full"),
    (["--seeds", "0"], "--seeds"),
    (["--oracle-chunks", __file__], "--oracle-chunks"),
])
def test_bad_options_fail_before_any_work(argv, option, tmp_path, capsys):
    from duollm.cli import main

    out = tmp_path / "never"
    rc = main(["study", "--quick", "--out", str(out)] + argv)
    assert rc == 2
    assert option in capsys.readouterr().err
    assert not out.exists()  # nothing was written


def test_paper_depth_preset_is_offered_and_warns_on_the_cpu(capsys):
    """paper-12 is the paper's 12 layers at the small preset's width: accepted on the CPU
    with a warning naming the cost (a GPU job), silent for the 6-layer demo preset."""

    from duollm.cli import build_parser
    from duollm.config import DuoConfig
    from duollm.study.cli import validate

    assert DuoConfig.from_name("paper-12").n_layers == 12
    parser = build_parser()
    args = parser.parse_args(["study", "--preset", "paper-12", "--device", "cpu",
                              "--budgets", "4,6,8"])
    assert validate(args)[1:] == ([4, 6, 8], "paper-12")
    err = capsys.readouterr().err
    assert "warning: 12 layers" in err and "8,192 patterns" in err and "--device cuda" in err
    validate(parser.parse_args(["study", "--device", "cpu"]))
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit):
        parser.parse_args(["study", "--help"])
    help_text = capsys.readouterr().out
    assert "paper-12" in help_text and "(default: None)" not in help_text
    assert "examples:" in help_text and "torchrun" in help_text


def test_study_runs_on_a_converted_hf_checkpoint(tmp_path):
    """--hf: the study on a converted Hugging Face model (no tokenizer saved, byte vocab),
    stage 1 skipped with --steps 0."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    import hf_models
    from duollm import hf as H
    from duollm.cli import main

    m = hf_models.llama(vocab_size=256)
    H.convert(m, 16)
    H.save_converted(m, tmp_path / "ckpt")
    out = tmp_path / "run"
    rc = main(["study", "--quick", "--hf", str(tmp_path / "ckpt"), "--steps", "0", "--out",
               str(out), "--no-synthetic-check", "--n-random", "5", "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["source"] == str(tmp_path / "ckpt") and res["steps"] == 0
    assert res["config"]["n_layers"] == hf_models.N_LAYERS
    assert [h["name"] for h in res["holdouts"]] == ["prose", "code"]


def test_two_walk_table_matches_the_full_table():
    """Beyond FULL_SKIP_LIMIT the table is a big/small and a big/skip walk: the oracles it
    serves equal the 3^L table's, and the 3^L-only result is reported as absent."""
    model = _tiny_model()
    tokens = torch.randint(0, 256, (4, 9), generator=torch.Generator().manual_seed(3))
    full = St.pattern_table(model, tokens, full=True)
    two = St.pattern_table(model, tokens, full=False)
    assert two.patterns.shape[0] == 2 * 2 ** 3 - 1
    for k in range(4):
        assert torch.allclose(two.oracle(two.mask(k))[0], full.oracle(full.mask(k))[0])
        assert torch.allclose(two.oracle(two.mask(k, small=False, skip=True))[0],
                              full.oracle(full.mask(k, small=False, skip=True))[0])
    assert St.skip_profiles(two, None, n_boot=20, seed=0).full_loss is None
    assert St.skip_profiles(full, None, n_boot=20, seed=0).full_loss is not None


def test_approx_gaps_against_the_exhaustive_oracle():
    """Beam and greedy of the paper's oracle never beat the exhaustive one; a beam as wide
    as every pattern is the exhaustive search (gap 0, every position exact)."""
    from duollm import DuoConfig, DuoLLM

    torch.manual_seed(0)
    model = DuoLLM(DuoConfig.from_name("tiny", n_layers=3)).eval()
    tokens = torch.randint(0, 256, (4, 10), generator=torch.Generator().manual_seed(1))
    tab = St.pattern_table(model, tokens)
    ex = tab.oracle(tab.mask(2))[0]
    narrow = St.approx_gaps(model, tokens, 2, ex, n_boot=50, seed=0, beam_width=2)
    assert [g.method for g in narrow] == ["beam", "greedy"]
    for g in narrow:
        assert g.gap.estimate >= -1e-9 and g.gap.low >= -1e-9 and 0 <= g.exact_share <= 1
    wide = St.approx_gaps(model, tokens, 2, ex, n_boot=50, seed=0, beam_width=2 ** 3)[0]
    assert wide.gap.estimate == pytest.approx(0, abs=1e-9) and wide.exact_share == 1.0
    with pytest.raises(ValueError, match="exhaustive"):
        St.approx_gaps(model, tokens, 2, ex[:, 1:], n_boot=50, seed=0)


@pytest.fixture(scope="module")
def tiny_run_folder(tmp_path_factory):
    """A duollm train run folder (step_N checkpoints) of a tiny model."""
    from duollm.config import DuoConfig
    from duollm.data import load_data
    from duollm.train import TrainConfig, train

    out = tmp_path_factory.mktemp("ckpt") / "run"
    cfg = TrainConfig(steps=4, batch_size=2, seq_len=16, checkpoint_every=2, out_dir=str(out),
                      eval_every=0, eval_batches=1, progress=False, keep_checkpoints=2)
    train(DuoConfig.from_name("tiny"), load_data(), cfg)
    return out


def test_study_checkpoint_resolves_run_and_step_folders(tiny_run_folder, tmp_path):
    from duollm.study.pipeline import resolve_study_checkpoint

    steps = sorted(p.name for p in tiny_run_folder.iterdir() if p.name.startswith("step_"))
    assert steps == ["step_0000002", "step_0000004"]
    newest = str(tiny_run_folder / "step_0000004")
    assert resolve_study_checkpoint(str(tiny_run_folder)) == newest
    assert resolve_study_checkpoint(str(tiny_run_folder / "step_0000002")) == str(
        tiny_run_folder / "step_0000002")
    with pytest.raises(ValueError, match="neither a checkpoint"):
        resolve_study_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match="not a folder"):
        resolve_study_checkpoint(str(tmp_path / "missing"))


@pytest.mark.parametrize("extra, option", [
    (["--preset", "tiny"], "--preset"), (["--steps", "3"], "--steps"),
    (["--seeds", "2"], "--seeds")])
def test_study_checkpoint_refuses_what_it_does_not_use(tiny_run_folder, extra, option,
                                                        tmp_path, capsys):
    from duollm.cli import main

    out = tmp_path / "never"
    rc = main(["study", "--quick", "--checkpoint", str(tiny_run_folder), "--out", str(out)]
              + extra)
    assert rc == 2 and f"error: {option}" in capsys.readouterr().err and not out.exists()
    rc = main(["study", "--quick", "--checkpoint", str(tmp_path), "--out", str(out)])
    assert rc == 2 and "--checkpoint" in capsys.readouterr().err and not out.exists()


# the step-folder case walks the same pipeline as the run folder's (30 s each on 2 cores):
# slow; resolve_study_checkpoint's step/run resolution is tested fast above
@pytest.mark.parametrize("which", ["run", pytest.param("step", marks=pytest.mark.slow)])
def test_study_checkpoint_with_null_control(tiny_run_folder, which, tmp_path):
    """study --checkpoint on a run folder (its newest step) and on a step folder, with the
    null control: the checkpoint's weights are studied (no training), every verdict has the
    null's numbers."""
    from duollm.cli import main
    from duollm.study.pipeline import run_study

    path = tiny_run_folder if which == "run" else tiny_run_folder / "step_0000002"
    out = tmp_path / "study"
    if which == "run":
        rc = main(["study", "--quick", "--checkpoint", str(path), "--out", str(out),
                   "--null-control", "--no-synthetic-check", "--n-random", "4",
                   "--oracle-batch", "4", "--router-steps", "2", "--no-progress"])
        assert rc == 0
        res = json.loads((out / "results.json").read_text())
        assert res["source"] == "checkpoint:" + str(path / "step_0000004")
        assert res["steps"] == 4 and res["null_control"] is True
        verdicts = json.loads((out / "verdicts.json").read_text())
    else:
        res = run_study(checkpoint=str(path), quick=True, out=str(out), progress=False,
                        synthetic_check=False, n_random=4, oracle_batch=4, router_steps=2,
                        null_control=True)
        assert res.steps == 2 and res.source == "checkpoint:" + str(path)
        verdicts = res.verdicts
    assert "the DuoLLM checkpoint" in (out / "report.md").read_text()
    judged = [v for v in verdicts if v["verdict"] != "not testable"]
    # every judged verdict has the null's numbers, unless the null model's own
    # precondition failed (then the reason says so, e.g. its gain is zero everywhere)
    assert judged and all((p["null"] is not None and p["vs_null"] is not None)
                          or "null model:" in v["reason"]
                          for v in judged for p in v["parts"])
    assert any(v["vs_null"] is not None for v in judged)


@pytest.mark.slow  # among the suite's slowest (30-75 s); make test stays short
def test_study_two_seeds_gives_hierarchical_verdicts(tmp_path):
    """--seeds 2: two models trained (seeds 0 and 1); each verdict's interval covers both
    seeds' evaluation sequences."""
    from duollm.study import run_study

    res = run_study(quick=True, steps=3, router_steps=2, n_random=4, oracle_batch=4,
                    out=str(tmp_path / "s2"), progress=False, synthetic_check=False, seeds=2)
    assert res.seeds == [0, 1]
    n_ev = res.holdouts[0].n_evaluation
    assert res.verdicts and all(v["n_seeds"] == 2 and v["n_sequences"] == 2 * n_ev
                                for v in res.verdicts)
    judged = [v for v in res.verdicts if v["parts"]]
    assert judged and all(p["interval"]["n"] == 2 * n_ev for v in judged for p in v["parts"])
    assert "hierarchical bootstrap" in (tmp_path / "s2" / "report.md").read_text()
    with pytest.raises(ValueError, match="seeds"):
        run_study(quick=True, seeds=0, out=str(tmp_path / "never"), progress=False)


def _without_times(v):
    """A results.json value without its wall-clock fields (seconds differ run to run)."""
    if isinstance(v, dict):
        return {k: _without_times(x) for k, x in v.items()
                if not (k.endswith("_s") or "second" in k or k in ("timings", "time"))}
    if isinstance(v, list):
        return [_without_times(x) for x in v]
    return v


@pytest.mark.slow  # two quick studies: about 2 min on a quiet core
def test_study_oracle_chunks_are_kept_and_reused(tmp_path, capsys):
    """--oracle-chunks: every oracle walk keeps its finished chunks (one folder per holdout
    and model); the same study run again reuses them all, walks nothing, and reports the
    same numbers. What a study killed midway relies on (the library's SIGKILL test covers
    the kill itself: tests/test_sharded_table.py)."""
    import json

    from duollm.cli import main

    chunks = tmp_path / "chunks"
    argv = ["study", "--quick", "--steps", "3", "--router-steps", "2", "--n-random", "4",
            "--oracle-batch", "4", "--oracle-chunks", str(chunks)]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    first = capsys.readouterr().out
    files = sorted(p.relative_to(chunks).parts[0] for p in chunks.rglob("rows_*.pt"))
    assert files and {"prose", "code"} <= set(files)
    assert "resumed from" not in first
    assert main(argv + ["--out", str(tmp_path / "b")]) == 0
    again = capsys.readouterr().out
    assert again.count("resumed from") == len(files)  # every chunk reused, none walked
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert a["verdicts"] == b["verdicts"]
    assert _without_times(a["holdouts"]) == _without_times(b["holdouts"])


def test_the_study_saves_its_trained_model(quick_run):
    """The --quick run saved its trained model in out/model: verified on load, the run's
    config and step."""
    from duollm.checkpoint import load_checkpoint, verify_sha256sums

    model_dir = quick_run / "model"
    assert verify_sha256sums(str(model_dir))  # SHA256SUMS beside it
    model, state = load_checkpoint(str(model_dir))
    res = json.loads((quick_run / "results.json").read_text())
    assert state["step"] == res["steps"] and model.config.to_dict() == res["config"]


@pytest.mark.slow
def test_the_saved_model_studied_again_gives_the_runs_losses(quick_run, tmp_path):
    """--checkpoint out/model studies that model: its all-big and all-small losses are the
    trained run's, on the same sequences; nothing is trained, so nothing is saved."""
    from duollm.cli import main

    again = tmp_path / "again"
    assert main(["study", "--checkpoint", str(quick_run / "model"), "--quick", "--out",
                 str(again), "--no-progress", "--n-random", "10"]) == 0
    res = json.loads((quick_run / "results.json").read_text())
    res2 = json.loads((again / "results.json").read_text())
    assert not (again / "model").exists()
    for h1, h2 in zip(res["holdouts"], res2["holdouts"]):
        assert h1["all_big"] == h2["all_big"] and h1["all_small"] == h2["all_small"]
