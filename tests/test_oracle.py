"""duollm.oracle against brute force (tests/oracle_brute.py: every pattern through the model's
plain forward, then the minimum)."""
import time

import pytest
import torch

from duollm import BIG, SKIP, SMALL, DuoConfig, DuoLLM
from duollm.oracle import (AtMost, Exactly, FlopBudget, PerPosition, all_patterns,
                           linear_schedule, pattern_losses, route_choices, search)
from duollm.routers import fixed_pattern, random_patterns
from duollm.stack import as_stack
from oracle_brute import (context_losses, every_pattern, masked_min, meets, sequence_min,
                          whole_sequence_losses)

L, B, T = 3, 2, 8
ATOL = 1e-5


def _tiny(n_layers=L, d=32, seed=0, skip=True):
    torch.manual_seed(seed)
    cfg = DuoConfig(n_layers=n_layers, d_model=d, n_heads=2, vocab_size=50, d_big=64,
                    d_small=8, max_seq_len=32, skip=skip)
    m = DuoLLM(cfg).eval()
    with torch.no_grad():  # larger weights than the init, so patterns differ clearly
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


@pytest.fixture(scope="module")
def model():
    return _tiny()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def whole(model, tokens):
    """(27, B, T-1) brute-force losses of every skip/small/big pattern over the sequence."""
    pats = every_pattern(L, (SKIP, SMALL, BIG))
    return pats, whole_sequence_losses(model, tokens, pats)


def _budgets(n_layers):
    return ([Exactly(k) for k in range(n_layers + 1)] + [AtMost(k) for k in range(n_layers + 1)]
            + [FlopBudget(fraction=0.5)])


def _subset(whole, choices):
    pats, losses = whole
    keep = torch.isin(pats, torch.tensor(choices)).all(1)
    return pats[keep], losses[keep]


def _assert_realised_whole(model, tokens, res):
    """Running routes[:, b, t] as a pattern over all positions gives loss[b, t]."""
    scored = res.routes[:, :, :-1]
    for p in torch.unique(scored.reshape(L, -1).t(), dim=0):
        got = as_stack(model).token_losses(tokens, p.tolist())
        hit = (scored == p[:, None, None]).all(0)  # (B, T-1)
        torch.testing.assert_close(got[hit], res.loss[hit], atol=ATOL, rtol=0)


@pytest.mark.parametrize("skip", [False, True])
def test_exhaustive_sequence_equals_brute_force(model, tokens, whole, skip):
    pats, losses = _subset(whole, route_choices(skip))
    for budget in _budgets(L):
        ok = meets(model, pats, budget)
        res = search(model, tokens, budget, "sequence", skip=skip)
        assert res.loss.shape == (B,) and res.routes.shape == (L, B, T)
        torch.testing.assert_close(res.loss, sequence_min(losses, ok), atol=ATOL, rtol=0)
        assert res.patterns_evaluated == int(ok.sum()) and res.patterns_per_s > 0
        got = model.token_losses(tokens, res.routes).mean(-1)  # the routes achieve the loss
        torch.testing.assert_close(got.detach(), res.loss, atol=ATOL, rtol=0)
        assert meets(model, res.routes[:, :, 0].t(), budget).all()
        assert res.base is None and "sequence oracle" in res.label


@pytest.mark.parametrize("skip", [False, True])
def test_paper_token_oracle_equals_brute_force(model, tokens, whole, skip):
    pats, losses = _subset(whole, route_choices(skip))
    for budget in _budgets(L):
        ok = meets(model, pats, budget)
        res = search(model, tokens, budget, "token", skip=skip, base="pattern")
        assert res.loss.shape == (B, T - 1) and res.routes.shape == (L, B, T)
        torch.testing.assert_close(res.loss, masked_min(losses, ok), atol=ATOL, rtol=0)
        _assert_realised_whole(model, tokens, res)
        assert meets(model, res.routes.reshape(L, -1).t(), budget).all()
        assert torch.equal(res.routes[:, :, -1], res.routes[:, :, -2])
        assert res.base == "pattern" and "paper's token oracle" in res.label
        assert str(budget) in res.describe()
        # a per-position minimum over whole-sequence patterns beats every single pattern
        seq = search(model, tokens, budget, "sequence", skip=skip)
        assert (res.loss.mean(-1) <= seq.loss + ATOL).all()


@pytest.mark.parametrize("skip", [False, True])
def test_context_token_oracle_equals_brute_force(model, tokens, skip):
    pats = every_pattern(L, route_choices(skip))
    brute = context_losses(model, tokens, pats)  # (n, B, T-1)
    for budget in (Exactly(1), AtMost(2), FlopBudget(fraction=0.5)):
        ok = meets(model, pats, budget)
        res = search(model, tokens, budget, "token", skip=skip)  # base "big": the default
        torch.testing.assert_close(res.loss, masked_min(brute, ok), atol=ATOL, rtol=0)
        uniq = torch.unique(res.routes[:, :, :-1].reshape(L, -1).t(), dim=0)
        hit = context_losses(model, tokens, uniq)  # each position's pattern in base context
        for b in range(B):
            for t in range(T - 1):
                j = int((uniq == res.routes[:, b, t]).all(1).nonzero()[0])
                assert abs(float(hit[j, b, t]) - float(res.loss[b, t])) <= ATOL
        assert (res.routes[:, :, -1] == BIG).all()  # the last position keeps the base route
        assert "context-fixed" in res.label and "all big" in res.label


def test_context_token_oracle_with_pattern_and_small_base(model, tokens):
    pats = every_pattern(L, (SMALL, BIG))
    ok = meets(model, pats, AtMost(1))
    for base in ([SMALL, BIG, SMALL], "small"):
        brute = context_losses(model, tokens, pats, base=base)
        res = search(model, tokens, AtMost(1), "token", base=base)
        torch.testing.assert_close(res.loss, masked_min(brute, ok), atol=ATOL, rtol=0)


@pytest.mark.parametrize("granularity", ["sequence", "token"])
def test_big_or_skip_and_three_way_oracles_equal_brute_force(model, tokens, whole,
                                                             granularity):
    cases = [((SKIP, BIG), Exactly(1)), ((SKIP, BIG), AtMost(1, route=SKIP)),
             ((SKIP, BIG), Exactly(2, route=SKIP)), ((SKIP, SMALL, BIG), Exactly(1, route=SKIP)),
             ((SKIP, SMALL, BIG), AtMost(0, route=SKIP)), ((SKIP, SMALL, BIG), None)]
    for paths, budget in cases:
        pats, losses = _subset(whole, paths)
        ok = (meets(model, pats, budget) if budget is not None
              else torch.ones(len(pats), dtype=torch.bool))
        res = search(model, tokens, budget, granularity, paths=paths, base="pattern")
        want = (sequence_min(losses, ok) if granularity == "sequence"
                else masked_min(losses, ok))
        torch.testing.assert_close(res.loss, want, atol=ATOL, rtol=0)
        assert set(res.routes.unique().tolist()) <= set(paths)
        assert res.paths == tuple(sorted(paths))
        if budget is not None:
            assert meets(model, res.routes.reshape(L, -1).t(), budget).all()
        if granularity == "token":
            _assert_realised_whole(model, tokens, res)
    assert "skip/big" in search(model, tokens, 1, paths=(BIG, SKIP)).label


@pytest.mark.parametrize("base", ["pattern", "big"])
@pytest.mark.parametrize("kind", ["exactly", "at_most"])
def test_per_position_budget_holds_and_equals_brute_force(model, tokens, whole, base, kind):
    ks = linear_schedule(T - 1, 1.0, L, "decreasing")
    assert ks[0] > ks[-1] and sum(ks) == T - 1
    budget = PerPosition(ks, kind)
    pats, losses = _subset(whole, (SMALL, BIG))
    if base == "big":
        losses = context_losses(model, tokens, pats)
    ok = meets(model, pats, budget)  # (n, T-1)
    for method, width in (("exhaustive", 0), ("beam", len(pats)), ("greedy", 1)):
        res = search(model, tokens, budget, "token", method=method, beam_width=max(width, 1),
                     base=base)
        n_big = (res.routes[:, :, :-1] == BIG).sum(0)  # (B, T-1)
        want_k = torch.tensor(ks)[None].expand(B, -1)
        assert (n_big == want_k).all() if kind == "exactly" else (n_big <= want_k).all()
        if method == "greedy":
            assert (res.loss >= masked_min(losses, ok) - ATOL).all()
        else:
            torch.testing.assert_close(res.loss, masked_min(losses, ok), atol=ATOL, rtol=0)
    if base == "pattern":
        _assert_realised_whole(model, tokens, res)
    with pytest.raises(ValueError, match="per-position"):
        search(model, tokens, budget, "sequence")
    with pytest.raises(ValueError, match="ks"):
        search(model, tokens[:, :-1], budget, "token", base=base)


def test_linear_schedule():
    for n, mean, n_layers in ((7, 1, 3), (9, 2, 4), (10, 1.2, 4), (5, 0, 3), (6, 3, 3)):
        dec = linear_schedule(n, mean, n_layers)
        inc = linear_schedule(n, mean, n_layers, "increasing")
        assert len(dec) == n and min(dec) >= 0 and max(dec) <= n_layers
        assert sum(dec) == round(mean * n) and inc == tuple(reversed(dec))
        assert all(a >= b for a, b in zip(dec, dec[1:]))
    assert linear_schedule(7, 1.5, 3)[0] == 3  # as wide as the layer range allows
    for bad in (dict(mean=4), dict(mean=-1), dict(direction="up")):
        with pytest.raises(ValueError):
            linear_schedule(**{**dict(n_positions=5, mean=1, n_layers=3), **bad})


@pytest.mark.parametrize("granularity,base", [("sequence", "big"), ("token", "big"),
                                              ("token", "pattern")])
@pytest.mark.parametrize("skip", [False, True])
def test_wide_beam_equals_exhaustive_and_greedy_is_bounded(model, tokens, granularity, base,
                                                           skip):
    n_all = len(route_choices(skip)) ** L
    for budget in (Exactly(1), AtMost(2), FlopBudget(fraction=0.5)):
        ex = search(model, tokens, budget, granularity, skip=skip, base=base)
        beam = search(model, tokens, budget, granularity, method="beam", beam_width=n_all,
                      skip=skip, base=base)
        torch.testing.assert_close(beam.loss, ex.loss, atol=ATOL, rtol=0)
        greedy = search(model, tokens, budget, granularity, method="greedy", skip=skip,
                        base=base)
        assert (greedy.loss >= ex.loss - ATOL).all()
        narrow = search(model, tokens, budget, granularity, method="beam", beam_width=2,
                        skip=skip, base=base)
        assert (narrow.loss >= ex.loss - ATOL).all()
        for r in (beam, greedy, narrow):  # routes meet the budget
            cols = r.routes if granularity == "sequence" else r.routes[:, :, :-1]
            assert meets(model, cols.reshape(L, -1).t(), budget).all()
            assert r.method in ("beam", "greedy") and r.label == ex.label
        if base == "pattern":
            _assert_realised_whole(model, tokens, greedy)
            _assert_realised_whole(model, tokens, narrow)


@pytest.mark.parametrize("granularity", ["sequence", "token"])
def test_at_most_is_monotone_and_beats_fixed_and_random(model, tokens, granularity):
    table = pattern_losses(model, tokens, granularity)
    prev = None
    for k in range(L + 1):
        cur = table.select(AtMost(k)).loss
        if prev is not None:
            assert (cur <= prev + 1e-7).all()
        prev = cur
        exact = table.select(Exactly(k)).loss
        pats = [fixed_pattern(L, "first", k), fixed_pattern(L, "last", k)]
        pats += random_patterns(L, k, 10, seed=k).tolist()
        for p in pats:
            if granularity == "sequence":
                other = model.token_losses(tokens, p).mean(-1).detach()
            else:
                other = table.loss_of(p)
            assert (exact <= other + ATOL).all()


def test_one_walk_gives_sequence_and_paper_token_oracles(model, tokens):
    seq = pattern_losses(model, tokens, "sequence", skip=True)
    tok = pattern_losses(model, tokens, "token", skip=True, base="pattern")
    torch.testing.assert_close(seq.losses, tok.losses, atol=1e-6, rtol=0)
    view = seq.as_granularity("token")
    for budget in (Exactly(2), AtMost(1, route=SKIP), PerPosition([1] * (T - 1), "at_most")):
        torch.testing.assert_close(view.select(budget).loss, tok.select(budget).loss)
    assert view.select(1).label == tok.select(1).label
    torch.testing.assert_close(tok.as_granularity("sequence").select(1).loss,
                               seq.select(1).loss)
    with pytest.raises(ValueError, match="fixed-context"):
        pattern_losses(model, tokens, "token").as_granularity("sequence")


def test_table_select_matches_pruned_search(model, tokens):
    table = pattern_losses(model, tokens, "token", skip=True)
    assert table.patterns.shape == (27, L)
    for budget in (Exactly(2), AtMost(1), AtMost(1, route=SKIP)):
        a = table.select(budget)
        b = search(model, tokens, budget, "token", skip=True)
        torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=0)


def test_runs_on_a_stack(model, tokens):
    stack = as_stack(model)
    a = search(stack, tokens, AtMost(1), "token", base="pattern", skip=True)
    b = search(model, tokens, AtMost(1), "token", base="pattern", skip=True)
    torch.testing.assert_close(a.loss, b.loss, atol=0, rtol=0)
    assert torch.equal(all_patterns(L, budget=FlopBudget(fraction=0.5), model=stack),
                       all_patterns(L, budget=FlopBudget(fraction=0.5), model=model))


def test_twelve_layers_all_4096_patterns_exactly():
    m = _tiny(n_layers=12, d=16, seed=3)
    tok = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    seq = pattern_losses(m, tok, "sequence")
    tokt = pattern_losses(m, tok, "token")
    elapsed = time.perf_counter() - t0
    assert seq.patterns.shape == (4096, 12) and tokt.patterns.shape == (4096, 12)
    assert torch.unique(seq.patterns, dim=0).shape[0] == 4096
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 4096, (4,), generator=gen)
    torch.testing.assert_close(seq.losses[idx], whole_sequence_losses(m, tok, seq.patterns[idx]),
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(tokt.losses[:3], context_losses(m, tok, tokt.patterns[:3]),
                               atol=ATOL, rtol=0)
    assert elapsed < 60  # ~2 s on one core; the prefix tree shares most of the work


def test_argument_errors(model, tokens):
    with pytest.raises(ValueError, match="budget"):
        search(model, tokens, L + 1)
    with pytest.raises(TypeError, match="budget"):
        search(model, tokens, 1.5)
    with pytest.raises(ValueError, match="granularity"):
        search(model, tokens, 1, granularity="layer")
    with pytest.raises(ValueError, match="method"):
        search(model, tokens, 1, method="anneal")
    with pytest.raises(ValueError, match="skip"):
        search(_tiny(skip=False), tokens, 1, skip=True)
    with pytest.raises(ValueError, match="skip"):
        search(_tiny(skip=False), tokens, 1, paths=(SKIP, BIG))
    with pytest.raises(ValueError, match="paths"):
        search(model, tokens, 1, paths=(BIG, BIG))
    with pytest.raises(ValueError, match="route"):
        search(model, tokens, 1, paths=(BIG, 5))
    with pytest.raises(ValueError, match="FlopBudget"):
        FlopBudget()
    with pytest.raises(ValueError, match="k"):
        Exactly(-1)
    with pytest.raises(ValueError, match="route"):
        AtMost(1, route=7)
    with pytest.raises(ValueError, match="kind"):
        PerPosition([1, 2], kind="between")
    with pytest.raises(TypeError, match="model"):
        search(torch.nn.Linear(2, 2), tokens, 1)
    with pytest.raises(ValueError, match="base"):
        search(model, tokens, 1, "token", base="medium")
    with pytest.raises(TypeError, match="router"):
        search(model, tokens, 1, "token", base=lambda i, h: h[..., 0].long())
