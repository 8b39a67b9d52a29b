"""`duollm study --quick` end to end: every file of the report is written."""
import csv
import json
import os

from duollm.study.report import PLOTS



def test_study_quick_writes_the_whole_report(tmp_path, capsys):
    from duollm.cli import main

    out = tmp_path / "run"
    rc = main(["study", "--quick", "--out", str(out), "--no-progress", "--n-random", "10"])
    assert rc == 0
    for name in PLOTS + ("report.md", "results.json", "difficulty.csv"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in (out / "report.md").read_text()
    res = json.loads((out / "results.json").read_text())
    L = res["n_layers"]
    assert res["ks"] == list(range(L + 1))
    for curve in res["curves"].values():
        assert len(curve) == L + 1
    # the oracle at k = L (all big) is all-big, and the at-most oracle never rises with k
    assert abs(res["curves"]["oracle_token_exactly"][L] - res["all_big"]) < 1e-4
    at_most = res["curves"]["oracle_token_at_most"]
    assert all(b <= a + 1e-6 for a, b in zip(at_most, at_most[1:]))
    for k, e in res["routers"].items():
        assert abs(e["realised"] - e["target"]) < 0.2
        assert len(e["agreement"]) == L
    for f in ("a", "b", "c"):
        assert isinstance(res["findings"][f]["holds"], bool)
    report = (out / "report.md").read_text()
    assert "(a)" in report and "(b)" in report and "(c)" in report
    with open(out / "difficulty.csv") as f:
        header = next(csv.reader(f))
    assert header[:6] == ["sequence", "position", "token", "target", "loss_small", "loss_big"]
    assert "difficulty" in header and any(h.startswith("loss_oracle_") for h in header)
    printed = capsys.readouterr().out
    assert "oracle-tok" in printed and "report:" in printed


def test_study_synthetic_reports_difficulty_by_kind(tmp_path):
    from duollm.study import run_study

    res = run_study(data="synthetic", quick=True, steps=5, router_steps=2, n_random=5,
                    out=str(tmp_path / "syn"), progress=False, budgets=[1])
    assert set(res["difficulty"]["by_kind"]) >= {"noise", "compute"}
    assert os.path.isfile(tmp_path / "syn" / "report.md")
    with open(tmp_path / "syn" / "difficulty.csv") as f:
        assert next(csv.reader(f))[-1] == "kind"
