"""``duollm bench model``: whole-model throughput under routing mixes, and oracle search speed.

Rows (``phase``):

* ``forward`` — ``DuoLLM`` forward on ``(B, T)`` tokens without autograd, tokens/s;
* ``train``   — one training step (forward, cross-entropy, backward, AdamW), tokens/s;
* ``oracle``  — ``duollm.oracle.search`` (sequence granularity, exhaustive, exactly one big
  layer per sequence), patterns evaluated per second.

Mixes: ``big`` (all big), ``small``, ``random`` (the ``"random"`` policy, drawn per call from
the config's probabilities, as in random-routing training) and fixed fractions such as
``1/12`` (exactly that share of tokens big at every layer, the rest small: oracle-like).
``dense`` is the same model on the bench-only ``bench-dense`` backend with all-big routes:
the dense model, which ``vs_dense`` compares against.
"""
from __future__ import annotations

import argparse
import gc
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

from .. import oracle
from ..config import DuoConfig
from ..model import DuoLLM
from . import accounting as acc
from ..usage import UsageError, options_of
from .common import (add_device_args, check_number_args, resolve_backends, resolve_device,
                     resolve_dtype, resolve_out_dir, setup_run)
from .dense_backend import register as register_dense
from .results import environment, stamp, write_results
from .timing import Stats, time_cuda, time_interleaved

PHASES = ("forward", "train", "oracle")


def add_args(p: argparse.ArgumentParser) -> None:
    add_device_args(p)
    p.add_argument("--config", default=None, choices=DuoConfig.presets(),
                   help="model preset (default: paper-1.4b on a GPU, small on the CPU)")
    p.add_argument("--n-layers", type=int, default=None, help="override the preset's layers")
    p.add_argument("--batch", type=int, default=None, help="sequences (default: 8 GPU/CPU)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default: 1024 on a GPU, 128 on the CPU)")
    p.add_argument("--mixes", default="big,small,random,1/12",
                   help="big, small, random (the config's policy) or fixed fractions "
                        "(default: %(default)s)")
    p.add_argument("--phases", default="forward,train,oracle",
                   help="forward, train, oracle (default: %(default)s)")
    p.add_argument("--oracle-batch", type=int, default=4, help="oracle: sequences")
    p.add_argument("--oracle-seq-len", type=int, default=64, help="oracle: tokens per sequence")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default: 10)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timing per candidate (default: 3)")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: the tiny preset")


def _routes(model: DuoLLM, mix_spec: str, B: int, T: int, device, gen):
    if mix_spec in ("big", "small", "random"):
        return mix_spec
    mix = acc.parse_mix(mix_spec)
    L = model.config.n_layers
    return torch.stack([acc.draw_routes(mix, B * T, gen, device).view(B, T)
                        for _ in range(L)])  # (L, B, T)


def _oracle_row(model, device, B, T, seed) -> Dict:
    row = dict(phase="oracle", mix="exactly 1 big", impl="torch-autograd-free",
               batch_shape=f"{B}x{T}")
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (B, T), generator=gen).to(device)
    try:
        with torch.inference_mode():
            t0 = time.perf_counter()
            result = oracle.search(model, tokens, 1, granularity="sequence", method="exhaustive",
                            skip=False)
            elapsed = time.perf_counter() - t0
        row.update(Stats.of([elapsed]).as_dict())
        row["patterns_per_s"] = float(result.patterns_per_s)
        row["impl"] = "oracle.search"
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"
    return row


def run(args: argparse.Namespace) -> int:
    # Every option is checked before anything is built, measured or written.
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    check_number_args(args, ints=("--n-layers", "--batch", "--seq-len", "--oracle-batch",
                                  "--oracle-seq-len", "--repeats"), positive=("--budget",))
    gpu = device.type == "cuda"
    name = args.config or ("tiny" if args.quick else "paper-1.4b" if gpu else "small")
    overrides = {"n_layers": args.n_layers} if args.n_layers else {}
    config = DuoConfig.from_name(name, **overrides)
    B = args.batch or (2 if args.quick else 8)
    T = args.seq_len or (32 if args.quick else 1024 if gpu else 128)
    T = min(T, config.max_seq_len)
    phases = [v.strip() for v in args.phases.split(",") if v.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown or not phases:
        raise UsageError("--phases", f"expected some of {', '.join(PHASES)}, got "
                                     f"{args.phases!r}")
    mixes = [v.strip() for v in args.mixes.split(",") if v.strip()]
    for mix in mixes:
        if mix not in ("big", "small", "random"):
            with options_of({"mix": "--mixes"}):
                acc.parse_mix(mix)
    if not mixes:
        raise UsageError("--mixes", f"expected a comma-separated list, got {args.mixes!r}")
    status = resolve_backends(args.backends, device)  # asked-for but unavailable: exit 2
    backends = [b for b, why in status.items() if why is None]
    out_dir = resolve_out_dir(args, device)
    settings = setup_run(args, device, d_model=config.d_model)
    repeats = args.repeats or (3 if args.quick else 10)
    budget = args.budget or (0.2 if args.quick else 3.0)
    dense_name = register_dense()
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = DuoLLM(config)
    model = model.to(dtype)
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, config.vocab_size, (B, T + 1), generator=gen).to(device)
    env = environment(device, dtype, kind="model", config=name, model_config=config.to_dict(),
                      batch=B, seq_len=T, mixes=mixes, backends=backends,
                      unavailable_backends={b: w for b, w in status.items() if w}, **settings)
    rows: List[Dict] = []
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5) if "train" in phases else None

    def forward(backend, routes):
        def call(i):
            with torch.inference_mode():
                return model(tokens[:, :-1], routes, backend=backend)
        return call

    def train_step(backend, routes):
        def call(i):
            logits = model(tokens[:, :-1], routes, backend=backend)
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        return call

    for phase in [p for p in phases if p in ("forward", "train")]:
        make = forward if phase == "forward" else train_step
        model.train(phase == "train")
        for mix in mixes:
            routes = _routes(model, mix, B, T, device, gen)
            fns = {"dense": make(dense_name, "big")}
            for b in backends:
                fns[b] = make(b, routes)
            errors = {}
            for k in list(fns):
                try:
                    fns[k](0)
                except Exception as e:
                    errors[k] = f"{type(e).__name__}: {e}"
                    del fns[k]
            if gpu:
                times = {k: time_cuda(f, repeats=repeats, budget_s=budget)
                         for k, f in fns.items()}
            else:
                times = time_interleaved(fns, device, repeats=repeats, warmup=1,
                                         budget_s=budget * len(fns))
            stats = {k: Stats.of(t) for k, t in times.items()}
            for k in list(stats) + list(errors):
                row = dict(phase=phase, mix=mix, impl=k, config=name, batch_shape=f"{B}x{T}")
                if k in stats:
                    row.update(stats[k].as_dict())
                    row["tokens_per_s"] = B * T / (stats[k].median_ms / 1e3)
                    if "dense" in stats:
                        row["vs_dense"] = stats["dense"].median_ms / stats[k].median_ms
                else:
                    row["error"] = errors[k]
                rows.append(row)
                print(f"{phase:>7} {mix:>7} {k:>7} " + (
                    f"{row['median_ms']:9.2f} ms  {row['tokens_per_s']:10.0f} tok/s"
                    if k in stats else f"failed: {row['error']}"))
    if "oracle" in phases:
        model.eval()
        row = _oracle_row(model, device, args.oracle_batch, args.oracle_seq_len, args.seed)
        row["config"] = name
        rows.append(row)
        print("oracle: " + (f"{row['patterns_per_s']:.1f} patterns/s" if "patterns_per_s" in
                            row else row.get("error", "")))
    model = opt = None  # free the weights and optimizer state before writing and plotting
    gc.collect()
    prefix = f"model-{env['dtype']}-{stamp()}"
    paths = write_results(out_dir, prefix, env, rows)
    if args.plots:
        from .plots import model_plots
        paths += tuple(model_plots(rows, env, out_dir, prefix))
    print("wrote " + ", ".join(paths))
    return 0
