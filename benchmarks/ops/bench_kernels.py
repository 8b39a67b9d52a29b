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

Writes ``kernels.csv`` and ``kernels.json`` (device, torch/triton versions, git SHA, dtype,
shapes, every row) into ``--out`` and prints a table last. A failing row is recorded with its
error and the run goes on. Needs a CUDA GPU; about 1-2 minutes on an H100.
"""
from __future__ import annotations

import argparse
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
    ap.add_argument("--out", required=True, help="directory for kernels.csv / kernels.json")
    ap.add_argument("--n", type=int, default=N_LAYER, help="tokens for the layer rows")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma list of {','.join(SECTIONS)} (default: all)")
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
        if args.n == N_LAYER:
            args.n = 40
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    sections = set(args.sections.split(","))
    if not sections <= set(SECTIONS):
        _fail(f"--sections: unknown {sorted(sections - set(SECTIONS))}; expected a comma list "
              f"of {','.join(SECTIONS)}")

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
    rows = []
    t_start = time.time()

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=dev, dtype=dtype)

    def record(name, fn, **fields):
        row = dict(name=name, ms=None, error=None, **fields)
        try:
            row.update(fn())
        except Exception as e:  # noqa: BLE001 - one failing row must not end the run
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            traceback.print_exc()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        rows.append(row)
        status = "ERROR " + row["error"] if row["error"] else f"{row['ms']:.4f} ms"
        print(f"[{time.time() - t_start:6.1f}s] {name} {fields} {status}", flush=True)
        return row

    def weights(width, n_sets=1):
        return [(randn(width, d, scale=d ** -0.5), randn(width, d, scale=d ** -0.5),
                 randn(d, width, scale=width ** -0.5)) for _ in range(n_sets)]

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
        def group_row(grouper=grouper):
            ms = bench_ms(grouper, route_sets)
            return dict(ms=ms, us=ms * 1e3)
        record("group_tokens", group_row, N=N, impl=impl)
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

    # ---------------------------------------------------------------- output
    os.makedirs(args.out, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else
                "cpu (--dry-run: nothing timed)", torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda, git_sha=git_sha(),
                dtype=str(dtype), d_model=d, d_big=D_BIG, d_small=D_SMALL, n_layer=N,
                python=platform.python_version(), rotated_input_sets=N_ROT,
                timing="triton.testing.do_bench median, warmup 25 ms, rep 100 ms",
                wall_s=round(time.time() - t_start, 1))
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "name", k))
    with open(os.path.join(args.out, "kernels.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if not math.isnan(v) else "nan"
        return str(v)

    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  "
          f"sha {meta['git_sha'][:10]}  {dtype}  wall {meta['wall_s']} s")
    cols = ["name", "impl", "N", "width", "mix", "graph", "ms", "us", "read_us", "gbps",
            "frac_of_copy", "tflops", "ideal_speedup", "realized_speedup", "efficiency",
            "vs_dense_big", "max_rel_err", "error"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(fmt(r.get(c)) for c in cols))


if __name__ == "__main__":
    main()
