"""Tests of ``duollm study ablations`` (Figure 8) and the freezing path it shares with the
Hugging Face stage-1 training (``TrainConfig.trainable``)."""
import json

import pytest
import torch

from duollm import DuoConfig, DuoLLM
from duollm.cli import main
from duollm.data import load_data
from duollm.study import ablations
from duollm.train import TrainConfig, freeze, make_optimizer, train
from multiproc import torchrun

TINY = DuoConfig.from_name("tiny", n_layers=2)


@pytest.mark.parametrize("p", ablations.P_BIGS)
def test_dense_counterpart_has_the_duo_models_flops(p):
    base = DuoConfig.from_name("small")
    dense = ablations.dense_config(base, p)
    duo_flops = base.flops_per_token(p, 1 - p, seq_len=128)
    dense_flops = dense.flops_per_token(1.0, 0.0, seq_len=128)
    # Equal up to rounding the width to an int: at most half a width unit of FFN FLOPs.
    per_width = base.n_layers * 6 * base.d_model
    assert abs(dense_flops - duo_flops) <= 0.5 * per_width
    assert dense.d_big == ablations.dense_width(base, p) and dense.p_big == 1.0
    if p in (0.0, 1.0):  # the same network as the Duo model at the extremes
        assert dense.d_big == (base.d_small if p == 0 else base.d_big)


def test_trainable_freezes_everything_else():
    data = load_data("default")
    torch.manual_seed(0)
    model = DuoLLM(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(steps=2, batch_size=4, seq_len=32, warmup=1, eval_every=0,
                      eval_batches=1, progress=False, trainable=ablations.SMALL_ONLY)
    res = train(TINY, data, cfg, model=model)
    for name, t in res.model.state_dict().items():
        moved = not torch.equal(t, before[name])
        assert moved == (".ffn.small." in name), name  # only the small FFNs train
    opt = make_optimizer(model, cfg)
    n_opt = sum(len(g["params"]) for g in opt.param_groups)
    assert n_opt == len(freeze(model, cfg.trainable)) == 3 * TINY.n_layers  # 3 per small FFN
    with pytest.raises(ValueError, match="trainable"):
        freeze(model, r"no_such_parameter")
    with pytest.raises(ValueError, match="trainable"):
        TrainConfig(trainable="(")


def test_quick_ablations_write_report_plot_and_results(tmp_path):
    out = tmp_path / "abl"
    assert main(["study", "ablations", "--quick", "--steps", "4", "--out", str(out),
                 "--no-progress"]) == 0
    png = (out / "ablations.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    report = (out / "report.md").read_text()
    for heading in ("equal FLOPs per token (Fig. 8a/b)", "from scratch (Fig. 8c)",
                    "## Verdicts", "Reproduce: `duollm study ablations"):
        assert heading in report
    res = json.loads((out / "results.json").read_text())
    assert [p["p_big"] for p in res["sweep"]] == list(ablations.P_BIGS)
    assert len(res["runs"]) == len(ablations.run_specs([0])) == 11
    assert {m["name"] for m in res["methods"]} == {"scratch", "frozen"}
    assert len(res["verdicts"]) == 5
    assert all(v["outcome"] in ("holds", "does not hold", "not resolved")
               for v in res["verdicts"])
    for point in res["sweep"]:
        gap = point["gap"]
        assert gap["low"] <= gap["estimate"] <= gap["high"]
        # The reported gap is the difference of the two reported losses (paired means).
        assert gap["estimate"] == pytest.approx(point["duo"]["estimate"] -
                                                point["dense"]["estimate"], abs=1e-9)
        assert point["dense_flops"] == pytest.approx(point["duo_flops"], rel=0.01)
    # The dense model starts from the Duo model's initial weights: at p_big = 1 both are one
    # big FFN per layer, the same weights, batches and routes, so they train identically.
    last = res["sweep"][-1]
    assert last["p_big"] == 1.0 and last["gap"]["estimate"] == 0.0
    assert last["duo"] == last["dense"]


def test_dense_counterpart_starts_from_the_duo_init():
    base = DuoConfig.from_name("tiny")
    torch.manual_seed(7)
    duo = DuoLLM(base).state_dict()
    dense = ablations.dense_from_duo_init(base, 0.5, seed=7).state_dict()
    w = ablations.dense_width(base, 0.5)
    for name, t in dense.items():
        if ".ffn.small." in name:
            continue
        src = duo[name]
        if ".ffn.big." in name:
            src = src[:, :w] if name.endswith("down_proj.weight") else src[:w]
        assert torch.equal(t, src), name


@pytest.mark.parametrize("argv, option", [
    (["--steps", "1"], "--steps"), (["--preset", "huge"], "--preset"),
    (["--seq-len", "100000"], "--seq-len"), (["--lr", "0"], "--lr"),
    (["--seeds", "0"], "--seeds"), (["--device", "cuda:9"], "--device"),
])
def test_bad_options_fail_before_any_work(argv, option, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["study", "ablations", "--quick", "--out", str(out), *argv]) == 2
    assert option in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow  # among the suite's slowest (30-75 s); make test stays short
def test_runs_shard_across_ranks_like_one_process(tmp_path):
    script = """
        import sys
        from duollm.cli import main
        sys.exit(main(["study", "ablations", "--quick", "--steps", "2", "--no-progress",
                       "--out", sys.argv[1]]))
    """
    torchrun(script, tmp_path, str(tmp_path / "two"))
    assert main(["study", "ablations", "--quick", "--steps", "2", "--no-progress",
                 "--threads", "1", "--out", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    # Each run trains alone, seeded, on one thread either way: the same numbers exactly.
    for r2, r1 in zip(two["runs"], one["runs"], strict=True):
        assert (r2["kind"], r2["p_big"], r2["seed"]) == (r1["kind"], r1["p_big"], r1["seed"])
        assert r2["seq_loss"] == r1["seq_loss"]
    assert two["verdicts"] == one["verdicts"]
