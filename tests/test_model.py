"""``DuoLLM``: shapes, causality, every routes form, generation with the KV cache, losses."""
import pytest
import torch
import torch.nn.functional as F

from duollm import BIG, SKIP, SMALL, DuoConfig, DuoLLM, KVCache

L, B, T, V = 4, 2, 10, 256



@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DuoLLM(DuoConfig.from_name("tiny", max_seq_len=32)).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))


def _routes(seed=2, t=T):
    return torch.randint(0, 3, (L, B, t), generator=torch.Generator().manual_seed(seed))


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- shapes


def test_output_shapes(model, tokens):
    logits = model(tokens)
    assert logits.shape == (B, T, V) and logits.dtype == torch.float32
    logits, hidden = model(tokens, "small", return_hidden=True)
    assert logits.shape == (B, T, V)
    assert len(hidden) == L and all(h.shape == (B, T, 64) for h in hidden)
    assert model(tokens.to(torch.int32)).shape == (B, T, V)


def test_empty_sequences(model):
    for routes in ("big", "random"):
        assert model(torch.zeros(B, 0, dtype=torch.int64), routes).shape == (B, 0, V)
        assert model(torch.zeros(0, 3, dtype=torch.int64), routes).shape == (0, 3, V)


# --------------------------------------------------------------------------- causality


def test_causality_under_fixed_routes(model, tokens):
    routes = _routes()
    base = model(tokens, routes)
    for pos in (0, 4, T - 1):
        changed = tokens.clone()
        changed[:, pos] = (changed[:, pos] + 1) % V
        out = model(changed, routes)
        torch.testing.assert_close(out[:, :pos], base[:, :pos], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, pos], base[:, pos], atol=1e-4)


# --------------------------------------------------------------------------- routes forms


@pytest.mark.parametrize("name,route", [("big", BIG), ("small", SMALL), ("skip", SKIP)])
def test_policy_names_equal_full_tensors(model, tokens, name, route):
    full = torch.full((L, B, T), route, dtype=torch.int64)
    expected = model(tokens, full)
    _close(model(tokens, name), expected)
    _close(model(tokens, [route] * L), expected)
    _close(model(tokens, torch.full((L,), route, dtype=torch.int8)), expected)


def test_policies_differ(model, tokens):
    big, small, skip = (model(tokens, r) for r in ("big", "small", "skip"))
    assert not torch.allclose(big, small, atol=1e-4)
    assert not torch.allclose(small, skip, atol=1e-4)


def test_default_policy_is_big(model, tokens):
    _close(model(tokens), model(tokens, "big"))


def test_layer_pattern_forms(model, tokens):
    pattern = [BIG, SMALL, SKIP, BIG]
    full = torch.tensor(pattern).view(L, 1, 1).expand(L, B, T).contiguous()
    expected = model(tokens, full)
    _close(model(tokens, pattern), expected)
    _close(model(tokens, tuple(pattern)), expected)
    _close(model(tokens, torch.tensor(pattern, dtype=torch.int32)), expected)
    assert not torch.allclose(expected, model(tokens, "big"), atol=1e-4)


def test_full_routes_tensor_is_per_token(model, tokens):
    routes = _routes()
    out = model(tokens, routes)
    flipped = routes.clone()
    flipped[:, 1, -1] = (flipped[:, 1, -1] + 1) % 3  # only the last token of sequence 1
    out2 = model(tokens, flipped)
    _close(out2[0], out[0])
    _close(out2[1, :-1], out[1, :-1])
    assert not torch.allclose(out2[1, -1], out[1, -1], atol=1e-5)


def test_router_returning_routes(model, tokens):
    routes = _routes()
    seen = []

    def router(layer, hidden):
        seen.append((layer, tuple(hidden.shape)))
        return routes[layer]

    _close(model(tokens, router), model(tokens, routes))
    assert seen == [(i, (B, T, 64)) for i in range(L)]


def test_router_returning_routes_and_gate(model, tokens):
    routes = _routes()
    ones = model(tokens, lambda i, h: (routes[i], torch.ones(B, T)))
    _close(ones, model(tokens, routes))
    # A zero gate removes every FFN's contribution: the same as skipping every layer.
    zeros = model(tokens, lambda i, h: (routes[i], torch.zeros(B, T)))
    _close(zeros, model(tokens, "skip"))
    half = model(tokens, lambda i, h: (routes[i], torch.full((B, T), 0.5)))
    assert not torch.allclose(half, ones, atol=1e-5)


def test_router_sees_the_ffn_input(model, tokens):
    _, hidden = model(tokens, "small", return_hidden=True)
    captured = []

    def router(layer, h):
        captured.append(h)
        return torch.full(h.shape[:-1], SMALL)

    model(tokens, router)
    for a, b in zip(captured, hidden):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_random_policy_is_reproducible(model, tokens):
    def run(seed):
        return model(tokens, "random", generator=torch.Generator().manual_seed(seed))

    _close(run(5), run(5))
    drawn = model.random_routes(B, T, torch.device("cpu"), torch.Generator().manual_seed(5))
    assert drawn.shape == (L, B, T) and drawn.dtype == torch.int64
    _close(run(5), model(tokens, drawn))
    assert not torch.allclose(run(5), run(6), atol=1e-5)


def test_random_routes_follow_config_probabilities():
    cfg = DuoConfig.from_name("tiny", n_layers=2, p_skip=0.0, p_small=0.0, p_big=1.0)
    m = DuoLLM(cfg)
    g = torch.Generator().manual_seed(0)
    assert (m.random_routes(3, 5, torch.device("cpu"), g) == BIG).all()
    cfg = DuoConfig.from_name("tiny", n_layers=2, p_skip=0.25, p_small=0.25, p_big=0.5)
    draws = DuoLLM(cfg).random_routes(50, 50, torch.device("cpu"), g)
    freq = torch.bincount(draws.reshape(-1), minlength=3).double() / draws.numel()
    torch.testing.assert_close(freq, torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64),
                               rtol=0, atol=0.02)


def test_skip_false_model_rejects_skip(tokens):
    m = DuoLLM(DuoConfig.from_name("tiny", n_layers=2, skip=False))
    with pytest.raises(ValueError, match="routes"):
        m(tokens, "skip")
    with pytest.raises(ValueError, match="routes"):
        m(tokens, [BIG, SKIP])
    assert m(tokens, "random", generator=torch.Generator().manual_seed(0)).shape == (B, T, V)


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("routes", ["big", "small", [BIG, SMALL, SKIP, SMALL], "router"])
def test_generate_cache_equals_no_cache(model, tokens, routes):
    if routes == "router":  # a data-dependent router: big where the hidden state's sum > 0
        def routes(layer, h):
            return torch.where(h.sum(-1) > 0, BIG, SMALL)
    cached = model.generate(tokens, 8, routes)
    plain = model.generate(tokens, 8, routes, use_cache=False)
    assert cached.shape == (B, T + 8)
    assert torch.equal(cached[:, :T], tokens)
    assert torch.equal(cached, plain)


def test_cached_forward_logits_equal_full_forward(model, tokens):
    pattern = [BIG, SMALL, SKIP, BIG]
    full = model(tokens, pattern)
    cache = KVCache.empty(model.config, B, T, tokens.device, torch.float32)
    pieces = [model(tokens[:, :4], pattern, cache=cache)]  # prefill 4 tokens
    assert cache.pos == 4
    for t in range(4, T):  # then one at a time
        pieces.append(model(tokens[:, t:t + 1], pattern, cache=cache))
    assert cache.pos == T
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_generate_greedy_is_argmax_of_forward(model, tokens):
    out = model.generate(tokens, 1, "small")
    expected = model(tokens, "small")[:, -1].argmax(-1)
    assert torch.equal(out[:, -1], expected)


def test_generate_sampling_is_seeded(model, tokens):
    def run(seed):
        return model.generate(tokens, 5, temperature=1.0, top_k=10,
                              generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(3), run(3))
    assert model.generate(tokens, 0).shape == (B, T)


def test_generate_under_autocast(model, tokens):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(tokens, 3, [BIG, SMALL, SKIP, BIG])
    assert out.shape == (B, T + 3) and out.dtype == tokens.dtype


def test_generate_bad_input(model, tokens):
    with pytest.raises(ValueError, match="routes"):
        model.generate(tokens, 2, _routes())
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(tokens, 32 - T + 1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(tokens, -1)
    with pytest.raises(ValueError, match="tokens"):
        model.generate(tokens[0], 2)
    with pytest.raises(ValueError, match="tokens"):
        model.generate(tokens[:, :0], 2)


def test_cache_too_small_or_wrong_batch(model, tokens):
    cache = KVCache.empty(model.config, B, 4, tokens.device, torch.float32)
    with pytest.raises(ValueError, match="cache"):
        model(tokens[:, :5], cache=cache)
    cache = KVCache.empty(model.config, B + 1, T, tokens.device, torch.float32)
    with pytest.raises(ValueError, match="cache"):
        model(tokens, cache=cache)


# --------------------------------------------------------------------------- losses


def test_token_losses_by_hand(model, tokens):
    pattern = [SMALL, BIG, BIG, SKIP]
    losses = model.token_losses(tokens, pattern)
    assert losses.shape == (B, T - 1)
    logits = model(tokens[:, :-1], pattern)  # (B, T-1, V)
    expected = torch.stack([torch.stack([
        F.cross_entropy(logits[b, t][None], tokens[b, t + 1][None]) for t in range(T - 1)])
        for b in range(B)])
    torch.testing.assert_close(losses, expected, rtol=1e-6, atol=1e-6)
    logp = torch.log_softmax(logits.double(), -1)
    by_hand = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(losses.double(), by_hand, rtol=1e-5, atol=1e-5)


def test_token_losses_with_full_routes(model, tokens):
    routes = _routes()
    losses = model.token_losses(tokens, routes)
    logits = model(tokens[:, :-1], routes[:, :, :-1])
    expected = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    torch.testing.assert_close(losses, expected, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- bad input


def test_bad_tokens(model, tokens):
    with pytest.raises(TypeError, match="tokens"):
        model(tokens.float())
    with pytest.raises(TypeError, match="tokens"):
        model(tokens.tolist())
    with pytest.raises(ValueError, match="tokens"):
        model(tokens[0])
    with pytest.raises(ValueError, match="tokens"):
        model(torch.full((1, 3), V))
    with pytest.raises(ValueError, match="tokens"):
        model(torch.full((1, 3), -1))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.int64))


def test_bad_routes(model, tokens):
    with pytest.raises(ValueError, match="routes.*nope"):
        model(tokens, "nope")
    with pytest.raises(ValueError, match="routes"):
        model(tokens, _routes(t=T + 1))  # (L, B, T+1)
    with pytest.raises(ValueError, match="routes"):
        model(tokens, [BIG] * (L + 1))
    with pytest.raises(ValueError, match="routes"):
        model(tokens, torch.full((L, B), BIG))
    with pytest.raises(TypeError, match="routes"):
        model(tokens, _routes().float())
    with pytest.raises(TypeError, match="routes"):
        model(tokens, [2.0, 1.5, 1.0, 2.0])  # never truncated to integers
    with pytest.raises(TypeError, match="routes"):
        model(tokens, 2)
    with pytest.raises(ValueError, match="routes"):
        model(tokens, [BIG, 3, BIG, BIG])
    with pytest.raises(ValueError, match="routes"):
        model(tokens, [BIG, -1, BIG, BIG])
    with pytest.raises(ValueError, match="routes"):
        model(tokens, lambda i, h: torch.full((B, T + 1), BIG))  # router output shape
