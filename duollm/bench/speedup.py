"""``duollm bench speedup``: realised vs ideal speedup of the routed layer
(docs/routes-and-budgets.md).

For every shape x token count x route mix, the routed layer of every available backend and the
plain-PyTorch baselines (``naive``, ``sorted``; ``reference`` = duollm.reference) are timed
against the dense big FFN in the same process. Per row: time (median, quartiles, min, max),
ideal speedup (FLOPs), realised speedup (median times), efficiency = realised / ideal, the same
from the fastest calls (``realised_min``, ``efficiency_min``: the least disturbed estimate on a
shared CPU), the speedup over the best plain-PyTorch routing (``vs_sorted``) and the error
against it.

Routed candidates include the router GEMM (d -> 3 logits on every token), as the ideal
speedup counts it; the routes themselves are drawn with exact counts (``exact_counts``) and
shuffled, so every candidate sees the same mix.
"""
from __future__ import annotations

import argparse
import gc
import time
from typing import Callable, Dict, List, Optional

import torch

from .. import ops
from .. import reference
from . import accounting as acc
from .baselines import dense_ffn, naive_routing, sorted_routing
from ..usage import UsageError, options_of
from .common import (add_device_args, check_number_args, input_sets, names_list,
                     resolve_backends, resolve_device, resolve_dtype, resolve_out_dir,
                     setup_run)
from .results import environment, stamp, write_results
from .timing import Stats, measure_ceilings, time_cuda, time_interleaved

BASELINE_FNS = {"naive": naive_routing, "sorted": sorted_routing,
                "reference": reference.duo_ffn}
DEFAULT_TOKENS = {"cuda": [1, 16, 64, 1024, 4096, 16384], "cpu": [16, 256, 1024, 4096]}
DEFAULT_SHAPES = {"cuda": ["paper", "small"], "cpu": ["small"]}
QUICK = dict(shapes="tiny", tokens="16,64", repeats=3, budget=0.05)
# Error allowed against the sorted baseline, relative to the output's scale.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2,
             torch.bfloat16: 6e-2}


def add_args(p: argparse.ArgumentParser) -> None:
    add_device_args(p)
    p.add_argument("--quick", action="store_true",
                   help=f"a CPU sweep of seconds (shape tiny, tokens {QUICK['tokens']}), for tests")
    p.add_argument("--shapes", default=None,
                   help=f"comma-separated: {', '.join(acc.SHAPES)} or D:DBIG:DSMALL "
                        "(default: paper,small on a GPU, small on the CPU)")
    p.add_argument("--tokens", default=None,
                   help="comma-separated token counts, 16k style allowed (default: "
                        "1,16,64,1024,4096,16384 on a GPU, 16,256,1024,4096 on the CPU)")
    p.add_argument("--mixes", default=None,
                   help=f"comma-separated: {', '.join(acc.MIXES)} or PBIG:PSMALL:PSKIP "
                        "(default: all)")
    p.add_argument("--baselines", default="naive,sorted,reference",
                   help="plain-PyTorch baselines besides dense: naive, sorted, reference "
                        "(default: %(default)s)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per candidate (default: 100 on a GPU, 20 on the CPU)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timing per candidate and configuration (default: 1 on a "
                        "GPU; on the CPU 8 per configuration, shared round-robin)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="stop starting new configurations after this many seconds")
    p.add_argument("--no-router", dest="router", action="store_false",
                   help="leave the router GEMM out of the routed candidates' time")
    p.add_argument("--no-ceilings", dest="ceilings", action="store_false",
                   help="skip measuring the device's copy bandwidth and matmul rate")


def _candidates(names_backends: List[str], baselines: List[str], params, w_router,
                xs, res, routes, router: bool) -> Dict[str, Callable[[int], object]]:
    k = len(xs)

    def routed(fn):
        def call(i: int):
            x = xs[i % k]
            if router:
                torch.mm(x, w_router.t())  # (N, 3) logits; the routes are given
            return fn(x, routes[i % k], params, res[i % k])
        return call

    def backend_fn(name):
        return lambda x, r, p, rs: ops.duo_ffn(x, r, p, residual=rs, backend=name)

    fns: Dict[str, Callable[[int], object]] = {
        "dense": lambda i: dense_ffn(xs[i % k], None, params, res[i % k])}
    for b in baselines:
        fns[b] = routed(BASELINE_FNS[b])
    for b in names_backends:
        fns[b] = routed(backend_fn(b))
    return fns


def _max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.shape != ref.shape:
        return float("inf")
    if out.numel() == 0:
        return 0.0
    scale = ref.float().abs().max().clamp_min(1e-6)
    return float((out.float() - ref.float()).abs().max() / scale)


def sweep(device: torch.device, dtype: torch.dtype, shapes, mixes, tokens: List[int],
          backends: List[str], baselines: List[str], repeats: int, budget: float,
          router: bool = True, seed: int = 0, time_limit: Optional[float] = None,
          log: Callable[[str], None] = print,
          checkpoint: Optional[Callable[[List[Dict]], None]] = None) -> List[Dict]:
    """Time every candidate at every (shape, N, mix); return the result rows.

    ``checkpoint(rows)`` is called after every (shape, N), so a run cut short keeps its rows.
    """
    rows: List[Dict] = []
    t_start = time.perf_counter()
    gen_cpu = torch.Generator().manual_seed(seed)
    gen_dev = torch.Generator(device=device).manual_seed(seed)
    tol = TOLERANCE[dtype]
    for shape in shapes:
        params = acc.weights_for(shape, device, dtype, gen_dev)
        w_router = acc.weights_for(acc.Shape("router", shape.d_model, 3, 1), device, dtype,
                                   gen_dev)[2][0]  # (3, d)
        for n in tokens:
            bytes_per_set = 3 * n * shape.d_model * torch.empty((), dtype=dtype).element_size()
            k = input_sets(bytes_per_set, device)
            xs = [torch.randn(n, shape.d_model, device=device, generator=gen_dev).to(dtype)
                  for _ in range(k)]
            res = [torch.randn(n, shape.d_model, device=device, generator=gen_dev).to(dtype)
                   for _ in range(k)]
            for mix in mixes:
                if time_limit is not None and time.perf_counter() - t_start > time_limit:
                    log(f"time limit of {time_limit:.0f} s reached: skipping {shape.name} "
                        f"N={n} {mix.name} and the rest")
                    return rows
                counts = acc.exact_counts(mix, n)
                routes = [acc.draw_routes(mix, n, gen_cpu, device) for _ in range(k)]
                fns = _candidates(backends, baselines, params, w_router, xs, res, routes,
                                  router)
                rows += _measure(fns, device, shape, mix, n, counts, repeats, budget, tol,
                                 router, res[0], log)
            del xs, res
            if checkpoint is not None:
                checkpoint(rows)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _measure(fns, device, shape, mix, n, counts, repeats, budget, tol, router, residual, log):
    n_big, n_small, n_skip = counts
    errors: Dict[str, str] = {}
    outs: Dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for name in list(fns):
            try:
                outs[name] = fns[name](0)
            except Exception as e:  # a backend that fails is recorded, not fatal
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                del fns[name]
        ref = outs.get("sorted")
        times: Dict[str, List[float]] = {}
        if device.type == "cuda":
            for name, fn in fns.items():
                try:
                    times[name] = time_cuda(fn, repeats=repeats, budget_s=budget)
                except Exception as e:
                    errors[name] = f"{type(e).__name__}: {e}"
        else:
            times = time_interleaved(fns, device, repeats=repeats, budget_s=budget * len(fns))
    ideal = acc.ideal_speedup(shape, n_big, n_small, n)
    stats = {name: Stats.of(t) for name, t in times.items()}
    t_dense = stats["dense"].median_ms if "dense" in stats else float("nan")
    t_sorted = stats["sorted"].median_ms if "sorted" in stats else float("nan")
    rows = []
    for name in list(outs) + [e for e in errors if e not in outs]:
        row = dict(shape=shape.name, d_model=shape.d_model, d_big=shape.d_big,
                   d_small=shape.d_small, mix=mix.name, p_big=mix.p_big, p_small=mix.p_small,
                   p_skip=mix.p_skip, n_tokens=n, n_big=n_big, n_small=n_small, n_skip=n_skip,
                   impl=name, impl_kind=("dense" if name == "dense" else
                                         "baseline" if name in BASELINE_FNS else "backend"),
                   router=router)
        if name in stats:
            s = stats[name]
            row.update(s.as_dict())
            is_dense = name == "dense"
            row["ideal"] = 1.0 if is_dense else ideal
            row["realised"] = t_dense / s.median_ms if s.median_ms > 0 else float("nan")
            row["efficiency"] = row["realised"] / row["ideal"] if row["ideal"] else float("nan")
            row["vs_sorted"] = t_sorted / s.median_ms if s.median_ms > 0 else float("nan")
            # From the fastest calls: on a shared CPU the least disturbed estimate.
            d_min = stats["dense"].min_ms if "dense" in stats else float("nan")
            row["realised_min"] = d_min / s.min_ms if s.min_ms > 0 else float("nan")
            row["efficiency_min"] = (row["realised_min"] / row["ideal"] if row["ideal"]
                                     else float("nan"))
            flops = (acc.dense_flops(shape, n) if is_dense else
                     acc.routed_flops(shape, n_big, n_small, n, router))
            row["tflops"] = flops / (s.median_ms * 1e-3) / 1e12 if s.median_ms > 0 else 0.0
            if ref is not None and not is_dense and name in outs:
                # Compared on the FFN term (out - residual), which the residual must not hide.
                err = _max_err(outs[name].float() - residual.float(),
                               ref.float() - residual.float())
                row["max_rel_err"] = err
                if not err <= tol:
                    row["error"] = f"output differs from the sorted baseline (rel err {err:.3g})"
        if name in errors:
            row["error"] = errors[name]
        rows.append(row)
        _log_row(row, log)
    return rows


def _log_row(row: Dict, log) -> None:
    head = (f"{row['shape']:>6} {row['mix']:>12} N={row['n_tokens']:<6} {row['impl']:>9}")
    if "median_ms" not in row:
        log(f"{head}  failed: {row.get('error')}")
        return
    log(f"{head} {row['median_ms']:10.4f} ms [{row['q1_ms']:.4f}, {row['q3_ms']:.4f}]  "
        f"ideal {row['ideal']:8.3f}  realised {row['realised']:8.3f}  "
        f"eff {row['efficiency']:6.1%} (min {row['efficiency_min']:6.1%})  "
        f"vs sorted {row['vs_sorted']:5.2f}x"
        + (f"  ERROR {row['error']}" if row.get("error") else ""))


_LIST_OPTIONS = {"shape": "--shapes", "shapes": "--shapes", "mix": "--mixes",
                 "mixes": "--mixes", "tokens": "--tokens"}


def run(args: argparse.Namespace) -> int:
    # Every option is checked before anything is measured or written (a mistake: exit 2).
    # --quick is the CPU smoke sweep: without an explicit --device it stays on the CPU.
    device = resolve_device("cpu" if args.quick and args.device is None else args.device)
    dkind = device.type
    if args.quick and dkind != "cpu":
        raise UsageError("--quick", "is the CPU smoke sweep; drop --device or use cpu")
    check_number_args(args, ints=("--repeats",), positive=("--budget", "--time-limit"))
    dtype = resolve_dtype(args.dtype, device)
    with options_of(_LIST_OPTIONS):
        shapes = acc.parse_list(args.shapes or (QUICK["shapes"] if args.quick else
                                                ",".join(DEFAULT_SHAPES[dkind])),
                                acc.parse_shape, "shapes")
        tokens = acc.parse_tokens(args.tokens or (QUICK["tokens"] if args.quick else
                                                  ",".join(map(str, DEFAULT_TOKENS[dkind]))))
        mixes = acc.parse_list(args.mixes or ",".join(acc.MIXES), acc.parse_mix, "mixes")
    baselines = names_list(args.baselines, [])
    for b in baselines:
        if b not in BASELINE_FNS:
            raise UsageError("--baselines", f"unknown {b!r}; expected some of "
                                            f"{', '.join(sorted(BASELINE_FNS))}")
    if "sorted" not in baselines:
        baselines.append("sorted")  # the correctness check and vs_sorted read it
    status = resolve_backends(args.backends, device)  # asked-for but unavailable: exit 2
    backends = [b for b, why in status.items() if why is None]
    unavailable = {b: why for b, why in ops.backend_status(device).items()
                   if why is not None and not b.startswith("bench-")}
    out_dir = resolve_out_dir(args, device)
    settings = setup_run(args, device, d_model=max(s.d_model for s in shapes))
    repeats = args.repeats or (QUICK["repeats"] if args.quick else
                               100 if dkind == "cuda" else 20)
    budget = args.budget or (QUICK["budget"] if args.quick else 1.0 if dkind == "cuda" else 8.0)
    if dkind == "cpu" and not args.budget and not args.quick:
        budget = budget / (2 + len(backends) + len(baselines))  # per candidate, shared
    ceilings = {}
    if args.ceilings and not args.quick:
        ceilings = measure_ceilings(device, dtype)
        print("device ceilings: " + ", ".join(f"{k} {v:.4g}" for k, v in ceilings.items()))
    env = environment(device, dtype, kind="speedup", shapes=[vars(s) for s in shapes],
                      mixes=[vars(m) for m in mixes], tokens=tokens, backends=backends,
                      unavailable_backends=unavailable, baselines=["dense"] + baselines,
                      router=args.router, repeats=repeats, ceilings=ceilings, **settings)
    prefix = f"speedup-{env['dtype']}-{stamp()}"
    rows = sweep(device, dtype, shapes, mixes, tokens, backends, baselines, repeats, budget,
                 router=args.router, seed=args.seed, time_limit=args.time_limit,
                 checkpoint=lambda rows: write_results(out_dir, prefix, dict(env), rows))
    paths = write_results(out_dir, prefix, env, rows)
    if args.plots:
        from .plots import speedup_plots
        paths += tuple(speedup_plots(rows, env, out_dir, prefix))
    print("wrote " + ", ".join(paths))
    bad = [r for r in rows if r.get("error") and "differs" in r["error"]]
    return 1 if bad else 0
