"""The bookkeeping of ``benchmarks/gpu_check.sh`` (standard library only: it starts in a
blink and runs whatever state the machine is in).

    python benchmarks/gpu_check_report.py step RESULTS NAME STATUS SECONDS [DETAIL]
    python benchmarks/gpu_check_report.py pytest RESULTS NAME LOG
    python benchmarks/gpu_check_report.py summary RESULTS

``step`` appends one step record (status: ok, failed, timed out, skipped) to the ``steps``
list of ``RESULTS`` (a ``results.json`` that ``benchmarks/ops/bench_kernels.py`` also writes
its rows into; created if absent). ``pytest`` records the outcome line and the first failures
of a pytest log under ``tests``. Every write replaces the file atomically. ``summary`` prints
the short summary: the steps, what was skipped, the smoke checks that failed, the benchmark
table with ``max_rel_err`` beside every timing, and the test outcomes.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import sys


def load(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def save(path: str, doc: dict) -> None:
    """``path`` and, beside it, ``results.csv`` of its rows (a header alone when none)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)
    rows = doc.get("rows", [])
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "name", k)) or ["name"]
    tmp = os.path.join(os.path.dirname(path), "results.csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    os.replace(tmp, os.path.join(os.path.dirname(path), "results.csv"))


def add_step(path: str, name: str, status: str, seconds: str, detail: str = "") -> None:
    doc = load(path)
    doc.setdefault("steps", []).append(dict(name=name, status=status,
                                            seconds=float(seconds), detail=detail))
    save(path, doc)


def add_pytest(path: str, name: str, log: str) -> None:
    """The last summary line of a pytest log (``N passed, M skipped in S s``), its counts and
    the first 20 FAILED/ERROR lines."""
    lines = open(log, errors="replace").read().splitlines() if os.path.exists(log) else []
    outcome = next((ln.strip("= ") for ln in reversed(lines)
                    if re.search(r"\b(passed|failed|skipped|error|errors|deselected|no tests)\b",
                                 ln)), "no pytest summary line (killed before the end?)")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed"
                                               r"|xpassed|deselected)", outcome)}
    failures = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:20]
    doc = load(path)
    doc.setdefault("tests", {})[name] = dict(outcome=outcome, counts=counts,
                                             failures=failures)
    save(path, doc)


def _f(v, spec: str) -> str:
    width = int(spec.split(".")[0] or 0)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-".rjust(width)
    if isinstance(v, bool):
        return str(v).rjust(width)
    return format(v, spec)


def summary(path: str) -> str:
    doc = load(path)
    m = doc.get("meta", {})
    out = [f"duollm gpu_check: {m.get('device', '?')}  torch {m.get('torch', '?')}  "
           f"triton {m.get('triton', '?')}  {m.get('dtype', '?')}  "
           f"sha {str(m.get('git_sha', '?'))[:10]}", "", "steps:"]
    for s in doc.get("steps", []):
        out.append(f"  {s['name']:<22}{s['status']:<10}{s['seconds']:7.1f} s  "
                   f"{s.get('detail', '')}"[:160])
    skipped = [s["name"] for s in doc.get("steps", []) if s["status"] != "ok"]
    rows = doc.get("rows", [])
    cut = [r for r in rows if r.get("skipped")]
    if skipped or cut:
        out.append(f"not done: steps {', '.join(skipped) or '-'}; {len(cut)} rows skipped "
                   f"for time")
    smoke = [r for r in rows if r.get("name") == "smoke" and not r.get("skipped")]
    if smoke:
        bad = [r for r in smoke if r.get("error") or not r.get("ok")]
        worst = max((r["max_rel_err"] for r in smoke if r.get("max_rel_err") is not None),
                    default=None)
        out += ["", f"smoke (every kernel variant vs duollm/reference.py, outputs poisoned): "
                    f"{len(smoke) - len(bad)}/{len(smoke)} ok, worst max_rel_err "
                    f"{_f(worst, '.3g')}"]
        for r in bad[:15]:
            out.append(f"  FAIL {r.get('kernel')} N={r.get('N')} mix={r.get('mix', '-')} "
                       f"err={_f(r.get('max_rel_err'), '.3g')} "
                       f"bit_equal={r.get('bit_equal_rerun', '-')} {r.get('error') or ''}"[:160])
    timed = [r for r in rows if r.get("name") != "smoke" and not r.get("skipped")]
    if timed:
        out += ["", f"{'row':<16}{'impl':<22}{'N':>6} {'mix':<18}{'graph':<6}{'us':>9}"
                    f"{'read_us':>9}{'GB/s|TF':>9}{'x dense':>8}{'eff':>6}{'max_rel_err':>12}"
                    f"  error"]
        for r in timed:
            rate = r.get("gbps") or r.get("tflops")
            x = r.get("vs_dense_big") or r.get("realized_speedup")
            us = r["ms"] * 1e3 if r.get("ms") is not None else None
            out.append(f"{r['name'][:15]:<16}{str(r.get('impl', ''))[:21]:<22}"
                       f"{str(r.get('N', '')):>6} {str(r.get('mix', ''))[:17]:<18}"
                       f"{str(r.get('graph', '')):<6}{_f(us, '9.1f')}"
                       f"{_f(r.get('read_us'), '9.1f')}{_f(rate, '9.0f')}{_f(x, '8.2f')}"
                       f"{_f(r.get('efficiency'), '6.2f')}{_f(r.get('max_rel_err'), '12.2e')}"
                       f"  {(r.get('error') or '')[:40]}")
    for name, t in doc.get("tests", {}).items():
        out += ["", f"{name}: {t['outcome']}"] + [f"  {ln}"[:160] for ln in t["failures"]]
    return "\n".join(out) + "\n"


def main(argv) -> int:
    cmds = {"step": (add_step, (5, 6)), "pytest": (add_pytest, (4, 4)),
            "summary": (lambda p: print(summary(p), end=""), (2, 2))}
    if not argv or argv[0] not in cmds or not cmds[argv[0]][1][0] <= len(argv) <= \
            cmds[argv[0]][1][1]:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    fn, _ = cmds[argv[0]]
    fn(*argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
