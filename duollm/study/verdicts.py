"""The study's verdict family: every claim of the paper the study checks, each with the paper's
setting beside ours, its precondition, its parts (each with its own interval), the null
control, a Holm correction across the family, and one ``verdicts.json`` entry.

A verdict is computed from ``VerdictInputs``: one holdout's pattern table split into the
selection and evaluation sequences, and the trained routers' per-sequence losses and routes on
the evaluation sequences. Several seeds give several ``VerdictInputs`` per holdout; every
interval is then a hierarchical bootstrap (seeds resampled, then sequences within each seed).
With ``--null-control`` the same inputs are measured on the null model
(``duollm.study.null.null_model``: big == small exactly) over the same sequences, and every part
also gets the null's estimate and the interval of real minus null, paired over sequences.
Every claim that needs big != small and reads the pattern table is also judged against the
*relabelled table* (always, no extra model runs): ``RELABEL_P`` copies of each seed's table
whose big/small labels are permuted among the patterns that skip the same layers
(``relabelled_inputs``), so that selection among candidates works exactly as on the real
table while "big" carries no systematic effect; its estimate and the interval of real minus
it (``relabel_boot``: paired over sequences, relabellings resampled) are reported per part.

Outcomes: ``holds`` / ``does not hold`` when the 95% interval of every part excludes zero on
the claimed / other side *and* the Holm-corrected p across the family is below 0.05; ``not
resolved`` otherwise; ``not distinguishable from selection`` when a claim that needs big !=
small holds on the real model but the interval of real minus the relabelled table (or, with
``--null-control``, minus the null model) does not exclude zero on the claimed side, for some
part; ``not testable`` when the claim's precondition fails (the reason names the
measured numbers). The family is every verdict of one study run (both holdouts, and the
synthetic check when it runs).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..reference import BIG, SKIP, SMALL
from . import stats as S

NOT_TESTABLE = "not testable"
SELECTION = "not distinguishable from selection"
ALPHA = 0.05

# Fixed in code before any data is seen (issue 16): the equivalence margin of Figure 2d's
# two-sided test (late-half minus early-half skip rate of the big-or-skip oracle), the
# largest Spearman correlation between small-model loss and gain that still counts as "loss is
# not a reliable indicator of gain", and the smallest all-small minus all-big margin a holdout
# needs before a claim that rests on big != small is judged.
SKIP_EQUIV_MARGIN = 0.10
SPEARMAN_MAX = 0.5
BIG_SMALL_MARGIN = 0.0  # the interval of all small - all big must lie above this (nats)
# The relabelled-table control (fixed in code): relabellings per seed, and the base of the
# seed of their generator (combined with the study's and the model's seeds).
RELABEL_P = 20
RELABEL_SEED = 16_001
# Resamples of the relabelled control's bootstrap for a part whose statistic is not linear in
# its arrays (5/6's Spearman: one ranking per relabelling and resample, the control's main
# cost); linear parts use the study's n_boot (docs/study.md, "The relabelled table").
RELABEL_NONLINEAR_BOOT = 250


# --------------------------------------------------------------------------- inputs


@dataclass
class VerdictInputs:
    """What the verdicts of one holdout read, for one model (real or null) and one seed.

    ``sel``/``ev``: the pattern table (``stages.PatternLosses``) on the selection and
    evaluation sequences. ``router_loss[name]`` (n_ev,) per-sequence loss and
    ``router_routes[name]`` (n_ev, T-1, L) routes of each trained router on the evaluation
    sequences. ``widths``: (d_small, d_big)."""

    holdout: str
    sel: object
    ev: object
    n_random: int
    seed: int
    budgets: List[int]
    widths: Tuple[int, int]
    router_loss: Dict[str, torch.Tensor] = field(default_factory=dict)
    router_routes: Dict[str, torch.Tensor] = field(default_factory=dict)
    relabelled: bool = False  # a relabelled copy (``relabelled_inputs``), not the model's table


class NotTestable(Exception):
    """A verdict's precondition failed; the message is the measured reason."""


@dataclass
class Part:
    """One part of a verdict: ``stat(*arrays)`` over per-sequence arrays (first axis the
    evaluation sequences). ``expect`` +1 / -1: the claim says the statistic is above / below
    zero; ``margin`` > 0: a two-sided equivalence claim (the interval inside (-margin,
    margin)); ``linear``: ``stat`` is affine in its arrays (a mean over sequences of a linear
    function of them), so a weighted mean of its values over several tables equals its value
    on the weighted mean of their arrays (``relabel_boot``'s fast path)."""

    name: str
    stat: Callable[..., float]
    arrays: Tuple[torch.Tensor, ...]
    expect: int = 1
    margin: float = 0.0
    linear: bool = False


@dataclass(frozen=True)
class Setting:
    paper: str
    ours: str
    why: str = ""


@dataclass
class Spec:
    """A verdict of the family: ``parts(inp)`` returns its parts (or raises ``NotTestable``);
    ``needs_big``: the claim rests on big != small (judged against the null); ``relabel``:
    such a claim reads the pattern table, so the relabelled-table control applies (False for
    a claim about the routers alone, which relabelling leaves as they are)."""

    key: str
    figure: str
    claim: str
    criterion: str
    setting: Setting
    needs_big: bool
    parts: Callable[[VerdictInputs], List[Part]]
    relabel: bool = True

    @property
    def relabels(self) -> bool:
        """Judged against the relabelled table."""
        return self.needs_big and self.relabel


@dataclass
class PartResult:
    name: str
    expect: int
    margin: float
    interval: S.Interval
    p: float
    outcome: str
    null: Optional[S.Interval] = None
    vs_null: Optional[S.Interval] = None
    p_vs_null: Optional[float] = None
    relabel_null: Optional[S.Interval] = None
    vs_relabel_null: Optional[S.Interval] = None
    p_vs_relabel_null: Optional[float] = None


@dataclass
class VerdictRecord:
    """One entry of ``verdicts.json``."""

    key: str
    figure: str
    holdout: str
    claim: str
    criterion: str
    setting_ours: str
    setting_paper: str
    setting_why: str
    needs_big: bool
    n_seeds: int
    n_sequences: int
    parts: List[PartResult]
    p: Optional[float]
    p_holm: Optional[float]
    verdict: str
    reason: str = ""
    precondition: str = ""  # the measured precondition, when the claim has one and it passed
    n_relabel: int = 0  # relabellings per seed of the relabelled-table control (0: not run)

    @property
    def estimate(self) -> Optional[S.Interval]:
        return self.parts[0].interval if self.parts else None


# --------------------------------------------------------------------------- statistics


def _samples(stat, groups, n_boot: int, seed: int):
    """(estimate, bootstrap values, number of sequences) of ``hboot``."""
    if not groups:
        raise ValueError("groups: expected at least one seed")
    gs = [tuple(torch.as_tensor(a, dtype=torch.float64) for a in g) for g in groups]
    for g in gs:
        n = g[0].shape[0]
        if n < 1 or any(a.shape[0] != n for a in g):
            raise ValueError("groups: every array of a seed needs the same number of sequences")
    est = sum(float(stat(*g)) for g in gs) / len(gs)
    gen = torch.Generator().manual_seed(seed)
    n_s = len(gs)
    boots = []
    for _ in range(n_boot):
        seeds = torch.randint(0, n_s, (n_s,), generator=gen).tolist() if n_s > 1 else [0]
        vals = []
        for s in seeds:
            g = gs[s]
            idx = torch.randint(0, g[0].shape[0], (g[0].shape[0],), generator=gen)
            vals.append(float(stat(*(a[idx] for a in g))))
        boots.append(sum(vals) / len(vals))
    b = torch.tensor(boots, dtype=torch.float64)
    return est, b[~torch.isnan(b)], sum(g[0].shape[0] for g in gs)


def hboot(stat: Callable[..., float], groups: Sequence[Sequence[torch.Tensor]],
          n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> Tuple[S.Interval, float]:
    """Hierarchical percentile bootstrap of the mean over seeds of ``stat(*arrays)``.

    ``groups``: one tuple of arrays per seed (each array's first axis the sequences of that
    seed, resampled together). Each resample draws the seeds with replacement (when there is
    more than one), then each drawn seed's sequences with replacement. Returns the interval
    and the two-sided bootstrap p-value of "the statistic is zero" (below 0.05 exactly when
    the 95% interval excludes zero, for a normal bootstrap distribution)."""
    est, b, n0 = _samples(stat, groups, n_boot, seed)
    if b.numel() == 0 or math.isnan(est):
        return S.Interval(est, math.nan, math.nan, n0, level), math.nan
    a = (1 - level) / 2
    lo, hi = torch.quantile(b, torch.tensor([a, 1 - a], dtype=torch.float64)).tolist()
    return S.Interval(est, lo, hi, n0, level), _normal_p(est, b)


def _normal_p(est: float, b: torch.Tensor, shift: float = 0.0) -> float:
    """Two-sided p of "the statistic is ``shift``" from the bootstrap standard error (normal
    approximation): unlike counting resamples beyond zero it has no floor at 1/n_boot, which
    Holm across a family of twenty needs."""
    sd = float(b.std()) if b.numel() > 1 else math.nan
    d = abs(est - shift)
    if math.isnan(sd) or sd == 0:
        return 1.0 if d == 0 or math.isnan(sd) else 0.0
    return math.erfc(d / sd / math.sqrt(2))


def relabel_boot(stat: Callable[..., float], real: Sequence[Sequence[torch.Tensor]],
                 null: Sequence[Sequence[Sequence[torch.Tensor]]], n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95, linear: bool = False
                 ) -> Tuple[S.Interval, S.Interval, float]:
    """The relabelled null's interval, and the interval and p of real minus it, from one
    nested bootstrap.

    ``real``: one tuple of arrays per seed (first axis that seed's sequences); ``null``: per
    seed, one such tuple per relabelling of that seed's table (the same sequences). The
    null of a seed is the mean of ``stat`` over its relabellings. Each resample draws the
    seeds with replacement (when there is more than one), then for each drawn seed its
    sequences with replacement, the *same* sequences for the real table and all its
    relabellings (they are one set of sequences: paired), and its relabellings with
    replacement (their mean is a Monte Carlo estimate of the permutation mean, and this
    carries its error). ``linear``: ``stat`` is affine in its arrays (``Part.linear``), so
    the weighted mean of the relabellings' values is computed as ``stat`` of the weighted
    mean of their arrays, one call instead of one per relabelling.

    Returns (null interval, real-minus-null interval, two-sided p of "real minus null is
    zero", as ``hboot``'s)."""
    if not real or len(real) != len(null) or any(not g for g in null):
        raise ValueError("null: expected at least one relabelling for every seed of real")
    rs = [tuple(torch.as_tensor(a, dtype=torch.float64) for a in g) for g in real]
    ns = [[tuple(torch.as_tensor(a, dtype=torch.float64) for a in t) for t in g] for g in null]
    for r, g in zip(rs, ns):
        n = r[0].shape[0]
        if n < 1 or any(a.shape[0] != n for t in [r] + g for a in t) or \
                any(len(t) != len(r) for t in g):
            raise ValueError("null: every table of a seed needs the same arrays and sequences")
    stacked = [tuple(torch.stack([t[a] for t in g]) for a in range(len(g[0]))) for g in ns]
    real_v = [float(stat(*r)) for r in rs]
    null_v = [sum(float(stat(*t)) for t in g) / len(g) for g in ns]
    null_est = sum(null_v) / len(null_v)
    diff_est = sum(a - b for a, b in zip(real_v, null_v)) / len(rs)
    gen = torch.Generator().manual_seed(seed)
    n_s = len(rs)
    nb, db = [], []
    for _ in range(n_boot):
        seeds = torch.randint(0, n_s, (n_s,), generator=gen).tolist() if n_s > 1 else [0]
        nv, dv = [], []
        for si in seeds:
            r, g, st = rs[si], ns[si], stacked[si]
            n, P = r[0].shape[0], len(g)
            idx = torch.randint(0, n, (n,), generator=gen)
            w = torch.bincount(torch.randint(0, P, (P,), generator=gen),
                               minlength=P).double() / P
            if linear:
                x = float(stat(*(torch.tensordot(w, a, 1)[idx] for a in st)))
            else:
                x = sum(float(wj) * float(stat(*(a[idx] for a in g[j])))
                        for j, wj in enumerate(w.tolist()) if wj > 0)
            nv.append(x)
            dv.append(float(stat(*(a[idx] for a in r))) - x)
        nb.append(sum(nv) / len(nv))
        db.append(sum(dv) / len(dv))
    a = (1 - level) / 2
    q = torch.tensor([a, 1 - a], dtype=torch.float64)
    n_seq = sum(r[0].shape[0] for r in rs)

    def interval(est, boots):
        b = torch.tensor(boots, dtype=torch.float64)
        b = b[~torch.isnan(b)]
        if b.numel() == 0 or math.isnan(est):
            return S.Interval(est, math.nan, math.nan, n_seq, level), math.nan
        lo, hi = torch.quantile(b, q).tolist()
        return S.Interval(est, lo, hi, n_seq, level), _normal_p(est, b)

    null_iv, _ = interval(null_est, nb)
    diff_iv, p = interval(diff_est, db)
    return null_iv, diff_iv, p


def equivalence_p(stat, groups, margin: float, n_boot: int, seed: int) -> float:
    """Bootstrap p of "the statistic lies outside (-margin, margin)": two one-sided tests,
    each doubled like ``hboot``'s p so that p < 0.05 matches the 95% interval inside the
    margin."""
    est, b, _ = _samples(stat, groups, n_boot, seed)
    if b.numel() < 2 or math.isnan(est):
        return math.nan

    def one_sided(shift, above):  # p of "at least shift" (above) or "at most shift"
        p2 = _normal_p(est, b, shift)
        inside = est < shift if above else est > shift
        return p2 / 2 if inside else 1 - p2 / 2

    return min(1.0, 2 * max(one_sided(margin, True), one_sided(-margin, False)))


def holm(pvalues: Sequence[float]) -> List[float]:
    """Holm's step-down adjusted p-values, in the input order (NaN stays NaN, and does not
    count towards the family size)."""
    ps = [float(p) for p in pvalues]
    idx = sorted((i for i, p in enumerate(ps) if not math.isnan(p)), key=lambda i: ps[i])
    m = len(idx)
    out = [math.nan] * len(ps)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def part_outcome(iv: S.Interval, expect: int, margin: float) -> str:
    if math.isnan(iv.low):
        return S.UNRESOLVED
    if margin > 0:
        if -margin < iv.low and iv.high < margin:
            return S.HOLDS
        if iv.low >= margin or iv.high <= -margin:
            return S.FAILS
        return S.UNRESOLVED
    s = iv.sign()
    return S.UNRESOLVED if s == 0 else (S.HOLDS if s == expect else S.FAILS)


def fmt(iv: Optional[S.Interval], nd: int = 3, zero: bool = True) -> str:
    """``estimate [low, high]`` with enough decimals that no nonzero bound rounds to zero (at
    least two significant digits of the smallest nonzero number), and "excludes 0" spelled
    out when the interval does."""
    if iv is None:
        return "-"
    xs = [x for x in (iv.estimate, iv.low, iv.high) if not math.isnan(x) and x != 0]
    d = nd
    if xs:
        d = max(nd, min(10, max(1 - math.floor(math.log10(abs(x))) for x in xs)))
    if math.isnan(iv.low):
        return "n/a" if math.isnan(iv.estimate) else f"{iv.estimate:.{d}f}"
    tag = " (excludes 0)" if zero and iv.sign() != 0 else ""
    return f"{iv.estimate:.{d}f} [{iv.low:.{d}f}, {iv.high:.{d}f}]{tag}"


# --------------------------------------------------------------------------- measures


def seq_mean(x: torch.Tensor) -> torch.Tensor:
    return x.double().reshape(x.shape[0], -1).mean(1)


def _mean(v):
    return float(v.mean())


def oracle_loss(ev, mask) -> torch.Tensor:
    """(B,) per-sequence loss of the paper's oracle over ``mask``'s patterns."""
    return seq_mean(ev.oracle(mask)[0])


def oracle_usage(ev, mask: torch.Tensor, route: int) -> torch.Tensor:
    """(B, L) per-sequence, per-layer share of tokens the oracle over ``mask`` sends to
    ``route``, with ties split evenly among the tied patterns (in the null model every
    big/small pattern ties; an argmin would turn the tie-break order into a usage profile)."""
    if hasattr(ev, "oracle_usage"):  # the per-rank table (duollm.study.sharded_table)
        return ev.oracle_usage(mask, route)
    m = mask[:, None, None] if mask.dim() == 1 else mask[:, None, :]
    tab = torch.where(m, ev.losses, torch.full((), math.inf, dtype=torch.float64))
    best = tab.min(0).values
    tied = (tab == best[None]).double()  # (n, B, T-1)
    w = tied / tied.sum(0, keepdim=True)
    uses = (ev.patterns == route).double()  # (n, L)
    per_tok = torch.einsum("nbt,nl->btl", w, uses)  # (B, T-1, L)
    return per_tok.mean(1)


def late_minus_early(by_layer: torch.Tensor) -> torch.Tensor:
    """(B, L) -> (B,) later half of the layers minus earlier half (middle layer of an odd L
    in neither)."""
    L = by_layer.shape[1]
    h = L // 2
    return by_layer[:, L - h:].mean(1) - by_layer[:, :h].mean(1)


def distinct_random_patterns(L: int, k: int, n: int, seed: int) -> Tuple[torch.Tensor, bool]:
    """``n`` distinct patterns with exactly ``k`` big layers (the rest small), drawn without
    replacement; all C(L, k) of them when there are fewer (second value True)."""
    import itertools

    total = math.comb(L, k)
    if total <= n:
        pats = [[BIG if i in c else SMALL for i in range(L)]
                for c in itertools.combinations(range(L), k)]
        return torch.tensor(pats, dtype=torch.int64), True
    gen = torch.Generator().manual_seed(seed)
    seen, out = set(), []
    while len(out) < n:
        c = tuple(sorted(torch.randperm(L, generator=gen)[:k].tolist()))
        if c not in seen:
            seen.add(c)
            out.append([BIG if i in c else SMALL for i in range(L)])
    return torch.tensor(out, dtype=torch.int64), False


def best_random(inp: VerdictInputs, k: int) -> torch.Tensor:
    """(n_ev,) evaluation losses of the best of ``n_random`` distinct random patterns with k
    big layers, chosen on the selection split."""
    pats, _ = distinct_random_patterns(inp.ev.L, k, inp.n_random, inp.seed + k)
    ridx = torch.tensor([inp.ev.index(p.tolist()) for p in pats])
    _, vals = S.select_on(inp.sel.losses[ridx].mean((1, 2)), inp.ev.losses[ridx].mean(2))
    return vals


def all_route(ev, route: int) -> torch.Tensor:
    return seq_mean(ev.losses[ev.index([route] * ev.L)])


def schedules_l3(L: int, n_pos: int) -> Tuple[int, Dict[str, List[int]]]:
    """Figure 4c's budgets: a constant round(L/3) big layers against per-position budgets
    falling (rising) linearly from round(L/3) + round(L/6) to round(L/3) - round(L/6) (the
    paper: 6 -> 2 of 12 against a constant 4). Both have the constant's mean (the schedule
    is symmetric about it)."""
    kc = max(1, round(L / 3))
    d = max(1, round(L / 6))
    hi, lo = min(L, kc + d), max(0, kc - d)
    x = torch.linspace(hi, lo, n_pos, dtype=torch.float64)
    dec = torch.floor(x + 0.5).long().tolist()
    # floor(x + 0.5) rounds the symmetric .5 points up in both halves; pair them so the mean
    # is exactly the constant's
    mean_gap = sum(dec) - kc * n_pos
    j = 0
    while mean_gap > 0 and j < n_pos:
        if dec[j] - x[j].item() == 0.5:
            dec[j] -= 1
            mean_gap -= 1
        j += 1
    return kc, {"decreasing": dec, "increasing": dec[::-1]}


def _precondition_big(inp: VerdictInputs) -> S.Interval:
    """All small minus all big on the evaluation split; raises ``NotTestable`` unless its
    interval lies above ``BIG_SMALL_MARGIN``."""
    d = all_route(inp.ev, SMALL) - all_route(inp.ev, BIG)
    iv, _ = hboot(_mean, [(d,)], n_boot=400, seed=inp.seed)
    if not iv.low > BIG_SMALL_MARGIN:
        raise NotTestable(f"all small minus all big is {fmt(iv, zero=False)} nats on the "
                          f"evaluation split: the big FFN is not measurably better than the "
                          f"small one")
    return iv


def _spearman(a, b):
    """``duollm.difficulty.rank_overlap(a, b).spearman`` (the same ranks, ties by position,
    and the same arithmetic) without the overlap counts it also makes: the relabelled
    control's bootstrap calls it some 10^4 times per holdout."""
    x, y = a.reshape(-1).double(), b.reshape(-1).double()
    if x.shape != y.shape or x.numel() < 2:
        raise ValueError(f"spearman: expected two equal sets of >= 2 tokens, got {x.numel()} "
                         f"and {y.numel()}")

    def ranks(v):
        r = torch.empty(v.numel(), dtype=torch.int64)
        r[v.argsort(stable=True)] = torch.arange(v.numel())
        return r.double()

    rl, rg = ranks(x), ranks(y)
    return float(((rl - rl.mean()) * (rg - rg.mean())).sum()
                 / ((rl - rl.mean()).norm() * (rg - rg.mean()).norm()))


# --------------------------------------------------------------------------- the relabelled table


def skip_classes(patterns: torch.Tensor) -> List[torch.Tensor]:
    """The row indices of ``patterns`` (n, L) grouped by their set of skipped layers (the
    patterns with no skip are one class), each class in row order, classes in order of first
    row."""
    if not isinstance(patterns, torch.Tensor) or patterns.dim() != 2:
        raise ValueError("patterns: expected an (n, L) tensor")
    keys: Dict[Tuple[bool, ...], List[int]] = {}
    for i, row in enumerate((patterns == SKIP).tolist()):
        keys.setdefault(tuple(row), []).append(i)
    return [torch.tensor(v, dtype=torch.int64) for v in keys.values()]


def relabel_permutation(patterns: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(n,) a uniformly random permutation of the rows of ``patterns`` within each skip
    class: row ``i`` of a relabelled table is labelled ``patterns[perm[i]]``, a pattern that
    skips the same layers as ``patterns[i]``."""
    perm = torch.arange(patterns.shape[0])
    for rows in skip_classes(patterns):
        perm[rows] = rows[torch.randperm(rows.numel(), generator=gen)]
    return perm


def relabel_table(tab, perm: torch.Tensor):
    """``tab`` (``stages.PatternLosses`` or the per-rank ``ReducedPatternLosses``) with row
    ``i`` labelled ``tab.patterns[perm[i]]``; the losses are the same (not copied)."""
    if hasattr(tab, "relabelled"):  # duollm.study.sharded_table.ReducedPatternLosses
        return tab.relabelled(perm)
    # stages.PatternLosses, by its shape (stages imports this module: no import back)
    if type(tab).__name__ == "PatternLosses" and hasattr(tab, "losses"):
        perm = torch.as_tensor(perm, dtype=torch.int64)
        if perm.shape != (tab.patterns.shape[0],):
            raise ValueError(f"perm: expected ({tab.patterns.shape[0]},) row indices, got "
                             f"{tuple(perm.shape)}")
        return type(tab)(tab.patterns[perm], tab.losses)  # n_big etc. recomputed
    raise TypeError(f"tab: cannot relabel a {type(tab).__name__}")


def relabelled_inputs(inp: VerdictInputs, n: int = RELABEL_P,
                      seed: int = 0) -> List[VerdictInputs]:
    """``n`` relabelled copies of ``inp``: the permutation null of "big has no effect".

    Under that hypothesis which layers of a pattern are big and which small is exchangeable
    among the patterns that skip the same layers, so each copy permutes the pattern labels
    at random within every skip class (``relabel_permutation``), the same permutation for
    the selection and the evaluation table (a pattern chosen on the one is scored on the
    other under the same labels). The losses stay, so the spread of losses among candidates,
    and with it selection, is exactly the real table's; only the link between "big" labels
    and loss is broken. Routers are left as they are. Deterministic: the generator is seeded
    from ``RELABEL_SEED``, ``seed`` (the study's) and ``inp.seed`` (the model's)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    if not torch.equal(inp.sel.patterns, inp.ev.patterns):
        raise ValueError("inp: the selection and evaluation tables hold different patterns")
    gen = torch.Generator().manual_seed(RELABEL_SEED + 1_000_003 * int(seed) + int(inp.seed))
    out = []
    for _ in range(n):
        perm = relabel_permutation(inp.ev.patterns, gen)
        out.append(dataclasses.replace(inp, sel=relabel_table(inp.sel, perm),
                                       ev=relabel_table(inp.ev, perm), relabelled=True))
    return out


# --------------------------------------------------------------------------- the family


def _p4a(inp):
    k = max(1, inp.ev.L // 2)
    o = oracle_loss(inp.ev, inp.ev.mask(k))
    return [Part(f"best random minus oracle, k={k}", lambda r, o_: float((r - o_).mean()),
                 (best_random(inp, k), o), linear=True)]


def _p4a_router(inp):
    k = max(1, inp.ev.L // 2)
    name = _router_at(inp, k)
    o = oracle_loss(inp.ev, inp.ev.mask(k))
    rnd = best_random(inp, k)
    gap, _ = hboot(lambda r, o_: float((r - o_).mean()), [(rnd, o)], 400, inp.seed)
    if not gap.low > 0:
        raise NotTestable(f"best random minus oracle at k={k} is {fmt(gap)}: with no gap "
                          f"between them, 'nearer one than the other' has no meaning")

    def position(r, o_, n_):  # where the router sits on the oracle (0) -> random (1) scale
        return float((r.mean() - o_.mean()) / (n_.mean() - o_.mean())) - 0.5

    return [Part(f"router {name}'s position between oracle (0) and best random (1), minus "
                 f"0.5", position, (inp.router_loss[name], o, rnd))]


def _router_at(inp, k):
    ks = [b for b in inp.budgets if f"k{b}" in inp.router_loss]
    if not ks:
        raise NotTestable("no big/small router was trained")
    return f"k{min(ks, key=lambda b: abs(b - k))}"


def _p4b(inp):
    o1 = oracle_loss(inp.ev, inp.ev.mask(1))
    return [Part("all big minus the oracle with exactly 1 big layer",
                 lambda b, o: float((b - o).mean()), (all_route(inp.ev, BIG), o1),
                 linear=True)]


def _cap_ks(L):
    lo, mid, hi = max(1, round(L / 3)), max(1, L // 2), min(L - 1, max(1, round(2 * L / 3)))
    return lo, mid, hi


def _p2(inp):
    ev = inp.ev
    lo, mid, hi = _cap_ks(ev.L)
    out = []
    for k, exp, tag in ((lo, 1, "2a"), (mid, 1, "2b"), (hi, -1, "2c")):
        u = late_minus_early(oracle_usage(ev, ev.mask(k), BIG))
        out.append(Part(f"{tag}: later minus earlier half big usage, k={k}", _mean, (u,), exp,
                        linear=True))
    return out


def _p3(inp):
    out = []
    for k in sorted(inp.budgets):
        name = f"k{k}"
        if name in inp.router_routes:
            u = late_minus_early((inp.router_routes[name] == BIG).double().mean(1))
            out.append(Part(f"router {name}: later minus earlier half big usage", _mean, (u,)))
    if not out:
        raise NotTestable("no big/small router was trained")
    return out


def _p2d(inp):
    ev = inp.ev
    k = max(1, ev.L // 2)
    u = late_minus_early(oracle_usage(ev, ev.mask(k, small=False, skip=True), SKIP))
    return [Part(f"later minus earlier half skip rate, big-or-skip oracle, k={k} (within "
                 f"+-{SKIP_EQUIV_MARGIN})", _mean, (u,), 1, SKIP_EQUIV_MARGIN)]


BOS_ROUTER = "bos-s50"


def _p3d(inp):
    if BOS_ROUTER not in inp.router_routes:
        raise NotTestable(f"the big-or-skip router ({BOS_ROUTER}) was not trained")
    r = inp.router_routes[BOS_ROUTER]
    skip = float((r == SKIP).double().mean())
    if not 0.25 <= skip <= 0.75:
        raise NotTestable(f"the big-or-skip router calibrated to skip 50% skips {skip:.1%} of "
                          f"the token-layers on the evaluation split (outside 25%..75%)")
    u = late_minus_early((r == SKIP).double().mean(1))
    return [Part("later minus earlier half skip rate, big-or-skip router", _mean, (u,))]


def _p4c(inp):
    ev = inp.ev
    kc, sched = schedules_l3(ev.L, ev.losses.shape[2])
    const = oracle_loss(ev, ev.mask(kc))
    out = []
    for name, ks in sched.items():
        kt = torch.tensor(ks)
        m = (ev.n_big[:, None] == kt[None, :]) & (ev.n_skip == 0)[:, None]
        out.append(Part(f"{name} ({ks[0]}->{ks[-1]}) minus constant {kc}",
                        lambda v, c: float((v - c).mean()), (oracle_loss(ev, m), const),
                        linear=True))
    return out


def _p56(inp):
    ev = inp.ev
    small = ev.losses[ev.index([SMALL] * ev.L)]
    gain = small - ev.oracle(ev.mask(None))[0]
    # The precondition is the model's; a relabelled copy is the null it is compared with (its
    # "all small" is a random big/small pattern, which may be the best one).
    if not inp.relabelled:
        g, _ = hboot(lambda x: float(x.mean()), [(seq_mean(gain),)], 400, inp.seed)
        if not g.low > 0:
            raise NotTestable(f"the oracle's gain over all small is {fmt(g)}: with no gain "
                              f"there is nothing to rank")
    return [Part(f"Spearman(small-model loss, gain) minus {SPEARMAN_MAX}",
                 lambda a, b: _spearman(a, b) - SPEARMAN_MAX, (small, gain), -1)]


MIXES = {"mix-b70s30": "70% big / 30% small", BOS_ROUTER: "50% big / 50% skip",
         "mix-b50s30k20": "50/30/20 big/small/skip (compute budget)"}


def _p7(inp):
    out = []
    for name, label in MIXES.items():
        if name not in inp.router_routes:
            continue
        r = inp.router_routes[name]  # (B, T-1, L)
        d_small, d_big = inp.widths
        cost = torch.zeros_like(r, dtype=torch.float64)
        cost[r == BIG] = 1.0
        cost[r == SMALL] = d_small / d_big
        per_pos = cost.mean(2)  # (B, T-1) compute per token
        h = per_pos.shape[1] // 2
        early_more = per_pos[:, :h].mean(1) - per_pos[:, -h:].mean(1)
        # For the big-or-skip router a token-layer's compute is 1 - skip, so this part is
        # also its "skips toward the end" (later minus earlier skip rate): one measurement.
        both = " (for big-or-skip: = later minus earlier skip rate)" if name == BOS_ROUTER else ""
        out.append(Part(f"router {name} ({label}): compute of the earlier half of the "
                        f"positions minus the later half{both}", _mean, (early_more,)))
    if not out:
        raise NotTestable("none of Figure 7's three routers was trained")
    return out


SPECS: List[Spec] = [
    Spec("4a", "4a", "the oracle beats the best of N random patterns",
         "best-of-N distinct random patterns (chosen on the selection split) minus oracle loss "
         "at k=L/2, > 0", Setting("100 random patterns, k=6 of 12", "min(N, C(L, L/2)) "
                                  "distinct patterns, k=L/2 of L",
                                  "fewer layers: all patterns when C(L, L/2) <= N"),
         True, _p4a),
    Spec("4a-router", "4a", "the router is nearer the best random pattern than the oracle",
         "the router's position on the oracle (0) to best-random (1) scale, minus 0.5, > 0 "
         "(not the 4a difference: a ratio of gaps)",
         Setting("router vs oracle vs random at 6 of 12", "router nearest k=L/2",
                 "position on the scale instead of |r-o|-|r-n|, which collapses into 4a when "
                 "the router is worse than random"), False, _p4a_router),
    Spec("4b", "4b", "the oracle with one big layer beats all big",
         "all-big loss minus the oracle's with exactly 1 big layer, > 0",
         Setting("1 big of 12 vs all big", "1 big of L vs all big", ""), True, _p4b),
    Spec("2", "2a-c", "later layers first at a low budget (also at 6 of 12), earlier layers "
         "once the later are served",
         "oracle's later-minus-earlier half big usage: > 0 at round(L/3) and L/2, < 0 at "
         "round(2L/3) (ties split evenly)",
         Setting("k = 4, 6, 8 of 12", "k = round(L/3), L/2, round(2L/3) of L", ""),
         True, _p2),
    Spec("3", "3a-c", "the router gives later layers more big compute at every budget",
         "router's later-minus-earlier half big usage > 0 at every budget",
         Setting("routers at 4, 6, 8 of 12", "routers at the --budgets", ""), True, _p3,
         relabel=False),
    Spec("2d", "2d", "the oracle's skipping is neither an early exit nor early-layer skipping",
         f"big-or-skip oracle (k=L/2), later-minus-earlier half skip rate inside "
         f"(-{SKIP_EQUIV_MARGIN}, {SKIP_EQUIV_MARGIN}) (two-sided equivalence; margin fixed in "
         f"code before data)",
         Setting("big-or-skip oracle, 6 of 12 skipped", "big-or-skip oracle, L/2 of L skipped",
                 ""), False, _p2d),
    Spec("3d", "3d", "the big-or-skip router behaves like an early exit",
         "big-or-skip router at 50% skip: later-minus-earlier half skip rate > 0",
         Setting("big-or-skip router, 6 of 12 layers skipped",
                 "big-or-skip router (paths skip, big) calibrated to 50% skip",
                 "precondition: it realises 25%..75% skip on the evaluation split"),
         False, _p3d),
    Spec("4c", "4c", "a constant budget beats a decreasing or increasing one with the same mean",
         "oracle loss with the varying budget minus the constant one, > 0 for both",
         Setting("constant 4 of 12 vs 6 -> 2", "constant round(L/3) vs round(L/3) +- "
                 "round(L/6)", ""), True, _p4c),
    Spec("5/6", "5/6", "small-model loss is not a reliable indicator of the gain from compute",
         f"Spearman rank correlation between small-model loss and gain (all small minus "
         f"oracle) below {SPEARMAN_MAX} (fixed in code)",
         Setting("qualitative (Figures 5, 6)", f"Spearman < {SPEARMAN_MAX}, evaluation tokens",
                 "the paper states no criterion; the old one (overlap < 1) passes any "
                 "correlation below about 0.85"), True, _p56),
    Spec("7", "7", "early tokens get more compute; the skip router skips toward the end",
         "for each mix router: compute of the earlier half of the positions minus the later "
         "half > 0 (for the big-or-skip router this is also its later-minus-earlier skip rate)",
         Setting("70/30 big/small, 50/50 big/skip, 50/30/20 big/small/skip",
                 "the same three mixes (the third as its compute budget)",
                 "'toward the end' read as the end of the sequence"), False, _p7),
]


# --------------------------------------------------------------------------- judging


def judge_one(spec: Spec, real: Sequence[VerdictInputs],
              null: Optional[Sequence[VerdictInputs]] = None, n_boot: int = 1000,
              seed: int = 0, relabel: int = RELABEL_P) -> VerdictRecord:
    """One verdict of ``spec`` on a holdout: ``real`` one ``VerdictInputs`` per seed, ``null``
    the null model's for the same seeds and sequences (or None). Outcome before Holm.

    ``relabel``: relabellings per seed of the relabelled-table control (``RELABEL_P``; 0
    turns it off, which only a test of what the control changes should do). It applies to
    the specs that need big != small and read the table (``Spec.relabels``); each part then
    gets the relabelled null's estimate (the mean over relabellings) and the interval of real
    minus it (``relabel_boot``: seeds, then sequences paired between the real table and its
    relabellings, and the relabellings)."""
    if isinstance(relabel, bool) or not isinstance(relabel, int) or relabel < 0:
        raise ValueError(f"relabel: expected an int >= 0, got {relabel!r}")
    holdout = real[0].holdout
    rec = VerdictRecord(spec.key, spec.figure, holdout, spec.claim, spec.criterion,
                        spec.setting.ours, spec.setting.paper, spec.setting.why,
                        spec.needs_big, len(real), sum(int(r.ev.losses.shape[1]) for r in real),
                        [], None, None, S.UNRESOLVED)
    try:
        if spec.needs_big:
            rec.precondition = "; ".join(
                f"all small minus all big {fmt(_precondition_big(r), zero=False)}"
                for r in real)
        parts = [spec.parts(r) for r in real]
    except NotTestable as e:
        rec.verdict, rec.reason = NOT_TESTABLE, str(e)
        return rec
    nparts = None
    if null is not None:
        try:
            nparts = [spec.parts(r) for r in null]
        except NotTestable as e:
            rec.reason = f"null model: {e}"
    rparts, rel_error = None, ""  # rparts: one list of parts per (seed, relabelling)
    if relabel and spec.relabels:
        try:
            rparts = [[spec.parts(ri) for ri in relabelled_inputs(r, relabel, seed)]
                      for r in real]
            rec.n_relabel = relabel
        except NotTestable as e:  # no spec of SPECS does this; a claim then is not judged
            rel_error = f"relabelled table: {e}"
    ps = []
    for j, p0 in enumerate(parts[0]):
        groups = [tuple(pp[j].arrays) for pp in parts]
        iv, p = hboot(p0.stat, groups, n_boot, seed)
        if p0.margin > 0:
            p = equivalence_p(p0.stat, groups, p0.margin, n_boot, seed)
        pr = PartResult(p0.name, p0.expect, p0.margin, iv, p, part_outcome(iv, p0.expect,
                                                                            p0.margin))
        if nparts is not None:
            ngroups = [tuple(pp[j].arrays) for pp in nparts]
            pr.null, _ = hboot(p0.stat, ngroups, n_boot, seed)
            pr.vs_null, pr.p_vs_null = hboot(_diff(p0.stat, len(groups[0])),
                                             [g + n for g, n in zip(groups, ngroups)],
                                             n_boot, seed)
        if rparts is not None:
            pr.relabel_null, pr.vs_relabel_null, pr.p_vs_relabel_null = relabel_boot(
                p0.stat, groups, [[tuple(rp[j].arrays) for rp in rel] for rel in rparts],
                n_boot if p0.linear else min(n_boot, RELABEL_NONLINEAR_BOOT), seed,
                linear=p0.linear)
        rec.parts.append(pr)
        ps.append(pr)
    outs = [p.outcome for p in ps]
    if S.FAILS in outs:
        rec.verdict = S.FAILS
        rec.p = min(p.p for p in ps if p.outcome == S.FAILS)
    elif all(o == S.HOLDS for o in outs):
        rec.verdict = S.HOLDS
        rec.p = max(p.p for p in ps)
        controls = []  # (what, interval of real minus it, its p) per part
        if spec.needs_big and nparts is not None:
            controls.append(("null", "vs_null", "p_vs_null"))
        if rparts is not None:
            controls.append(("relabelled null", "vs_relabel_null", "p_vs_relabel_null"))
        sel = []
        for what, iv_name, p_name in controls:
            rec.p = max([rec.p] + [getattr(p, p_name) for p in ps
                                   if getattr(p, p_name) is not None])
            sel += [f"real minus {what} ({p.name}) {fmt(getattr(p, iv_name))}" for p in ps
                    if getattr(p, iv_name) is None or getattr(p, iv_name).sign() != p.expect]
        why = ""
        if sel:
            rec.verdict = SELECTION
            why = "; ".join(sel) + ": does not exclude zero on the claimed side"
        elif rel_error:  # it holds on the real model but could not be judged against selection
            rec.verdict = S.UNRESOLVED
            why = f"{rel_error}; not judged against selection"
        if why:  # after what was already said (the null model's own precondition)
            rec.reason = f"{rec.reason}; {why}" if rec.reason else why
    else:
        rec.verdict = S.UNRESOLVED
        rec.p = max(p.p for p in ps)
    return rec


def _diff(f, m: int):
    """The paired statistic real minus null: ``f`` of the first ``m`` arrays minus ``f`` of
    the rest."""
    def diff(*a):
        return f(*a[:m]) - f(*a[m:])

    return diff


def apply_holm(records: List[VerdictRecord], alpha: float = ALPHA) -> List[VerdictRecord]:
    """Holm across the family: every record with a p gets ``p_holm``; a ``holds`` or ``does
    not hold`` whose corrected p is not below ``alpha`` becomes ``not resolved`` (the reason
    says so)."""
    adj = holm([math.nan if r.p is None else r.p for r in records])
    for r, a in zip(records, adj):
        r.p_holm = None if math.isnan(a) else a
        if r.verdict in (S.HOLDS, S.FAILS) and (r.p_holm is None or r.p_holm >= alpha):
            holm_note = (f"{r.verdict} at 95% on its own, but the Holm-corrected p "
                         f"{r.p_holm:.3g} across the family of {len(records)} is not below "
                         f"{alpha}")
            r.reason = f"{holm_note}; {r.reason}" if r.reason else holm_note
            r.verdict = S.UNRESOLVED
    return records


def judge_family(real: Dict[str, List[VerdictInputs]],
                 null: Optional[Dict[str, List[VerdictInputs]]] = None, n_boot: int = 1000,
                 seed: int = 0, specs: Sequence[Spec] = SPECS,
                 extra: Sequence[VerdictRecord] = (),
                 relabel: int = RELABEL_P) -> List[VerdictRecord]:
    """Every spec on every holdout (``real[holdout]``: one input per seed), and the ``extra``
    records (the synthetic check), Holm-corrected across all of them: the family.
    ``relabel``: relabellings per seed of the relabelled-table control (``judge_one``)."""
    recs = [judge_one(s, real[h], None if null is None else null[h], n_boot, seed, relabel)
            for h in real for s in specs]
    return apply_holm(recs + list(extra))


def synthetic_record(check) -> VerdictRecord:
    """The synthetic check (``stages.synthetic_check``'s ``SyntheticCheck``) as a record of
    the family: its parts, its precondition, its p."""
    parts = [PartResult(name, 1, 0.0, iv, p, part_outcome(iv, 1, 0.0))
             for name, iv, p in check.parts]
    rec = VerdictRecord("synthetic", "5/6", "synthetic", check.verdict.claim,
                        check.verdict.criterion, check.setting, "none (our control)",
                        "a corpus whose answer is known", True, 1, check.n_sequences, parts,
                        None, None, check.verdict.outcome, check.reason)
    if rec.verdict == S.HOLDS:
        rec.p = max(p.p for p in parts)
    elif rec.verdict == S.FAILS:
        rec.p = min(p.p for p in parts if p.outcome == S.FAILS)
    return rec


def record_dict(r: VerdictRecord) -> Dict:
    """The ``verdicts.json`` entry of a record."""
    def iv(x):
        return None if x is None else {"estimate": _num(x.estimate), "low": _num(x.low),
                                       "high": _num(x.high), "n": x.n, "level": x.level}

    return {"figure": r.figure, "key": r.key, "holdout": r.holdout, "claim": r.claim,
            "criterion": r.criterion,
            "setting": {"ours": r.setting_ours, "paper": r.setting_paper,
                        "why": r.setting_why},
            "needs_big_ne_small": r.needs_big, "n_seeds": r.n_seeds,
            "n_sequences": r.n_sequences,
            "estimate": iv(r.estimate), "interval": iv(r.estimate),
            "null_estimate": iv(r.parts[0].null) if r.parts else None,
            "vs_null": iv(r.parts[0].vs_null) if r.parts else None,
            "relabel_null": iv(r.parts[0].relabel_null) if r.parts else None,
            "vs_relabel_null": iv(r.parts[0].vs_relabel_null) if r.parts else None,
            "n_relabel": r.n_relabel,
            "parts": [{"name": p.name, "expect": p.expect, "margin": p.margin,
                       "interval": iv(p.interval), "p": _num(p.p), "outcome": p.outcome,
                       "null": iv(p.null), "vs_null": iv(p.vs_null),
                       "p_vs_null": _num(p.p_vs_null),
                       "relabel_null": iv(p.relabel_null),
                       "vs_relabel_null": iv(p.vs_relabel_null),
                       "p_vs_relabel_null": _num(p.p_vs_relabel_null)} for p in r.parts],
            "p": _num(r.p), "p_holm": _num(r.p_holm), "level": ALPHA,
            "verdict": r.verdict, "reason": r.reason, "precondition": r.precondition}


def _num(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _iv_of(d: Optional[Dict]) -> Optional[S.Interval]:
    if d is None:
        return None
    f = [math.nan if d[k] is None else d[k] for k in ("estimate", "low", "high")]
    return S.Interval(f[0], f[1], f[2], d["n"], d["level"])


def markdown_table(entries: List[Dict], null: bool, relabel: bool = True) -> List[str]:
    """The report's verdict table from ``verdicts.json`` entries: one row per part (the
    verdict, its setting and its Holm p on the part's first row). ``null``: the null model's
    columns; ``relabel``: the relabelled table's (``-`` for a claim it does not apply to, and
    for entries written before it existed)."""
    head = ("| figure, holdout | claim | setting: paper / ours (why) | part | estimate [95% CI]"
            + (" | null model | real minus null" if null else "")
            + (" | relabelled null | real minus relabelled" if relabel else "")
            + " | Holm p | verdict |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in entries:
        st = r["setting"]
        setting = f"{st['paper']} / {st['ours']}" + (f" ({st['why']})" if st["why"] else "")
        ph = "-" if r["p_holm"] is None else f"{r['p_holm']:.3g}"
        verdict = f"**{r['verdict']}**" + (f": {r['reason']}" if r["reason"] else "")
        where = f"{r['figure']}, {r['holdout']}"
        if not r["parts"]:
            out.append(f"| {where} | {r['claim']} | {setting} | - | - "
                       + ("| - | - " if null else "") + ("| - | - " if relabel else "")
                       + f"| {ph} | {verdict} |")
            continue
        for i, p in enumerate(r["parts"]):
            first = i == 0
            out.append(
                f"| {where if first else ''} | {r['claim'] if first else ''} | "
                f"{setting if first else ''} | {p['name']} | {fmt(_iv_of(p['interval']))}"
                + (f" | {fmt(_iv_of(p['null']))} | {fmt(_iv_of(p['vs_null']))}" if null else "")
                + (f" | {fmt(_iv_of(p.get('relabel_null')))} | "
                   f"{fmt(_iv_of(p.get('vs_relabel_null')))}" if relabel else "")
                + f" | {ph if first else ''} | {verdict if first else p['outcome']} |")
    return out


def summary_lines(entries: List[Dict]) -> List[str]:
    """One line per verdict (``duollm study``'s printout)."""
    out = []
    for r in entries:
        iv = _iv_of(r["parts"][0]["interval"]) if r["parts"] else None
        extra = ""
        if r["parts"] and r["parts"][0]["vs_null"] is not None:
            extra = f"; minus null {fmt(_iv_of(r['parts'][0]['vs_null']))}"
        if r["parts"] and r["parts"][0].get("vs_relabel_null") is not None:
            extra += (f"; minus relabelled null "
                      f"{fmt(_iv_of(r['parts'][0]['vs_relabel_null']))}")
        out.append(f"Fig {r['figure']:<5} {r['holdout']:<9} {r['verdict']:<14} {r['claim']}: "
                   f"{fmt(iv)}{extra}" + (f" ({r['reason']})" if r["reason"] else ""))
    return out
