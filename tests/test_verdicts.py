"""duollm.study.verdicts on constructed loss tables whose answer is known: the null table,
the issue's pure-noise table, planted effects, Holm, precondition failures, formatting."""
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


def _judge(key, real, null=None, n_boot=300):
    return V.judge_one(_spec(key), [real], None if null is None else [null], n_boot=n_boot)


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
    rec = _judge("4a", real, null)
    assert rec.verdict == S.HOLDS, rec
    assert rec.precondition.startswith("all small minus all big 0.")  # measured, kept
    assert V.record_dict(rec)["precondition"] == rec.precondition
    p = rec.parts[0]
    assert p.null.estimate == pytest.approx(0.0) and p.vs_null.low > 0
    # the same effect in the null as in the real model: indistinguishable from selection
    rec = _judge("4a", real, real)
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
