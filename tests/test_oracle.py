"""duollm.oracle and duollm.difficulty against brute force through DuoLLM.forward."""
import time

import pytest
import torch

from duollm import BIG, SMALL, DuoConfig, DuoLLM
from duollm.difficulty import export_csv, high_loss_correlation, token_difficulty
from duollm.oracle import (AtMost, Exactly, FlopBudget, all_patterns, pattern_losses,
                           route_choices, search)
from duollm.routers import fixed_pattern, random_patterns

L, B, T = 3, 2, 10
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


def _budgets(n_layers):
    return ([Exactly(k) for k in range(n_layers + 1)] + [AtMost(k) for k in range(n_layers + 1)]
            + [FlopBudget(fraction=0.5)])


@torch.no_grad()
def _brute_sequence(model, tokens, pats):
    """(n, B) mean loss of every pattern, one DuoLLM.forward per pattern."""
    return torch.stack([model.token_losses(tokens, p.tolist()).mean(-1) for p in pats])


@torch.no_grad()
def _brute_token(model, tokens, pats, base="big"):
    """(n, B, T-1): position t re-routed by pattern p, everything else by base; one batched
    forward over every (pattern, position, sequence) variant."""
    n, Lm = pats.shape
    Bn, Tn = tokens.shape
    base_r = model.resolve_routes(base, Bn, Tn, tokens.device)
    routes = base_r[:, None, None].expand(Lm, n, Tn - 1, Bn, Tn).clone()  # (L, n, t, B, T)
    for t in range(Tn - 1):
        routes[:, :, t, :, t] = pats.t()[:, :, None]
    flat = routes.reshape(Lm, n * (Tn - 1) * Bn, Tn)
    toks = tokens[None, None].expand(n, Tn - 1, Bn, Tn).reshape(-1, Tn)
    losses = model.token_losses(toks, flat).view(n, Tn - 1, Bn, Tn - 1)
    idx = torch.arange(Tn - 1)
    return losses[:, idx, :, idx].permute(1, 2, 0)  # (n, B, T-1)


@pytest.mark.parametrize("skip", [False, True])
def test_exhaustive_sequence_equals_brute_force(model, tokens, skip):
    pats = all_patterns(L, skip)
    brute = _brute_sequence(model, tokens, pats)
    for budget in _budgets(L):
        ok = _mask(model, pats, budget)
        want = brute[ok].min(0).values
        res = search(model, tokens, budget, "sequence", skip=skip)
        assert res.loss.shape == (B,)
        assert res.routes.shape == (L, B, T)
        torch.testing.assert_close(res.loss, want, atol=ATOL, rtol=0)
        assert res.patterns_evaluated == int(ok.sum())
        assert res.patterns_per_s > 0
        # the chosen routes achieve the reported loss
        got = model.token_losses(tokens, res.routes).mean(-1)
        torch.testing.assert_close(got.detach(), res.loss, atol=ATOL, rtol=0)
        for b in range(B):
            assert _mask(model, res.routes[:, b, 0][None], budget).all()


def _mask(model, pats, budget):
    allowed = all_patterns(pats.shape[1], True, budget, model)
    return (pats[:, None, :] == allowed[None]).all(-1).any(1)


@pytest.mark.parametrize("skip", [False, True])
def test_exhaustive_token_equals_brute_force(model, tokens, skip):
    pats = all_patterns(L, skip)
    brute = _brute_token(model, tokens, pats)  # (n, B, T-1)
    for budget in _budgets(L):
        ok = _mask(model, pats, budget)
        want = brute[ok].min(0).values
        res = search(model, tokens, budget, "token", skip=skip)
        assert res.loss.shape == (B, T - 1)
        torch.testing.assert_close(res.loss, want, atol=ATOL, rtol=0)
        # each position's pattern, with the context routed by base, achieves its loss
        hit = _brute_token(model, tokens, torch.unique(res.routes[:, :, :-1].reshape(L, -1).t(),
                                                       dim=0))
        uniq = torch.unique(res.routes[:, :, :-1].reshape(L, -1).t(), dim=0)
        for b in range(B):
            for t in range(T - 1):
                j = int((uniq == res.routes[:, b, t]).all(1).nonzero()[0])
                assert abs(float(hit[j, b, t]) - float(res.loss[b, t])) <= ATOL
        assert (res.routes[:, :, -1] == BIG).all()  # the last position keeps the base route


def test_token_oracle_with_pattern_base(model, tokens):
    base = [SMALL, BIG, SMALL]
    pats = all_patterns(L, False)
    brute = _brute_token(model, tokens, pats, base=base)
    res = search(model, tokens, AtMost(1), "token", base=base)
    ok = _mask(model, pats, AtMost(1))
    torch.testing.assert_close(res.loss, brute[ok].min(0).values, atol=ATOL, rtol=0)


@pytest.mark.parametrize("granularity", ["sequence", "token"])
@pytest.mark.parametrize("skip", [False, True])
def test_wide_beam_equals_exhaustive_and_greedy_is_bounded(model, tokens, granularity, skip):
    n_all = len(route_choices(skip)) ** L
    for budget in (Exactly(1), AtMost(2), FlopBudget(fraction=0.5)):
        ex = search(model, tokens, budget, granularity, skip=skip)
        beam = search(model, tokens, budget, granularity, method="beam", beam_width=n_all,
                      skip=skip)
        torch.testing.assert_close(beam.loss, ex.loss, atol=ATOL, rtol=0)
        greedy = search(model, tokens, budget, granularity, method="greedy", skip=skip)
        assert (greedy.loss >= ex.loss - ATOL).all()
        for r in (beam, greedy):  # routes meet the budget
            cols = r.routes if granularity == "sequence" else r.routes[:, :, :-1]
            assert _mask(model, cols.reshape(L, -1).t(), budget).all()


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


def test_table_select_matches_pruned_search(model, tokens):
    table = pattern_losses(model, tokens, "token", skip=True)
    assert table.patterns.shape == (27, L)
    for budget in (Exactly(2), AtMost(1)):
        a = table.select(budget)
        b = search(model, tokens, budget, "token", skip=True)
        torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=0)


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
    for i in torch.randint(0, 4096, (4,), generator=gen).tolist():
        p = seq.patterns[i]
        want = m.token_losses(tok, p.tolist()).detach()
        torch.testing.assert_close(seq.losses[i], want, atol=ATOL, rtol=0)
    got = _brute_token(m, tok, tokt.patterns[:3])
    torch.testing.assert_close(tokt.losses[:3], got, atol=ATOL, rtol=0)
    assert elapsed < 60  # ~2 s on one core; the prefix tree shares most of the work


def test_budget_errors(model, tokens):
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
    with pytest.raises(ValueError, match="FlopBudget"):
        FlopBudget()


def test_difficulty_table_and_csv(model, tokens, tmp_path):
    kinds = torch.randint(0, 4, tokens.shape)
    tab = token_difficulty(model, tokens, budgets=[1, L], kinds=kinds)
    n = B * (T - 1)
    assert len(tab) == n
    small = model.token_losses(tokens, "small").detach().reshape(-1)
    torch.testing.assert_close(tab.loss_small, small, atol=ATOL, rtol=0)
    # at most k big with an all-small context: the all-small pattern is a candidate
    assert (tab.difficulty >= -ATOL).all()
    assert (tab.loss_oracle["3"] <= tab.loss_oracle["1"] + 1e-7).all()
    torch.testing.assert_close(tab.difficulty, tab.loss_small - tab.loss_oracle["3"])
    path = tmp_path / "d.csv"
    export_csv(path, tab)
    lines = path.read_text().splitlines()
    assert lines[0].split(",") == ["sequence", "position", "token", "target", "loss_small",
                                   "loss_big", "loss_oracle_1", "loss_oracle_3", "difficulty",
                                   "kind"]
    assert len(lines) == n + 1
    stats = high_loss_correlation(tab)
    assert stats["n_high"] >= 1 and "corr_high_loss" in stats
