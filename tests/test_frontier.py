"""``duollm bench frontier``: the Pareto front on constructed tables, FLOPs counted from the
realised routes, ``--quick`` end to end (every file, a consistent table), a converted HF
folder as input, and bad options exiting 2."""
import glob
import json
import math

import pytest
import torch

from duollm import BIG, SKIP, SMALL, DuoConfig, DuoLLM
from duollm.bench.pareto import (SETTINGS, FrontierRow, ModelCosts, dominated_by, front_lines,
                                 mark_fronts, pareto_front, route_accounting, setting_key)
from duollm.cli import main
from duollm.config import router_flops, swiglu_flops
from duollm.stack import as_stack

NAN = float("nan")


def test_pareto_front_marks_dominated_points():
    pts = [(2.0, 100.0),   # front: fastest
           (1.5, 50.0),    # front
           (1.0, 10.0),    # front: best loss
           (1.6, 40.0),    # dominated by (1.5, 50)
           (2.0, 90.0),    # dominated by (2.0, 100): equal loss, slower
           (1.5, 50.0),    # an exact tie with point 1: neither dominates the other
           (NAN, 500.0),   # no loss: never on the front, dominates nothing
           (0.5, NAN)]
    assert pareto_front(pts) == [True, True, True, False, False, True, False, False]
    assert pareto_front([]) == []
    assert pareto_front([(3.0, 1.0)]) == [True]


def _row(name, loss, tps, kind="fixed", deployable=True):
    r = FrontierRow(routing=name, kind=kind, loss=loss, perplexity=math.exp(loss),
                    deployable=deployable)
    for phase, batch in SETTINGS:
        setattr(r, f"{setting_key(phase, batch)}_tps", tps)
    return r


def test_mark_fronts_skips_the_oracle_and_says_why():
    rows = [_row("dense big", 2.0, 10.0, "dense"), _row("fixed k=1", 2.1, 20.0),
            _row("random k=1", 2.2, 15.0, "random"),
            _row("oracle k=1", 1.0, NAN, "oracle", deployable=False)]
    mark_fronts(rows)
    assert [r.decode_b1_front for r in rows] == [True, True, False, False]
    assert dominated_by(rows, rows[2], "decode_b1") == {"fixed k=1": 2.1}
    lines = front_lines(rows)
    assert "on the front at prefill_b1, prefill_b8, decode_b1, decode_b8" in lines[1]
    assert "dominated at every setting" in lines[2]
    assert "not deployable" in lines[3] and "not on any front" in lines[3]


def test_realised_flops_are_the_count_of_the_routes():
    cfg = DuoConfig(n_layers=3, d_model=32, n_heads=2, vocab_size=50, d_big=64, d_small=8)
    stack = as_stack(DuoLLM(cfg))
    costs = ModelCosts.of(stack, other_params=1000, bytes_per_param=4)
    routes = torch.tensor([[[BIG, BIG, SMALL, SKIP]],       # layer 0: 2 big, 1 small, 1 skip
                           [[SMALL, SMALL, SMALL, SMALL]],  # layer 1: all small
                           [[BIG, SKIP, SKIP, SKIP]]])      # layer 2: 1 big
    big, small = swiglu_flops(32, 64), swiglu_flops(32, 8)
    by_hand = (2 * big + small + 4 * small + big) / 4  # per token, summed over layers
    acc = route_accounting(routes, costs)
    assert acc.ffn_flops == pytest.approx(by_hand, rel=1e-12)
    assert acc.flops == pytest.approx(by_hand + 2000, rel=1e-12)
    assert acc.shares == pytest.approx([4 / 12, 5 / 12, 3 / 12])
    assert acc.k == pytest.approx(0.75)  # big layers per token
    assert acc.ideal_ffn_speedup == pytest.approx(3 * big / by_hand)
    bytes_hand = 4 * ((2 * 3 * 32 * 64 + 3 * 32 * 8 + 4 * 3 * 32 * 8 + 3 * 32 * 64) / 4 + 1000)
    assert acc.bytes == pytest.approx(bytes_hand)
    with_router = route_accounting(routes, costs, router_paths=2)
    assert with_router.ffn_flops == pytest.approx(by_hand + 3 * router_flops(32, 2))
    assert with_router.bytes == pytest.approx(bytes_hand + 4 * 3 * 33 * 2)


QUICK = ["--train-steps", "4", "--router-steps", "2", "--repeats", "1", "--budget", "0.01",
         "--sequences", "3", "--seq-len", "12", "--prefill-len", "12", "--prompt-len", "4",
         "--new-tokens", "2", "--router-budgets", "0.3,0.6"]


def _check_table(out, n_layers):
    (js,) = glob.glob(str(out / "frontier-float32-*.json"))
    assert glob.glob(str(out / "frontier-float32-*.csv"))
    assert glob.glob(str(out / "frontier-float32-*.png"))
    data = json.load(open(js))
    rows = {r["routing"]: r for r in data["rows"]}
    kinds = {r["kind"] for r in data["rows"]}
    assert kinds == {"dense", "policy", "fixed", "random", "router", "oracle"}
    assert {f"fixed k={k}" for k in range(1, n_layers)} <= set(rows)
    assert abs(rows["dense big"]["loss"] - rows["all-big"]["loss"]) < 1e-3
    assert abs(rows["dense small"]["loss"] - rows["all-small"]["loss"]) < 1e-3
    for r in data["rows"]:
        if r["kind"] == "oracle":
            assert r["deployable"] is False and r["decode_b1_tps"] is None
            assert not any(r[f"{setting_key(p, b)}_front"] for p, b in SETTINGS)
        else:
            assert r["decode_b1_tps"] > 0 and r["prefill_b8_tps"] > 0, r
    # The fronts in the file are the fronts of the file's own numbers.
    live = [r for r in data["rows"] if r["deployable"]]
    for p, b in SETTINGS:
        key = setting_key(p, b)
        assert [r[f"{key}_front"] for r in live] == pareto_front(
            [(r["loss"], r[f"{key}_tps"]) for r in live])
    assert rows["dense big"]["decode_b1_speedup"] == 1.0
    # A fixed pattern's FLOPs: its pattern's own count.
    fixed = rows["fixed k=1"]
    pat = [int(v) for v in fixed["pattern"].split(",")]
    d, big, small = data["env"]["d_model"], data["env"]["d_big"], data["env"]["d_small"]
    assert pat.count(BIG) == 1 and fixed["k"] == 1
    assert fixed["ffn_flops_per_token"] == pytest.approx(
        swiglu_flops(d, big) + (n_layers - 1) * swiglu_flops(d, small))
    assert rows["router big=0.30"]["ffn_flops_per_token"] > rows["router big=0.30"]["k"] * \
        swiglu_flops(d, big)  # the router's own FLOPs are in
    overhead = data["env"]["router_overhead"]
    assert {o["router"] for o in overhead} >= {"router big=0.30", "router big=0.60"}
    assert all(o["router_ms"] > 0 and o["flops_vs_big"] < 0.05 for o in overhead)
    return data


def test_quick_writes_every_file(tmp_path, capsys):
    assert main(["bench", "frontier", "--quick", "--out", str(tmp_path), "--device", "cpu",
                 *QUICK]) == 0
    out = capsys.readouterr().out
    data = _check_table(tmp_path, 4)
    for r in data["rows"]:  # one line per routing
        assert sum(line.startswith(r["routing"] + " ") for line in out.splitlines()) == 1


def test_converted_hf_folder_as_input(tmp_path, capsys):
    H = pytest.importorskip("tests.hf_models")
    from duollm import hf, router_io
    from duollm.routers import train_router

    model = hf.convert(H.llama(vocab_size=256), 16, init="prune")
    hf.save_converted(model, tmp_path / "conv")
    stream = torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(0))
    router, _ = train_router(model, stream, target_big=0.3, steps=2, batch_size=2, seq_len=12)
    router_io.write_router(str(tmp_path / "conv"), router)
    args = QUICK[2:]  # no --train-steps: nothing is trained
    assert main(["bench", "frontier", "--hf", str(tmp_path / "conv"), "--out",
                 str(tmp_path / "res"), "--device", "cpu", *args]) == 0
    data = _check_table(tmp_path / "res", 3)
    assert "saved router" in {r["routing"] for r in data["rows"]}


@pytest.mark.parametrize("argv,option", [
    ([], "--checkpoint"),
    (["--quick", "--checkpoint", "x"], "--quick"),
    (["--quick", "--router-budgets", "0.5,1.5"], "--router-budgets"),
    (["--quick", "--sequences", "1"], "--sequences"),
    (["--quick", "--budget", "0"], "--budget"),
    (["--quick", "--backends", "torch,triton"], "--backends"),
    (["--checkpoint", "/nonexistent/ck"], "--checkpoint"),
    (["--checkpoint", "/nonexistent/ck", "--train-steps", "3"], "--train-steps"),
])
def test_bad_options_exit_2(tmp_path, capsys, argv, option):
    assert main(["bench", "frontier", "--out", str(tmp_path / "o"), "--device", "cpu",
                 *argv]) == 2
    assert f"error: {option}: " in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_checkpoint_folder_as_input_with_its_saved_router(tmp_path, capsys):
    from duollm.checkpoint import save_checkpoint
    from duollm.routers import LinearRouter
    from duollm.routes import attach_router

    torch.manual_seed(0)
    model = DuoLLM(DuoConfig(n_layers=3, d_model=32, n_heads=2, vocab_size=256, d_big=64,
                             d_small=8, max_seq_len=64))
    router = LinearRouter(model, (SMALL, BIG))
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0, 1.0)
    attach_router(model, router)
    save_checkpoint(str(tmp_path / "ck"), model)
    assert main(["bench", "frontier", "--checkpoint", str(tmp_path / "ck"), "--out",
                 str(tmp_path / "res"), "--device", "cpu", *QUICK[2:]]) == 0
    data = _check_table(tmp_path / "res", 3)
    saved = next(r for r in data["rows"] if r["routing"] == "saved router")
    assert saved["kind"] == "router" and saved["decode_b8_tps"] > 0
