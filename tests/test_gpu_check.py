"""``benchmarks/gpu_check.sh`` proven on a CPU before a GPU minute is spent on it: the dry run
takes every step (build, smoke of every kernel variant against the reference with poisoned
outputs, benchmarks, the gpu tests with the switches on and off) with the Triton interpreter
at tiny shapes, and must leave the same four files a GPU run leaves."""
import importlib.util
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
FILES = {"results.json", "results.csv", "logs.tar.gz", "summary.txt"}
STEPS = ["smoke", "bench", "build", "tests-switched-on", "tests-default"]
KERNELS = {"group_tokens", "gather", "scatter_combine", "swiglu_ffn fwd+bwd", "duo_ffn backward",
           "duo_ffn backward[bwd]",
           *(f"{op}[{m}]" for op in ("duo_ffn", "one_path")
             for m in ("default", "decode", "persistent", "decode+persistent"))}


def _run(out, *args, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    full.update(PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(SCRIPT), *args, str(out)], env=full, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def _check_run(out, proc):
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == FILES  # at most 6 come back from the machine
    doc = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in doc["steps"]] == STEPS
    assert all(s["status"] == "ok" for s in doc["steps"]), doc["steps"]
    smoke = [r for r in doc["rows"] if r["name"] == "smoke"]
    assert {r["kernel"] for r in smoke} == KERNELS
    bad = [r for r in smoke if not r["ok"] or r["error"] or not r["max_rel_err"] < 1e-4]
    assert not bad, bad
    assert all(r["bit_equal_rerun"] for r in smoke if "bit_equal_rerun" in r)
    timed = [r for r in doc["rows"] if r["name"] != "smoke"]
    assert not [r for r in timed if r["error"]]
    assert {("group_tokens", True), ("group_tokens", False)} <= {
        (r["name"], r.get("graph")) for r in timed}
    layer = [r for r in timed if r["name"] in ("duo_ffn", "decode_layer")]
    assert layer and all(r["max_rel_err"] < 1e-4 for r in layer)
    switched = ("gpu tests, switched on: DUOLLM_TRITON_DECODE=1 DUOLLM_TRITON_PERSISTENT=1 "
                "DUOLLM_TRITON_BWD=1")  # the label names the environment the step ran in
    assert set(doc["tests"]) == {switched, "gpu tests, default paths"}
    assert all(t["counts"].get("skipped") for t in doc["tests"].values())  # no GPU here
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert len(csv_rows) == len(doc["rows"]) + 1 and "max_rel_err" in csv_rows[0]
    with tarfile.open(out / "logs.tar.gz") as tar:
        logs = {Path(n).name for n in tar.getnames()}
    assert {f"{s}.log" for s in STEPS} <= logs
    summary = (out / "summary.txt").read_text()
    assert "max_rel_err" in summary and "smoke" in summary and "not done" not in summary
    assert summary in proc.stdout  # printed last
    from duollm.bench.report import render  # `duollm bench report` reads it, errors shown
    report = render([str(out)])
    assert "max rel err" in report and "| duo_ffn[decode] |" in report
    return doc


def test_dry_run_quick_every_step_and_four_files(tmp_path):
    """One token count and one route mix per section (the "bad" mix: every path and
    out-of-range routes), every step and every kernel variant."""
    doc = _check_run(tmp_path, _run(tmp_path, "--dry-run", "--quick"))
    assert {r["N"] for r in doc["rows"] if r["name"] == "smoke"} == {5}


@pytest.mark.slow
def test_dry_run_full(tmp_path):
    # every row of every section in the interpreter: minutes on a loaded CPU
    doc = _check_run(tmp_path, _run(tmp_path, "--dry-run", BUDGET="3000",
                                    GPU_CHECK_STEP_SCALE="8"))
    assert {r["N"] for r in doc["rows"] if r["name"] == "smoke"} == {1, 7, 40, 70}


def test_failed_build_goes_on_and_the_budget_stops_the_run(tmp_path):
    """A build that fails is recorded and the run continues without duollm._C; a spent budget
    skips the remaining steps, says so, and still leaves the four files."""
    proc = _run(tmp_path, "--dry-run", "--quick", BUDGET="10",
                GPU_CHECK_BUILD_CMD="echo nvcc exploded >&2; exit 3")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert {p.name for p in tmp_path.iterdir()} == FILES
    steps = {s["name"]: s for s in json.loads((tmp_path / "results.json").read_text())["steps"]}
    assert steps["build"]["status"] == "failed"
    assert "exit 3" in steps["build"]["detail"]
    assert "DUOLLM_SKIP_CUDA_BUILD=1" in steps["build"]["detail"]
    for name in ("smoke", "bench", "tests-switched-on", "tests-default"):
        assert steps[name]["status"] == "skipped" and "budget" in steps[name]["detail"]
    summary = (tmp_path / "summary.txt").read_text()
    assert "not done: steps smoke, bench, build, tests-switched-on, tests-default" in summary
    with tarfile.open(tmp_path / "logs.tar.gz") as tar:
        build_log = tar.extractfile("logs/build.log").read().decode()
    assert "nvcc exploded" in build_log


def test_bad_arguments_exit_2_before_any_work(tmp_path):
    for args in (["--bogus"], ["--quick"], [str(tmp_path / "a")]):
        proc = _run(tmp_path / "b", *args)
        assert proc.returncode == 2 and "error:" in proc.stderr, (args, proc.stderr)
    assert not (tmp_path / "b").exists()
    proc = _run(tmp_path / "c", "--dry-run", BUDGET="8m")
    assert proc.returncode == 2 and "BUDGET" in proc.stderr
    proc = _run(tmp_path / "c", "--dry-run", GPU_CHECK_STEP_SCALE="0")
    assert proc.returncode == 2 and "GPU_CHECK_STEP_SCALE" in proc.stderr
    assert not (tmp_path / "c").exists()


def _bench_module():
    spec = importlib.util.spec_from_file_location(
        "bench_kernels", ROOT / "benchmarks" / "ops" / "bench_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_poisoned_allocations_show_unwritten_elements():
    """What the smoke relies on: inside, fresh buffers hold NaN (integers a large negative),
    so an element a kernel forgets to write makes max_rel_err infinite; outside, torch is
    itself again."""
    bk = _bench_module()
    real = torch.empty, torch.empty_like, torch.Tensor.new_empty
    want = torch.ones(4, 3)
    with bk.poisoned_allocations():
        out = torch.empty(4, 3)
        out[:3] = 1.0  # "the kernel" forgets the last row
        assert torch.empty_like(want).isnan().all() and want.new_empty(2).isnan().all()
        assert (torch.empty(2, dtype=torch.int64) < -2 ** 60).all()
        assert (torch.empty(2, dtype=torch.uint8) == 255).all()
    assert bk.max_rel_err(out, want) == math.inf
    out[3] = 1.0 + 1e-3
    assert bk.max_rel_err(out, want) == pytest.approx(1e-3, rel=1e-3)
    assert (torch.empty, torch.empty_like, torch.Tensor.new_empty) == real  # restored
    with pytest.raises(ValueError, match="shape"):
        bk.max_rel_err(torch.ones(2), torch.ones(3))
