"""benchmarks/ops/bench_kernels.py checked on a CPU before GPU time is spent on it:
``--dry-run`` runs every row of the chosen sections once in the Triton interpreter with tiny
float32 shapes (nothing timed), so a Python error in the script or a wrong answer of a path
(each layer row compares its output with the reference) shows up here."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _dry_run(tmp_path, sections):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/ops/bench_kernels.py"),
                           "--dry-run", "--out", str(tmp_path), "--sections", sections],
                          env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    errors = [(r["name"], r.get("impl"), r["error"]) for r in rows if r.get("error")]
    assert not errors, errors
    bad = [(r["name"], r.get("impl"), r.get("mix"), r["max_rel_err"]) for r in rows
           if r.get("max_rel_err") is not None and not r["max_rel_err"] < 1e-4]
    assert not bad, bad  # float32: every path's answer matches the reference
    return rows


@pytest.mark.slow  # among the suite's slowest (30-75 s); make test stays short
def test_bench_kernels_dry_run_decode(tmp_path):
    rows = _dry_run(tmp_path, "decode")
    names = {(r["name"], r.get("impl"), r.get("graph")) for r in rows}
    for impl in ("triton-default", "triton-decode"):
        for graph in (False, True):
            assert ("decode_layer", impl, graph) in names
    assert {"ceiling_copy", "ceiling_matmul", "decode_dense"} <= {r["name"] for r in rows}


@pytest.mark.slow
def test_bench_kernels_dry_run_all_sections(tmp_path):
    rows = _dry_run(tmp_path, "routing,swiglu,layer,fwd_bwd,decode")
    impls = {r.get("impl") for r in rows if r["name"] == "duo_ffn"}
    assert impls == {"triton", "triton-persistent", "torch"}
