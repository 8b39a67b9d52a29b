"""duollm.study.verdicts on constructed loss tables whose answer is known: the null table,
the issue's pure-noise table, planted effects, Holm, precondition failures, formatting."""
import dataclasses
import itertools
import math

import pytest
import torch

from duollm.reference import BIG, SKIP, SMALL
from duollm.study import stats as S
from duollm.study import verdicts as V
from duollm.study.stages import PatternLosses

L, B, T = 4, 24, 12
PATS = torch.tensor(list(itertools.product((SKIP, SMALL, BIG), repeat=L)), dtype=torch.int64)


def _table(big_gain, noise=0.0, seed=0, skip_cost=0.5):
    """losses (n, B, T): base + skip_cost per skipped layer - big_gain[l] per big layer l,
    plus independent per-(pattern, token) noise of scale ``noise``."""
    gen = torch.Generator().manual_seed(seed)
    base = 2.0 + 0.3 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    g = torch.as_tensor(big_gain, dtype=torch.float64)
    if g.dim() == 1:
        g = g[:, None, None].expand(L, B, T)
    eff = ((PATS == BIG).double()[:, :, None, None] * g[None]).sum(1)  # (n, B, T)
    sk = (PATS == SKIP).double().sum(1)[:, None, None] * skip_cost
    losses = base[None] + sk - eff
    if noise:
        losses = losses + noise * torch.randn(losses.shape, generator=gen, dtype=torch.float64)
    return PatternLosses(PATS, losses)


def _inputs(tab, seed=0, routes=None, n_random=100):
    sel_i, ev_i = S.split_indices(B, seed)
    inp = V.VerdictInputs("t", tab.subset(sel_i), tab.subset(ev_i), n_random, seed, [1, 2, 3],
                          (16, 64))
    for name, r in (routes or {}).items():
        inp.router_routes[name] = r[ev_i]
        inp.router_loss[name] = torch.zeros(len(ev_i), dtype=torch.float64)
    return inp


def _spec(key):
    return next(s for s in V.SPECS if s.key == key)


def _judge(key, real, null=None, n_boot=300, relabel=V.RELABEL_P):
    return V.judge_one(_spec(key), [real], None if null is None else [null], n_boot=n_boot,
                       relabel=relabel)


NEEDS_BIG = [s.key for s in V.SPECS if s.needs_big and s.key != "3"]


def test_holm_on_known_p_values():
    adj = V.holm([0.01, 0.04, 0.03, 0.005])
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1, made monotone
    assert adj == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adj = V.holm([0.2, math.nan, 0.01])
    assert adj[0] == pytest.approx(0.2) and math.isnan(adj[1]) and adj[2] == pytest.approx(0.02)
    assert V.holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])


def test_holm_downgrades_a_hold_that_does_not_survive_the_family():
    recs = [V.VerdictRecord(str(i), "x", "h", "c", "m", "", "", "", False, 1, 10, [], p,
                            None, S.HOLDS) for i, p in enumerate([0.001, 0.03, 0.04])]
    recs[1].reason = "null model: its gain is zero"
    V.apply_holm(recs)
    assert [r.verdict for r in recs] == [S.HOLDS, S.UNRESOLVED, S.UNRESOLVED]
    assert "null model: its gain is zero" in recs[1].reason  # kept beside Holm's note
    assert "Holm" in recs[1].reason and recs[1].p_holm == pytest.approx(0.06)


def test_a_bound_never_rounds_to_zero():
    text = V.fmt(S.Interval(0.0012, 0.00034, 0.0021, 10))
    assert "0.00034" in text and "excludes 0" in text
    assert "excludes" not in V.fmt(S.Interval(0.1, -0.02, 0.3, 10))
    assert V.fmt(S.Interval(1.5, 1.25, 1.75, 10)).startswith("1.500 [1.250, 1.750]")
    from duollm.study.report import _iv  # every interval of report.md prints this way

    assert _iv(S.Interval(0.0012, 0.00034, 0.0021, 10)) == "0.00120 [0.00034, 0.00210]"


def test_hierarchical_bootstrap_covers_seed_to_seed_spread():
    gen = torch.Generator().manual_seed(0)
    groups = [(torch.randn(30, generator=gen, dtype=torch.float64) * 0.1 + off,)
              for off in (-1.0, 0.0, 1.0)]
    hier, _ = V.hboot(lambda v: float(v.mean()), groups, n_boot=400)
    pooled, _ = V.hboot(lambda v: float(v.mean()), [(torch.cat([g[0] for g in groups]),)],
                        n_boot=400)
    assert hier.estimate == pytest.approx(pooled.estimate)
    assert hier.high - hier.low > 3 * (pooled.high - pooled.low)
    one, _ = V.hboot(lambda v: float(v.mean()), groups[:1], n_boot=400)
    assert one.n == 30 and hier.n == 90


def test_null_table_gives_no_holds_for_claims_that_need_big():
    """The null model's table: big and small tie exactly, so the precondition (all small
    minus all big above zero) fails for every claim that needs big != small."""
    null = _inputs(_table([0.0] * L))
    for key in NEEDS_BIG:
        rec = _judge(key, null)
        assert rec.verdict == V.NOT_TESTABLE, key
        assert "all small minus all big" in rec.reason and "[" in rec.reason


def test_pure_noise_table_gives_no_holds_for_claims_that_need_big():
    """The issue's simulation: big has no effect, only per-(pattern, token) noise. The
    oracle still 'beats' everything by selection; no big-needing claim may hold."""
    for seed in range(3):
        noisy = _inputs(_table([0.0] * L, noise=0.05, seed=seed))
        # selection alone makes 4b's raw difference positive ...
        o1 = V.oracle_loss(noisy.ev, noisy.ev.mask(1))
        assert float((V.all_route(noisy.ev, BIG) - o1).mean()) > 0.02
        # ... and no verdict that needs big != small holds
        for key in NEEDS_BIG:
            assert _judge(key, noisy).verdict != S.HOLDS, (seed, key)


def test_planted_big_effect_holds_against_the_null():
    real = _inputs(_table([0.05, 0.05, 0.1, 0.1], noise=0.02, seed=1))
    null = _inputs(_table([0.0] * L, noise=0.0, seed=1))
    # The null model alone (the relabelled control off): it holds against the null model ...
    rec = _judge("4a", real, null, relabel=0)
    assert rec.verdict == S.HOLDS, rec
    # ... but this plant helps every token alike, so the best fixed pattern (layers 2, 3) is
    # every token's best and the oracle's edge over it is selection among noisy near-ties:
    # the relabelled table, whose candidates differ by as much, shows the same edge.
    both = _judge("4a", real, null)
    assert both.verdict == V.SELECTION and "real minus relabelled null" in both.reason
    assert both.parts[0].vs_null.low > 0  # still beyond the null model
    assert rec.precondition.startswith("all small minus all big 0.")  # measured, kept
    assert V.record_dict(rec)["precondition"] == rec.precondition
    p = rec.parts[0]
    assert p.null.estimate == pytest.approx(0.0) and p.vs_null.low > 0
    # the same effect in the null as in the real model: indistinguishable from selection
    rec = _judge("4a", real, real, relabel=0)
    assert rec.verdict == V.SELECTION and "real minus null" in rec.reason
    # a strong big effect: one big layer is far worse than all big (4b does not hold)
    assert _judge("4b", real, null).verdict == S.FAILS


def test_capacity_profile_planted_later_layers_first():
    gen = torch.Generator().manual_seed(5)
    # per-token gains, larger at later layers: at a low budget the oracle goes late
    g = torch.rand(L, B, T, generator=gen, dtype=torch.float64) * 0.02
    g += torch.tensor([0.0, 0.01, 0.05, 0.06], dtype=torch.float64)[:, None, None]
    rec = _judge("2", _inputs(_table(g)))
    a, b, c = rec.parts
    assert a.outcome == S.HOLDS and b.outcome == S.HOLDS
    assert c.outcome != S.HOLDS  # at k=3 the later layers are already served, not the early
    assert rec.verdict != S.HOLDS


def test_oracle_usage_splits_ties_evenly():
    tab = _inputs(_table([0.0] * L)).ev
    u = V.oracle_usage(tab, tab.mask(1), BIG)  # every 1-big pattern ties
    assert torch.allclose(u, torch.full_like(u, 1 / L))


def test_2d_is_two_sided_with_a_fixed_margin():
    flat = _inputs(_table([0.1] * L))  # skipping any layer costs the same: ties split evenly
    rec = _judge("2d", flat)
    assert rec.parts[0].interval.estimate == pytest.approx(0.0)
    assert rec.verdict == S.HOLDS and rec.parts[0].margin == V.SKIP_EQUIV_MARGIN
    # big matters only in the early layers: the oracle skips the later ones (an early exit)
    late = _inputs(_table([0.3, 0.3, 0.0, 0.0]))
    assert _judge("2d", late).verdict == S.FAILS
    # and only in the later layers: it skips the early ones -- also a failure (two-sided)
    early = _inputs(_table([0.0, 0.0, 0.3, 0.3]))
    rec = _judge("2d", early)
    assert rec.verdict == S.FAILS and rec.parts[0].interval.estimate < 0


def test_3d_precondition_failure_is_not_testable_with_the_measured_reason():
    tab = _table([0.1] * L)
    routes = torch.full((B, T, L), BIG, dtype=torch.int64)
    routes[:, :, -1] = SKIP  # 25% skip: inside the window, skips at the end
    rec = _judge("3d", _inputs(tab, routes={V.BOS_ROUTER: routes}))
    assert rec.verdict == S.HOLDS
    routes = torch.full((B, T, L), BIG, dtype=torch.int64)
    routes[:, :2, -1] = SKIP  # 4% skip
    rec = _judge("3d", _inputs(tab, routes={V.BOS_ROUTER: routes}))
    assert rec.verdict == V.NOT_TESTABLE and "4.2%" in rec.reason
    assert _judge("3d", _inputs(tab)).verdict == V.NOT_TESTABLE


def test_4c_schedules_are_the_papers_with_the_constant_mean():
    kc, sched = V.schedules_l3(12, 96)
    assert kc == 4 and sched["decreasing"][0] == 6 and sched["decreasing"][-1] == 2
    assert sum(sched["decreasing"]) == 4 * 96 and sched["increasing"] == sched["decreasing"][::-1]
    kc, sched = V.schedules_l3(6, 11)
    assert kc == 2 and sum(sched["decreasing"]) == 2 * 11


def test_distinct_random_patterns_without_replacement():
    pats, every = V.distinct_random_patterns(12, 6, 100, seed=0)
    assert not every and len({tuple(p) for p in pats.tolist()}) == 100
    assert all(int((p == BIG).sum()) == 6 for p in pats)
    pats, every = V.distinct_random_patterns(4, 2, 100, seed=0)
    assert every and pats.shape == (6, 4)


def test_router_position_is_not_the_4a_difference():
    real = _inputs(_table([0.05, 0.05, 0.1, 0.1], noise=0.02, seed=1))
    o = V.oracle_loss(real.ev, real.ev.mask(2))
    rnd = V.best_random(real, 2)
    for frac, want in ((0.2, S.FAILS), (0.9, S.HOLDS), (2.0, S.HOLDS)):
        real.router_loss = {"k2": o + frac * (rnd - o)}
        rec = _judge("4a-router", real)
        assert rec.parts[0].interval.estimate == pytest.approx(frac - 0.5, abs=0.05)
        assert rec.verdict == want, frac


def test_fig7_early_tokens_more_compute_per_mix_router():
    tab = _table([0.1] * L)
    early_big = torch.full((B, T, L), SMALL, dtype=torch.int64)
    early_big[:, : T // 2] = BIG  # the 70/30 router spends its big layers on early tokens
    late_skip = torch.full((B, T, L), BIG, dtype=torch.int64)
    late_skip[:, T // 2:] = SKIP  # the big-or-skip router skips the later tokens
    rec = _judge("7", _inputs(tab, routes={"mix-b70s30": early_big, V.BOS_ROUTER: late_skip}))
    assert [p.outcome for p in rec.parts] == [S.HOLDS, S.HOLDS] and rec.verdict == S.HOLDS
    assert rec.parts[0].interval.estimate == pytest.approx(1 - 16 / 64)
    assert rec.parts[1].interval.estimate == pytest.approx(1.0)  # compute 1 early, 0 late
    rec = _judge("7", _inputs(tab, routes={"mix-b70s30": early_big.flip(1)}))
    assert rec.verdict == S.FAILS
    assert _judge("7", _inputs(tab)).verdict == V.NOT_TESTABLE


# --------------------------------------------------------------------------- relabelled table


def _noise_inputs_passing_the_precondition(n=2):
    """Pure-noise tables (big has no effect; every pattern's loss is iid noise per sequence
    and position) on which, by chance, all big is measurably better than all small, so the
    precondition passes and only a selection control can stop a claim."""
    out = []
    for seed in range(100):
        inp = _inputs(_table([0.0] * L, noise=0.05, seed=seed))
        try:
            V._precondition_big(inp)
        except V.NotTestable:
            continue
        out.append(inp)
        if len(out) == n:
            return out
    raise AssertionError("no noise table passed the precondition")


def test_relabelled_control_catches_selection_on_pure_noise():
    """The issue's simulation with the precondition passing: without the relabelled control
    4a, 4b (and 4c) "hold" by selection alone; with it none of them holds."""
    for inp in _noise_inputs_passing_the_precondition():
        for key in ("4a", "4b", "4c"):
            raw = _judge(key, inp, relabel=0)
            assert raw.verdict == S.HOLDS, (key, raw)  # selection alone: "holds"
            assert all(p.interval.low > 0 for p in raw.parts)
            rec = _judge(key, inp)
            assert rec.verdict in (V.SELECTION, S.UNRESOLVED), (key, rec)
            assert rec.n_relabel == V.RELABEL_P and "real minus relabelled null" in rec.reason
            # the real model's raw interval is unchanged; the control adds the comparison
            assert [p.interval for p in rec.parts] == [p.interval for p in raw.parts]
            assert all(p.relabel_null is not None and p.p_vs_relabel_null is not None
                       for p in rec.parts)
        for key in ("2", "5/6"):
            assert _judge(key, inp, n_boot=200).verdict != S.HOLDS, key


def _two_kinds_of_token(seed=3, noise=0.01):
    """A planted effect the paper's Figure 2a-c describes: per token, big helps layer 2 most;
    40% of the tokens gain next from layer 3 (the other later layer), 60% from the early
    layers 0 and 1 and not at all from layer 3. Later-minus-earlier half big usage of the
    oracle: at k=1 +0.5 for every token (2a); at k=2 +1 for the first kind, 0 for the second
    (2b: 0.4 on average); at k=3 +0.5 and -0.5 (2c: 0.4 * 0.5 - 0.6 * 0.5 = -0.1)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(B, T, generator=gen) < 0.4
    kind_a = torch.tensor([0.01, 0.0, 0.12, 0.09], dtype=torch.float64)
    kind_b = torch.tensor([0.08, 0.07, 0.12, 0.0], dtype=torch.float64)
    g = torch.where(a[None], kind_a[:, None, None], kind_b[:, None, None])  # (L, B, T)
    return _table(g, noise=noise, seed=seed)


def _later_first_then_earlier(seed=3, noise=0.01):
    """Figure 2a-c's claim planted exactly: every big layer lowers the loss by 0.1, and the
    best set of k big layers is later-first at k=1 ({3}) and k=2 ({2, 3}) and earlier-heavy
    at k=3 ({0, 1, 2}), each by 0.05 over the other sets of its size (an interaction: with
    gains that only add up, a later-first set at k=2 stays in the best set at k=3)."""
    gen = torch.Generator().manual_seed(seed)
    base = 2.0 + 0.3 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    best = {(SMALL, SMALL, SMALL, BIG), (SMALL, SMALL, BIG, BIG), (BIG, BIG, BIG, SMALL)}
    gain = torch.tensor([0.1 * p.count(BIG) + (0.05 if p in best else 0.0)
                         for p in map(tuple, PATS.tolist())], dtype=torch.float64)
    skip = (PATS == SKIP).double().sum(1) * 0.5
    losses = base[None] + (skip - gain)[:, None, None]
    losses = losses + noise * torch.randn(losses.shape, generator=gen, dtype=torch.float64)
    return PatternLosses(PATS, losses)


def test_planted_effect_holds_against_the_relabelled_control():
    real = _inputs(_later_first_then_earlier())
    null = _inputs(_table([0.0] * L, seed=3))  # the null model: big == small
    rec = _judge("2", real, null)
    assert rec.n_relabel == V.RELABEL_P
    assert [p.expect for p in rec.parts] == [1, 1, -1]
    want = [0.5, 1.0, -0.5]  # {3}: late 1/2; {2, 3}: late 1; {0, 1, 2}: 1/2 - 1
    assert [p.interval.estimate for p in rec.parts] == pytest.approx(want, abs=0.01)
    for p in rec.parts:
        assert p.vs_relabel_null.sign() == p.expect, p
        assert p.vs_null.sign() == p.expect, p
        assert abs(p.relabel_null.estimate) < 0.3  # labels shuffled: no profile to speak of
    assert rec.verdict == S.HOLDS, rec
    # two kinds of token that prefer different big layers: the oracle's per-token choice
    # beats any fixed pattern by more than selection among the same candidates does
    rec = _judge("4a", _inputs(_two_kinds_of_token()), null)
    assert rec.parts[0].vs_relabel_null.low > 0 and rec.verdict == S.HOLDS, rec


def test_relabelling_permutes_labels_within_each_skip_class():
    inp = _inputs(_two_kinds_of_token())
    classes = V.skip_classes(PATS)
    assert len(classes) == 2 ** L and sum(c.numel() for c in classes) == len(PATS)
    assert sorted(c.numel() for c in classes)[-1] == 2 ** L  # no skip: every big/small mix
    rel = V.relabelled_inputs(inp, 5, seed=7)
    assert len(rel) == 5 and all(r.relabelled for r in rel)
    moved = 0
    for r in rel:
        for tab, orig in ((r.sel, inp.sel), (r.ev, inp.ev)):
            assert tab.losses is orig.losses  # the losses, unchanged and not copied
            assert torch.equal(tab.patterns == SKIP, orig.patterns == SKIP)  # skip sets kept
            assert torch.equal(tab.n_big, (tab.patterns == BIG).sum(1))  # recomputed
            for c in classes:  # within a class: a permutation of the class's labels
                got = sorted(map(tuple, tab.patterns[c].tolist()))
                assert got == sorted(map(tuple, orig.patterns[c].tolist()))
        assert torch.equal(r.sel.patterns, r.ev.patterns)  # one relabelling for both splits
        moved += int((r.ev.patterns != inp.ev.patterns).any(1).sum())
        assert torch.equal(r.router_loss.get("x", torch.zeros(1)), torch.zeros(1))
    assert moved > 0
    # deterministic given the study's and the model's seed; another seed, other labels
    again = V.relabelled_inputs(inp, 5, seed=7)
    assert all(torch.equal(a.ev.patterns, b.ev.patterns) for a, b in zip(rel, again))
    other = V.relabelled_inputs(inp, 5, seed=8)
    assert not all(torch.equal(a.ev.patterns, b.ev.patterns) for a, b in zip(rel, other))
    # the two-walk layout (big/small, big/skip): a big/skip pattern is its class's only one
    two = torch.tensor([p for p in itertools.product((SMALL, BIG), repeat=L)]
                       + [p for p in itertools.product((SKIP, BIG), repeat=L)
                          if SKIP in p])
    perm = V.relabel_permutation(two, torch.Generator().manual_seed(0))
    assert torch.equal(perm[2 ** L:], torch.arange(2 ** L, len(two)))
    with pytest.raises(ValueError, match="n"):
        V.relabelled_inputs(inp, 0)
    with pytest.raises(ValueError, match="relabel"):
        _judge("4a", inp, relabel=-1)
    with pytest.raises(TypeError, match="relabel"):
        V.relabel_table(object(), perm)


def test_relabelled_control_applies_only_to_claims_on_the_table_that_need_big():
    real = _inputs(_two_kinds_of_token(),
                   routes={"k2": torch.full((B, T, L), BIG, dtype=torch.int64)})
    for spec in V.SPECS:
        rec = V.judge_one(spec, [real], n_boot=100)
        if spec.key in ("3", "4a-router", "2d", "3d", "7"):  # routers or skips: none
            assert not spec.relabels and rec.n_relabel == 0, spec.key
            assert all(p.relabel_null is None for p in rec.parts), spec.key
        else:
            assert spec.relabels and rec.n_relabel == V.RELABEL_P, spec.key


def test_linear_parts_are_linear_and_their_fast_bootstrap_is_the_slow_one():
    """``Part.linear`` lets ``relabel_boot`` average the relabellings' arrays instead of
    their statistics: exact only for a statistic affine in its arrays."""
    real = _inputs(_two_kinds_of_token(noise=0.03))
    rel = V.relabelled_inputs(real, 4)
    n_linear = 0
    for spec in V.SPECS:
        if not spec.relabels:
            continue
        parts = spec.parts(real)
        rparts = [spec.parts(r) for r in rel]
        for j, p in enumerate(parts):
            null = [[tuple(rp[j].arrays) for rp in rparts]]
            if p.linear:
                n_linear += 1
                fast = V.relabel_boot(p.stat, [p.arrays], null, 200, 0, linear=True)
                slow = V.relabel_boot(p.stat, [p.arrays], null, 200, 0, linear=False)
                for a, b in zip(fast[:2], slow[:2]):
                    assert (a.estimate, a.low, a.high) == pytest.approx(
                        (b.estimate, b.low, b.high), abs=1e-12)
            else:  # 5/6's Spearman: the statistic of the mean is not the mean statistic
                arrs = [tuple(rp[j].arrays) for rp in rparts]
                mean = tuple(sum(t[a] for t in arrs) / len(arrs) for a in range(len(arrs[0])))
                assert p.stat(*mean) != pytest.approx(
                    sum(p.stat(*t) for t in arrs) / len(arrs), abs=1e-9)
    assert n_linear == 7  # 4a, 4b, 2a-c (3), 4c (2)


def test_relabel_boot_pairs_sequences_and_carries_the_relabelling_error():
    gen = torch.Generator().manual_seed(0)
    real = (torch.randn(30, generator=gen, dtype=torch.float64) + 1.0,)
    # nulls equal to the real arrays: real minus null is exactly zero on every resample
    null_iv, diff, p = V.relabel_boot(_mean_stat, [real], [[real, real]], 200, 0, linear=True)
    assert diff.estimate == 0 and diff.low == 0 and diff.high == 0 and p == 1.0
    assert null_iv.estimate == pytest.approx(float(real[0].mean()))
    # nulls spread far apart: resampling the relabellings widens real minus null
    shift = [(real[0] + d,) for d in (-1.0, 1.0)]
    _, wide, _ = V.relabel_boot(_mean_stat, [real], [shift], 400, 0, linear=True)
    assert wide.estimate == pytest.approx(0.0, abs=1e-12) and wide.high - wide.low > 1.0
    with pytest.raises(ValueError, match="null"):
        V.relabel_boot(_mean_stat, [real], [[]], 10, 0)
    with pytest.raises(ValueError, match="null"):
        V.relabel_boot(_mean_stat, [real], [[(real[0][:5],)]], 10, 0)


def _mean_stat(v):
    return float(v.mean())


def test_a_relabelled_table_that_cannot_be_judged_leaves_a_hold_unresolved():
    def parts(inp):
        if inp.relabelled:
            raise V.NotTestable("nothing to compare")
        return [V.Part("always above zero", _mean_stat,
                       (torch.full((inp.ev.losses.shape[1],), 1.0, dtype=torch.float64),))]

    spec = V.Spec("x", "x", "c", "m", V.Setting("p", "o"), True, parts)
    rec = V.judge_one(spec, [_inputs(_two_kinds_of_token())], n_boot=50)
    assert rec.verdict == S.UNRESOLVED and "relabelled table: nothing to compare" in rec.reason


def test_per_rank_table_relabels_like_the_whole_table():
    """``ReducedPatternLosses`` (the per-rank table under torchrun, and the resumable one of
    ``--oracle-chunks``) relabelled gives the verdicts the whole table gives."""
    from duollm import distributed
    from duollm.study.sharded_table import LocalTable, ReducedPatternLosses

    tab = _two_kinds_of_token(noise=0.03)
    whole = PatternLosses(tab.patterns, tab.losses.float().double())
    reduced = ReducedPatternLosses(LocalTable(tab.patterns, tab.losses.float(), range(B), B,
                                              distributed.DistInfo()))
    perm = V.relabel_permutation(PATS, torch.Generator().manual_seed(1))
    rw, rr = V.relabel_table(whole, perm), V.relabel_table(reduced, perm)
    assert torch.equal(rr.patterns, rw.patterns) and torch.equal(rr.n_big, rw.n_big)
    assert torch.equal(rr.mask(2), rw.mask(2)) and rr.index([BIG] * L) == rw.index([BIG] * L)
    assert torch.equal(V.oracle_usage(rr, rr.mask(1), BIG), V.oracle_usage(rw, rw.mask(1), BIG))
    # the real table's usage is not served to the relabelled one (its labels differ)
    assert not torch.equal(V.oracle_usage(reduced, reduced.mask(1), BIG),
                           V.oracle_usage(rr, rr.mask(1), BIG))
    for key in ("4a", "4b", "2", "4c", "5/6"):
        a, b = _judge(key, _inputs(whole), n_boot=60), _judge(key, _inputs(reduced), n_boot=60)
        assert a.verdict == b.verdict, key
        for pa, pb in zip(a.parts, b.parts):
            assert (pa.vs_relabel_null.estimate, pa.vs_relabel_null.low) == pytest.approx(
                (pb.vs_relabel_null.estimate, pb.vs_relabel_null.low), abs=1e-12), key


def test_verdicts_json_and_report_carry_the_relabelled_control():
    real = _inputs(_two_kinds_of_token())
    rec = _judge("2", real)
    d = V.record_dict(rec)
    assert d["n_relabel"] == V.RELABEL_P
    assert d["relabel_null"] == d["parts"][0]["relabel_null"] is not None
    assert d["vs_relabel_null"] == d["parts"][0]["vs_relabel_null"] is not None
    for part in d["parts"]:
        assert set(part["vs_relabel_null"]) == {"estimate", "low", "high", "n", "level"}
        assert isinstance(part["p_vs_relabel_null"], float)
    router = V.record_dict(_judge("2d", real))  # a claim it does not apply to
    assert router["relabel_null"] is None and router["n_relabel"] == 0
    table = V.markdown_table([d, router], null=False)
    assert "| relabelled null | real minus relabelled |" in table[0]
    assert all(r.count("|") == table[0].count("|") for r in table)
    assert V.fmt(rec.parts[0].vs_relabel_null) in table[2]
    line = V.summary_lines([d])[0]
    assert "minus relabelled null" in line
    old = {**d, "parts": [{k: v for k, v in p.items() if "relabel" not in k}
                          for p in d["parts"]]}
    assert V.markdown_table([old], null=True)[2].count("| - |") >= 1  # older entries: "-"


def test_selection_reason_keeps_what_the_null_model_said():
    """A claim whose null model is not testable (its own precondition) and that the
    relabelled table then finds indistinguishable from selection keeps both reasons."""
    inp = _noise_inputs_passing_the_precondition(1)[0]
    null = _inputs(_table([0.0] * L))  # big == small: no gain, 5/6's null is not testable

    def parts(i):
        if i.ev.losses is null.ev.losses:
            raise V.NotTestable("no gain to rank")
        return _spec("4b").parts(i)

    spec = dataclasses.replace(_spec("4b"), parts=parts)
    rec = V.judge_one(spec, [inp], [null], n_boot=200)
    assert rec.verdict == V.SELECTION
    assert rec.reason.startswith("null model: no gain to rank; real minus relabelled null")


_TWO_RANKS = """
    import json, os, sys
    sys.path.insert(0, sys.argv[2])
    import torch
    from duollm import distributed
    from duollm.study import verdicts as V
    from duollm.study.sharded_table import LocalTable, ReducedPatternLosses
    from test_verdicts import B, _inputs, _records_of, _two_kinds_of_token
    info = distributed.join("cpu")
    tab = _two_kinds_of_token(noise=0.03)
    rows = distributed.shard_range(info, B)
    local = LocalTable(tab.patterns, tab.losses[:, rows.start:rows.stop].float(), rows, B, info)
    recs = _records_of(_inputs(ReducedPatternLosses(local)))
    with open(os.path.join(sys.argv[1], f"rank{info.rank}.json"), "w") as f:
        json.dump(recs, f)
"""


def _records_of(inp):
    """The relabelled verdicts of the table-read claims on ``inp``, as ``verdicts.json``."""
    return [V.record_dict(_judge(key, inp, n_boot=40)) for key in ("4a", "4b", "2", "5/6")]


def test_relabelled_verdicts_under_two_ranks_equal_one_process(tmp_path):
    """Under torchrun each rank holds half the table: the relabelled copies' oracles and
    usage profiles are collective reductions, made alike on both ranks, and the verdicts
    equal one process's whole table's exactly."""
    import json
    import os

    from multiproc import torchrun

    torchrun(_TWO_RANKS, tmp_path, str(tmp_path), os.path.dirname(__file__))
    tab = _two_kinds_of_token(noise=0.03)
    want = _records_of(_inputs(PatternLosses(tab.patterns, tab.losses.float().double())))
    want = json.loads(json.dumps(want))
    assert all(r["n_relabel"] == V.RELABEL_P for r in want)
    for r in (0, 1):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == want, r
