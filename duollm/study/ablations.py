"""``duollm study ablations``: the paper's stage-1 ablations (its Figure 8), at small scale.

Two experiments, every model trained with the same steps, batch and schedule:

* **p_big sweep against dense models of equal FLOPs** (Fig. 8a/b). A Duo model is trained
  with random routing at ``p_big`` in {0, 0.25, 0.5, 0.75, 1} (``p_small = 1 - p_big``) and
  scored under that same random routing. Its dense counterpart is a ``DuoLLM`` whose every
  token takes its one FFN (``p_big = 1``) of width ``w = round(p_big * d_big + (1 - p_big) *
  d_small)``: a SwiGLU FFN costs ``6 * d_model * width`` FLOPs per token, linear in the width,
  so ``w`` matches the Duo model's *expected* FFN FLOPs per token; attention, norms and the
  head are the same in both, so the whole forward FLOPs per token match up to the rounding of
  ``w`` (both are reported). The dense model starts from the Duo model's initial weights
  (its FFN the big FFN's first ``w`` units), so the pair differs by training, not by the luck
  of two initialisations; at ``p_big`` 1 the two train identically (a check of the pairing).
* **freeze big, then train small** (Fig. 8c) against training both from scratch: a dense
  big model (every token big) trained for 2/3 of the steps, then frozen except the small
  FFNs, which train for the remaining 1/3 with random routing at ``p_big = 0.5`` (the paper:
  200B + 100B tokens against 300B from scratch). Freezing is ``TrainConfig.trainable``, the
  same path the Hugging Face stage-1 training uses. "From scratch" is the sweep's
  ``p_big = 0.5`` Duo model. Both are scored under random routing at 0.5, and all-big and
  all-small.

Losses are next-token cross-entropy (nats) per validation sequence, averaged over the training
seeds; intervals are bootstrap 95% over sequences (paired where two models are compared on the
same sequences). Under ``torchrun`` the runs are shared among the ranks (each trains its runs
alone) and gathered on every rank; rank 0 writes ``report.md``, ``ablations.png`` and
``results.json`` (``dataclasses.asdict`` of ``AblationResult``) under ``--out``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import distributed
from ..config import DuoConfig
from ..data import TokenData, eval_batches
from ..model import DuoLLM
from ..usage import UsageError
from .stats import Interval, Verdict, bootstrap, bootstrap_mean, paired_difference, verdict

P_BIGS = (0.0, 0.25, 0.5, 0.75, 1.0)
SCRATCH_P = 0.5       # the mix of the "from scratch" model and of the small-FFN stage
FROZEN_SHARE = 2 / 3  # of the steps spent on the dense big model before freezing it
SMALL_ONLY = r"[.]ffn[.]small[.]"  # TrainConfig.trainable of the second stage


# --------------------------------------------------------------------------- typed results


@dataclass(frozen=True)
class RunSpec:
    """One training run: ``kind`` is ``"duo"`` (random routing at ``p_big``), ``"dense"``
    (the equal-FLOPs dense model of ``p_big``) or ``"frozen"`` (dense big, frozen, then the
    small FFNs at ``SCRATCH_P``)."""

    kind: str
    p_big: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.kind}-p{self.p_big:.2f}-s{self.seed}"


@dataclass
class RunResult:
    """A trained run scored on the validation sequences.

    ``seq_loss``: policy -> per-sequence mean loss (n,), for ``"random"`` (the run's own mix;
    ``SCRATCH_P`` for ``"frozen"``), ``"big"`` and ``"small"`` (Duo models only; a dense model
    has one FFN, scored as ``"big"`` = ``"random"``). ``ffn_width``: the dense width, or None.
    ``flops_per_token``: forward FLOPs per token under the scored routing (``"random"``).
    """

    kind: str
    p_big: float
    seed: int
    ffn_width: Optional[int]
    flops_per_token: float
    steps: int
    train_s: float
    seq_loss: Dict[str, List[float]]


@dataclass
class SweepPoint:
    """One ``p_big`` of the sweep: the Duo model and its dense counterpart (seed-averaged).
    ``gap`` is duo minus dense on the same sequences (positive: dense is better)."""

    p_big: float
    duo_flops: float
    dense_width: int
    dense_flops: float
    duo: Interval
    dense: Interval
    gap: Interval


@dataclass
class TrainingMethod:
    """One way of training the Duo model (Fig. 8c): its loss under each policy."""

    name: str
    description: str
    loss: Dict[str, Interval]


@dataclass
class AblationResult:
    preset: str
    config: Dict
    steps: int
    batch_size: int
    seq_len: int
    seeds: List[int]
    eval_sequences: int
    data: str
    sweep: List[SweepPoint]
    methods: List[TrainingMethod]
    frozen_minus_scratch: Interval
    verdicts: List[Verdict]
    runs: List[RunResult]
    world_size: int
    elapsed_s: float
    command: str = ""
    notes: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class Settings:
    """What ``run`` needs, validated from the command line."""

    preset: str
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    seeds: Sequence[int]
    eval_batches: int
    device: str
    data: str
    out: str
    n_boot: int
    progress: bool


# --------------------------------------------------------------------------- model shapes


def dense_width(config: DuoConfig, p_big: float) -> int:
    """The FFN width whose FLOPs per token equal the Duo model's expected FFN FLOPs at
    ``p_big`` (SwiGLU FLOPs are linear in the width)."""
    return max(1, round(p_big * config.d_big + (1 - p_big) * config.d_small))


def dense_config(config: DuoConfig, p_big: float) -> DuoConfig:
    """A ``DuoLLM`` shape used densely: one FFN of ``dense_width`` taken by every token (the
    small FFN is a width-1 stub no token visits)."""
    return dataclasses.replace(config, d_big=dense_width(config, p_big), d_small=1,
                               p_skip=0.0, p_small=0.0, p_big=1.0)


@torch.no_grad()
def dense_from_duo_init(base: DuoConfig, p_big: float, seed: int) -> DuoLLM:
    """The dense counterpart's initial weights, taken from the Duo model's initial weights of
    the same ``seed``: embeddings, attention and norms equal, and the one FFN the first
    ``dense_width`` units of the big FFN.

    Common initial weights make the paired comparison about the training, not about the luck
    of two independent initialisations (which, early in training, moves the loss by as much
    as the effect measured). At ``p_big = 1`` the dense model then trains exactly like the
    Duo model, a check that the pairing is right.
    """
    torch.manual_seed(seed)  # as train() seeds a fresh model
    duo = DuoLLM(base)
    dense = DuoLLM(dense_config(base, p_big))
    w = dense.config.d_big
    duo_state = duo.state_dict()
    for name, t in dense.state_dict().items():
        src = duo_state[name]
        if ".ffn.big." in name:
            src = src[:, :w] if name.endswith("down_proj.weight") else src[:w]
        if ".ffn.small." not in name:  # the width-1 stub keeps its own (never used) init
            t.copy_(src)
    return dense


def run_specs(seeds: Sequence[int]) -> List[RunSpec]:
    """Every run of the ablations, in a fixed order (ranks take contiguous shares of it)."""
    specs = []
    for seed in seeds:
        specs += [RunSpec("duo", p, seed) for p in P_BIGS]
        specs += [RunSpec("dense", p, seed) for p in P_BIGS]
        specs.append(RunSpec("frozen", SCRATCH_P, seed))
    return specs


# --------------------------------------------------------------------------- one run


@torch.no_grad()
def sequence_losses(model, data: TokenData, s: Settings, policy: str,
                    seed: int = 0) -> List[float]:
    """Mean next-token loss of each validation window (``eval_batches`` windows of
    ``s.seq_len + 1``) under ``policy``; ``"random"`` draws routes from a generator seeded with
    ``seed`` (the same draws for every model of one mix). Returns n floats."""
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    out: List[float] = []
    for batch in eval_batches(data.val, s.batch_size, s.seq_len, s.eval_batches):
        routes = policy
        if policy == "random":
            routes = model.random_routes(batch.shape[0], s.seq_len, torch.device("cpu"), gen)
            routes = routes.to(device)
        batch = batch.to(device)
        logits = model(batch[:, :-1], routes)  # (B, T, V)
        loss = F.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:],
                               reduction="none")  # (B, T)
        out += loss.mean(1).tolist()
    model.train()
    return out


def train_run(spec: RunSpec, base: DuoConfig, data: TokenData, s: Settings) -> RunResult:
    """Train and score one run, alone in this process (never data-parallel)."""
    from ..train import TrainConfig, train

    def cfg(steps: int, p_big: float, **kw) -> TrainConfig:
        return TrainConfig(steps=steps, batch_size=s.batch_size, seq_len=s.seq_len, lr=s.lr,
                           min_lr=s.lr / 10, warmup=max(1, steps // 10), eval_every=0,
                           eval_batches=1, seed=spec.seed, device=s.device, progress=False,
                           p_big=p_big, p_small=1 - p_big, data_parallel=False, **kw)

    t0 = time.perf_counter()
    width = None
    if spec.kind == "duo":
        model = train(base, data, cfg(s.steps, spec.p_big)).model
    elif spec.kind == "dense":
        model = dense_from_duo_init(base, spec.p_big, spec.seed)
        width = model.config.d_big
        model = train(model.config, data, cfg(s.steps, 1.0), model=model).model
    elif spec.kind == "frozen":
        first = max(1, round(s.steps * FROZEN_SHARE))
        model = train(base, data, cfg(first, 1.0)).model  # dense big: every token big
        model = train(base, data, cfg(max(1, s.steps - first), spec.p_big,
                                      trainable=SMALL_ONLY), model=model).model
        model.requires_grad_(True)
    else:
        raise ValueError(f"spec: unknown run kind {spec.kind!r}")
    train_s = time.perf_counter() - t0
    policies = ("random",) if spec.kind == "dense" else ("random", "big", "small")
    seq_loss = {p: sequence_losses(model, data, s, p, seed=spec.seed) for p in policies}
    c = model.config
    flops = c.flops_per_token(c.p_big, c.p_small, seq_len=s.seq_len)
    return RunResult(spec.kind, spec.p_big, spec.seed, width, flops, s.steps, train_s,
                     seq_loss)


# --------------------------------------------------------------------------- aggregation


def _seq_mean(runs: List[RunResult], policy: str = "random") -> torch.Tensor:
    """(n,) per-sequence loss averaged over the runs (the seeds)."""
    return torch.tensor([r.seq_loss[policy] for r in runs], dtype=torch.float64).mean(0)


def summarize(runs: List[RunResult], base: DuoConfig, s: Settings, world_size: int,
              elapsed: float) -> AblationResult:
    """Seed-averaged sweep points, training methods and verdicts from every run."""
    def pick(kind: str, p: float) -> List[RunResult]:
        found = [r for r in runs if r.kind == kind and r.p_big == p]
        if not found:
            raise ValueError(f"runs: no {kind} run at p_big={p}")
        return found

    boot = dict(n_boot=s.n_boot, seed=0)
    sweep, seq = [], {}
    for p in P_BIGS:
        duo, dense = pick("duo", p), pick("dense", p)
        a, b = _seq_mean(duo), _seq_mean(dense)
        seq[p] = (a, b)
        sweep.append(SweepPoint(p, duo[0].flops_per_token, dense[0].ffn_width,
                                dense[0].flops_per_token, bootstrap_mean(a, **boot),
                                bootstrap_mean(b, **boot), paired_difference(a, b, **boot)))
    scratch, frozen = pick("duo", SCRATCH_P), pick("frozen", SCRATCH_P)
    methods = [
        TrainingMethod("scratch", f"big and small FFNs trained together from scratch, "
                                  f"random routing at p_big={SCRATCH_P}, {s.steps} steps",
                       {p: bootstrap_mean(_seq_mean(scratch, p), **boot)
                        for p in ("random", "big", "small")}),
        TrainingMethod("frozen", f"dense big model {round(s.steps * FROZEN_SHARE)} steps, "
                                 f"then frozen; small FFNs alone trained "
                                 f"{s.steps - round(s.steps * FROZEN_SHARE)} steps at "
                                 f"p_big={SCRATCH_P}",
                       {p: bootstrap_mean(_seq_mean(frozen, p), **boot)
                        for p in ("random", "big", "small")}),
    ]
    fms = paired_difference(_seq_mean(frozen), _seq_mean(scratch), **boot)
    verdicts = []
    for p in (0.25, 0.5, 0.75):
        pt = next(x for x in sweep if x.p_big == p)
        verdicts.append(verdict(
            f"A dense model of equal FLOPs/token beats the Duo model trained at p_big={p}",
            f"Duo loss (random routing at {p}) minus dense loss (width {pt.dense_width}), "
            f"paired over validation sequences; holds if the interval lies above 0",
            pt.gap))
    (a1, b1), (a3, b3) = seq[0.25], seq[0.75]
    verdicts.append(verdict(
        "The Duo model gets closer to its dense counterpart as big is chosen more often",
        "gap (Duo minus dense) at p_big=0.25 minus gap at p_big=0.75; holds if above 0",
        bootstrap(lambda w, x, y, z: ((w - x) - (y - z)).mean(), a1, b1, a3, b3, **boot)))
    verdicts.append(verdict(
        "Freezing a trained big model and training only the small FFNs is worse than "
        "training both from scratch (equal total steps)",
        f"loss of freeze-then-train-small minus from-scratch, both under random routing at "
        f"p_big={SCRATCH_P}, paired; holds if above 0", fms))
    notes = [f"Each dense model starts from its Duo model's initial weights (same seed; its "
             f"FFN is the first units of the big FFN), so a gap measures the training, not "
             f"two initialisations. At p_big=1 the two train identically (gap 0 checks the "
             f"pairing); at p_big=0 both are one FFN of width {base.d_small} that differs only "
             f"in its initial values: that gap is the noise floor of an FFN's initialisation.",
             "Intervals resample validation sequences; they do not cover the variation "
             "between training seeds (losses are averaged over the seeds listed above): "
             "compare a gap with the p_big=0 noise floor before trusting it."]
    return AblationResult(
        preset=s.preset, config=base.to_dict(), steps=s.steps, batch_size=s.batch_size,
        seq_len=s.seq_len, seeds=list(s.seeds), eval_sequences=len(seq[0.0][0]),
        data=s.data, sweep=sweep, methods=methods, frozen_minus_scratch=fms,
        verdicts=verdicts, runs=runs, world_size=world_size, elapsed_s=elapsed, notes=notes)


# --------------------------------------------------------------------------- report


def plot(res: AblationResult, path: str) -> None:
    """Loss vs forward FLOPs per token (Duo sweep and dense), and the two training methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for name, xs, ivs, style in (
            ("Duo (random routing)", [p.duo_flops for p in res.sweep],
             [p.duo for p in res.sweep], "o-"),
            ("dense, equal FLOPs", [p.dense_flops for p in res.sweep],
             [p.dense for p in res.sweep], "s--")):
        ys = [iv.estimate for iv in ivs]
        err = [[iv.estimate - iv.low for iv in ivs], [iv.high - iv.estimate for iv in ivs]]
        ax.errorbar([x / 1e6 for x in xs], ys, yerr=err, fmt=style, capsize=3, label=name)
    for p in res.sweep:
        ax.annotate(f"p_big={p.p_big:g}", (p.duo_flops / 1e6, p.duo.estimate),
                    textcoords="offset points", xytext=(4, 6), fontsize=7)
    ax.set_xlabel("forward MFLOPs per token")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("(a) Duo models vs dense models of equal FLOPs")
    ax.legend(fontsize=8)
    policies = ("random", "big", "small")
    width = 0.38
    for i, m in enumerate(res.methods):
        ivs = [m.loss[p] for p in policies]
        xs = [j + (i - 0.5) * width for j in range(len(policies))]
        err = [[iv.estimate - iv.low for iv in ivs], [iv.high - iv.estimate for iv in ivs]]
        bx.bar(xs, [iv.estimate for iv in ivs], width, yerr=err, capsize=3, label=m.name)
    bx.set_xticks(range(len(policies)))
    bx.set_xticklabels([f"random {SCRATCH_P:g}", "all big", "all small"])
    lows = [m.loss[p].low for m in res.methods for p in policies]
    highs = [m.loss[p].high for m in res.methods for p in policies]
    if all(math.isfinite(v) for v in lows + highs):
        pad = 0.1 * (max(highs) - min(lows) + 1e-6)
        bx.set_ylim(min(lows) - pad, max(highs) + pad)
    bx.set_title("(c) training methods")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_text(res: AblationResult, png: str) -> str:
    """``report.md`` of the ablations."""
    c = res.config
    lines = [
        "# Stage-1 ablations (Duo-LLM Figure 8)", "",
        f"Preset `{res.preset}` ({c['n_layers']} layers, d_model {c['d_model']}, d_big "
        f"{c['d_big']}, d_small {c['d_small']}), data `{res.data}`; every model trained "
        f"{res.steps} steps of {res.batch_size} x {res.seq_len} tokens, seeds {res.seeds}; "
        f"scored on {res.eval_sequences} validation sequences. Losses in nats/token, "
        f"[bootstrap 95% interval over sequences], averaged over seeds. {len(res.runs)} runs "
        f"on {res.world_size} process(es), {res.elapsed_s:.0f} s.", "",
        f"![loss vs FLOPs per token]({png})", "",
        "## Duo models vs dense models of equal FLOPs per token (Fig. 8a/b)", "",
        "The dense width is `round(p_big * d_big + (1 - p_big) * d_small)`: SwiGLU FLOPs are "
        "linear in the width, so it matches the Duo model's expected FFN FLOPs per token; the "
        "rest of the network is identical.", "",
        "| p_big | Duo MFLOPs/token | Duo loss | dense width | dense MFLOPs/token | dense loss "
        "| Duo - dense |", "|---|---|---|---|---|---|---|"]
    for p in res.sweep:
        lines.append(f"| {p.p_big:g} | {p.duo_flops / 1e6:.3f} | {p.duo.text()} | "
                     f"{p.dense_width} | {p.dense_flops / 1e6:.3f} | {p.dense.text()} | "
                     f"{p.gap.text()} |")
    lines += ["", "## Freeze big, then train small vs training both from scratch (Fig. 8c)",
              "", "| method | how | random | all big | all small |", "|---|---|---|---|---|"]
    for m in res.methods:
        lines.append(f"| {m.name} | {m.description} | {m.loss['random'].text()} | "
                     f"{m.loss['big'].text()} | {m.loss['small'].text()} |")
    lines += ["", f"Freeze-then-small minus scratch (random routing at {SCRATCH_P:g}): "
                  f"{res.frozen_minus_scratch.text()}", "", "## Verdicts", "",
              "| claim (paper) | criterion | interval | verdict |", "|---|---|---|---|"]
    for v in res.verdicts:
        lines.append(f"| {v.claim} | {v.criterion} | {v.interval.text()} | **{v.outcome}** |")
    lines += [""] + [f"Note: {n}" for n in res.notes]
    lines += ["", "The paper trains 1.4B-parameter models on 300B tokens and reports downstream "
                  "accuracy; this is the same design at toy scale, reported as validation "
                  "loss. A verdict says only what this run's intervals support.", "",
              f"Reproduce: `{res.command}`" if res.command else ""]
    return "\n".join(lines).rstrip() + "\n"


def write_outputs(res: AblationResult, out: str) -> None:
    """``report.md``, ``ablations.png`` and ``results.json`` under ``out``."""
    os.makedirs(out, exist_ok=True)
    plot(res, os.path.join(out, "ablations.png"))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dataclasses.asdict(res), f, indent=1)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report_text(res, "ablations.png"))


# --------------------------------------------------------------------------- driver


def run_ablations(s: Settings, data: TokenData, command: str = "") -> AblationResult:
    """Train every run (this rank's share under torchrun), gather, summarise; rank 0 writes
    the outputs. Returns the result on every rank."""
    base = DuoConfig.from_name(s.preset, vocab_size=data.vocab_size)
    device_type = torch.device(s.device).type
    info = distributed.join(device_type)
    if info.enabled and device_type == "cuda":
        s = dataclasses.replace(s, device=info.device)  # one GPU per rank
    specs = run_specs(s.seeds)
    t0 = time.perf_counter()
    mine = []
    for i in distributed.shard_range(info, len(specs)):
        if s.progress:
            print(f"[rank {info.rank}] run {i + 1}/{len(specs)}: {specs[i].name}",
                  file=sys.stderr, flush=True)
        mine.append(train_run(specs[i], base, data, s))
    runs = [r for part in distributed.gather_objects(info, mine) for r in part]
    res = summarize(runs, base, s, info.world_size, time.perf_counter() - t0)
    res.command = command
    if info.is_main:
        write_outputs(res, s.out)
    distributed.barrier(info)
    return res


def add_args(p: argparse.ArgumentParser) -> None:
    """Arguments of ``duollm study ablations``."""
    p.add_argument("--preset", default=None,
                   help="model preset (default tiny: 22 runs in ~8 minutes on 2 CPU cores; "
                        "small or paper-1.4b on GPUs under torchrun)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of every model (default 200; 12 with --quick)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per step (default 16; 4 with --quick)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default 64; 32 with --quick)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--seeds", type=int, default=None,
                   help="training seeds per run (default 2; 1 with --quick)")
    p.add_argument("--eval-batches", type=int, default=None,
                   help="validation batches of --batch-size sequences (default 4; 2 with "
                        "--quick)")
    p.add_argument("--data", default="default",
                   help="'default' (the embedded pydoc text), 'synthetic' or a UTF-8 file")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--out", default=None, help="output folder (default runs/ablations)")
    p.add_argument("--quick", action="store_true",
                   help="tiny preset, a few steps: the whole pipeline in seconds (a test, "
                        "not a result)")
    p.add_argument("--no-progress", action="store_true", help="no per-run lines")
    from ..usage import add_threads_arg
    add_threads_arg(p)


def settings_from(args: argparse.Namespace) -> Settings:
    """Validate every option before any work; UsageError names the bad one."""
    from ..usage import check_data_file, check_device, check_float, check_int, check_out_dir

    quick = bool(args.quick)
    preset = args.preset or "tiny"
    if preset not in DuoConfig.presets():
        raise UsageError("--preset", f"unknown preset {preset!r}; choose one of "
                                     f"{', '.join(DuoConfig.presets())}")

    def opt(name: str, flag: str, default: int, quick_default: int, low: int = 1) -> int:
        value = getattr(args, name)
        if value is None:
            return quick_default if quick else default
        return check_int(flag, value, low=low)

    steps = opt("steps", "--steps", 200, 12, low=2)  # two stages for freeze-then-small
    batch = opt("batch_size", "--batch-size", 16, 4)
    seq_len = opt("seq_len", "--seq-len", 64, 32)
    n_seeds = opt("seeds", "--seeds", 2, 1)
    n_eval = opt("eval_batches", "--eval-batches", 4, 2)
    if seq_len > DuoConfig.from_name(preset).max_seq_len:
        raise UsageError("--seq-len", f"{seq_len} exceeds the {preset} preset's max_seq_len "
                                      f"{DuoConfig.from_name(preset).max_seq_len}")
    if batch * n_eval < 2:
        raise UsageError("--eval-batches", "need at least 2 validation sequences for an "
                                           "interval")
    lr = check_float("--lr", args.lr, low=0, low_open=True)
    device = check_device("--device", args.device)
    if args.data not in ("default", "synthetic"):
        check_data_file("--data", args.data)
    out = check_out_dir("--out", args.out) or os.path.join("runs", "ablations")
    return Settings(preset=preset, steps=steps, batch_size=batch, seq_len=seq_len, lr=lr,
                    seeds=tuple(range(n_seeds)), eval_batches=n_eval, device=str(device),
                    data=args.data, out=out, n_boot=200 if quick else 2000,
                    progress=not args.no_progress)


def command_of(s: Settings) -> str:
    """The command line that reproduces ``s`` (every default spelled out)."""
    return (f"duollm study ablations --preset {s.preset} --steps {s.steps} --batch-size "
            f"{s.batch_size} --seq-len {s.seq_len} --lr {s.lr:g} --seeds {len(s.seeds)} "
            f"--eval-batches {s.eval_batches} --data {s.data} --device {s.device}")


def run(args: argparse.Namespace) -> int:
    """``duollm study ablations``: validate, train every run, write the report; 0 on success."""
    from ..data import load_data
    from ..usage import apply_thread_rule

    s = settings_from(args)
    apply_thread_rule(args.threads, torch.device(s.device),
                      DuoConfig.from_name(s.preset).d_model)
    data = load_data(s.data)
    res = run_ablations(s, data, command=command_of(s))
    if os.environ.get("RANK", "0") == "0":
        for v in res.verdicts:
            print(f"{v.outcome:>13}: {v.claim} ({v.interval.text()})")
        print(f"\nreport: {os.path.join(s.out, 'report.md')}")
    return 0
