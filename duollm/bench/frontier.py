"""``duollm bench frontier``: held-out quality against measured speed, for every way to route.

Input: a ``DuoLLM`` checkpoint (``--checkpoint``), a converted Hugging Face folder (``--hf``),
or ``--quick``: a small ``DuoLLM`` trained in the run with random routing (the ``tiny`` preset
on the embedded corpus). Routings, all over big/small paths:

* ``dense big`` — the unconverted dense model (a ``DuoLLM`` exported with
  ``duollm.hf.export(which="big")`` and loaded by ``transformers``; for a converted folder, the
  original architecture with the big weights): every speedup is against it, measured here;
* ``dense small`` — the width-``d_small`` model, exported (``which="small"``) and timed as a
  plain dense model;
* ``all-big`` / ``all-small`` — the routed model under those policies;
* ``fixed k=K`` — the best fixed layer pattern with K big layers, chosen on a selection split
  (every pattern's loss, ``duollm.oracle.pattern_losses``), scored on the evaluation split;
* ``random k=K`` — each token draws its own K big layers (``random_token_routes``; in timing a
  router that draws per step);
* ``router big=B`` — ``duollm.routers.train_router`` at big share B (three budgets by
  default), calibrated on the selection split; ``saved router`` — the folder's own, if any;
* ``oracle k=K`` — the paper's token oracle on the evaluation split: a loss bound, not
  deployable (it picks routes knowing the token it predicts), never timed or on a front.

Per routing: loss and perplexity on the evaluation split; shares of big/small/skip, FFN and
model FLOPs and weight bytes per token counted from the realised routes (router included) and
the ideal speedups they imply; tokens/s of a prefill (no cache) and of greedy decoding
(``generate``, prompt included) at batch 1 and 8, timed round-robin on the CPU
(``duollm.bench.timing``); measured speedups over ``dense big``. Writes
``frontier-<dtype>-<stamp>.csv/.json`` and a plot of loss against tokens/s per setting with
the Pareto front, and prints one line per routing saying where it stands on the front. The
router's own cost per layer (time and FLOPs against the FFN it routes) is measured and
recorded in the JSON's ``env.router_overhead``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..reference import BIG, SMALL
from ..usage import UsageError, check_float, check_int
from .common import (add_device_args, resolve_backends, resolve_device, resolve_dtype,
                     resolve_out_dir, setup_run)
from .pareto import (SETTINGS, FrontierRow, ModelCosts, apply_accounting, front_lines,
                     mark_fronts, route_accounting, setting_key)
from .results import environment, stamp, write_results
from .timing import Stats, time_cuda, time_interleaved

MAX_EXHAUSTIVE_LAYERS = 12  # 2^L patterns are walked for the fixed patterns and the oracle


def add_args(p: argparse.ArgumentParser) -> None:
    from ..router_cli import add_model_args

    add_device_args(p)
    add_model_args(p, required=False)
    p.add_argument("--quick", action="store_true",
                   help="train a small DuoLLM in the run (tiny preset, embedded corpus) and "
                        "use small sizes everywhere: a CPU run of a few minutes")
    p.add_argument("--data", default="default", metavar="PATH|default",
                   help="held-out text (its validation split): the embedded corpus, a UTF-8 "
                        "file or a token shard folder")
    p.add_argument("--train-steps", type=int, default=None,
                   help="--quick: random-routing training steps (default: 300)")
    p.add_argument("--sequences", type=int, default=None,
                   help="held-out sequences per split, selection and evaluation (default: 16 "
                        "with --quick, else 32)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per held-out sequence (default: 64 with --quick, else 128)")
    p.add_argument("--router-budgets", default="0.25,0.5,0.75",
                   help="big shares the routers are trained and calibrated at")
    p.add_argument("--router-steps", type=int, default=None,
                   help="training steps per router (default: 60 with --quick, else 200)")
    p.add_argument("--prefill-len", type=int, default=None,
                   help="tokens per sequence of the timed prefill (default: 64 with --quick, "
                        "else 256)")
    p.add_argument("--prompt-len", type=int, default=16, help="decode: prompt tokens")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="decode: generated tokens per call (default: 16 with --quick, else 64)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds per setting (default: 5 with --quick, else 15)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timing per candidate and setting (default: 0.5 with "
                        "--quick, else 3)")


# --------------------------------------------------------------------------- options


@dataclasses.dataclass
class Plan:
    device: torch.device
    dtype: torch.dtype
    backend: Optional[str]
    out_dir: str
    source: object            # duollm.router_cli.ModelSource, or None for --quick
    sequences: int
    seq_len: int
    router_budgets: List[float]
    router_steps: int
    train_steps: int
    prefill_len: int
    prompt_len: int
    new_tokens: int
    repeats: int
    budget: float


def _plan(args: argparse.Namespace) -> Plan:
    """Every option checked before anything is built, trained, measured or written."""
    from ..hf_cli import require_transformers
    from ..router_cli import check_model_source

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    given = args.checkpoint is not None or args.hf is not None
    if args.quick and given:
        raise UsageError("--quick", "trains its own model; give it without --checkpoint/--hf")
    if not args.quick and not given:
        raise UsageError("--checkpoint", "give a model: --checkpoint DIR, --hf DIR, or --quick "
                                         "to train a small one in the run")
    q = args.quick
    if args.train_steps is not None and not q:
        raise UsageError("--train-steps", "only with --quick (the model given is not trained)")
    for flag in ("--train-steps", "--sequences", "--seq-len", "--router-steps",
                 "--prefill-len", "--prompt-len", "--new-tokens", "--repeats"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            check_int(flag, value, low=1 if flag != "--sequences" else 2)
    if args.budget is not None:
        check_float("--budget", args.budget, low=0.0, low_open=True)
    try:
        budgets = [float(v) for v in args.router_budgets.split(",") if v.strip()]
    except ValueError:
        budgets = []
    if not budgets or any(not 0 < b < 1 for b in budgets):
        raise UsageError("--router-budgets", f"expected comma-separated big shares in (0, 1), "
                                             f"got {args.router_budgets!r}")
    backend = None
    if args.backends is not None:
        chosen = resolve_backends(args.backends, device)
        if len(chosen) != 1:
            raise UsageError("--backends", "the frontier times one backend for the routed "
                                           "FFNs; name one")
        backend = next(iter(chosen))
    if args.data != "default" and not os.path.exists(args.data):
        raise UsageError("--data", f"no such file or folder: {args.data}")
    require_transformers("bench frontier")  # the dense reference models are transformers'
    source = None if q else check_model_source(args)
    plan = Plan(device=device, dtype=dtype, backend=backend, out_dir=resolve_out_dir(args,
                                                                                    device),
                source=source, sequences=args.sequences or (16 if q else 32),
                seq_len=args.seq_len or (64 if q else 128), router_budgets=budgets,
                router_steps=args.router_steps or (60 if q else 200),
                train_steps=args.train_steps or 300,
                prefill_len=args.prefill_len or (64 if q else 256),
                prompt_len=args.prompt_len, new_tokens=args.new_tokens or (16 if q else 64),
                repeats=args.repeats or (5 if q else 15),
                budget=args.budget or (0.5 if q else 3.0))
    if source is not None:
        if source.n_layers > MAX_EXHAUSTIVE_LAYERS:
            raise UsageError(source.option, f"the fixed patterns and the oracle walk all 2^L "
                                            f"patterns; {source.n_layers} layers is more than "
                                            f"{MAX_EXHAUSTIVE_LAYERS}")
        need = max(plan.seq_len + 1, plan.prefill_len, plan.prompt_len + plan.new_tokens)
        if source.max_positions is not None and need > source.max_positions:
            raise UsageError("--seq-len", f"the model holds {source.max_positions} positions; "
                                          f"--seq-len + 1, --prefill-len and --prompt-len + "
                                          f"--new-tokens must fit (need {need})")
    return plan


# --------------------------------------------------------------------------- models


def _quick_model(plan: Plan, data, seed: int):
    """A tiny DuoLLM trained with random routing (big/small 50:50) on ``data.train``."""
    from ..config import DuoConfig
    from ..train import TrainConfig, train

    config = DuoConfig.from_name("tiny", vocab_size=data.vocab_size)
    cfg = TrainConfig(steps=plan.train_steps, batch_size=16, seq_len=64, lr=3e-3,
                      min_lr=3e-4, warmup=20, eval_every=plan.train_steps, eval_batches=2,
                      seed=seed, device=str(plan.device), progress=False)
    result = train(config, data, cfg)
    return result.model.eval()


def _dense_duo(model, which: str, dtype):
    """The all-``which`` sub-model of a DuoLLM exported as a Llama folder and loaded back by
    ``transformers`` (the dense model a user would deploy instead)."""
    import transformers

    from ..hf import export

    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar per model
    with tempfile.TemporaryDirectory() as tmp:
        export(model, os.path.join(tmp, which), which=which)
        dense = transformers.LlamaForCausalLM.from_pretrained(os.path.join(tmp, which),
                                                              dtype=dtype)
    return dense.to(next(model.parameters()).device).eval()


def _dense_hf(model, which: str, d_small: int):
    """The unconverted architecture of a converted HF model with its big (the original) or
    small MLP weights: a plain ``transformers`` model, no duollm module in it."""
    config = copy.deepcopy(model.config)
    if which == "small":
        config.intermediate_size = d_small
    keep, drop = (".mlp.big.", ".mlp.small.") if which == "big" else (".mlp.small.",
                                                                      ".mlp.big.")
    state = {k.replace(keep, ".mlp."): v for k, v in model.state_dict().items() if drop not in k}
    p = next(model.parameters())
    dense = type(model)._from_config(config, dtype=p.dtype)
    dense.load_state_dict(state, strict=False)
    missing = [k for k in dense.state_dict() if k not in state and not k.endswith("inv_freq")]
    tied = getattr(config, "tie_word_embeddings", False)
    if [k for k in missing if not (tied and k == "lm_head.weight")]:
        raise RuntimeError(f"dense {which} model: weights missing: {missing}")
    return dense.to(p.device).eval()


def _other_params(model, stack) -> int:
    """Weights every token multiplies outside the FFNs: attention projections and the head
    (norms counted too; the embedding lookup is not a multiply)."""
    ffn = {id(p) for i in range(stack.n_layers) for p in stack.ffn_module(i).parameters()}
    emb = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") \
        else model.embed.weight
    head = model.get_output_embeddings().weight if hasattr(model, "get_output_embeddings") \
        else model.lm_head.weight
    total = sum(p.numel() for p in model.parameters() if id(p) not in ffn)
    return total - (emb.numel() if emb is not head else 0)


# --------------------------------------------------------------------------- routings


class RandomKRouter:
    """Per forward, every token draws its own ``k`` big layers (the rest small): drawn at
    layer 0 for the whole (B, T) and read by the later layers of that forward."""

    def __init__(self, n_layers: int, k: int, seed: int):
        self.L, self.k = n_layers, k
        self.gen = torch.Generator().manual_seed(seed)
        self.plan: Optional[torch.Tensor] = None

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if layer == 0 or self.plan is None:
            B, T = hidden.shape[:2]
            ranks = torch.rand(self.L, B, T, generator=self.gen).argsort(0).argsort(0)
            self.plan = torch.where(ranks < self.k, BIG, SMALL).to(hidden.device)
        return self.plan[layer]


@dataclasses.dataclass
class Candidate:
    row: FrontierRow
    routes: object = None       # what generate/forward/routing take; None: a dense model
    dense: object = None        # the dense model, for dense rows


def _losses_dense(dense, tokens: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        logits = dense(input_ids=tokens[:, :-1]).logits.float()
    return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")


def _row(name: str, kind: str, losses: torch.Tensor, acc, **kw) -> FrontierRow:
    loss = float(losses.float().mean())
    row = FrontierRow(routing=name, kind=kind, loss=loss, perplexity=math.exp(loss), **kw)
    return apply_accounting(row, acc)


def build_candidates(model, stack, dense: Dict[str, object], sel: torch.Tensor,
                     ev: torch.Tensor, train_tokens: torch.Tensor, plan: Plan, seed: int,
                     costs: ModelCosts, log=print) -> Tuple[List[Candidate], Dict]:
    """Every routing's loss and accounting on the evaluation split (selection on ``sel``)."""
    from ..oracle import Exactly, pattern_losses
    from ..routers import calibrate, random_token_routes, route_and_loss, train_router
    from ..routes import attached_router

    L = stack.n_layers
    B, T = ev.shape
    out: List[Candidate] = []
    ones = torch.ones(L, B, T - 1, dtype=torch.int64)

    def const(route):
        return route_accounting(ones * route, costs)

    for which, route in (("big", BIG), ("small", SMALL)):
        out.append(Candidate(_row(f"dense {which}", "dense", _losses_dense(dense[which], ev),
                                  const(route), note="unconverted dense model"),
                             dense=dense[which]))
    with torch.inference_mode():
        for name, route in (("all-big", BIG), ("all-small", SMALL)):
            losses = stack.token_losses(ev, name[4:])
            out.append(Candidate(_row(name, "policy", losses, const(route)), name[4:]))
    t0 = time.perf_counter()
    with torch.inference_mode():
        table_sel = pattern_losses(stack, sel, "sequence")
        table_ev = pattern_losses(stack, ev, "sequence").as_granularity("token")
    log(f"pattern walks: {table_sel.patterns.shape[0]} patterns on each split in "
        f"{time.perf_counter() - t0:.1f} s")
    fixed_losses = table_sel.losses.mean((1, 2))  # (n,) selection-split mean per pattern
    n_big = (table_sel.patterns == BIG).sum(1)
    info: Dict = {"patterns": int(table_sel.patterns.shape[0])}
    for k in range(1, L):
        idx = torch.where(n_big == k, fixed_losses, torch.full_like(fixed_losses, math.inf))
        best = table_sel.patterns[int(idx.argmin())].tolist()
        with torch.inference_mode():
            losses = stack.token_losses(ev, best)
        routes = torch.tensor(best).view(L, 1, 1).expand(L, B, T - 1)
        out.append(Candidate(_row(f"fixed k={k}", "fixed", losses, route_accounting(routes,
                                                                                  costs),
                                  pattern=",".join(map(str, best)),
                                  note="best pattern on the selection split"), best))
        r = random_token_routes(L, B, T, k, seed=seed + k)
        with torch.inference_mode():
            losses = stack.token_losses(ev, r.to(ev.device))
        out.append(Candidate(_row(f"random k={k}", "random", losses,
                                  route_accounting(r[:, :, :-1], costs),
                                  note="each token draws its own k big layers"),
                             RandomKRouter(L, k, seed + k)))
        oracle = table_ev.select(Exactly(k))
        out.append(Candidate(_row(f"oracle k={k}", "oracle", oracle.loss,
                                  route_accounting(oracle.routes[:, :, :-1], costs),
                                  deployable=False,
                                  note="paper's token oracle: a bound, not deployable")))
    routers = []
    for b in plan.router_budgets:
        t0 = time.perf_counter()
        router, _ = train_router(stack, train_tokens, target_big=b, steps=plan.router_steps,
                                 batch_size=8, seq_len=min(64, plan.seq_len), seed=seed)
        calibrate(stack, router, sel, target_big=b)
        routers.append((f"router big={b:.2f}", router,
                        f"trained {plan.router_steps} steps, calibrated on the selection split "
                        f"({time.perf_counter() - t0:.1f} s)"))
    saved = attached_router(model)
    if saved is not None:
        routers.append(("saved router", saved, "the router saved with the model"))
    for name, router, note in routers:
        losses, routes = route_and_loss(stack, router, ev)
        out.append(Candidate(_row(name, "router", losses,
                                  route_accounting(routes, costs, len(router.paths)),
                                  note=note), router))
    return out, info


# --------------------------------------------------------------------------- timing


def _callers(model, kind: str, backend, cand: Candidate, inputs: Dict, new_tokens: int
             ) -> Dict[str, Callable[[int], object]]:
    """{setting key: fn(i)} for one candidate."""
    fns = {}
    for phase, batch in SETTINGS:
        data = inputs[(phase, batch)]
        if cand.dense is not None:
            fns[setting_key(phase, batch)] = _dense_call(cand.dense, phase, data, new_tokens)
        elif kind == "checkpoint":
            fns[setting_key(phase, batch)] = _duo_call(model, phase, data, cand.routes,
                                                       backend, new_tokens)
        else:
            fns[setting_key(phase, batch)] = _hf_call(model, phase, data, cand.routes,
                                                      backend, new_tokens)
    return fns


def _dense_call(dense, phase, data, new_tokens):
    def call(i):
        x = data[i % len(data)]
        with torch.inference_mode():
            if phase == "prefill":
                return dense(input_ids=x, use_cache=False).logits
            return dense.generate(x, attention_mask=torch.ones_like(x),
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, pad_token_id=0)
    return call


def _duo_call(model, phase, data, routes, backend, new_tokens):
    def call(i):
        x = data[i % len(data)]
        with torch.inference_mode():
            if phase == "prefill":
                return model(x, routes, backend=backend)
            return model.generate(x, new_tokens, routes=routes, backend=backend)
    return call


def _hf_call(model, phase, data, routes, backend, new_tokens):
    from .. import hf

    def call(i):
        x = data[i % len(data)]
        with torch.inference_mode(), hf.routing(model, routes, backend=backend):
            if phase == "prefill":
                return model(input_ids=x, use_cache=False).logits
            return model.generate(x, attention_mask=torch.ones_like(x),
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, pad_token_id=0)
    return call


def time_candidates(model, kind: str, cands: List[Candidate], inputs: Dict, plan: Plan,
                    log=print) -> None:
    """Fill every deployable row's tokens/s and speedup over ``dense big`` per setting."""
    live = [c for c in cands if c.row.deployable]
    per = {c.row.routing: _callers(model, kind, plan.backend, c, inputs, plan.new_tokens)
           for c in live}
    for phase, batch in SETTINGS:
        key = setting_key(phase, batch)
        fns = {name: f[key] for name, f in per.items()}
        errors = {}
        for name in list(fns):
            try:
                fns[name](0)
            except Exception as e:  # recorded in the row: one failing candidate keeps the rest
                errors[name] = f"{type(e).__name__}: {e}"
                del fns[name]
        t0 = time.perf_counter()
        if plan.device.type == "cuda":
            times = {n: time_cuda(f, repeats=plan.repeats, budget_s=plan.budget)
                     for n, f in fns.items()}
        else:
            times = time_interleaved(fns, plan.device, repeats=plan.repeats, warmup=1,
                                     budget_s=plan.budget * len(fns))
        stats = {n: Stats.of(t) for n, t in times.items()}
        n_tokens = batch * (plan.prefill_len if phase == "prefill" else plan.new_tokens)
        for c in live:
            name = c.row.routing
            if name in errors:
                c.row.error = (c.row.error + "; " if c.row.error else "") + \
                    f"{key}: {errors[name]}"
                continue
            setattr(c.row, f"{key}_tps", n_tokens / (stats[name].median_ms / 1e3))
        dense = stats.get("dense big")
        for c in live:
            if dense is not None and c.row.routing in stats:
                setattr(c.row, f"{key}_speedup", dense.median_ms / stats[c.row.routing].median_ms)
        log(f"timed {key}: {len(fns)} candidates, {min(len(t) for t in times.values())}+ "
            f"rounds, {time.perf_counter() - t0:.1f} s")


def router_overhead(stack, routers: List[Tuple[str, object]], hidden: List[torch.Tensor],
                    plan: Plan) -> List[Dict]:
    """Per router and layer: its time on the layer's FFN input against the big and small
    FFN's on the same rows, and its FLOPs against the big FFN's."""
    from ..config import router_flops, swiglu_flops

    rows = []
    for name, router in routers:
        for i in range(stack.n_layers):
            x = hidden[i]
            ffn = stack.ffn_module(i)
            fns = {"router": lambda j, x=x, i=i: router(i, x),
                   "big": lambda j, x=x, f=ffn: f.big(x),
                   "small": lambda j, x=x, f=ffn: f.small(x)}
            with torch.inference_mode():
                if plan.device.type == "cuda":
                    times = {n: time_cuda(f, repeats=plan.repeats * 4, budget_s=0.2)
                             for n, f in fns.items()}
                else:
                    times = time_interleaved(fns, plan.device, repeats=plan.repeats * 4,
                                             warmup=2, budget_s=0.3)
            s = {n: Stats.of(t).median_ms for n, t in times.items()}
            rows.append({"router": name, "layer": i, "tokens": int(x.shape[:-1].numel()),
                         "router_ms": s["router"], "big_ffn_ms": s["big"],
                         "small_ffn_ms": s["small"], "time_vs_big": s["router"] / s["big"],
                         "time_vs_small": s["router"] / s["small"],
                         "flops_vs_big": router_flops(stack.d_model, len(router.paths))
                         / swiglu_flops(stack.d_model, stack.d_big)})
    return rows


# --------------------------------------------------------------------------- the command


def _token_data(args, plan: Plan, tokenizer, vocab: int):
    if plan.source is not None and plan.source.kind == "hf":
        from ..hf_cli import token_data

        return token_data(args.data, tokenizer, vocab, 0.1, "--hf")
    from ..data import load_data

    try:
        data = load_data(args.data, val_fraction=0.1)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError("--data", str(e).split(": ", 1)[-1]) from None
    if plan.source is not None and data.vocab_size > plan.source.vocab_size:
        raise UsageError("--data", f"its ids need a vocabulary of {data.vocab_size}, the model "
                                   f"has {plan.source.vocab_size}")
    return data


def _windows(tokens: torch.Tensor, n: int, length: int, start: int, what: str) -> torch.Tensor:
    need = start + n * length
    if tokens.numel() < need:
        raise UsageError("--sequences", f"the held-out split holds {tokens.numel()} tokens; "
                                        f"{what} need {need} (lower --sequences / --seq-len)")
    return tokens[start:need].reshape(n, length).to(torch.int64)


def run(args: argparse.Namespace) -> int:
    from ..router_cli import load_model_source
    from ..stack import as_stack
    from ..usage import apply_thread_rule

    plan = _plan(args)
    settings = setup_run(args, plan.device)
    t_start = time.perf_counter()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    tokenizer = None
    if plan.source is None:
        data = _token_data(args, plan, None, 256)
        apply_thread_rule(args.threads, plan.device, 64)
        print(f"--quick: training the tiny preset for {plan.train_steps} steps "
              f"(random routing, big/small 50:50) on {data.name}", flush=True)
        model = _quick_model(plan, data, args.seed)
        kind = "checkpoint"
    else:
        apply_thread_rule(args.threads, plan.device, plan.source.d_model)
        model, tokenizer = load_model_source(plan.source, plan.device)
        kind = plan.source.kind
        data = _token_data(args, plan, tokenizer, plan.source.vocab_size)
    model = model.to(plan.dtype).eval()
    stack = as_stack(model)
    dev = plan.device
    S, T = plan.sequences, plan.seq_len + 1
    val = data.val.reshape(-1)
    sel = _windows(val, S, T, 0, "selection and evaluation sequences").to(dev)
    ev = _windows(val, S, T, S * T, "selection and evaluation sequences").to(dev)
    start = 2 * S * T
    prefill = _windows(val, 8, plan.prefill_len, start, "the timed prefill").to(dev)
    prompts = _windows(val, 8, plan.prompt_len, start + 8 * plan.prefill_len,
                       "the timed prompts").to(dev)
    inputs = {("prefill", 1): [prefill[i:i + 1] for i in range(2)],
              ("prefill", 8): [prefill],
              ("decode", 1): [prompts[i:i + 1] for i in range(2)],
              ("decode", 8): [prompts]}
    if kind == "checkpoint":
        dense = {w: _dense_duo(model, w, plan.dtype) for w in ("big", "small")}
    else:
        dense = {w: _dense_hf(model, w, stack.d_small) for w in ("big", "small")}
    bytes_per = torch.finfo(plan.dtype).bits // 8
    costs = ModelCosts.of(stack, _other_params(model, stack), bytes_per)
    cands, info = build_candidates(model, stack, dense, sel, ev, data.train, plan, args.seed,
                                   costs)
    # Sanity of the reference: the exported dense big model computes the all-big model.
    by = {c.row.routing: c.row for c in cands}
    gap = abs(by["dense big"].loss - by["all-big"].loss)
    if gap > 1e-2 * max(1.0, by["all-big"].loss):
        raise RuntimeError(f"the dense big model's loss {by['dense big'].loss:.5f} differs from "
                           f"all-big's {by['all-big'].loss:.5f}: the reference is wrong")
    time_candidates(model, kind, cands, inputs, plan)
    rows = [c.row for c in cands]
    mark_fronts(rows)
    with torch.inference_mode():
        _, hidden = stack.forward(prefill, "big", return_hidden=True)
    overhead = router_overhead(stack, [(c.row.routing, c.routes) for c in cands
                                       if c.row.kind == "router"], hidden, plan)
    env = environment(dev, plan.dtype, kind="frontier",
                      model=("quick: tiny preset trained in the run" if plan.source is None
                             else f"{plan.source.kind} {os.path.basename(plan.source.folder)}"),
                      n_layers=stack.n_layers, d_model=stack.d_model, d_big=stack.d_big,
                      d_small=stack.d_small, vocab=stack.vocab_size,
                      data=getattr(data, "name", str(args.data)), sequences_per_split=S,
                      seq_len=plan.seq_len, prefill_len=plan.prefill_len,
                      prompt_len=plan.prompt_len, new_tokens=plan.new_tokens,
                      repeats=plan.repeats, budget_s=plan.budget,
                      backend=plan.backend or "default", router_budgets=plan.router_budgets,
                      router_steps=plan.router_steps,
                      train_steps=plan.train_steps if plan.source is None else None,
                      router_overhead=overhead, flops_note=(
                          "FLOPs per token: the FFNs by the realised routes (router included) "
                          "plus the attention projections and the head; attention scores are "
                          "not counted"), **info, **settings)
    if load_start is not None:  # environment() is called at the end: keep the real start
        env["loadavg_start"] = load_start
    prefix = f"frontier-{env['dtype']}-{stamp()}"
    json_path, csv_path = write_results(plan.out_dir, prefix, env,
                                        [dataclasses.asdict(r) for r in rows])
    paths = [csv_path, json_path]
    if args.plots:
        from .plots import frontier_plot

        paths.append(frontier_plot([dataclasses.asdict(r) for r in rows], env, plan.out_dir,
                                   prefix))
    for line in front_lines(rows):
        print(line)
    for name in dict.fromkeys(o["router"] for o in overhead):
        mine = [o for o in overhead if o["router"] == name]
        print(f"{name}: router time per layer {min(o['time_vs_big'] for o in mine):.1%}-"
              f"{max(o['time_vs_big'] for o in mine):.1%} of the big FFN's on the same "
              f"{mine[0]['tokens']} tokens ({mine[0]['flops_vs_big']:.2%} of its FLOPs)")
    print(f"{time.perf_counter() - t_start:.0f} s; wrote " + ", ".join(paths))
    return 0
