"""duollm.routers: trained and imitation routers (big/small and with a skip path, budgets on big
usage or on compute), calibration, baselines, agreement."""
import pytest
import torch

from duollm import BIG, SKIP, SMALL, DuoConfig, DuoLLM
from duollm.oracle import Exactly, pattern_losses, search
from duollm.routers import (LinearRouter, agreement, best_random_pattern, calibrate,
                            compute_fraction, compute_prices, fixed_pattern, random_patterns,
                            random_token_routes, route_and_loss, soft_forward,
                            soft_forward_stats, train_router, train_supervised_router)
from duollm.stack import as_stack

BUDGET_TOL = 0.05  # |realised - target| big fraction after training / calibration



@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = DuoConfig(n_layers=2, d_model=32, n_heads=2, vocab_size=32, d_big=64, d_small=8,
                    max_seq_len=64)
    m = DuoLLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m


@pytest.fixture(scope="module")
def stream():
    # a learnable stream: a fixed random cycle of 40 ids
    gen = torch.Generator().manual_seed(0)
    cycle = torch.randint(0, 32, (40,), generator=gen)
    return cycle.repeat(100)


def test_router_interface_and_modes(model):
    r = LinearRouter(model.config)
    x = torch.randn(2, 5, 32)
    assert r(0, x).shape == (2, 5) and r(0, x).dtype == torch.int64
    r.mode = "threshold"
    r.threshold = -1.0  # zero logits: score 0 > -1 -> all big
    assert (r(1, x) == BIG).all()
    r.threshold = 1.0
    assert (r(1, x) == SMALL).all()
    r3 = LinearRouter(model.config, (SKIP, SMALL, BIG))
    assert set(r3(0, x).unique().tolist()) <= {SKIP, SMALL, BIG}
    with pytest.raises(ValueError, match="paths"):
        LinearRouter(model.config, (SMALL, SMALL))
    with pytest.raises(ValueError, match="mode"):
        LinearRouter(model.config, mode="soft")
    logits = model(torch.zeros(1, 4, dtype=torch.long), r)
    assert logits.shape == (1, 4, 32)


def _objective(model, router, tokens, target, penalty=10.0):
    with torch.no_grad():
        lm, usage = soft_forward(model, router, tokens, tau=1.0)
    return float(lm + penalty * (usage.mean() - target) ** 2), float(usage.mean())


def test_train_router_lowers_objective_and_meets_budget(model, stream):
    target = 0.3
    kw = dict(target_big=target, batch_size=8, seq_len=24, lr=3e-2, tau_start=1.0,
              tau_end=1.0, seed=0)
    start, _ = train_router(model, stream, steps=0, **kw)  # the initial router
    router, hist = train_router(model, stream, steps=40, **kw)
    assert len(hist) == 40
    tokens = torch.stack([stream[i:i + 25] for i in range(0, 400, 25)])  # fixed batch
    before, _ = _objective(model, start, tokens, target)
    after, usage = _objective(model, router, tokens, target)
    assert after < before
    assert abs(usage - target) < BUDGET_TOL
    assert all(p.requires_grad for p in model.parameters())  # unfrozen afterwards
    tokens = torch.stack([stream[i:i + 25] for i in range(0, 200, 25)])
    realised = calibrate(model, router, tokens, target)
    assert abs(realised - target) < BUDGET_TOL
    losses, routes = route_and_loss(model, router, tokens)
    assert routes.shape == (2, 8, 24) and losses.shape == (8, 24)
    assert abs(float((routes == BIG).float().mean()) - realised) < 1e-6


def test_soft_forward_matches_hard_forward_at_one_hot(model):
    tokens = torch.randint(0, 32, (2, 9))
    r = LinearRouter(model.config)
    with torch.no_grad():
        for p in r.proj:
            p.bias.copy_(torch.tensor([0.0, 50.0]))  # certainly BIG
        loss, usage = soft_forward(model, r, tokens, tau=1.0)
    want = model.token_losses(tokens, "big").mean()
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=0)
    assert torch.allclose(usage, torch.ones(2))


def test_supervised_router_imitates_oracle(model, stream):
    tokens = torch.stack([stream[i:i + 17] for i in range(0, 400, 40)])
    oracle = search(model, tokens, Exactly(1), "token")
    router, hist = train_supervised_router(model, tokens, oracle.routes, steps=60)
    assert hist[-1]["ce"] < hist[0]["ce"]
    assert hist[-1]["accuracy"] >= hist[0]["accuracy"]
    calibrate(model, router, tokens, 0.5)
    _, routes = route_and_loss(model, router, tokens)
    agree = agreement(routes, oracle.routes)
    assert agree.shape == (2,) and ((agree >= 0) & (agree <= 1)).all()


def test_baselines(model):
    assert fixed_pattern(4, "first", 1) == [BIG, SMALL, SMALL, SMALL]
    assert fixed_pattern(4, "last", 2) == [SMALL, SMALL, BIG, BIG]
    assert fixed_pattern(3, "big") == [BIG] * 3 and fixed_pattern(3, "small") == [SMALL] * 3
    pats = random_patterns(6, 2, 50)
    assert pats.shape == (50, 6) and ((pats == BIG).sum(1) == 2).all()
    tr = random_token_routes(5, 3, 7, 2)
    assert tr.shape == (5, 3, 7) and ((tr == BIG).sum(0) == 2).all()
    tokens = torch.randint(0, 32, (3, 10))
    pattern, loss, n = best_random_pattern(model, tokens, 1, n=20)
    assert n == 2 and sum(p == BIG for p in pattern) == 1
    table = pattern_losses(model, tokens, "sequence")
    assert float(table.select(Exactly(1)).loss.mean()) <= loss + 1e-5


def test_agreement():
    a = torch.tensor([[[2, 1, 1, 2]], [[1, 1, 1, 1]]])
    b = torch.tensor([[[2, 2, 1, 2, 2]], [[2, 2, 2, 2, 2]]])  # longer time axis is trimmed
    torch.testing.assert_close(agreement(a, b), torch.tensor([0.75, 0.0]))


def test_skip_router_with_compute_penalty_trains_and_meets_budget_after_calibration(model,
                                                                                     stream):
    target = 0.4  # FFN FLOPs as a fraction of all-big
    kw = dict(target_compute=target, paths=(SKIP, SMALL, BIG), batch_size=8, seq_len=24,
              lr=3e-2, tau_start=1.0, tau_end=1.0, penalty=20.0, seed=0)
    start, _ = train_router(model, stream, steps=0, **kw)
    router, hist = train_router(model, stream, steps=40, **kw)
    assert router.paths == (SKIP, SMALL, BIG) and router.mode == "threshold"
    assert {"compute", "usage", "objective"} <= set(hist[-1])
    tokens = torch.stack([stream[i:i + 25] for i in range(0, 400, 25)])

    def objective(r):
        with torch.no_grad():
            s = soft_forward_stats(model, r, tokens, tau=1.0)
        comp = float(s.compute(r.paths, model).mean())
        return float(s.loss) + 20.0 * (comp - target) ** 2, comp

    before, _ = objective(start)
    after, comp = objective(router)
    assert after < before and abs(comp - target) < BUDGET_TOL
    calib = torch.stack([stream[i:i + 25] for i in range(0, 200, 25)])
    realised = calibrate(model, router, calib, target_compute=target)
    assert abs(realised - target) < BUDGET_TOL
    _, routes = route_and_loss(model, router, calib)
    assert abs(compute_fraction(routes, model) - realised) < 1e-6
    # the price of a path never falls as the threshold rises: compute is monotone
    fracs = []
    for thr in (-5.0, 0.0, 5.0):
        router.threshold = thr
        fracs.append(compute_fraction(route_and_loss(model, router, calib)[1], model))
    assert fracs[0] >= fracs[1] >= fracs[2]
    with pytest.raises(ValueError, match="exactly one"):
        calibrate(model, router, calib)


def test_compute_prices_and_soft_stats(model):
    prices = compute_prices(model)
    c = model.config
    assert prices[SKIP] == 0 and prices[BIG] == 1
    assert abs(float(prices[SMALL]) - c.d_small / c.d_big) < 1e-12
    r = LinearRouter(model, (SKIP, SMALL, BIG))
    tokens = torch.randint(0, 32, (2, 9))
    with torch.no_grad():
        s = soft_forward_stats(model, r, tokens, tau=1.0)
    # zero logits: each path 1/3, so compute is (0 + d_small/d_big + 1) / 3 per layer
    torch.testing.assert_close(s.probs, torch.full((2, 3), 1 / 3))
    want = (float(prices[SMALL]) + 1) / 3
    torch.testing.assert_close(s.compute(r.paths, model), torch.full((2,), want))
    with torch.no_grad():  # all skip: the model's all-skip loss
        for p in r.proj:
            p.bias.copy_(torch.tensor([50.0, 0.0, 0.0]))
        s = soft_forward_stats(model, r, tokens, tau=1.0)
    torch.testing.assert_close(s.loss, model.token_losses(tokens, "skip").mean(), atol=1e-5,
                               rtol=0)


def test_routers_run_on_a_stack(model):
    stack = as_stack(model)
    tokens = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(3))
    r = LinearRouter(stack, (SMALL, BIG))
    with torch.no_grad():
        for p in r.proj:
            p.weight.normal_(0, 1.0)
    a = route_and_loss(stack, r, tokens)
    b = route_and_loss(model, r, tokens)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert best_random_pattern(stack, tokens, 1, n=5) == best_random_pattern(model, tokens, 1,
                                                                              n=5)


def test_supervised_router_imitates_a_skip_oracle(model, stream):
    tokens = torch.stack([stream[i:i + 9] for i in range(0, 400, 40)])
    oracle = search(model, tokens, Exactly(1, route=SKIP), "token", base="pattern", skip=True)
    router, hist = train_supervised_router(model, tokens, oracle.routes, steps=40)
    assert set(router.paths) >= set(oracle.routes[:, :, :-1].unique().tolist())
    assert hist[-1]["ce"] < hist[0]["ce"]
    with pytest.raises(ValueError, match="outside paths"):
        train_supervised_router(model, tokens, oracle.routes, steps=1, paths=(SMALL, BIG))
