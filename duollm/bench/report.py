"""``duollm bench report FILES_OR_DIRS...``: Markdown tables from result files of any machines.

Each result kind gets its own table (speedup, decode, model, and the kernel microbenchmarks of
``benchmarks/ops/bench_kernels.py``; any other kind gets every column); one line per measured
row, with the device and dtype so runs on different machines sit side by side. ``--summary``
keeps, for the speedup sweep, only the largest token count of each (device, shape, mix).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Sequence, Tuple

from ..usage import UsageError, check_out_dir
from .results import load_results


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="FILES_OR_DIRS",
                   help="result JSON/CSV files, or folders searched recursively")
    p.add_argument("--out", default=None, metavar="FILE", help="write the Markdown here too")
    p.add_argument("--impls", default=None,
                   help="comma-separated implementations to keep (e.g. triton,sorted,dense)")
    p.add_argument("--summary", action="store_true",
                   help="speedup: only the largest token count per device, shape and mix")


def _fmt(v, kind: str = "") -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if kind == "pct":
        return f"{100 * v:.1f}%"
    if abs(v) >= 1e5:
        return f"{v:.3g}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return f"{v:.3g}"


def _table(header: Sequence[Tuple[str, str, str]], rows: List[Dict]) -> List[str]:
    """``header`` = (title, key, format); a Markdown table of ``rows``."""
    lines = ["| " + " | ".join(h[0] for h in header) + " |",
             "|" + "|".join("---" if h[2] == "text" else "---:" for h in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(key), fmt).replace("|", "/")
                                       for _, key, fmt in header) + " |")
    return lines


SPEEDUP = [("device", "device", "text"), ("dtype", "dtype", "text"), ("shape", "shape", "text"),
           ("mix (big/small/skip)", "mix_label", "text"), ("N", "n_tokens", "num"),
           ("impl", "impl", "text"), ("median ms", "median_ms", "num"),
           ("IQR ms", "iqr", "text"), ("ideal", "ideal", "num"),
           ("realised", "realised", "num"), ("efficiency", "efficiency", "pct"),
           ("eff (min times)", "efficiency_min", "pct"),
           ("vs sorted", "vs_sorted", "num"), ("TFLOP/s", "tflops", "num"),
           ("error", "error", "text")]
DECODE = [("device", "device", "text"), ("dtype", "dtype", "text"), ("level", "level", "text"),
          ("shape / config", "shape", "text"), ("mix", "mix", "text"),
          ("N", "n_tokens", "num"), ("impl", "impl", "text"), ("mode", "mode", "text"),
          ("median us", "median_us", "num"), ("IQR us", "iqr_us", "text"),
          ("vs dense", "vs_dense", "num"), ("error", "error", "text")]
KERNELS = [("device", "device", "text"), ("dtype", "dtype", "text"), ("kernel", "name", "text"),
           ("variant", "kernel", "text"), ("impl", "impl", "text"), ("N", "N", "num"),
           ("d / width", "dims", "text"),
           ("mix", "mix", "text"), ("graph", "graph", "text"), ("ms", "ms", "num"),
           ("weights' read us", "read_us", "num"), ("x dense big", "vs_dense_big", "num"),
           ("GB/s", "gbps", "num"),
           ("of copy", "frac_of_copy", "pct"), ("TFLOP/s", "tflops", "num"),
           ("ideal", "ideal_speedup", "num"), ("realised", "realized_speedup", "num"),
           ("efficiency", "efficiency", "pct"), ("max rel err", "max_rel_err", "num"),
           ("ok", "ok", "text"), ("error", "error", "text")]
MODEL = [("device", "device", "text"), ("dtype", "dtype", "text"), ("config", "config", "text"),
         ("phase", "phase", "text"), ("mix", "mix", "text"), ("impl", "impl", "text"),
         ("B x T", "batch_shape", "text"), ("median ms", "median_ms", "num"),
         ("tokens/s", "tokens_per_s", "num"), ("patterns/s", "patterns_per_s", "num"),
         ("vs dense", "vs_dense", "num"), ("note", "error", "text")]


def _decorate(env: Dict, r: Dict) -> Dict:
    r = dict(r, device=env.get("device", "?"), dtype=env.get("dtype", "?"))
    if "p_big" in r:
        r["mix_label"] = f"{r['mix']} ({r['p_big']:.3g}/{r['p_small']:.3g}/{r['p_skip']:.3g})"
    if r.get("q1_ms") is not None and r.get("q3_ms") is not None:
        r["iqr"] = f"{r['q1_ms']:.4g}-{r['q3_ms']:.4g}"
    dims = [str(r[k]) for k in ("d", "width", "shape") if r.get(k) not in (None, "")]
    if dims:
        r["dims"] = " / ".join(dims)
    if r.get("median_ms") is not None:
        r["median_us"] = r["median_ms"] * 1e3
        if r.get("q1_ms") is not None:
            r["iqr_us"] = f"{r['q1_ms'] * 1e3:.4g}-{r['q3_ms'] * 1e3:.4g}"
    return r


def render(paths: Sequence[str], impls: Sequence[str] = (), summary: bool = False) -> str:
    """The Markdown report of every result file under ``paths``."""
    try:
        runs = load_results(paths)
    except FileNotFoundError as e:
        raise UsageError("FILES_OR_DIRS", str(e).removeprefix("results: ")) from None
    if not runs:
        raise UsageError("FILES_OR_DIRS", f"no result files (duollm bench or bench_kernels "
                                          f"JSON) found under {', '.join(paths)}")
    by_kind: Dict[str, List[Dict]] = {}
    envs: List[Dict] = []
    for env, rows in runs:
        envs.append(env)
        for r in rows:
            if impls and r.get("impl") not in impls:
                continue
            by_kind.setdefault(env.get("kind", "?"), []).append(_decorate(env, r))
    out = ["# duollm benchmark report", "", "## Runs", ""]
    out += _table([("file", "file", "text"), ("kind", "kind", "text"),
                   ("device", "device", "text"), ("dtype", "dtype", "text"),
                   ("torch", "torch", "text"), ("triton", "triton", "text"),
                   ("git", "git_sha", "text"), ("when (UTC)", "timestamp", "text"),
                   ("threads", "torch_threads", "num"), ("malloc tuned", "malloc_tuned", "text"),
                   ("load avg", "load", "text"),
                   ("copy GB/s", "copy", "num"), ("matmul TFLOP/s", "mm", "num")],
                  [dict(e, file=os.path.relpath(e["file"]), load=_load(e),
                        copy=(e.get("ceilings") or {}).get("copy_GBps"),
                        mm=next((v for k, v in (e.get("ceilings") or {}).items()
                                 if k.startswith("matmul_TFLOPs")), None)) for e in envs])
    known = {"speedup": SPEEDUP, "decode": DECODE, "model": MODEL, "kernels": KERNELS}
    # Kinds this report has no layout for (other tools' result files) get every column.
    for kind in by_kind:
        if kind not in known:
            columns = ["device", "dtype"]
            for r in by_kind[kind]:
                columns += [k for k in r if k not in columns and k != "mix_label"]
            known[kind] = [(c, c, "text" if c in ("device", "dtype") else "num")
                           for c in columns]
    for kind, header in known.items():
        rows = by_kind.get(kind)
        if not rows:
            continue
        if kind == "speedup" and summary:
            top: Dict[Tuple, int] = {}
            for r in rows:
                key = (r["device"], r["dtype"], r["shape"], r["mix"])
                top[key] = max(top.get(key, 0), r["n_tokens"])
            rows = [r for r in rows
                    if r["n_tokens"] == top[(r["device"], r["dtype"], r["shape"], r["mix"])]]
        out += ["", f"## {kind}", ""] + _table(header, rows)
    return "\n".join(out) + "\n"


def _load(env: Dict) -> str:
    a, b = env.get("loadavg_start"), env.get("loadavg_end")
    if not a:
        return ""
    return f"{a[0]:.1f}" + (f"->{b[0]:.1f}" if b else "")


def run(args: argparse.Namespace) -> int:
    impls = [i.strip() for i in args.impls.split(",")] if args.impls else []
    if args.out is not None:
        if os.path.isdir(args.out):
            raise UsageError("--out", f"{args.out} is a folder; expected a file name")
        check_out_dir("--out", os.path.dirname(os.path.abspath(args.out)))
    text = render(args.paths, impls, args.summary)
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0
