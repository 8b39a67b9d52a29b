"""Result files: one CSV (rows) and one JSON (environment + rows) per run, and reading them back.

Every run records what is needed to compare machines: device name, torch/triton versions, git
SHA, dtype, shapes, backends, timestamp, threads, the machine's load, and the device's measured
copy bandwidth and matmul rate.
"""
from __future__ import annotations

import csv
import datetime as _dt
import glob
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from importlib import metadata
from typing import Dict, Iterable, List, Optional, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: torch.device) -> str:
    """A folder name for the device, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-amd-epyc``."""
    name = device_name(device).lower()
    if device.type != "cuda" and not name.startswith("cpu"):
        name = "cpu-" + name
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or device.type


def default_out_dir(device: torch.device) -> str:
    """Where a bench run writes unless told: ``runs/bench/<device-slug>/`` under the current
    folder (never the repository's committed results)."""
    return os.path.join("runs", "bench", device_slug(device))


def committed_results_dir(device: torch.device) -> str:
    """The repository's committed ``benchmarks/results/<device-slug>/`` (``--commit-results``)."""
    return os.path.join(ROOT, "benchmarks", "results", device_slug(device))


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_sha() -> str:
    """The commit measured; ``DUOLLM_GIT_SHA`` names it where the tree travels without .git."""
    if os.environ.get("DUOLLM_GIT_SHA"):
        return os.environ["DUOLLM_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("-dirty" if sha and dirty.strip() else "")


def environment(device: torch.device, dtype: torch.dtype, **extra) -> Dict:
    """The run's metadata (``extra`` fields are added as given)."""
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "dtype": str(dtype).replace("torch.", ""),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "command": command_line(),
    }
    if hasattr(os, "getloadavg"):
        env["loadavg_start"] = list(os.getloadavg())
    env.update(extra)
    return env


def scrub_paths(text: str) -> str:
    """``text`` without this machine's paths: the checkout becomes relative, the interpreter's
    environment ``<venv>``, its installation ``<python>``, the temp folder ``<tmp>`` and the
    home folder ``~`` (committed results must name no machine's paths)."""
    tmp = tempfile.gettempdir()
    places = [(ROOT + os.sep, ""), (ROOT, "."), (sys.prefix, "<venv>"),
              (sys.base_prefix, "<python>"), (tmp, "<tmp>"),
              (os.path.expanduser("~"), "~")]
    for path, name in sorted(places, key=lambda p: -len(p[0])):
        if path and path not in (os.sep, "~"):
            text = text.replace(path, name)
    return text


def command_line(argv: Optional[List[str]] = None) -> str:
    """The command that wrote a result file as a user types it (``duollm bench ...``), with no
    machine's paths in it."""
    argv = list(sys.argv if argv is None else argv)
    prog = argv[0] if argv else ""
    where = os.path.basename(os.path.dirname(os.path.abspath(prog))) if prog else ""
    if os.path.basename(prog) == "__main__.py" and where in ("duollm", "bench"):
        head = ["duollm"] if where == "duollm" else ["duollm", "bench"]
    elif os.path.basename(prog) == "duollm":
        head = ["duollm"]
    else:
        head = ["python", prog]
    return scrub_paths(shlex.join(head + argv[1:]))


def stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def write_results(out_dir: str, prefix: str, env: Dict, rows: List[Dict]) -> Tuple[str, str]:
    """Write ``<prefix>.json`` (env + rows) and ``<prefix>.csv`` (rows); return both paths."""
    os.makedirs(out_dir, exist_ok=True)
    if hasattr(os, "getloadavg"):
        env["loadavg_end"] = list(os.getloadavg())
    json_path = os.path.join(out_dir, prefix + ".json")
    csv_path = os.path.join(out_dir, prefix + ".csv")
    with open(json_path, "w") as f:
        json.dump({"env": env, "rows": [{k: _clean(v) for k, v in r.items()} for r in rows]},
                  f, indent=1)
    columns: List[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["device", "dtype"] + columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({"device": env["device"], "dtype": env["dtype"],
                             **{k: _clean(v) for k, v in r.items()}})
    return json_path, csv_path


def find_result_files(paths: Iterable[str]) -> List[str]:
    """The JSON result files named or found (recursively) under the given paths; a missing
    path is a FileNotFoundError."""
    files: List[str] = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(glob.glob(os.path.join(p, "**", "*.json"), recursive=True))
        elif p.endswith(".csv") and os.path.exists(p[:-4] + ".json"):
            files.append(p[:-4] + ".json")
        elif os.path.exists(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"results: no such file or directory: {p}")
    return files


def load_results(paths: Iterable[str]) -> List[Tuple[Dict, List[Dict]]]:
    """``[(env, rows)]`` of every result file under ``paths`` (JSON, or a CSV beside one): the
    ``{"env", "rows"}`` files of ``duollm bench`` and the ``{"meta", "rows"}`` files of
    ``benchmarks/ops/bench_kernels.py`` (``env["kind"] == "kernels"``)."""
    out = []
    for path in find_result_files(paths):
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"results: {path} is not a JSON result file ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            continue  # some other JSON file in the folder
        if isinstance(data.get("env"), dict):
            env = dict(data["env"], file=path)
        elif isinstance(data.get("meta"), dict):
            # benchmarks/ops/bench_kernels.py writes {"meta", "rows"}: the kernel microbenchmarks.
            env = dict(data["meta"], file=path)
            env.setdefault("kind", "kernels")
            env["dtype"] = str(env.get("dtype", "?")).replace("torch.", "")
        else:
            continue
        out.append((env, data["rows"]))
    return out
