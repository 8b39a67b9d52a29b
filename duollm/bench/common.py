"""Pieces the bench commands share: device/dtype/backend arguments and the run's set-up."""
from __future__ import annotations

import argparse
import os
from typing import Dict, List, Optional

import torch

from .. import ops
from .timing import tune_cpu_allocator

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
                   help="results folder (default: benchmarks/results/<device-slug>/)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and routes")
    p.add_argument("--no-malloc-tune", dest="malloc_tune", action="store_false",
                   help="CPU: keep glibc's default allocator thresholds (see "
                        "duollm.bench.timing.tune_cpu_allocator)")
    p.add_argument("--route-checks", action="store_true",
                   help="keep duollm.ops' route-value checks on (a host sync per call); off "
                        "by default, as in production")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch intra-op threads (default: torch's own choice)")


def resolve_device(spec: Optional[str]) -> torch.device:
    device = torch.device(spec if spec is not None else
                          "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda requested but no CUDA GPU is visible to torch")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu or cuda[:N], got {spec!r}")
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
        if device.type == "cpu" and ops._triton_interpreting():
            chosen.pop("triton", None)  # the interpreter: correct, far too slow to time
        return chosen
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in status]
    if unknown:
        raise ValueError(f"--backends: unknown {unknown}; registered: {sorted(status)}")
    return {n: status[n] for n in names}


def setup_run(args: argparse.Namespace, device: torch.device) -> Dict:
    """Apply the process-wide settings of a bench run on ``device`` (already resolved);
    return what to record about them."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    tuned = tune_cpu_allocator() if (device.type == "cpu" and args.malloc_tune) else False
    if not args.route_checks:
        os.environ["DUOLLM_CHECK_ROUTES"] = "0"
    return {"malloc_tuned": tuned, "route_checks": bool(args.route_checks)}


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
