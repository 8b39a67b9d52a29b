"""GPU microbenchmark of the Triton kernels at the paper's layer (d_model 2560, d_big 10240,
d_small 640), bf16.

    python benchmarks/ops/bench_kernels.py --out benchmarks/results/kernels

Measures (``triton.testing.do_bench``, median; inputs rotated over several random sets so
the L2 cache does not flatter; never zeros):

* device ceilings: a large D2D copy (GB/s, read + write) and an 8192^3 bf16 matmul (TFLOP/s);
* group_tokens at N=16384 (us);
* gather and scatter_combine at N=16384 (GB/s and fraction of the copy ceiling);
* swiglu_ffn (Triton) vs cuBLAS (three torch matmuls + F.silu * mul) at widths 640 / 10240,
  N 4096 / 16384 (TFLOP/s);
* duo_ffn (triton and torch backends, the latter resolved through ``duollm.ops``) vs the
  dense big FFN (torch: three matmuls + F.silu * mul + residual) at N=16384 for the paper's
  route mixes: realised speedup = time(dense) / time(routed) next to the ideal speedup
  (docs/routes-and-budgets.md: dense FLOPs / (router 2*d*3 + p_big*N big + p_small*N small FLOPs));
* forward + backward of duo_ffn (triton) vs torch autograd on the dense big FFN at N=4096;
* the switched-on paths next to the default one, same run: ``triton-persistent``
  (``DUOLLM_TRITON_PERSISTENT``: persistent grouped GEMMs, one-launch grouping) in the layer
  rows and a one-launch grouping row; decode (N = 1, 16, 64) of the layer for the 1/12, big
  and small mixes with the default and the ``decode`` path (``DUOLLM_TRITON_DECODE``), eager
  and replayed from a CUDA graph, against the dense big and dense small layers, with the
  time the active weights take to read at the measured copy bandwidth.

``--sections`` picks a subset (ceilings always run: every row is compared with them).
``smoke`` (not in the default list) is the correctness pass ``benchmarks/gpu_check.sh`` runs
before any timing: every kernel variant (grouping, gather, scatter-combine, SwiGLU forward and
backward, the routed layer in every mode for every mix including out-of-range routes, its
backward with the backward switch off and on, a policy route on one path) on random data
against ``duollm/reference.py``, every buffer the kernels allocate poisoned first (NaN, or
-2**30 for integers) so an element never written shows, each forward run twice and compared
bit for bit. Nothing is timed there.

Writes ``results.json`` (``{"meta", "rows"}``: device, torch/triton versions, git SHA,
dtype, shapes, every row with its derived fields: efficiency, ratios, ``max_rel_err``) and
``results.csv`` into ``--out`` after EVERY row, so a run cut short still leaves every row it
finished; ``--append`` keeps the rows (and other keys) already there. ``--time-limit S``
starts no row after S seconds and records the rows it skipped. A failing row is recorded
with its error and the run goes on. Prints a table last. Needs a CUDA GPU (or
``--dry-run``); about 1-2 minutes on an H100.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F

D_MODEL, D_BIG, D_SMALL = 2560, 10240, 640
N_LAYER = 16384
MIXES = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.5, 0.5, 0.0), (1 / 12, 11 / 12, 0.0),
         (0.25, 0.5, 0.25), (0.0, 0.0, 1.0)]
SWIGLU_NS = (4096, 16384)
N_FWD_BWD = 4096
COPY_ELEMS = 256 * 1024 * 1024  # 512 MiB per bf16 tensor for the copy ceiling
MM_N = 8192                     # the matmul ceiling's size
N_ROT = 3  # input sets cycled through while timing
SECTIONS = ("routing", "swiglu", "layer", "fwd_bwd", "decode")
ALL_SECTIONS = ("smoke",) + SECTIONS  # smoke: correctness only, run on its own first
SMOKE_NS = (1, 7, 16, 64, 1000)  # decode sizes, the decode path's fallback, grouped tiles
SMOKE_MIXES = {"1/12": (1 / 12, 11 / 12, 0.0), "big": (1.0, 0.0, 0.0),
               "small": (0.0, 1.0, 0.0), "skip+all": (0.25, 0.5, 0.25), "skip": (0.0, 0.0, 1.0),
               "bad": None}  # bad: random routes with some out of range (they skip)
MODES = ("default", "decode", "persistent", "decode+persistent")
DECODE_NS = (1, 16, 64)
DECODE_MIXES = {"1/12": (1 / 12, 11 / 12, 0.0), "big": (1.0, 0.0, 0.0), "small": (0.0, 1.0, 0.0)}


def _fail(msg: str) -> None:
    print(f"bench_kernels: {msg}", file=sys.stderr)
    sys.exit(2)


class Rotor:
    """Calls ``fn(*inputs[i])`` with i cycling over the input sets."""

    def __init__(self, fn, sets):
        self.fn, self.sets, self.i = fn, sets, 0

    def __call__(self):
        args = self.sets[self.i % len(self.sets)]
        self.i += 1
        return self.fn(*args)


DRY_RUN = False  # --dry-run: the script checked on a CPU; nothing is timed


def bench_ms(fn, sets, grad_to_none=None) -> float:
    """Median ms of ``fn`` over rotated input sets (grads in ``grad_to_none`` reset per run)."""
    if DRY_RUN:
        for args in sets:
            fn(*args)
        return float("nan")
    import triton.testing
    return triton.testing.do_bench(Rotor(fn, sets), warmup=25, rep=100,
                                   grad_to_none=grad_to_none, return_mode="median")


def graph_ms(fn, sets) -> float:
    """Median ms of replaying ``fn(*set)`` captured in one CUDA graph per input set."""
    if DRY_RUN:
        return bench_ms(fn, sets)
    for args in sets:
        fn(*args)  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graphs = []
    for args in sets:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(*args)
        graphs.append((graph,))
    return bench_ms(lambda graph: graph.replay(), graphs)


@contextlib.contextmanager
def poisoned_allocations():
    """Every ``torch.empty``, ``torch.empty_like`` and ``Tensor.new_empty`` made inside is
    filled first (NaN for floats, a large negative or the largest value for integers), so an
    output element a kernel never writes, or a workspace it reads before writing, shows in the
    result instead of passing on whatever memory held."""
    real = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool and not t.is_complex():
            info = torch.iinfo(t.dtype)
            t.fill_(info.min // 2 if info.min < 0 else info.max)
        return t

    torch.empty = lambda *a, **k: fill(real[0](*a, **k))
    torch.empty_like = lambda *a, **k: fill(real[1](*a, **k))
    torch.Tensor.new_empty = lambda self, *a, **k: fill(real[2](self, *a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = real


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (inf where got is not finite but want is)."""
    if got.shape != want.shape:
        raise ValueError(f"shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    got, want = got.double(), want.double()
    if not torch.isfinite(got[torch.isfinite(want)]).all():
        return math.inf
    if got.numel() == 0:
        return 0.0
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def smoke(record, dev, dtype, g, d) -> None:
    """The correctness pass: every kernel variant against ``duollm.reference`` on random data,
    outputs poisoned, forwards run twice and compared bit for bit (see the module doc)."""
    import duollm.kernels as K
    from duollm import reference
    from duollm.kernels import ffn_gemm_bwd
    from duollm.kernels.swiglu import one_path

    tol = 1e-4 if dtype == torch.float32 else 3e-2  # fp32 (interpreter) / 16-bit on a GPU

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=dev, dtype=dtype)

    def triple(width):
        return [randn(width, d, scale=d ** -0.5), randn(width, d, scale=d ** -0.5),
                randn(d, width, scale=width ** -0.5)]

    params = (None, triple(D_SMALL), triple(D_BIG))
    f32 = [None if p is None else [w.float() for w in p] for p in params]

    def check(errs, bit_equal=None):
        err = max(errs)
        out = dict(max_rel_err=err, tol=tol, ok=bool(err <= tol) and bit_equal is not False)
        if bit_equal is not None:
            out["bit_equal_rerun"] = bit_equal
        return out

    def routes(mix, n):
        if mix is None:  # random paths, a few out of range (3 and -1): they must skip
            r = torch.randint(0, 3, (n,), generator=g)
            r[torch.rand(n, generator=g) < 0.2] = 3
            r[:1] = -1 if n > 1 else r[:1]
            return r.to(dev)
        return _routes_for(mix, n, g, dev)

    for n in SMOKE_NS:
        x, res = randn(n, d), randn(n, d)
        gate = (torch.rand(n, generator=g) + 0.5).to(dev, dtype)
        r3 = torch.randint(0, 3, (n,), generator=g).to(dev)
        with poisoned_allocations():
            def grouping():
                got, want = K.group_tokens(r3, 3), reference.group_tokens(r3, 3)
                same = all(torch.equal(a.long(), b.long()) for a, b in zip(got, want))
                return check([0.0 if same else math.inf])
            record("smoke", grouping, kernel="group_tokens", N=n)

            def gather():
                gr = reference.group_tokens(r3, 3)
                return check([max_rel_err(K.gather(x, gr), reference.gather(x, gr))])
            record("smoke", gather, kernel="gather", N=n)

            def scatter():
                gr = reference.group_tokens(r3, 3)
                got = K.scatter_combine(x, gr, res, gate, (0,))
                want = reference.scatter_combine(x.float(), gr, res.float(), gate.float(), (0,))
                return check([max_rel_err(got, want)])
            record("smoke", scatter, kernel="scatter_combine", N=n)

            def swiglu():
                xs = x.detach().clone().requires_grad_()
                ws = [w.detach().clone().requires_grad_() for w in params[1]]
                y = K.swiglu_ffn(xs, *ws)
                y2 = K.swiglu_ffn(x, *params[1])
                # float64 copies (``.float()`` of a float32 tensor would be the tensor itself)
                xr = x.double().requires_grad_()
                wr = [w.double().requires_grad_() for w in params[1]]
                want = reference.swiglu_ffn(xr, *wr)
                dy = torch.randn(want.shape, generator=g, dtype=torch.float64).to(dev)
                y.backward(dy.to(dtype))
                want.backward(dy)
                errs = [max_rel_err(y, want)] + [max_rel_err(a.grad, b.grad)
                                                 for a, b in zip([xs, *ws], [xr, *wr])]
                return check(errs, torch.equal(y.detach(), y2))
            record("smoke", swiglu, kernel="swiglu_ffn fwd+bwd", N=n)

            for mix_name, mix in SMOKE_MIXES.items():
                rt = routes(mix, n)
                want = reference.duo_ffn(x.float(), rt.clamp(0, 2) * ((rt >= 0) & (rt < 3)),
                                         f32, res.float(), gate.float())
                for mode in MODES:
                    def fwd(mode=mode, rt=rt, want=want):
                        a = K.duo_ffn(x, rt, params, res, gate, mode=mode)
                        b = K.duo_ffn(x, rt, params, res, gate, mode=mode)
                        return check([max_rel_err(a, want)], torch.equal(a, b))
                    record("smoke", fwd, kernel=f"duo_ffn[{mode}]", N=n, mix=mix_name)

                def bwd(rt=rt):
                    xs = x.detach().clone().requires_grad_()
                    gs = gate.detach().clone().requires_grad_()
                    ws = [None if p is None else [w.detach().clone().requires_grad_()
                                                  for w in p] for p in params]
                    out = K.duo_ffn(xs, rt, ws, res, gs)
                    xr = x.double().requires_grad_()
                    gr = gate.double().requires_grad_()
                    wr = [None if p is None else [w.double().requires_grad_() for w in p]
                          for p in params]
                    safe = rt.clamp(0, 2) * ((rt >= 0) & (rt < 3))
                    want = reference.duo_ffn(xr, safe, wr, res.double(), gr)
                    dy = torch.randn(want.shape, generator=g, dtype=torch.float64).to(dev)
                    out.backward(dy.to(dtype))
                    want.backward(dy)
                    pairs = [(xs, xr), (gs, gr)] + [
                        (a, b) for pa, pb in zip(ws, wr) if pa is not None
                        for a, b in zip(pa, pb)]
                    # a path with no tokens has zero gradients on both sides
                    return check([max_rel_err(a.grad, b.grad) for a, b in pairs])
                record("smoke", bwd, kernel="duo_ffn backward", N=n, mix=mix_name)

                def bwd_switched(rt=rt):  # DUOLLM_TRITON_BWD=1: BK 64, per-path splits
                    was, ffn_gemm_bwd.ENV_BWD = ffn_gemm_bwd.ENV_BWD, True
                    try:
                        return bwd(rt)
                    finally:
                        ffn_gemm_bwd.ENV_BWD = was
                record("smoke", bwd_switched, kernel="duo_ffn backward[bwd]", N=n,
                       mix=mix_name)

            for mode in MODES:
                def policy(mode=mode):  # generate(routes="big"): every token on one path
                    a = one_path(x, params[2], res, gate, mode=mode)
                    b = one_path(x, params[2], res, gate, mode=mode)
                    want = reference.duo_ffn(x.float(), torch.full((n,), 2, device=dev), f32,
                                             res.float(), gate.float())
                    return check([max_rel_err(a, want)], torch.equal(a, b))
                record("smoke", policy, kernel=f"one_path[{mode}]", N=n, mix="big (policy)")


def _routes_for(mix, n, g, device):
    """Routes with exactly round(p * n) tokens per path, shuffled (SKIP=0, SMALL=1, BIG=2)."""
    p_big, p_small, _ = mix
    n_big, n_small = round(p_big * n), round(p_small * n)
    r = torch.zeros(n, dtype=torch.int64)
    r[:n_big] = 2
    r[n_big:n_big + n_small] = 1
    return r[torch.randperm(n, generator=g)].to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for results.json / results.csv")
    ap.add_argument("--n", type=int, default=N_LAYER, help="tokens for the layer rows")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma list of {','.join(ALL_SECTIONS)} (default: all but smoke)")
    ap.add_argument("--quick", action="store_true",
                    help="with --dry-run: one token count and one route mix per section (the "
                         "plumbing only; tests/test_kernels_*.py check every kernel)")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows already in OUT/results.json and add these")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="start no row after this many seconds; the rest are recorded as "
                         "skipped")
    ap.add_argument("--dry-run", action="store_true",
                    help="check this script on a CPU before spending GPU time: the Triton "
                         "interpreter, float32, tiny shapes, every timed call run once and "
                         "recorded as nan")
    args = ap.parse_args()
    if args.dry_run:
        global DRY_RUN, D_MODEL, D_BIG, D_SMALL, SWIGLU_NS, N_FWD_BWD, COPY_ELEMS, MM_N
        global DECODE_NS
        DRY_RUN = True
        D_MODEL, D_BIG, D_SMALL, SWIGLU_NS, N_FWD_BWD = 32, 80, 16, (24,), 24
        COPY_ELEMS, MM_N, DECODE_NS = 1024, 32, (1, 5)
        global SMOKE_NS, SMOKE_MIXES, DECODE_MIXES, MIXES
        SMOKE_NS = (1, 7, 40, 70)
        if args.quick:  # "bad" holds every path and out-of-range routes; 5 tokens: decode
            SMOKE_NS, SMOKE_MIXES, DECODE_NS = (5,), {"bad": None}, (5,)
            DECODE_MIXES, MIXES = {"1/12": DECODE_MIXES["1/12"]}, [MIXES[4]]
        if args.n == N_LAYER:
            args.n = 40
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    elif args.quick:
        _fail("--quick: only with --dry-run (a GPU run measures every row)")
    sections = set(args.sections.split(","))
    if not sections <= set(ALL_SECTIONS):
        _fail(f"--sections: unknown {sorted(sections - set(ALL_SECTIONS))}; expected a comma "
              f"list of {','.join(ALL_SECTIONS)}")
    if args.time_limit is not None and not args.time_limit > 0:
        _fail(f"--time-limit: expected a positive number of seconds, got {args.time_limit}")

    if os.environ.get("TRITON_INTERPRET", "0") == "1" and not DRY_RUN:
        _fail("TRITON_INTERPRET=1 is set; unset it: timing the interpreter means nothing")
    if not torch.cuda.is_available() and not DRY_RUN:
        _fail("no CUDA device is visible to torch; this benchmark needs an NVIDIA GPU")
    import triton

    import duollm.kernels as K
    from duollm import ops, reference
    from duollm.bench.results import git_sha

    dev = torch.device("cpu" if DRY_RUN else "cuda")
    dtype = torch.float32 if DRY_RUN else torch.bfloat16
    d = D_MODEL
    N = args.n
    g = torch.Generator().manual_seed(0)
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "results.json")
    doc = {}
    if args.append and os.path.exists(json_path):
        with open(json_path) as f:
            doc = json.load(f)
    rows = doc.setdefault("rows", [])
    doc["meta"] = dict(doc.get("meta") or {}, **dict(
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else
        "cpu (--dry-run: nothing timed)", torch=torch.__version__,
        triton=triton.__version__, cuda=torch.version.cuda, git_sha=git_sha(),
        dtype=str(dtype), d_model=d, d_big=D_BIG, d_small=D_SMALL, n_layer=N,
        python=platform.python_version(), rotated_input_sets=N_ROT,
        timing="triton.testing.do_bench median, warmup 25 ms, rep 100 ms"))

    def flush():
        """results.json and results.csv as they stand (atomic replace: a reader, or a kill
        mid-write, never sees half a file)."""
        doc["meta"]["wall_s"] = round(time.time() - t_start, 1)
        tmp = json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        os.replace(tmp, json_path)
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "name", k))
        tmp = os.path.join(args.out, "results.csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in rows:
                w.writerow(r)
        os.replace(tmp, os.path.join(args.out, "results.csv"))

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=dev, dtype=dtype)

    def record(name, fn, **fields):
        row = dict(name=name, ms=None, error=None, **fields)
        if args.time_limit is not None and time.time() - t_start > args.time_limit:
            row["error"] = f"skipped: --time-limit {args.time_limit:g} s spent"
            row["skipped"] = True
        else:
            try:
                row.update(fn())
            except Exception as e:  # noqa: BLE001 - one failing row must not end the run
                row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                traceback.print_exc()
            if dev.type == "cuda":
                torch.cuda.synchronize()
        rows.append(row)
        flush()
        if row["error"]:
            status = "ERROR " + row["error"]
        elif row.get("ok") is not None:
            status = ("ok" if row["ok"] else "FAIL") + f" max_rel_err {row['max_rel_err']:.3g}"
        else:
            status = f"{row['ms']:.4f} ms"
        print(f"[{time.time() - t_start:6.1f}s] {name} {fields} {status}", flush=True)
        return row

    def weights(width, n_sets=1):
        return [(randn(width, d, scale=d ** -0.5), randn(width, d, scale=d ** -0.5),
                 randn(d, width, scale=width ** -0.5)) for _ in range(n_sets)]

    def finish():
        flush()
        print_table(doc)
        bad = [r for r in rows if r["name"] == "smoke" and not r.get("skipped")
               and (r.get("error") or not r.get("ok"))]
        if bad:
            print(f"bench_kernels: {len(bad)} smoke row(s) failed", file=sys.stderr)
            sys.exit(1)

    # ---------------------------------------------------------------- smoke
    if "smoke" in sections:
        smoke(record, dev, dtype, g, d)
    if not sections & set(SECTIONS):
        finish()
        return

    # ---------------------------------------------------------------- ceilings
    copy_gb = {}

    def copy_row():
        n = COPY_ELEMS
        sets = [(torch.randn(n, device=dev, dtype=dtype), torch.empty(n, device=dev, dtype=dtype))
                for _ in range(2)]
        ms = bench_ms(lambda s, t: t.copy_(s), sets)
        copy_gb["v"] = 2 * n * 2 / ms / 1e6
        return dict(ms=ms, gbps=copy_gb["v"])

    record("ceiling_copy", copy_row, bytes=2 * 2 * COPY_ELEMS)

    mm_tf = {}

    def mm_row():
        n = MM_N
        sets = [(randn(n, n), randn(n, n)) for _ in range(2)]
        ms = bench_ms(torch.matmul, sets)
        mm_tf["v"] = 2 * n ** 3 / ms / 1e9
        return dict(ms=ms, tflops=mm_tf["v"])

    record("ceiling_matmul", mm_row, shape=f"{MM_N}^3")

    # ---------------------------------------------------------------- routing ops
    route_sets = [(torch.randint(0, 3, (N,), generator=g).to(dev),) for _ in range(N_ROT)]
    from duollm.kernels.grouping import group_tokens_fwd

    groupers = {
        "triton": lambda r: K.group_tokens(r, 3),  # the public op: every output
        # what the routed layer's forward runs: no inv / widened routes
        "triton-lean": lambda r: group_tokens_fwd(r, 3, write_inv=False, write_routes=False),
        "triton-one-launch": lambda r: group_tokens_fwd(r, 3, write_inv=False,
                                                        write_routes=False, one_launch=True),
    }
    for impl, grouper in groupers.items() if "routing" in sections else ():
        # eager (mostly the Python launch cost at 16K) and replayed from a CUDA graph (the
        # kernels alone: what a captured decode step or a compiled model pays)
        for graph in (False, True):
            def group_row(grouper=grouper, graph=graph):
                ms = (graph_ms if graph else bench_ms)(grouper, route_sets)
                return dict(ms=ms, us=ms * 1e3)
            record("group_tokens", group_row, N=N, impl=impl, graph=graph)
    groups = [K.group_tokens(r[0], 3) for r in route_sets]
    xs = [randn(N, d) for _ in range(N_ROT)]
    res = [randn(N, d) for _ in range(N_ROT)]
    gates = [torch.rand(N, generator=g).to(dev, dtype) + 0.5 for _ in range(N_ROT)]

    def bw_row(fn, sets, nbytes):
        ms = bench_ms(fn, sets)
        gbps = nbytes / ms / 1e6
        return dict(ms=ms, gbps=gbps, frac_of_copy=gbps / copy_gb["v"] if copy_gb else None)

    row_bytes = N * d * 2
    if "routing" in sections:
        record("gather",
               lambda: bw_row(K.gather, list(zip(xs, groups)), 2 * row_bytes + 8 * N),
               N=N, d=d, impl="triton")
        record("scatter_combine",
               lambda: bw_row(lambda y, gr, r, gt: K.scatter_combine(y, gr, r, gt, (0,)),
                              list(zip(xs, groups, res, gates)), 3 * row_bytes + 10 * N),
               N=N, d=d, impl="triton")

    # ---------------------------------------------------------------- swiglu_ffn
    def cublas_swiglu(x, wg, wu, wd):
        return (F.silu(x @ wg.t()) * (x @ wu.t())) @ wd.t()

    for width in (D_SMALL, D_BIG) if "swiglu" in sections else ():
        ws = weights(width, 2)
        for n in SWIGLU_NS:
            xn = [randn(n, d) for _ in range(2)]
            sets = [(xn[i % 2], *ws[i % 2]) for i in range(2)]
            flops = 6 * n * d * width
            for impl, fn in (("triton", K.swiglu_ffn), ("cublas", cublas_swiglu)):
                def sw_row(fn=fn, sets=sets, flops=flops):
                    ms = bench_ms(fn, sets)
                    return dict(ms=ms, tflops=flops / ms / 1e9)
                record("swiglu_ffn", sw_row, N=n, width=width, impl=impl)
            del xn, sets
        del ws

    # ---------------------------------------------------------------- duo_ffn layer
    big = weights(D_BIG)[0]
    small = weights(D_SMALL)[0]
    params = (None, small, big)
    dense_flops = 6 * N * d * D_BIG
    dense = {} if "layer" not in sections else record("dense_big", lambda: dict(
        ms=bench_ms(lambda x, r: r + cublas_swiglu(x, *big), list(zip(xs, res)))),
        N=N, impl="torch")
    for mix in MIXES if "layer" in sections else ():
        p_big, p_small, p_skip = mix
        routed_flops = 2 * d * 3 * N + p_big * N * 6 * d * D_BIG + p_small * N * 6 * d * D_SMALL
        ideal = dense_flops / routed_flops
        rsets = [(x, _routes_for(mix, N, g, dev), r) for x, r in zip(xs, res)]
        for impl in ("triton", "triton-persistent", "torch"):
            # the torch backend as dispatched by duollm.ops (fast plain PyTorch; it reads the
            # per-path counts back to the host, which the triton path never does)
            fn = {"triton": lambda *a: K.duo_ffn(*a, mode="default"),
                  "triton-persistent": lambda *a: K.duo_ffn(*a, mode="persistent"),
                  "torch": ops.resolve("duo_ffn", dev, "torch")}[impl]

            def duo_row(fn=fn, rsets=rsets, ideal=ideal):
                ms = bench_ms(lambda x, rt, r: fn(x, rt, params, r, None), rsets)
                out = dict(ms=ms, ideal_speedup=ideal)
                # a timing of a wrong answer means nothing: compare with the reference
                # on the first input set (relative to the reference's largest magnitude)
                x0, rt0, r0 = rsets[0]
                want = reference.duo_ffn(x0.float(), rt0, [None if p is None else
                                                           [w.float() for w in p]
                                                           for p in params], r0.float())
                got = fn(x0, rt0, params, r0, None).float()
                out["max_rel_err"] = ((got - want).abs().max() / want.abs().max()).item()
                if dense.get("ms"):
                    out["realized_speedup"] = dense["ms"] / ms
                    out["efficiency"] = out["realized_speedup"] / ideal
                return out
            record("duo_ffn", duo_row, N=N, mix=f"{p_big:.3f}/{p_small:.3f}/{p_skip:.3f}",
                   impl=impl)

    # ---------------------------------------------------------------- forward + backward
    # Not part of the speedup table: how the backward kernels (h recomputed, split weight
    # gradients) compare with torch autograd on the dense big FFN, at N=4096.
    nb = N_FWD_BWD
    big_g = [w.detach().clone().requires_grad_() for w in big]
    small_g = [w.detach().clone().requires_grad_() for w in small]
    params_g = (None, small_g, big_g)
    xb = [randn(nb, d).requires_grad_() for _ in range(2)]
    dyb = randn(nb, d)
    leaves = big_g + small_g + xb

    def fb_ms(step, sets):
        return bench_ms(step, sets, grad_to_none=leaves)

    if "fwd_bwd" not in sections:
        nb = 0  # skipped
    dense_fb = {} if not nb else record("dense_big_fwd_bwd", lambda: dict(ms=fb_ms(
        lambda x: cublas_swiglu(x, *big_g).backward(dyb), [(x,) for x in xb])),
        N=nb, impl="torch")
    for mix in (MIXES[0], MIXES[2], MIXES[4]) if nb else ():
        rs = [(x, _routes_for(mix, nb, g, dev)) for x in xb]

        def fb_row(rs=rs):
            ms = fb_ms(lambda x, rt: K.duo_ffn(x, rt, params_g).backward(dyb), rs)
            out = dict(ms=ms)
            if dense_fb.get("ms"):
                out["realized_speedup"] = dense_fb["ms"] / ms
            return out
        record("duo_ffn_fwd_bwd", fb_row, N=nb, mix="/".join(f"{p:.3f}" for p in mix),
               impl="triton")

    # ---------------------------------------------------------------- decode
    # The layer at decode sizes is a weight stream: compare with the dense layers and with
    # the time the active paths' weights take to read at the measured copy bandwidth.
    def read_us(nbytes):
        return nbytes / (copy_gb["v"] * 1e3) if copy_gb else None

    wbytes = {"big": 3 * d * D_BIG * 2, "small": 3 * d * D_SMALL * 2}
    for n in DECODE_NS if "decode" in sections else ():
        xs_n = [randn(n, d) for _ in range(N_ROT)]
        res_n = [randn(n, d) for _ in range(N_ROT)]
        dense_ms = {}
        for which, w in (("big", big), ("small", small)):
            for graph in (False, True):
                def dense_row(w=w, graph=graph):
                    timer = graph_ms if graph else bench_ms
                    ms = timer(lambda x, r: r + cublas_swiglu(x, *w), list(zip(xs_n, res_n)))
                    return dict(ms=ms, us=ms * 1e3, read_us=read_us(wbytes[which]))
                row = record("decode_dense", dense_row, N=n, impl=f"torch-dense-{which}",
                             graph=graph)
                dense_ms[which, graph] = row.get("ms")
        for mix_name, mix in DECODE_MIXES.items():
            rsets = [(x, _routes_for(mix, n, g, dev), r) for x, r in zip(xs_n, res_n)]
            active = sum(wbytes[p] for p in ("big", "small")
                         if any(((rt == (2 if p == "big" else 1)).any().item()
                                 for _, rt, _ in rsets)))
            for mode in ("default", "decode"):
                for graph in (False, True):
                    def dec_row(mode=mode, graph=graph, rsets=rsets, active=active):
                        timer = graph_ms if graph else bench_ms
                        ms = timer(lambda x, rt, r: K.duo_ffn(x, rt, params, r, None,
                                                               mode=mode), rsets)
                        out = dict(ms=ms, us=ms * 1e3, read_us=read_us(active))
                        if out["read_us"] and ms == ms:  # (not nan: --dry-run)
                            # fraction of the weight-read floor reached
                            out["efficiency"] = out["read_us"] / out["us"]
                        if dense_ms.get(("big", graph)):
                            out["vs_dense_big"] = dense_ms["big", graph] / ms
                        x0, rt0, r0 = rsets[0]
                        want = reference.duo_ffn(x0.float(), rt0, [None if p is None else
                                                                   [w.float() for w in p]
                                                                   for p in params], r0.float())
                        got = K.duo_ffn(x0, rt0, params, r0, None, mode=mode).float()
                        out["max_rel_err"] = ((got - want).abs().max()
                                              / want.abs().max()).item()
                        return out
                    record("decode_layer", dec_row, N=n, mix=mix_name, impl=f"triton-{mode}",
                           graph=graph)

    finish()


def print_table(doc) -> None:
    """The rows of a results document, one line each."""
    meta = doc["meta"]

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if not math.isnan(v) else "nan"
        return str(v)

    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  "
          f"sha {meta['git_sha'][:10]}  {meta['dtype']}  wall {meta['wall_s']} s")
    cols = ["name", "impl", "kernel", "N", "width", "mix", "graph", "ms", "us", "read_us",
            "gbps", "frac_of_copy", "tflops", "ideal_speedup", "realized_speedup",
            "efficiency", "vs_dense_big", "max_rel_err", "ok", "error"]
    print(" | ".join(cols))
    for r in doc["rows"]:
        print(" | ".join(fmt(r.get(c)) for c in cols))


if __name__ == "__main__":
    main()
