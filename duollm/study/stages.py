"""The Duo-LLM study end to end (``duollm study``, run by ``make demo``).

1. Random-routing training (``duollm.train.train``).
2. Oracles on a validation batch (``duollm.oracle``): every layer pattern at sequence and at
   token granularity (context all big), so the oracle of every budget (exactly / at most k big
   layers, k = 0..L) comes from one exhaustive walk each; beam and greedy against exhaustive;
   token difficulty (``duollm.difficulty``, context all small).
3. Routers (``duollm.routers``) at several budgets, trained with the LM loss and a budget
   penalty and also by imitating the oracle, evaluated with hard routing calibrated to the
   budget, against fixed patterns, the best of N random patterns and the oracle.

Writes ``report.md`` + PNG plots (``duollm.report``), ``results.json`` and ``difficulty.csv``
under ``--out`` and prints a summary table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from ..config import DuoConfig
from ..reference import BIG


@dataclass(frozen=True)
class StudySizes:
    """How much work each stage does (``--quick`` picks ``QUICK``, otherwise ``DEMO``)."""

    steps: int            # random-routing training steps
    batch_size: int       # training batch (sequences)
    seq_len: int          # training sequence length
    lr: float
    oracle_batch: int     # validation sequences searched by the oracles
    oracle_len: int       # their length (scored positions per sequence)
    router_steps: int     # router training steps per budget
    router_batch: int     # router training batch (sequences of oracle_len)
    sup_batch: int        # training sequences labelled by the oracle for imitation
    sup_steps: int        # imitation-router steps (full batch)
    n_tokens_synth: int   # synthetic corpus length


# DEMO fits `make demo` in ~10 minutes on 2 CPU cores (training about half of it); QUICK (the
# tests) runs the whole study in well under a minute.
DEMO = StudySizes(steps=300, batch_size=16, seq_len=128, lr=3e-3, oracle_batch=8,
                  oracle_len=128, router_steps=100, router_batch=4, sup_batch=8, sup_steps=300,
                  n_tokens_synth=300_000)
QUICK = StudySizes(steps=20, batch_size=8, seq_len=32, lr=3e-3, oracle_batch=2, oracle_len=24,
                   router_steps=8, router_batch=2, sup_batch=2, sup_steps=30,
                   n_tokens_synth=20_000)


def add_cli(parser: argparse.ArgumentParser) -> None:
    """Add the ``duollm study`` arguments to ``parser``."""
    parser.add_argument("--preset", default=None,
                        help="model preset (DuoConfig.from_name); default small (tiny with "
                             "--quick)")
    parser.add_argument("--data", default="default",
                        help="'default' (embedded corpus), 'synthetic' (known difficulty) or "
                             "a UTF-8 text file")
    parser.add_argument("--steps", type=int, default=None,
                        help="random-routing training steps (default 300; 20 with --quick)")
    parser.add_argument("--device", default="auto",
                        help="torch device: cpu, cuda, or auto (cuda when a GPU is visible, "
                             "the default)")
    parser.add_argument("--out", default=None, help="output folder (default runs/<name>)")
    parser.add_argument("--budgets", default=None,
                        help="comma-separated big-layer counts k for the routers and the "
                             "difficulty oracle (default 1 and L/2)")
    parser.add_argument("--router-steps", type=int, default=None,
                        help="router training steps per budget (default 100)")
    parser.add_argument("--n-random", type=int, default=100,
                        help="random layer patterns per budget for the best-of-N baseline")
    parser.add_argument("--oracle-batch", type=int, default=None,
                        help="validation sequences the oracles search (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="tiny preset, few steps: the whole study in well under a minute")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_cli(args: argparse.Namespace) -> int:
    """Run the study from parsed ``add_cli`` arguments; 0 on success."""
    budgets = None
    if args.budgets:
        try:
            budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
        except ValueError:
            raise SystemExit(f"--budgets: expected comma-separated ints, got {args.budgets!r}")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    results = run_study(preset=args.preset, data=args.data, steps=args.steps,
                        device=device, out=args.out, budgets=budgets,
                        router_steps=args.router_steps, n_random=args.n_random,
                        oracle_batch=args.oracle_batch, seed=args.seed, quick=args.quick,
                        progress=not args.no_progress)
    print(results["summary_text"])
    print(f"\nreport: {os.path.join(results['out_dir'], 'report.md')}")
    return 0


def _windows(tokens: torch.Tensor, n: int, length: int, kinds=None):
    """``n`` evenly spaced windows (n, length) of a 1-D split (and of its kinds)."""
    last = tokens.numel() - length
    if last < 0:
        raise ValueError(f"split of {tokens.numel()} tokens is shorter than a window of "
                         f"{length}")
    starts = torch.linspace(0, last, n, dtype=torch.float64).round().long()
    idx = starts[:, None] + torch.arange(length)
    return tokens[idx], (None if kinds is None else kinds[idx])


def _mean(x: torch.Tensor) -> float:
    return float(x.detach().double().mean())


def run_study(preset: Optional[str] = None, data="default", steps: Optional[int] = None,
              device: str = "cpu", out: Optional[str] = None,
              budgets: Optional[Sequence[int]] = None, router_steps: Optional[int] = None,
              n_random: int = 100, oracle_batch: Optional[int] = None, seed: int = 0,
              quick: bool = False, progress: bool = True, model=None) -> Dict:
    """Run the three stages and write the report; returns the results dict (also in
    ``results.json``).

    Args:
      preset: model preset (default "small", "tiny" with ``quick``).
      data: "default", "synthetic", a text file path, or a ``TokenData``.
      steps: random-routing training steps (ignored when ``model`` is given).
      budgets: big-layer counts k for routers and difficulty (default 1 and L // 2).
      model: an already trained ``DuoLLM`` to study instead of training one.
    """
    from .. import oracle as O
    from . import report as R
    from ..data import TokenData, load_data, sample_batch
    from ..difficulty import export_csv, high_loss_correlation, token_difficulty
    from ..routers import (agreement, calibrate, fixed_pattern, random_patterns,
                          random_token_routes, route_and_loss, train_router,
                          train_supervised_router)
    from .synthetic import KIND_NAMES, make_synthetic_data

    t_start = time.perf_counter()
    d = QUICK if quick else DEMO
    preset = preset or ("tiny" if quick else "small")
    steps = d.steps if steps is None else steps
    router_steps = d.router_steps if router_steps is None else router_steps
    oracle_batch = d.oracle_batch if oracle_batch is None else oracle_batch
    torch.manual_seed(seed)
    timings: Dict[str, float] = {}

    def log(msg: str) -> None:
        if progress:
            print(f"[study {time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    # ---------------------------------------------------------------- data
    labels = None
    if isinstance(data, TokenData):
        tdata = data
    elif data == "synthetic":
        tdata, labels = make_synthetic_data(n_tokens=d.n_tokens_synth, seed=seed,
                                            return_labels=True)
    else:
        tdata = load_data(None if data == "default" else data)
    kind = data if data in ("default", "synthetic") else "data"
    name = (os.path.basename(out.rstrip("/")) if out
            else f"{preset}-{kind}" + ("-quick" if quick else ""))
    out_dir = out or os.path.join("runs", name)
    os.makedirs(out_dir, exist_ok=True)

    # ---------------------------------------------------------------- stage 1
    t0 = time.perf_counter()
    if model is None:
        from ..train import TrainConfig, train

        config = DuoConfig.from_name(preset, vocab_size=tdata.vocab_size)
        seq_len = min(d.seq_len, config.max_seq_len - 1)
        tcfg = TrainConfig(steps=steps, batch_size=d.batch_size, seq_len=seq_len,
                           lr=d.lr, warmup=min(20, max(1, steps // 10)),
                           eval_every=steps, eval_batches=2 if quick else 4, seed=seed,
                           device=device, progress=progress)
        log(f"stage 1: random-routing training, preset {preset}, {steps} steps "
            f"of {tcfg.batch_size}x{seq_len} tokens on {tdata.name}")
        trained = train(config, tdata, tcfg)
        model, train_val = trained.model, trained.val_loss
        history = trained.history
    else:
        config, train_val, history = model.config, {}, []
    model = model.to(device).eval()
    L = config.n_layers
    timings["train_s"] = time.perf_counter() - t0
    budgets = sorted(set(budgets or [1, max(1, L // 2)]))
    for k in budgets:
        if not 0 <= k <= L:
            raise ValueError(f"budgets: {k} is not a big-layer count in 0..{L}")

    T = min(d.oracle_len, config.max_seq_len - 1) + 1
    val, val_kind = _windows(tdata.val, oracle_batch, T,
                             labels.val_kind if labels is not None else None)
    val = val.to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    calib = sample_batch(tdata.train, oracle_batch, T - 1, generator=gen).to(device)
    sup_tokens = sample_batch(tdata.train, d.sup_batch, T - 1, generator=gen).to(device)

    # ---------------------------------------------------------------- stage 2: oracles
    t0 = time.perf_counter()
    log(f"stage 2: exhaustive oracles over {2 ** L} patterns on {oracle_batch}x{T - 1} "
        f"validation positions")
    seq_tab = O.pattern_losses(model, val, "sequence", progress=progress)
    tok_tab = O.pattern_losses(model, val, "token", base="big", progress=progress)
    ks = list(range(L + 1))
    curves: Dict[str, List[float]] = {n: [] for n in (
        "oracle_token_exactly", "oracle_token_at_most", "oracle_sequence_exactly",
        "oracle_sequence_at_most", "first_k", "last_k", "best_random_pattern",
        "random_per_token")}
    best_random = {}
    for k in ks:
        curves["oracle_token_exactly"].append(_mean(tok_tab.select(O.Exactly(k)).loss))
        curves["oracle_token_at_most"].append(_mean(tok_tab.select(O.AtMost(k)).loss))
        curves["oracle_sequence_exactly"].append(_mean(seq_tab.select(O.Exactly(k)).loss))
        curves["oracle_sequence_at_most"].append(_mean(seq_tab.select(O.AtMost(k)).loss))
        curves["first_k"].append(_mean(seq_tab.loss_of(fixed_pattern(L, "first", k))))
        curves["last_k"].append(_mean(seq_tab.loss_of(fixed_pattern(L, "last", k))))
        pats = random_patterns(L, k, n_random, seed=seed + k).unique(dim=0)
        losses = [(_mean(seq_tab.loss_of(p.tolist())), p.tolist()) for p in pats]
        best = min(losses)
        best_random[k] = {"loss": best[0], "pattern": best[1], "distinct": len(losses)}
        curves["best_random_pattern"].append(best[0])
        rt = [_mean(model.token_losses(val, random_token_routes(L, *val.shape, k,
                                                                seed=seed + 100 * r + k)
                                       .to(device)))
              for r in range(3)]
        curves["random_per_token"].append(sum(rt) / len(rt))

    usage_layer = {"oracle_token": {}, "oracle_sequence": {}}
    usage_pos = {"oracle_token_at_most": {}}
    oracle_tok_routes = {}
    for k in budgets:
        r_tok = tok_tab.select(O.Exactly(k))
        oracle_tok_routes[k] = r_tok.routes
        usage_layer["oracle_token"][k] = (r_tok.routes[:, :, :-1] == BIG).float().mean(
            (1, 2)).tolist()
        r_seq = seq_tab.select(O.Exactly(k))
        usage_layer["oracle_sequence"][k] = (r_seq.routes == BIG).float().mean((1, 2)).tolist()
        r_am = tok_tab.select(O.AtMost(k))
        usage_pos["oracle_token_at_most"][k] = (r_am.routes[:, :, :-1] == BIG).float().mean(
            (0, 1)).tolist()

    approx = {}
    for k in budgets:
        exact = curves["oracle_token_exactly"][k]
        for method, width in (("greedy", 1), ("beam", 4)):
            r = O.search(model, val, k, "token", method=method, beam_width=width)
            approx[f"{method}{width if method == 'beam' else ''}_k{k}"] = {
                "loss": _mean(r.loss), "exhaustive": exact, "gap": _mean(r.loss) - exact,
                "patterns_evaluated": r.patterns_evaluated}
    oracle_speed = {"sequence_patterns_per_s": seq_tab.patterns_per_s,
                    "token_patterns_per_s": tok_tab.patterns_per_s,
                    "sequence_s": seq_tab.elapsed_s, "token_s": tok_tab.elapsed_s,
                    "positions": int(val.shape[0] * (T - 1))}
    timings["oracle_s"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- difficulty
    t0 = time.perf_counter()
    diff_budgets = sorted(set(budgets + [L]))
    log(f"token difficulty (context all small, oracle at most {diff_budgets} big)")
    dtab = token_difficulty(model, val, budgets=diff_budgets, base="small",
                            kinds=val_kind, progress=progress)
    export_csv(os.path.join(out_dir, "difficulty.csv"), dtab)
    # The difficulty table already holds every validation token's all-big and all-small loss.
    all_big, all_small = _mean(dtab.loss_big), _mean(dtab.loss_small)
    corr = high_loss_correlation(dtab)
    by_kind = None
    if dtab.kind is not None:
        by_kind = {}
        for kind, kname in KIND_NAMES.items():
            m = dtab.kind == kind
            if bool(m.any()):
                by_kind[kname] = {"n": int(m.sum()), "loss_big": _mean(dtab.loss_big[m]),
                                  "loss_small": _mean(dtab.loss_small[m]),
                                  "difficulty": _mean(dtab.difficulty[m])}
    timings["difficulty_s"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- stage 3: routers
    t0 = time.perf_counter()
    routers = {}
    usage_layer["router"], usage_layer["supervised"] = {}, {}
    usage_pos["router"] = {}
    for k in budgets:
        target = k / L
        log(f"stage 3: router at {k}/{L} big ({router_steps} steps)")
        router, hist = train_router(model, tdata, target_big=target, steps=router_steps,
                                    batch_size=d.router_batch, seq_len=T - 1, seed=seed,
                                    progress=progress)
        router.threshold = 0.0
        argmax_loss, argmax_routes = route_and_loss(model, router, val)
        calib_frac = calibrate(model, router, calib, target)
        loss, routes = route_and_loss(model, router, val)
        # Imitation of the token oracle (context all big, exactly k) on training windows.
        sup_oracle = O.search(model, sup_tokens, k, "token", base="big")
        sup, sup_hist = train_supervised_router(model, sup_tokens, sup_oracle.routes,
                                                steps=d.sup_steps, seed=seed)
        calibrate(model, sup, calib, target)
        s_loss, s_routes = route_and_loss(model, sup, val)
        entry = {
            "target": target, "k": k,
            "history": hist[:: max(1, len(hist) // 50)] + hist[-1:],
            "objective_first": sum(h["objective"] for h in hist[:5]) / min(5, len(hist)),
            "objective_last": sum(h["objective"] for h in hist[-5:]) / min(5, len(hist)),
            "loss": _mean(loss), "realised": _mean((routes == BIG).float()),
            "calibration_realised": calib_frac, "threshold": router.threshold,
            "argmax_loss": _mean(argmax_loss),
            "argmax_realised": _mean((argmax_routes == BIG).float()),
            "agreement": agreement(routes, oracle_tok_routes[k]).tolist(),
            "supervised_loss": _mean(s_loss),
            "supervised_realised": _mean((s_routes == BIG).float()),
            "supervised_accuracy": sup_hist[-1]["accuracy"],
            "supervised_agreement": agreement(s_routes, oracle_tok_routes[k]).tolist(),
        }
        # Oracle results live on the CPU, router routes on the model's device.
        o_big = (oracle_tok_routes[k][:, :, :-1] == BIG).float().mean((1, 2)).cpu()
        r_big = (routes == BIG).float().mean((1, 2)).cpu()
        entry["chance_agreement"] = (o_big * r_big + (1 - o_big) * (1 - r_big)).tolist()
        routers[k] = entry
        usage_layer["router"][k] = r_big.tolist()
        usage_layer["supervised"][k] = (s_routes == BIG).float().mean((1, 2)).tolist()
        usage_pos["router"][k] = (routes == BIG).float().mean((0, 1)).tolist()
    timings["routers_s"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- findings
    tok1 = curves["oracle_token_exactly"][1] if L >= 1 else math.nan
    seq1 = curves["oracle_sequence_exactly"][1] if L >= 1 else math.nan
    finding_a = {"oracle_token_1": tok1, "oracle_sequence_1": seq1, "all_big": all_big,
                 "holds": bool(tok1 < all_big), "holds_sequence": bool(seq1 < all_big)}
    near = {}
    for k, e in routers.items():
        o, rnd = curves["oracle_token_exactly"][k], curves["best_random_pattern"][k]
        near[k] = {"router": e["loss"], "best_random": rnd, "oracle_token": o,
                   "oracle_sequence": curves["oracle_sequence_exactly"][k],
                   "closer_to_random": bool(abs(e["loss"] - rnd) < abs(e["loss"] - o))}
    finding_b = {"per_budget": near, "holds": bool(near) and all(v["closer_to_random"]
                                                                 for v in near.values())}
    finding_c = dict(corr)
    finding_c["holds"] = bool(not math.isnan(corr["corr_high_loss"])
                              and corr["corr_high_loss"] < 0.3)

    results = {
        "name": name, "out_dir": out_dir, "preset": preset, "config": config.to_dict(),
        "data": tdata.name, "steps": steps, "train_val_loss": train_val,
        "train_history": history[-20:] if history else [],
        "budgets": budgets, "n_layers": L, "oracle_batch": [int(val.shape[0]), T],
        "n_random": n_random, "ks": ks, "curves": curves, "all_big": all_big,
        "all_small": all_small, "best_random": {str(k): v for k, v in best_random.items()},
        "approx": approx, "oracle_speed": oracle_speed,
        "usage_layer": {p: {str(k): v for k, v in u.items()} for p, u in usage_layer.items()},
        "usage_position": {p: {str(k): v for k, v in u.items()} for p, u in usage_pos.items()},
        "routers": {str(k): v for k, v in routers.items()},
        "difficulty": {"reference": f"at most {dtab.reference} big", "budgets": diff_budgets,
                       "correlation": corr, "by_kind": by_kind,
                       "mean_difficulty": _mean(dtab.difficulty),
                       "points": {"loss_big": [round(v, 4) for v in dtab.loss_big.tolist()],
                                  "difficulty": [round(v, 4) for v in
                                                 dtab.difficulty.tolist()],
                                  "kind": None if dtab.kind is None else dtab.kind.tolist()}},
        "findings": {"a": finding_a, "b": {"holds": finding_b["holds"],
                                           "per_budget": {str(k): v for k, v in
                                                          near.items()}},
                     "c": finding_c},
        "timings": timings, "device": str(device),
    }
    timings["total_s"] = time.perf_counter() - t_start
    R.write_report(results, out_dir)
    results["summary_text"] = R.summary_table(results)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    log(f"done in {timings['total_s']:.0f}s")
    return results
