"""``duollm bench decode``: latency of a decode step, eager and captured in a CUDA graph.

Two levels, at N = 1, 16, 64 tokens (one token per sequence):

* ``layer`` — the routed FFN layer (router GEMM + ``duollm.ops.duo_ffn`` with the residual) of
  every backend, the best plain-PyTorch routing (``sorted``) and the dense big FFN.
* ``model`` — one ``DuoLLM`` decode step with a KV cache (``context`` cached positions filled
  with random keys and values) under each mix, per backend; ``dense`` is the same model with
  the bench-only ``bench-dense`` backend and all-big routes: the dense model.

On a GPU each candidate is also captured in a ``torch.cuda.CUDAGraph`` and replayed; a capture
that fails (e.g. a host synchronisation inside the step) is recorded in its row's ``error``.
``vs_dense`` is the dense candidate's latency over this one's, in the same mode.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
from typing import Callable, Dict, List

import torch

from .. import ops
from ..config import DuoConfig
from ..model import DuoLLM, KVCache
from . import accounting as acc
from .baselines import dense_ffn, sorted_routing
from .common import (add_device_args, check_number_args, resolve_backends, resolve_device,
                     resolve_dtype, resolve_out_dir, setup_run)
from ..usage import UsageError, check_int
from . import llama_compare
from .dense_backend import register as register_dense
from .results import environment, stamp, write_results
from .timing import Stats, time_cuda, time_interleaved


def add_args(p: argparse.ArgumentParser) -> None:
    add_device_args(p)
    p.add_argument("--tokens", default="1,16,64", help="tokens per step (default: %(default)s)")
    p.add_argument("--shape", default=None,
                   help="layer shape (default: paper on a GPU, small on the CPU)")
    p.add_argument("--config", default=None, choices=DuoConfig.presets(),
                   help="model preset (default: paper-1.4b on a GPU, small on the CPU)")
    p.add_argument("--n-layers", type=int, default=None, help="override the preset's layers")
    p.add_argument("--context", type=int, default=128,
                   help="cached positions before the decoded token (default: %(default)s)")
    p.add_argument("--mixes", default="1/12,big,small",
                   help="route mixes (default: %(default)s); per layer and token with exact "
                        "counts")
    p.add_argument("--levels", default="layer,model",
                   help="any of layer, model, llama (DuoLLM against transformers' dense "
                        "Llama of the same shape: greedy decode, prefill, an N=1 layer call)")
    p.add_argument("--llama-shape", default="8x512x2048x128", metavar="LxDxBIGxSMALL",
                   help="llama level: layers x d_model x d_big x d_small, 64-wide heads "
                        "(default: %(default)s)")
    p.add_argument("--prompt", type=int, default=16,
                   help="llama level: prompt tokens before greedy decoding (default: %(default)s)")
    p.add_argument("--new", type=int, default=32,
                   help="llama level: tokens generated per timed call (default: %(default)s)")
    p.add_argument("--prefill", type=int, default=128,
                   help="llama level: prompt tokens of the prefill timing (default: %(default)s)")
    p.add_argument("--no-graphs", dest="graphs", action="store_false",
                   help="GPU: eager only, no CUDA-graph capture")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls (default: 200 on a GPU, 30 on the CPU)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timing per candidate (default: 0.5 GPU, 0.5 CPU)")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shapes, 1 and 16")


def _sync_free_first(backends: List[str]) -> List[str]:
    """The torch backend (and the sorted baseline) read counts back to the host, so their
    graph capture fails; they go last so that a failed capture cannot disturb the others."""
    return [b for b in backends if b != "torch"] + [b for b in backends if b == "torch"]


def _capture(fn: Callable[[int], object]):
    """Capture ``fn(0)`` in a CUDA graph; returns (graph, output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside the graph (lazy inits, autotuning)
            fn(0)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(0)
    return graph, out


def _time(fns: Dict[str, Callable[[int], object]], device, graphs: bool, repeats: int,
          budget: float) -> Dict[tuple, Dict]:
    """{(name, mode): {"stats": Stats} or {"error": str}} for every candidate and mode."""
    res: Dict[tuple, Dict] = {}
    ok = {}
    outs = {}
    for name, fn in fns.items():
        try:
            outs[name] = fn(0)
            ok[name] = fn
        except Exception as e:
            res[(name, "eager")] = {"error": f"{type(e).__name__}: {e}"}
    if device.type == "cuda":
        for name, fn in ok.items():
            res[(name, "eager")] = {"stats": Stats.of(time_cuda(fn, repeats=repeats,
                                                                budget_s=budget))}
            if not graphs:
                continue
            try:
                graph, g_out = _capture(fn)
                graph.replay()
                torch.cuda.synchronize()
                entry = {"stats": Stats.of(time_cuda(lambda i: graph.replay(),
                                                     repeats=repeats, budget_s=budget))}
                ref = outs[name]
                if isinstance(ref, torch.Tensor) and isinstance(g_out, torch.Tensor):
                    scale = ref.float().abs().max().clamp_min(1e-6)
                    entry["graph_rel_err"] = float((g_out.float() - ref.float()).abs().max()
                                                   / scale)
                res[(name, "graph")] = entry
                del graph
            except Exception as e:  # record why capture failed, keep going
                msg = str(e).strip().splitlines()
                res[(name, "graph")] = {"error": f"capture failed: {type(e).__name__}: "
                                                 f"{msg[0] if msg else ''}"}
                try:
                    torch.cuda.synchronize()
                except Exception:
                    pass
    else:
        times = time_interleaved(ok, device, repeats=repeats, budget_s=budget * len(ok))
        for name, t in times.items():
            res[(name, "eager")] = {"stats": Stats.of(t)}
    return res


def _rows(res, base: Dict, log) -> List[Dict]:
    rows = []
    for (name, mode), entry in res.items():
        row = dict(base, impl=name, mode=mode)
        if "stats" in entry:
            row.update(entry["stats"].as_dict())
            dense = res.get(("dense", mode), {}).get("stats")
            if dense is not None:
                row["vs_dense"] = dense.median_ms / entry["stats"].median_ms
        if "graph_rel_err" in entry:
            row["graph_rel_err"] = entry["graph_rel_err"]
        if "error" in entry:
            row["error"] = entry["error"]
        rows.append(row)
        head = (f"{base['level']:>5} {base['shape']:>10} {base['mix']:>6} "
                f"N={base['n_tokens']:<3} {name:>7} {mode:>5}")
        if "stats" in entry:
            log(f"{head} {entry['stats'].median_ms * 1e3:10.1f} us"
                + (f"  vs dense {row['vs_dense']:.2f}x" if "vs_dense" in row else ""))
        else:
            log(f"{head} failed: {entry['error']}")
    return rows


def layer_rows(device, dtype, shape, mixes, tokens, backends, graphs, repeats, budget,
               seed=0, log=print) -> List[Dict]:
    gen = torch.Generator(device=device).manual_seed(seed)
    gen_cpu = torch.Generator().manual_seed(seed)
    params = acc.weights_for(shape, device, dtype, gen)
    w_router = acc.weights_for(acc.Shape("r", shape.d_model, 3, 1), device, dtype, gen)[2][0]
    rows = []
    for n in tokens:
        k = 4
        xs = [torch.randn(n, shape.d_model, device=device, generator=gen).to(dtype)
              for _ in range(k)]
        res = [torch.randn_like(x) for x in xs]
        for mix in mixes:
            routes = [acc.draw_routes(mix, n, gen_cpu, device) for _ in range(k)]

            def routed(fn):
                def call(i):
                    x = xs[i % k]
                    torch.mm(x, w_router.t())
                    return fn(x, routes[i % k], params, res[i % k])
                return call

            fns = {"dense": lambda i: dense_ffn(xs[i % k], None, params, res[i % k])}
            for b in _sync_free_first(backends):
                fns[b] = routed(lambda x, r, p, rs, b=b: ops.duo_ffn(x, r, p, residual=rs,
                                                                      backend=b))
            fns["sorted"] = routed(sorted_routing)  # host sync: its capture fails, so last
            with torch.inference_mode():
                timed = _time(fns, device, graphs, repeats, budget)
            rows += _rows(timed, dict(level="layer", shape=shape.name, d_model=shape.d_model,
                                      d_big=shape.d_big, d_small=shape.d_small, mix=mix.name,
                                      n_tokens=n), log)
    return rows


def model_rows(device, dtype, config: DuoConfig, config_name: str, mixes, tokens, backends,
               graphs, repeats, budget, context, seed=0, log=print,
               checkpoint=None) -> List[Dict]:
    torch.manual_seed(seed)
    gen_cpu = torch.Generator().manual_seed(seed)
    with torch.device(device):
        model = DuoLLM(config)
    model = model.to(dtype).eval()
    dense_name = register_dense()
    L = config.n_layers
    rows = []
    for n in tokens:
        cache = KVCache.empty(config, n, context + 1, device, dtype)
        cache.k.normal_()
        cache.v.normal_()
        tok = torch.randint(0, config.vocab_size, (n, 1), device=device)
        for mix in mixes:
            routes = acc.draw_routes(mix, L * n, gen_cpu, device).view(L, n, 1)

            def step(backend, r):
                def call(i):
                    cache.pos = context  # every call decodes the same position
                    return model(tok, r, cache=cache, backend=backend)
                return call

            fns = {"dense": step(dense_name, "big")}  # timed beside each mix: fair ratios
            for b in _sync_free_first(backends):
                fns[b] = step(b, routes)
            with torch.inference_mode():
                timed = _time(fns, device, graphs, repeats, budget)
            rows += _rows(timed, dict(level="model", shape=config_name, mix=mix.name,
                                      n_tokens=n, context=context, n_layers=L), log)
        if checkpoint is not None:
            checkpoint(rows)
    gc.collect()
    return rows


def _llama_config(spec: str) -> DuoConfig:
    """DuoConfig of ``--llama-shape`` ``LxDxBIGxSMALL`` (64-wide heads, the small preset's
    vocabulary and norms, room for 512 positions)."""
    try:
        L, d, d_big, d_small = (int(v) for v in spec.lower().split("x"))
        return DuoConfig.from_name("small", n_layers=L, d_model=d, n_heads=max(1, d // 64),
                                   d_big=d_big, d_small=d_small, max_seq_len=512)
    except ValueError as e:
        raise UsageError("--llama-shape", f"expected LxDxBIGxSMALL positive ints with D a "
                                          f"multiple of 64 or below it, got {spec!r} ({e})")


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    out_dir = resolve_out_dir(args, device)
    dtype = resolve_dtype(args.dtype, device)
    gpu = device.type == "cuda"
    # Every number is checked before anything is built or timed (a mistake: exit 2).
    check_number_args(args, ints=("--n-layers", "--repeats"), positive=("--budget",))
    check_int("--context", args.context, low=0)
    shape = acc.parse_shape(args.shape or ("tiny" if args.quick else
                                           "paper" if gpu else "small"))
    config_name = args.config or ("tiny" if args.quick else "paper-1.4b" if gpu else "small")
    overrides = {"n_layers": args.n_layers} if args.n_layers else {}
    context = min(args.context, 32) if args.quick else args.context
    config = DuoConfig.from_name(config_name, **overrides)
    if context + 1 > config.max_seq_len:
        print(f"--context {context}: the {config_name} preset holds {config.max_seq_len} "
              f"positions; using {config.max_seq_len - 1}")
        context = config.max_seq_len - 1
    tokens = acc.parse_tokens("1,16" if args.quick else args.tokens)
    mixes = acc.parse_list(args.mixes, acc.parse_mix, "mixes")
    levels = [v.strip() for v in args.levels.split(",") if v.strip()]
    if not levels:
        raise UsageError("--levels", f"expected some of layer, model, llama, got "
                                     f"{args.levels!r}")
    for v in levels:
        if v not in ("layer", "model", "llama"):
            raise UsageError("--levels", f"expected some of layer, model, llama, got {v!r}")
    llama_config = None
    if "llama" in levels:
        llama_config = _llama_config(args.llama_shape if not args.quick else "2x64x256x16")
        for flag in ("--prompt", "--new", "--prefill"):
            check_int(flag, getattr(args, flag[2:]), low=1)
        if importlib.util.find_spec("transformers") is None:
            raise UsageError("--levels", "llama needs the transformers package "
                                         "(pip install transformers)")
        if max(args.prompt + args.new, args.prefill) > llama_config.max_seq_len:
            flag = "--prefill" if args.prefill > llama_config.max_seq_len else "--prompt/--new"
            raise UsageError(flag, f"--prompt + --new and --prefill must each fit "
                                   f"{llama_config.max_seq_len} positions, got "
                                   f"{args.prompt} + {args.new} and {args.prefill}")
    status = resolve_backends(args.backends, device)
    backends = [b for b, why in status.items() if why is None]
    # The thread rule every command shares, by the widest model measured (after the checks).
    settings = setup_run(args, device, d_model=max(shape.d_model, config.d_model))
    graphs = gpu and args.graphs
    repeats = args.repeats or (5 if args.quick else 200 if gpu else 30)
    budget = args.budget or (0.1 if args.quick else 0.5)
    env = environment(device, dtype, kind="decode", shape=vars(shape), config=config_name,
                      model_config=config.to_dict(), context=context, tokens=tokens,
                      mixes=[vars(m) for m in mixes], backends=backends,
                      unavailable_backends={b: w for b, w in status.items() if w},
                      graphs=graphs, **settings)
    rows: List[Dict] = []
    prefix = f"decode-{env['dtype']}-{stamp()}"
    if "layer" in levels:  # results are written after each part: a cut run keeps its rows
        rows += layer_rows(device, dtype, shape, mixes, tokens, backends, graphs, repeats,
                           budget, args.seed)
        write_results(out_dir, prefix, dict(env), rows)
    if "model" in levels:
        layer_part = list(rows)
        rows += model_rows(device, dtype, config, config_name, mixes, tokens, backends,
                           graphs, repeats, budget, context, args.seed,
                           checkpoint=lambda mrows: write_results(out_dir, prefix, dict(env),
                                                                  layer_part + mrows))
    if "llama" in levels:
        env["llama_shape"] = llama_config.to_dict()
        backend = "triton" if gpu and "triton" in backends else "torch"
        new, prompt, prefill = ((4, 4, 16) if args.quick else
                                (args.new, args.prompt, args.prefill))
        d, d_big, d_small = llama_config.d_model, llama_config.d_big, llama_config.d_small
        rows += [dict(r, shape=args.llama_shape, backend=backend) for r in
                 llama_compare.layer_pairs([(32, 128, 8), (d, d_big, d_small)], device, dtype,
                                           repeats * 200, budget, args.seed, backend)]
        write_results(out_dir, prefix, dict(env), rows)
        rows += [dict(r, shape=args.llama_shape, backend=backend) for r in
                 llama_compare.model_pairs(llama_config, device, dtype, prompt, new, prefill,
                                           repeats, budget * 4, args.seed, backend)]
    paths = write_results(out_dir, prefix, env, rows)
    if args.plots:
        from .plots import decode_plots
        plotted = [r for r in rows if r["level"] in ("layer", "model")]
        if plotted:
            paths += tuple(decode_plots(plotted, env, out_dir, prefix))
    print("wrote " + ", ".join(paths))
    return 0
