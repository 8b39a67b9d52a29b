"""The study's stages, one function each; ``duollm.study.pipeline.run_study`` chains them.

1. ``train_model``: random-routing training (stage 1 of the paper) on the prose and code
   training text, with a skip path so the skip oracles have something to choose.
2. ``pattern_table``: every layer pattern (3^L with skip) run over each holdout sequence; the
   paper's token oracle and every fixed-pattern baseline are read from this one table.
3. ``loss_curves`` (Figure 4a/4b), ``capacity`` (2a-c), ``skip_profiles`` (2d/3d),
   ``position_budget`` (4c), ``difficulty`` (5, 6): analyses of the table, each baseline chosen
   on the selection split and scored on the evaluation split, with bootstrap intervals.
4. ``train_routers`` and ``evaluate_router``: the trained routers (stage 3 of the paper).
5. ``synthetic_check``: the difficulty criterion on a corpus whose difficulty is known.

The oracle here is the paper's: "exhaustively enumerates all possible routing paths and
selects the one that results in the lowest perplexity on each token" -- every pattern runs
over the whole sequence and each position takes its best pattern (``base="pattern"``). The
library's context-big variant (``duollm.oracle`` with ``base="big"``: only the scored token's
own path changes) is reported beside it, labelled.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..reference import BIG, SKIP, SMALL
from . import stats as S
from .parallel import once_across_ranks
from .results import (ApproxGap, CapacityResult, Curve, DifficultyResult, PositionBudgetResult,
                      RouterResult, SkipResult, SyntheticCheck)


@dataclass(frozen=True)
class StudySizes:
    """How much work each stage does (``--quick`` picks ``QUICK``, otherwise ``DEMO``)."""

    steps: int            # random-routing training steps
    batch_size: int       # training batch (sequences)
    seq_len: int          # training sequence length
    lr: float
    n_sequences: int      # holdout sequences per holdout (selection + evaluation)
    oracle_len: int       # scored positions per holdout sequence
    router_steps: int     # router training steps per budget
    router_batch: int     # router training batch (sequences of oracle_len)
    n_tokens_synth: int   # synthetic corpus length
    synth_steps: int      # training steps of the synthetic-check model
    n_boot: int           # bootstrap resamples per interval
    synth_keys: int = 512  # entries of the synthetic check's key -> value table


# DEMO keeps `make demo` under 10 minutes on 2 CPU cores; QUICK (the tests) runs in seconds.
DEMO = StudySizes(steps=300, batch_size=16, seq_len=128, lr=3e-3, n_sequences=40,
                  oracle_len=96, router_steps=100, router_batch=4, n_tokens_synth=200_000,
                  synth_steps=250, n_boot=1000)
QUICK = StudySizes(steps=20, batch_size=8, seq_len=32, lr=3e-3, n_sequences=8, oracle_len=24,
                   router_steps=8, router_batch=2, n_tokens_synth=20_000, synth_steps=10,
                   n_boot=200)
# FULL is `make study` (--full): 200 holdout sequences (100 to evaluate) per holdout, trained
# on the `wide` preset (default_preset). Measured in the session that set it (a pilot, 2
# threads, not the study itself): `wide` at 800 steps had all small minus all big 0.184 nats
# (prose) and 0.166 (code) on 40 validation windows, the `tiny` preset at 1,200 steps 0.134 and
# 0.092, `small` costs 2.7x `wide` per step (1.48 s against 0.54 s) and 9x per oracle table.
# 1,000 steps per seed. The whole `make study` ran in 2,410 s on 2 quiet cores (246 s of
# training per seed at 2 threads): all small minus all big 0.267 (prose) / 0.206 (code) nats.
FULL = StudySizes(steps=1000, batch_size=16, seq_len=128, lr=3e-3, n_sequences=200,
                  oracle_len=96, router_steps=100, router_batch=4, n_tokens_synth=400_000,
                  synth_steps=2000, n_boot=1000, synth_keys=128)


def default_preset(quick: bool = False, full: bool = False) -> str:
    """The model preset a study trains when none is given: ``tiny`` with ``--quick``,
    ``wide`` (16x-wide big FFNs, a 0.15-nat big/small margin in 1,000 CPU steps) with
    ``--full``, otherwise ``small``."""
    return "tiny" if quick else ("wide" if full else "small")


# (p_skip, p_small, p_big) of random-routing training. The paper trains big/small at 0.5
# each; a skip share is added so the skip oracles (Figures 2d, 3d) route a model that has
# seen skipped layers.
TRAIN_PROBS = (0.2, 0.4, 0.4)


# --------------------------------------------------------------------------- stage 1


def train_model(preset: str, data, sizes: StudySizes, steps: int, seed: int, device: str,
                progress: bool, probs: Sequence[float] = TRAIN_PROBS):
    """Random-routing training. Returns ``duollm.train.TrainResult``."""
    from ..config import DuoConfig
    from ..train import TrainConfig, train

    config = DuoConfig.from_name(preset, vocab_size=data.vocab_size)
    seq_len = min(sizes.seq_len, config.max_seq_len - 1)
    p_skip, p_small, p_big = probs
    tcfg = TrainConfig(steps=steps, batch_size=sizes.batch_size, seq_len=seq_len, lr=sizes.lr,
                       min_lr=sizes.lr / 10, warmup=min(20, max(1, steps // 10)),
                       eval_every=steps, eval_batches=2, seed=seed, device=device,
                       progress=progress, p_skip=p_skip, p_small=p_small, p_big=p_big)
    return train(config, data, tcfg)


# --------------------------------------------------------------------------- stage 2


class PatternLosses:
    """Per-token losses of every layer pattern, each run over whole sequences.

    Args:
      patterns: (n, L) int64 routes (SKIP/SMALL/BIG) per layer.
      losses: (n, B, T-1) next-token loss of each position under each pattern.
    """

    def __init__(self, patterns: torch.Tensor, losses: torch.Tensor):
        if patterns.dim() != 2 or losses.dim() != 3 or losses.shape[0] != patterns.shape[0]:
            raise ValueError(f"patterns (n, L) and losses (n, B, T-1) disagree: "
                             f"{tuple(patterns.shape)} vs {tuple(losses.shape)}")
        self.patterns, self.losses = patterns.long(), losses.double()
        self.n_big = (self.patterns == BIG).sum(1)
        self.n_small = (self.patterns == SMALL).sum(1)
        self.n_skip = (self.patterns == SKIP).sum(1)
        self.L = patterns.shape[1]

    def subset(self, seqs: torch.Tensor) -> "PatternLosses":
        """The table restricted to sequences ``seqs`` (indices)."""
        return PatternLosses(self.patterns, self.losses[:, seqs])

    def mask(self, big: Optional[int] = None, at_most: bool = False, small: bool = True,
             skip: bool = False) -> torch.Tensor:
        """(n,) patterns with exactly (or at most) ``big`` big layers, using small/skip only
        where allowed."""
        m = torch.ones(self.patterns.shape[0], dtype=torch.bool)
        if big is not None:
            m &= (self.n_big <= big) if at_most else (self.n_big == big)
        if not small:
            m &= self.n_small == 0
        if not skip:
            m &= self.n_skip == 0
        return m

    def index(self, pattern: Sequence[int]) -> int:
        hit = (self.patterns == torch.as_tensor(list(pattern))).all(1).nonzero()
        if hit.numel() == 0:
            raise ValueError(f"pattern {list(pattern)} is not in the table")
        return int(hit[0])

    def oracle(self, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The paper's token oracle over the allowed patterns.

        Args: mask (n,) or (n, T-1) (a per-position budget).
        Returns: (loss (B, T-1), chosen pattern index (B, T-1)).
        """
        m = mask[:, None, :] if mask.dim() == 2 else mask[:, None, None]
        if not bool(mask.any(0).all()):
            raise ValueError("mask: some position has no allowed pattern")
        tab = torch.where(m, self.losses, torch.full((), math.inf, dtype=torch.float64))
        loss, idx = tab.min(0)
        return loss, idx

    def routes(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T-1, L) routes of the chosen pattern indices ``idx`` (B, T-1)."""
        return self.patterns[idx]


# Beyond FULL_SKIP_LIMIT 3^L patterns the table is two 2^L walks (big/small and big/skip)
# instead of one 3^L walk (defined beside the per-rank table, which walks the same way).
from .sharded_table import (FULL_SKIP_LIMIT, ReducedPatternLosses,  # noqa: E402
                            build_local_table, table_mode)


def pattern_table(model, tokens: torch.Tensor, progress: bool = False,
                  full: Optional[bool] = None,
                  checkpoint_dir: Optional[str] = None, log=None) -> PatternLosses:
    """Stage 2: every layer pattern over each whole sequence of ``tokens`` (B, T), as
    exhaustive prefix-sharing walks: the table of the paper's token oracle
    (``duollm.oracle.pattern_losses(..., "token", base="pattern")``).

    ``full``: one walk over all 3^L skip/small/big patterns (default while 3^L <=
    ``FULL_SKIP_LIMIT``); otherwise two walks, big/small (2^L) and big/skip (2^L), which serve
    every figure except the full 3^L oracle of Figure 2d.

    Under ``torchrun`` each rank walks and keeps only its share of the sequences and the
    analyses read reductions across the ranks (``duollm.study.sharded_table``: a
    ``ReducedPatternLosses``, equal to one process's numbers); ``DUOLLM_ORACLE_TABLE=whole``
    gathers the whole table onto every rank instead
    (``duollm.study.parallel.sharded_pattern_losses``).

    ``checkpoint_dir``: walk in chunks and keep each finished chunk under
    ``checkpoint_dir/<the model's digest>/``; a run killed midway and started again with the
    same folder reuses them (``duollm study --oracle-chunks``; ``log`` says which). One folder
    per token set: a chunk of other tokens or of another model is refused, never mixed in."""
    from ..stack import as_stack
    from .parallel import sharded_pattern_losses as pattern_losses

    L = as_stack(model).n_layers
    full = 3 ** L <= FULL_SKIP_LIMIT if full is None else full
    if checkpoint_dir is not None:
        from .sharded_table import model_digest

        checkpoint_dir = os.path.join(checkpoint_dir, model_digest(model)[:16])
    if table_mode() == "per-rank" or checkpoint_dir is not None:
        return ReducedPatternLosses(build_local_table(model, tokens, full=full,
                                                      checkpoint_dir=checkpoint_dir, log=log))
    if full:
        tab = pattern_losses(model, tokens, "token", base="pattern", skip=True,
                             progress=progress)
        return PatternLosses(tab.patterns, tab.losses)
    a = pattern_losses(model, tokens, "token", base="pattern", paths=(SMALL, BIG),
                       progress=progress)
    b = pattern_losses(model, tokens, "token", base="pattern", paths=(SKIP, BIG),
                       progress=progress)
    keep = (b.patterns == SKIP).any(1)  # all big is in both walks
    return PatternLosses(torch.cat([a.patterns, b.patterns[keep]]),
                         torch.cat([a.losses, b.losses[keep]]))


def context_big_curve(model, tokens: torch.Tensor, L: int, n_boot: int, seed: int,
                      progress: bool = False) -> Curve:
    """The library's other token oracle (``base="big"``): only the scored position's path
    changes, the context stays all big. A bound on per-token routing *given* a full-compute
    context; not realisable by running all tokens with their routes at once."""
    from ..oracle import Exactly
    from .parallel import sharded_selected_losses

    # Under torchrun each rank keeps only its sequences' table; the k-oracles are gathered.
    sel = sharded_selected_losses(model, tokens, [Exactly(k) for k in range(L + 1)], "token",
                                  base="big", progress=progress)
    vals = [loss.double().mean(1) for loss in sel]
    return make_curve("oracle_context_big", "token oracle, context all big (base='big')", vals,
                      vals[L], n_boot, seed)


def make_curve(name: str, label: str, values: List[Optional[torch.Tensor]],
               all_big: torch.Tensor, n_boot: int, seed: int, patterns=None) -> Curve:
    """A ``Curve`` from per-sequence losses per k (None where there is no point)."""
    pts = [None if v is None else S.bootstrap_mean(v, n_boot=n_boot, seed=seed)
           for v in values]
    rel = [None if v is None else S.paired_difference(v, all_big, n_boot=n_boot, seed=seed)
           for v in values]
    return Curve(name, label, pts, rel, dict(patterns or {}))


# --------------------------------------------------------------------------- analyses


def seq_mean(x: torch.Tensor) -> torch.Tensor:
    """(B, T-1) -> (B,) per-sequence mean."""
    return x.double().mean(1)


def loss_curves(sel: PatternLosses, ev: PatternLosses, n_random: int, seed: int,
                n_boot: int) -> Tuple[List[Curve], Dict[str, List[torch.Tensor]]]:
    """Figure 4a/4b: loss vs k for the paper's oracle, the best fixed pattern and the best of
    ``n_random`` random patterns (both chosen on ``sel``, scored on ``ev``).

    Returns (curves, per-sequence evaluation losses: name -> [k] -> (n_eval,))."""
    from ..routers import random_patterns

    L = ev.L
    fixed_pat, rnd_pat = {}, {}
    values: Dict[str, List[torch.Tensor]] = {"oracle": [], "fixed": [], "random": []}
    for k in range(L + 1):
        m = ev.mask(k)
        values["oracle"].append(seq_mean(ev.oracle(m)[0]))
        cand = m.nonzero().flatten()
        i, vals = S.select_on(sel.losses[cand].mean((1, 2)), ev.losses[cand].mean(2))
        values["fixed"].append(vals)
        fixed_pat[k] = ev.patterns[cand[i]].tolist()
        pats = random_patterns(L, k, n_random, seed=seed + k)
        ridx = torch.tensor([ev.index(p.tolist()) for p in pats])
        j, rvals = S.select_on(sel.losses[ridx].mean((1, 2)), ev.losses[ridx].mean(2))
        values["random"].append(rvals)
        rnd_pat[k] = ev.patterns[ridx[j]].tolist()
    big = seq_mean(ev.losses[ev.index([BIG] * L)])
    return [make_curve("oracle", "oracle (paper: best pattern per token, base='pattern')",
                       values["oracle"], big, n_boot, seed),
            make_curve("fixed", "best fixed pattern (chosen on selection split)",
                       values["fixed"], big, n_boot, seed, fixed_pat),
            make_curve("random", f"best of {n_random} random patterns (chosen on selection "
                                 f"split)", values["random"], big, n_boot, seed, rnd_pat)
            ], values


def _halves(L: int) -> Tuple[slice, slice]:
    h = L // 2
    return slice(0, h), slice(L - h, L)  # the middle layer of an odd L is in neither


def _late_minus_early(by_layer: torch.Tensor) -> torch.Tensor:
    """(n, L) per-sequence per-layer fractions -> (n,) later half minus earlier half."""
    early, late = _halves(by_layer.shape[1])
    return by_layer[:, late].mean(1) - by_layer[:, early].mean(1)


def per_layer(routes: torch.Tensor, route: int) -> torch.Tensor:
    """(B, T-1, L) routes -> (B, L) per-sequence fraction of tokens taking ``route``."""
    return (routes == route).double().mean(1)


def capacity_budgets(L: int) -> List[int]:
    """Low, middle and high budget (the paper: 4, 6, 8 of 12)."""
    return sorted({max(1, round(L / 3)), max(1, L // 2), min(L - 1, max(1, round(2 * L / 3)))})


def capacity(ev: PatternLosses, router_routes: Dict[int, torch.Tensor], budgets: List[int],
             n_boot: int, seed: int) -> CapacityResult:
    """Figure 2a-c and 3a-c: big usage per layer at low/mid/high budget, oracle and router.

    Criterion (the paper's "later layers first at a low budget, earlier layers once the later
    ones are served"): big usage of the later half of the layers minus the earlier half is
    above zero at the lowest budget and below zero at the highest (95% intervals)."""
    budgets = sorted(budgets)
    by_layer, lme, r_by_layer, r_lme = {}, {}, {}, {}
    for k in budgets:
        u = per_layer(ev.routes(ev.oracle(ev.mask(k))[1]), BIG)  # (B, L)
        by_layer[k] = [S.bootstrap_mean(u[:, i], n_boot=n_boot, seed=seed)
                       for i in range(ev.L)]
        lme[k] = S.bootstrap_mean(_late_minus_early(u), n_boot=n_boot, seed=seed)
        if k in router_routes:
            ru = per_layer(router_routes[k], BIG)
            r_by_layer[k] = ru.mean(0).tolist()
            r_lme[k] = S.bootstrap_mean(_late_minus_early(ru), n_boot=n_boot, seed=seed)
    lo, hi = budgets[0], budgets[-1]
    crit = (f"big usage of the later half of the layers minus the earlier half: above zero "
            f"at k={lo}, below zero at k={hi}")
    v = S.all_of("later layers first at a low budget, earlier layers once the later are "
                 "served", crit, [S.verdict("late first at low budget", crit, lme[lo], +1),
                                  S.verdict("early at high budget", crit, lme[hi], -1)])
    rcrit = "router: later-half minus earlier-half big usage above zero at every budget"
    rparts = [S.verdict("router late", rcrit, r_lme[k], +1) for k in budgets if k in r_lme]
    rv = (S.all_of("the router gives later layers more compute at every budget", rcrit, rparts)
          if rparts else S.Verdict("router", rcrit, S.Interval(math.nan, math.nan, math.nan,
                                                               0), S.UNRESOLVED))
    return CapacityResult(budgets, by_layer, r_by_layer, lme, v, rv)


def _suffix_share(routes: torch.Tensor) -> float:
    """Share of tokens with at least one skip whose skipped layers are exactly the last ones
    (what an early exit does). routes (..., L)."""
    r = routes.reshape(-1, routes.shape[-1])
    sk = r == SKIP
    any_skip = sk.any(1)
    if not bool(any_skip.any()):
        return math.nan
    n = sk.sum(1)
    L = r.shape[1]
    tail = torch.arange(L)[None, :] >= (L - n)[:, None]  # the last n layers
    is_suffix = (sk == tail).all(1)
    return float(is_suffix[any_skip].double().mean())


def skip_profiles(ev: PatternLosses, router_routes: Optional[torch.Tensor], n_boot: int,
                  seed: int) -> SkipResult:
    """Figures 2d/3d: big-or-skip oracle (exactly k big, every other layer skipped) and the
    full 3^L oracle (exactly k big, the rest small or skip), k = L/2; per-layer skip profile.

    Criterion for "early exit": the skip rate of the later half of the layers minus the
    earlier half is above zero (95% interval). "Not an early exit" holds for the oracle when
    that interval lies below zero, fails when above, and is not resolved when it includes
    zero; the router "behaves like an early exit" when it lies above zero."""
    k = max(1, ev.L // 2)
    bos_loss, bos_idx = ev.oracle(ev.mask(k, small=False, skip=True))
    bos_r = ev.routes(bos_idx)
    bos_sk = per_layer(bos_r, SKIP)
    has_full = bool(((ev.n_skip > 0) & (ev.n_small > 0)).any())  # a 3^L table
    if has_full:
        full_loss, full_idx = ev.oracle(ev.mask(k, small=True, skip=True))
        full_r = ev.routes(full_idx)
        full_sk = per_layer(full_r, SKIP).mean(0).tolist()
    crit = "skip rate of the later half of the layers minus the earlier half (early exit: > 0)"
    v_or = S.verdict("the oracle's skips are not an early exit", crit,
                     S.bootstrap_mean(_late_minus_early(bos_sk), n_boot=n_boot, seed=seed), -1)
    suffix = {"oracle_big_or_skip": _suffix_share(bos_r)}
    if has_full:
        suffix["oracle_full"] = _suffix_share(full_r)
    r_prof, v_r = None, None
    if router_routes is not None:
        rs = per_layer(router_routes, SKIP)
        r_prof = rs.mean(0).tolist()
        suffix["router"] = _suffix_share(router_routes)
        v_r = S.verdict("the trained router behaves like an early exit", crit,
                        S.bootstrap_mean(_late_minus_early(rs), n_boot=n_boot, seed=seed), +1)
    return SkipResult(k, S.bootstrap_mean(seq_mean(bos_loss), n_boot=n_boot, seed=seed),
                      S.bootstrap_mean(seq_mean(full_loss), n_boot=n_boot, seed=seed)
                      if has_full else None,
                      bos_sk.mean(0).tolist(), full_sk if has_full else None, r_prof, suffix,
                      v_or, v_r)


def schedules(L: int, n_pos: int) -> Tuple[int, Dict[str, List[int]]]:
    """The paper's Figure 4c setting: a constant round(L/3) big layers against per-position
    budgets falling (rising) from round(L/3) + round(L/6) to round(L/3) - round(L/6) with the
    same mean (the paper: 6 -> 2 big layers of 12 against a constant 4). The study used L/2,
    the oracle's best k, before issue 16; ``duollm.study.verdicts.schedules_l3``."""
    from .verdicts import schedules_l3

    return schedules_l3(L, n_pos)


def position_budget(ev: PatternLosses, n_boot: int, seed: int) -> PositionBudgetResult:
    """Figure 4c: the oracle with a per-position budget against a constant budget."""
    n_pos = ev.losses.shape[2]
    kc, sched = schedules(ev.L, n_pos)
    const = seq_mean(ev.oracle(ev.mask(kc))[0])
    loss = {"constant": S.bootstrap_mean(const, n_boot=n_boot, seed=seed)}
    parts = []
    crit = "oracle loss with the varying budget minus the constant budget (paper: > 0)"
    for name, ks in sched.items():
        kt = torch.tensor(ks)
        m = ev.n_big[:, None] == kt[None, :]
        m &= (ev.n_skip == 0)[:, None]
        v = seq_mean(ev.oracle(m)[0])
        loss[name] = S.bootstrap_mean(v, n_boot=n_boot, seed=seed)
        parts.append(S.verdict(f"{name} worse than constant", crit,
                               S.paired_difference(v, const, n_boot=n_boot, seed=seed), +1))
    v = S.all_of("a constant budget beats a decreasing or increasing one with the same mean",
                 crit, parts)
    return PositionBudgetResult(kc, sched, loss, v)


@once_across_ranks  # under torchrun: rank 0 runs it, the others get its result
def approx_gaps(model, tokens: torch.Tensor, k: int, exhaustive: torch.Tensor, n_boot: int,
                seed: int, beam_width: int = 4) -> List[ApproxGap]:
    """Beam (``beam_width``) and greedy search of the paper's token oracle (exactly ``k`` big
    layers, big/small) against the exhaustive one, whose losses ``exhaustive`` (B, T-1) come
    from the pattern table of the same ``tokens`` (B, T). Run in one process: that beam ranks
    prefixes over the whole batch (``duollm.study.parallel`` refuses to shard it)."""
    import time

    from ..oracle import Exactly, search

    out = []
    for method, width in (("beam", beam_width), ("greedy", 1)):
        t0 = time.perf_counter()
        res = search(model, tokens, Exactly(k), "token", method=method, base="pattern",
                     beam_width=width)
        seconds = time.perf_counter() - t0
        loss = res.loss.double().cpu()
        if loss.shape != exhaustive.shape:
            raise ValueError(f"exhaustive: shape {tuple(exhaustive.shape)} differs from the "
                             f"search's {tuple(loss.shape)}")
        out.append(ApproxGap(
            method, width, k, S.bootstrap_mean(seq_mean(loss), n_boot=n_boot, seed=seed),
            S.paired_difference(seq_mean(loss), seq_mean(exhaustive), n_boot=n_boot,
                                seed=seed),
            float(torch.isclose(loss, exhaustive, rtol=0, atol=1e-6).double().mean()),
            seconds))
    return out


# --------------------------------------------------------------------------- difficulty


# ``duollm.difficulty.rank_overlap`` with top groups the top quartile and bottom groups the
# bottom half. Not the library's default (bottom quartile): gain = loss all small - oracle
# loss is at most the loss all small, so the lowest-loss quartile (loss near 0) cannot reach
# the top gain quartile by construction, and "some low-loss tokens gain much" would be
# untestable (at demo scale that share is 0.000 [0.000, 0.008] with quartiles).
QUANTILE, LOW = 0.75, 0.5


def difficulty(ev: PatternLosses, tokens: torch.Tensor, n_boot: int, seed: int,
               kinds: Optional[torch.Tensor] = None) -> DifficultyResult:
    """Token difficulty on the evaluation split: small-model loss vs gain (loss with every
    layer small minus the paper's oracle over all 2^L big/small patterns).

    Criterion for the paper's claim ("some high-loss tokens gain little, some low-loss tokens
    gain much": loss is not a reliable indicator of the need for compute): both shares above
    zero and the rank overlap below one (95% intervals).

    Args: tokens (B, T) the evaluation sequences (for the text figure); kinds (B, T) ground
      truth token kinds (synthetic corpus) or None.
    """
    small = ev.losses[ev.index([SMALL] * ev.L)]  # (B, T-1)
    orc = ev.oracle(ev.mask(None))[0]
    gain = small - orc

    from ..difficulty import rank_overlap

    def stat(field):
        return lambda a, b: getattr(rank_overlap(a, b, QUANTILE, low=LOW), field)

    iv = {n: S.bootstrap(stat(f), small, gain, n_boot=n_boot, seed=seed)
          for n, f in (("overlap", "top_overlap"), ("high_loss_low_gain", "high_loss_low_gain"),
                       ("low_loss_high_gain", "low_loss_high_gain"), ("spearman", "spearman"))}
    not_one = S.bootstrap(lambda a, b: 1 - rank_overlap(a, b, QUANTILE, low=LOW).top_overlap,
                          small, gain, n_boot=n_boot, seed=seed)
    crit = ("share of top-quartile-loss tokens with below-median gain > 0, share of "
            "bottom-half-loss tokens in the top gain quartile > 0, and 1 - top-quartile "
            "overlap > 0 (duollm.difficulty.rank_overlap, low=0.5)")
    v = S.all_of("loss ranks tokens differently from the gain of extra compute", crit, [
        S.verdict("high loss, low gain", crit, iv["high_loss_low_gain"], +1),
        S.verdict("low loss, high gain", crit, iv["low_loss_high_gain"], +1),
        S.verdict("overlap below one", crit, not_one, +1)])
    by_kind = None
    if kinds is not None:
        from .synthetic import KIND_NAMES

        kt = kinds[:, 1:]  # position t predicts token t+1: its label is kinds[t+1]
        by_kind = {}
        for kind, name in KIND_NAMES.items():
            m = kt == kind
            if bool(m.any()):
                by_kind[name] = {"n": int(m.sum()), "loss_small": float(small[m].mean()),
                                 "gain": float(gain[m].mean())}
    return DifficultyResult(
        n_tokens=int(small.numel()), spearman=iv["spearman"], overlap=iv["overlap"],
        high_loss_low_gain=iv["high_loss_low_gain"],
        low_loss_high_gain=iv["low_loss_high_gain"], verdict=v,
        snippet_tokens=tokens[0].tolist(), snippet_loss_small=small[0].tolist(),
        snippet_gain=gain[0].tolist(),
        points_loss_small=[round(x, 4) for x in small.flatten().tolist()],
        points_gain=[round(x, 4) for x in gain.flatten().tolist()], by_kind=by_kind)


# --------------------------------------------------------------------------- routers


@dataclass
class TrainedRouter:
    """A router trained on the training text; ``target_compute`` (FFN FLOPs as a fraction of
    all big) is set for routers with a skip path, whose budget is on compute, not on big."""

    name: str
    router: object
    target_big: float
    target_compute: Optional[float]
    history: List[Dict]


def router_specs(L: int, budgets: List[int], widths: Optional[Tuple[int, int]] = None
                 ) -> List[Tuple[str, Tuple[int, ...], float, Optional[float]]]:
    """(name, paths, target big fraction, target compute fraction): one big/small router per
    budget (budget on big usage, as in the paper) and one with a skip path whose budget is on
    compute: half of all-big's FFN FLOPs.

    With ``widths`` (d_small, d_big), also the paper's big-or-skip router at 50% skip
    (``bos-s50``, Figure 3d and one of Figure 7's mixes) and Figure 7's other two mixes:
    70% big / 30% small (``mix-b70s30``) and 50/30/20 big/small/skip (``mix-b50s30k20``, as its
    compute budget 0.5 + 0.3 d_small/d_big: one threshold cannot fix two shares)."""
    specs = [(f"k{k}", (SMALL, BIG), k / L, None) for k in budgets]
    specs.append(("skip-c50", (SKIP, SMALL, BIG), 0.5, 0.5))
    if widths is not None:
        d_small, d_big = widths
        specs += [("bos-s50", (SKIP, BIG), 0.5, None),
                  ("mix-b70s30", (SMALL, BIG), 0.7, None),
                  ("mix-b50s30k20", (SKIP, SMALL, BIG), 0.5,
                   0.5 + 0.3 * d_small / d_big)]
    return specs


@once_across_ranks  # under torchrun: rank 0 runs it, the others get its result
def train_routers(model, data, sizes: StudySizes, seq_len: int, steps: int, seed: int,
                  budgets: List[int], progress: bool, log=print) -> List[TrainedRouter]:
    """Stage 3: routers trained with the LM loss and the budget loss (the paper's router) on
    the training text, the model frozen."""
    from ..routers import train_router
    from ..stack import as_stack

    out = []
    st = as_stack(model)
    for name, paths, target, compute in router_specs(st.n_layers, budgets,
                                                     (st.d_small, st.d_big)):
        log(f"router {name}: {steps} steps, paths {paths}, target "
            + (f"compute {compute:.2f}" if compute is not None else f"big {target:.2f}"))
        torch.manual_seed(seed)
        r, hist = train_router(model, data, target_big=target, steps=steps,
                               batch_size=sizes.router_batch, seq_len=seq_len, paths=paths,
                               seed=seed, progress=progress, target_compute=compute)
        out.append(TrainedRouter(name, r, target, compute, hist))
    return out


def evaluate_router(model, tr: TrainedRouter, sel_tokens: torch.Tensor,
                    ev_tokens: torch.Tensor, n_boot: int, seed: int
                    ) -> Tuple[RouterResult, torch.Tensor, torch.Tensor]:
    """Score a router on a holdout: its threshold is calibrated to its budget (big usage, or
    compute for a skip router) on the selection split; the loss is measured on the
    evaluation split.

    Returns (result, per-sequence losses (n_eval,), routes (n_eval, T-1, L))."""
    from ..routers import calibrate, route_and_loss

    router = tr.router
    if tr.target_compute is not None:
        calibrate(model, router, sel_tokens, target_compute=tr.target_compute)
    else:
        calibrate(model, router, sel_tokens, tr.target_big)
    threshold = float(router.threshold)
    loss, routes = route_and_loss(model, router, ev_tokens)
    routes = routes.permute(1, 2, 0).cpu()  # (B, T-1, L)
    per_seq = seq_mean(loss.cpu())
    h = tr.history
    res = RouterResult(
        name=tr.name, paths=",".join({SKIP: "skip", SMALL: "small", BIG: "big"}[p]
                                     for p in router.paths),
        target_big=tr.target_big, target_compute=tr.target_compute, threshold=threshold,
        loss=S.bootstrap_mean(per_seq, n_boot=n_boot, seed=seed),
        realised_big=float((routes == BIG).double().mean()),
        realised_small=float((routes == SMALL).double().mean()),
        realised_skip=float((routes == SKIP).double().mean()),
        big_by_layer=per_layer(routes, BIG).mean(0).tolist(),
        skip_by_layer=per_layer(routes, SKIP).mean(0).tolist(),
        big_by_position=(routes == BIG).double().mean((0, 2)).tolist(),
        objective_first=sum(x["objective"] for x in h[:5]) / max(1, min(5, len(h))),
        objective_last=sum(x["objective"] for x in h[-5:]) / max(1, min(5, len(h))))
    return res, per_seq, routes


# --------------------------------------------------------------------------- synthetic


def synthetic_check(sizes: StudySizes, seed: int, device: str, progress: bool,
                    preset: str = "tiny", task: str = "memory") -> SyntheticCheck:
    """The difficulty criterion on a corpus whose answer is known, on its evaluation split.

    ``task="memory"`` (default): the key -> value table of
    ``duollm.study.synthetic.make_memory_data`` (``sizes.synth_keys`` entries), whose value
    letters only a model that stored the table can predict: the answer lives in the FFN.
    ``task="copy"``: the older copy/running-sum corpus (copying is attention's job, so it
    cannot show FFN difficulty; kept for comparison).

    Precondition, measured first: the model learned the known tokens (their loss with every
    layer big lies below half a uniform guess over letters, log(26)/2 nats, 95% interval);
    otherwise the check is "not testable" and says what it measured. Parts: the known tokens
    gain more than noise (gain = loss all small minus the oracle over the 2^L big/small
    patterns), and the study's 5/6 criterion (Spearman of small-model loss and gain below
    ``verdicts.SPEARMAN_MAX``) finds that loss does not rank the gain, as it must here: noise
    and memory tokens both have a high small-model loss, only memory tokens gain."""
    from .holdouts import windows
    from .synthetic import COMPUTE, COPY, MEMORY, NOISE, make_memory_data, make_synthetic_data
    from .verdicts import SPEARMAN_MAX, fmt, hboot, part_outcome

    if task == "memory":
        data, labels = make_memory_data(n_tokens=sizes.n_tokens_synth, n_keys=sizes.synth_keys,
                                        seed=seed, return_labels=True)
        known_kinds, known = (MEMORY,), "memory"
    elif task == "copy":
        data, labels = make_synthetic_data(n_tokens=sizes.n_tokens_synth, seed=seed,
                                           return_labels=True)
        known_kinds, known = (COPY, COMPUTE), "copy/compute"
    else:
        raise ValueError(f"task: expected 'memory' or 'copy', got {task!r}")
    res = train_model(preset, data, sizes, sizes.synth_steps, seed, device, progress,
                      probs=(0.0, 0.5, 0.5))
    model = res.model.eval()
    T = min(sizes.oracle_len, model.config.max_seq_len - 1) + 1
    toks = windows(data.val, sizes.n_sequences, T)
    kinds = windows(labels.val_kind, sizes.n_sequences, T)
    _, ev_i = S.split_indices(sizes.n_sequences, seed)
    toks, kinds = toks[ev_i], kinds[ev_i]  # every number below: the evaluation split
    tab = PatternLosses(*_walk(model, toks.to(device)))
    d = difficulty(tab, toks, sizes.n_boot, seed, kinds=kinds)
    small = tab.losses[tab.index([SMALL] * tab.L)]
    big = tab.losses[tab.index([BIG] * tab.L)]
    gain = small - tab.oracle(tab.mask(None))[0]
    kt = kinds[:, 1:]
    is_known = torch.zeros_like(kt, dtype=torch.bool)
    for k in known_kinds:
        is_known |= kt == k
    known_m, noise_m = is_known.double(), (kt == NOISE).double()

    def masked_diff(x, a, b):
        return float((x * a).sum() / a.sum() - (x * b).sum() / b.sum())

    nb = sizes.n_boot
    d_loss, _ = hboot(masked_diff, [(small, noise_m, known_m)], nb, seed)
    d_gain, p_gain = hboot(masked_diff, [(gain, known_m, noise_m)], nb, seed)
    pre, _ = hboot(lambda x, a: float((x * a).sum() / a.sum()), [(big, known_m)], nb, seed)
    from ..difficulty import rank_overlap

    rho, p_rho = hboot(lambda a, b: rank_overlap(a, b, QUANTILE, low=LOW).spearman
                       - SPEARMAN_MAX, [(small, gain)], nb, seed)
    parts = [(f"{known} minus noise gain", d_gain, p_gain),
             (f"Spearman(small-model loss, gain) minus {SPEARMAN_MAX} (< 0)",
              S.Interval(-rho.estimate, -rho.high, -rho.low, rho.n, rho.level), p_rho)]
    crit = (f"precondition: {known} tokens' all-big loss below log(26)/2; then {known} minus "
            f"noise gain > 0 and Spearman(small-model loss, gain) < {SPEARMAN_MAX}")
    claim = "the difficulty criterion finds the known structure"
    limit = math.log(26) / 2
    reason = ""
    if not pre.high < limit:
        outcome = "not testable"
        reason = (f"precondition failed: the model did not learn the {known} tokens (all-big "
                  f"loss {fmt(pre, zero=False)} nats, not below log(26)/2 = {limit:.3f}; a "
                  f"uniform guess is {math.log(26):.3f})")
    else:
        outs = [part_outcome(iv, 1, 0.0) for _, iv, _ in parts]
        outcome = (S.FAILS if S.FAILS in outs else
                   S.HOLDS if all(o == S.HOLDS for o in outs) else S.UNRESOLVED)
    v = S.Verdict(claim, crit, d_gain, outcome)
    return SyntheticCheck(preset, sizes.synth_steps, d, d_loss, d_gain, v, task=task,
                          precondition=pre, parts=parts,
                          setting=f"{task} corpus ({data.name}), `{preset}` model, "
                                  f"{sizes.synth_steps} steps",
                          reason=reason, n_sequences=int(ev_i.numel()))


def _walk(model, tokens):
    from .parallel import sharded_pattern_losses

    tab = sharded_pattern_losses(model, tokens, "sequence", skip=False)
    return tab.patterns, tab.losses
