"""Pieces the bench commands share: device/dtype/backend/output arguments, their checks (a
mistake is a ``UsageError``: exit 2 before any measuring), and the run's set-up."""
from __future__ import annotations

import argparse
import os
from typing import Dict, List, Optional

import torch

from .. import ops
from ..usage import (UsageError, add_threads_arg, apply_thread_rule, check_device, check_float,
                     check_int, check_out_dir)
from .results import committed_results_dir, default_out_dir
from .timing import tune_cpu_allocator

# DUOLLM_CHECK_ROUTES values (duollm.ops.check_mode); "1" is the default configuration.
ROUTE_CHECK_MODES = ("1", "0", "sync", "device")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float64": torch.float64}


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="compute dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--backends", default=None,
                   help="comma-separated op backends to measure (default: every available "
                        "one, except the Triton interpreter on the CPU)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="results folder (default: runs/bench/<device-slug>/ under the current "
                        "folder)")
    p.add_argument("--commit-results", action="store_true",
                   help="write into the repository's committed benchmarks/results/"
                        "<device-slug>/ instead (for results meant to be committed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and routes")
    p.add_argument("--no-malloc-tune", dest="malloc_tune", action="store_false",
                   help="CPU: keep glibc's default allocator thresholds (see "
                        "duollm.bench.timing.tune_cpu_allocator)")
    p.add_argument("--route-checks", nargs="?", const="1", default=None,
                   choices=ROUTE_CHECK_MODES, metavar="MODE",
                   help="DUOLLM_CHECK_ROUTES for the run (docs/speed.md): 1 (a bare "
                        "--route-checks), the default mode users get: values read on the CPU, "
                        "checked on a GPU's device with no host sync; 0: no checks (the "
                        "layer without their cost); sync: a read per call (debug); device. "
                        "Default: as the environment says, 1 unless DUOLLM_CHECK_ROUTES is "
                        "set, so the bench measures what a user runs")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    add_threads_arg(p)


def resolve_device(spec: Optional[str]) -> torch.device:
    """The device ``--device`` names (None: cuda when a GPU is visible, else cpu), checked to
    exist here; UsageError otherwise."""
    device = check_device("--device", spec)
    if device.type == "cuda" and device.index is None:
        # torch 2.11's set_device and friends refuse an index-less CUDA device.
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(spec: Optional[str], device: torch.device) -> torch.dtype:
    if spec is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[spec]


def resolve_backends(spec: Optional[str], device: torch.device) -> Dict[str, Optional[str]]:
    """``{backend: None if it can run, else why not}`` for the backends to measure."""
    status = {n: why for n, why in ops.backend_status(device).items()
              if not n.startswith("bench-")}  # bench-only stand-ins are not backends
    if spec is None:
        chosen = {n: why for n, why in status.items() if why is None}
        if device.type == "cpu" and ops.triton_interpreting():
            chosen.pop("triton", None)  # the interpreter: correct, far too slow to time
        return chosen
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise UsageError("--backends", f"expected a comma-separated list of "
                                       f"{', '.join(sorted(status))}, got {spec!r}")
    unknown = [n for n in names if n not in status]
    if unknown:
        raise UsageError("--backends", f"unknown {', '.join(unknown)}; expected some of "
                                       f"{', '.join(sorted(status))}")
    # Asked for by name, a backend that cannot run is a mistake, not a silent empty row.
    missing = [f"{n} ({status[n]})" for n in names if status[n] is not None]
    if missing:
        raise UsageError("--backends", f"cannot run on {device}: {'; '.join(missing)}")
    return {n: status[n] for n in names}


def resolve_out_dir(args: argparse.Namespace, device: torch.device) -> str:
    """Where a measuring command writes: ``--out``, else the committed
    ``benchmarks/results/<device>/`` with ``--commit-results``, else ``runs/bench/<device>/``.
    Checked (creatable, not a file); nothing is created here."""
    if args.out and getattr(args, "commit_results", False):
        raise UsageError("--commit-results", "give either --out DIR or --commit-results")
    if args.out:
        out = args.out
    elif getattr(args, "commit_results", False):
        out = committed_results_dir(device)
    else:
        out = default_out_dir(device)
    return check_out_dir("--out", out)


def check_number_args(args: argparse.Namespace, ints=(), positive=()) -> None:
    """UsageError unless each named int option (``"--repeats"``) is >= 1 and each named
    float option is > 0, when given."""
    for flag in ints:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            check_int(flag, value, low=1)
    for flag in positive:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            check_float(flag, value, low=0.0, low_open=True)


def setup_run(args: argparse.Namespace, device: torch.device,
              d_model: Optional[int] = None) -> Dict:
    """Apply the process-wide settings of a bench run on ``device`` (already resolved);
    return what to record about them.

    ``d_model``: the widest model dimension measured; with it the CPU thread rule of every
    command applies (one thread for d_model <= 128 unless ``--threads``, see
    ``duollm.usage.apply_thread_rule``); without it only an explicit ``--threads`` does.
    """
    # Route checks stay in the mode a user gets (the default: no host sync on a GPU, a free
    # read on the CPU) unless --route-checks names another; the results record the mode.
    if args.route_checks is not None:
        os.environ["DUOLLM_CHECK_ROUTES"] = args.route_checks
    try:
        mode = ops.check_mode()
    except ValueError:  # a bad DUOLLM_CHECK_ROUTES in the environment: the user's setting
        raise UsageError("--route-checks", f"the environment's DUOLLM_CHECK_ROUTES="
                                           f"{os.environ.get('DUOLLM_CHECK_ROUTES')!r} is not "
                                           f"a mode; expected one of "
                                           f"{', '.join(ROUTE_CHECK_MODES)}") from None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if d_model is not None or args.threads is not None:
        apply_thread_rule(args.threads, device, d_model if d_model is not None else 1 << 30)
    tuned = tune_cpu_allocator() if (device.type == "cpu" and args.malloc_tune) else False
    return {"malloc_tuned": tuned, "route_checks": mode}


def input_sets(bytes_per_set: int, device: torch.device, max_sets: int = 4) -> int:
    """How many input sets to rotate so that the cache does not flatter small inputs."""
    cache = 32 << 20
    if device.type == "cuda":
        cache = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    else:
        try:
            with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
                text = f.read().strip().upper()
            cache = int(text.rstrip("KMB")) << (20 if text.endswith("M") else 10)
        except (OSError, ValueError):
            pass
    # Enough sets that one round of them overflows the cache, within max_sets.
    return int(max(1, min(max_sets, -(-2 * cache // max(bytes_per_set, 1)))))


def names_list(spec: Optional[str], default: List[str]) -> List[str]:
    if spec is None:
        return list(default)
    return [n.strip() for n in spec.split(",") if n.strip()]
