"""duollm.hf.routing: every routes form on a converted HF model, generate, and scoping."""
import hf_models as H
import pytest
import torch

from duollm.reference import BIG, SKIP, SMALL

hf = pytest.importorskip("duollm.hf")

D_SMALL = 24
L = H.N_LAYERS


def _converted(family="llama", **kw):
    return hf.convert(H.FAMILIES[family](), D_SMALL, **kw)


def _logits(model, t, routes=None, **kw):
    with torch.no_grad():
        if routes is None:
            return model(t).logits
        with hf.routing(model, routes, **kw):
            return model(t).logits


@pytest.mark.parametrize("family", ["llama_gqa", "qwen3"])
def test_pattern_equals_matching_per_token_tensor(family):
    model = _converted(family)
    t = H.tokens()
    pattern = [SMALL, SKIP, BIG]
    per_token = torch.tensor(pattern).view(L, 1, 1).expand(L, *t.shape).clone()
    a = _logits(model, t, pattern)
    b = _logits(model, t, per_token)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # And the pattern really differs from all-big and all-small.
    assert (a - _logits(model, t)).abs().max() > 1e-3
    assert (a - _logits(model, t, "small")).abs().max() > 1e-3


def test_policies_equal_their_patterns():
    model = _converted()
    t = H.tokens()
    for name, route in (("small", SMALL), ("skip", SKIP), ("big", BIG)):
        torch.testing.assert_close(_logits(model, t, name), _logits(model, t, [route] * L),
                                   atol=0, rtol=0)


def test_changing_a_later_route_never_changes_an_earlier_logit():
    model = _converted("mistral")
    t = H.tokens(T=16)
    g = torch.Generator().manual_seed(0)
    routes = torch.randint(0, 3, (L, *t.shape), generator=g)
    base = _logits(model, t, routes)
    j = 9
    changed = routes.clone()
    changed[:, :, j:] = (changed[:, :, j:] + 1) % 3
    out = _logits(model, t, changed)
    # Close, not bit-equal: regrouped tokens run through GEMMs of other sizes.
    torch.testing.assert_close(out[:, :j], base[:, :j], atol=1e-5, rtol=1e-5)
    assert (out[:, j:] - base[:, j:]).abs().max() > 1e-3


def test_router_is_called_once_per_layer_with_that_layers_ffn_input():
    model = _converted("qwen2")
    t = H.tokens()
    seen, inputs = [], {}
    for i, layer in enumerate(model.model.layers):
        layer.post_attention_layernorm.register_forward_hook(
            lambda m, a, out, i=i: inputs.__setitem__(i, out))

    def router(layer, hidden):
        seen.append(layer)
        assert torch.equal(hidden, inputs[layer])
        routes = torch.where(hidden[..., 0] > 0, BIG, SMALL)
        return routes, torch.full(routes.shape, 0.5)

    out = _logits(model, t, router)
    assert seen == list(range(L))
    # The gate halves every FFN output: it must not equal the ungated routing.
    ungated = _logits(model, t, lambda i, h: router(i, h)[0])
    assert (out - ungated).abs().max() > 1e-3


def _greedy_matches_no_cache_forward(model, routes, n_new=6):
    prompt = H.tokens(B=2, T=5, seed=4)
    with torch.no_grad(), hf.routing(model, routes):
        gen = model.generate(prompt, max_new_tokens=n_new, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        full = model(gen.sequences).logits  # no cache: the whole sequence at once
    T0 = prompt.shape[1]
    assert gen.sequences.shape == (2, T0 + n_new)
    step_logits = torch.stack(gen.logits, 1)  # (B, n_new, V)
    torch.testing.assert_close(step_logits, full[:, T0 - 1:-1], atol=1e-5, rtol=1e-5)
    assert torch.equal(gen.sequences[:, T0:], full[:, T0 - 1:-1].argmax(-1))
    return gen.sequences


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_generate_under_small_agrees_with_the_no_cache_forward(family):
    model = _converted(family)
    seq = _greedy_matches_no_cache_forward(model, "small")
    with torch.no_grad():
        big = model.generate(seq[:, :5], max_new_tokens=6, do_sample=False)
    assert not torch.equal(big, seq)  # on this model, small and big do decode differently


def test_generate_under_a_router_agrees_with_the_no_cache_forward():
    model = _converted("llama_gqa")
    calls = []

    def router(layer, hidden):
        calls.append(hidden.shape[1])
        return torch.where(hidden.sum(-1) > 0, BIG, SMALL)

    _greedy_matches_no_cache_forward(model, router)
    # Prefill (T=5), then one call per layer per decoded token (T=1), then the full forward.
    assert calls[:L] == [5] * L and set(calls[L:-L]) == {1}


def test_generate_with_a_per_token_tensor_raises_a_clear_error():
    model = _converted()
    prompt = H.tokens(B=1, T=4)
    routes = torch.full((L, 1, 4), SMALL)
    with pytest.raises(ValueError, match="per-token routes tensor"):
        with torch.no_grad(), hf.routing(model, routes):
            model.generate(prompt, max_new_tokens=3, do_sample=False)


def test_an_exception_inside_routing_restores_the_previous_routing():
    model = _converted()
    t = H.tokens()
    big = _logits(model, t)
    small = _logits(model, t, "small")
    with pytest.raises(RuntimeError, match="boom"):
        with hf.routing(model, "small"):
            raise RuntimeError("boom")
    assert torch.equal(_logits(model, t), big)
    assert hf.active_routes(model) is None
    with hf.routing(model, "small"):
        with pytest.raises(RuntimeError):
            with hf.routing(model, "skip"):
                assert hf.active_routes(model) == [SKIP] * L
                raise RuntimeError("inner")
        assert hf.active_routes(model) == [SMALL] * L
        with torch.no_grad():
            assert torch.equal(model(t).logits, small)
    assert torch.equal(_logits(model, t), big)


def test_two_converted_models_route_independently():
    a, b = _converted(), _converted()
    t = H.tokens()
    with torch.no_grad(), hf.routing(a, "small"):
        la = a(t).logits
        lb = b(t).logits
    assert torch.equal(lb, _logits(b, t))
    assert torch.equal(la, _logits(a, t, "small"))


def test_a_deep_copy_routes_independently_of_its_original():
    import copy
    a = _converted()
    b = copy.deepcopy(a)
    t = H.tokens()
    with torch.no_grad(), hf.routing(b, "small"):
        assert torch.equal(a(t).logits, _logits(H.llama(), t))
        assert torch.equal(b(t).logits, _logits(a, t, "small"))


def test_random_policy_uses_the_conversions_probs_and_generator():
    model = _converted(probs=(0.0, 1.0, 0.0))
    t = H.tokens()
    assert torch.equal(_logits(model, t, "random"), _logits(model, t, "small"))
    model = _converted()
    r1 = _logits(model, t, "random", generator=torch.Generator().manual_seed(3))
    r2 = _logits(model, t, "random", generator=torch.Generator().manual_seed(3))
    r3 = _logits(model, t, "random", generator=torch.Generator().manual_seed(4))
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)


def test_backend_choice_is_used():
    model = _converted()
    t = H.tokens()
    routes = torch.randint(0, 3, (L, *t.shape), generator=torch.Generator().manual_seed(2))
    ref = _logits(model, t, routes)
    torch.testing.assert_close(_logits(model, t, routes, backend="torch"), ref,
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        with hf.routing(model, "small", backend="nope"):
            pass


@pytest.mark.parametrize("routes", ["small", "per-token"])
def test_the_named_backend_runs_the_ffns(monkeypatch, routes):
    """routing(..., backend=) reaches the op dispatch: every op an FFN resolves is asked of the
    named backend (triton, in the interpreter here), and the result matches the default."""
    from duollm import ops

    if not ops.is_available("triton", torch.device("cpu")):
        pytest.skip("triton is not available here")
    model = _converted()
    t = H.tokens(B=1, T=6)
    if routes == "per-token":
        routes = torch.randint(0, 3, (L, *t.shape), generator=torch.Generator().manual_seed(4))
    ref = _logits(model, t, routes)
    asked = []
    real = ops.resolve

    def spy(op, device, backend=None, optional=False):
        asked.append(backend)
        return real(op, device, backend, optional)

    monkeypatch.setattr(ops, "resolve", spy)
    out = _logits(model, t, routes, backend="triton")
    assert asked and set(asked) == {"triton"}, asked
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("routes, exc, match", [
    ("medium", ValueError, "unknown policy"),
    ([BIG] * (L + 1), ValueError, "shape"),
    ([1.0] * L, TypeError, "integer"),
    ([3] * L, ValueError, r"\[0, 3\)"),
    (torch.zeros(L, 2, dtype=torch.long), ValueError, "shape"),
    (42, TypeError, "routes"),
])
def test_bad_routes_raise_on_entry(routes, exc, match):
    model = _converted()
    with pytest.raises(exc, match=match):
        with hf.routing(model, routes):
            pass
    assert hf.active_routes(model) is None


def test_skip_refused_when_converted_without_skip():
    model = _converted(skip=False)
    with pytest.raises(ValueError, match="skip"):
        with hf.routing(model, "skip"):
            pass
    with pytest.raises(ValueError, match="routes"):  # a router returning SKIP, caught per call
        with torch.no_grad(), hf.routing(model, lambda i, h: torch.zeros(h.shape[:-1],
                                                                          dtype=torch.long)):
            model(H.tokens())


def test_routing_an_unconverted_model_raises():
    with pytest.raises(TypeError, match="convert"):
        with hf.routing(H.llama(), "small"):
            pass


def test_wrong_length_per_token_tensor_raises():
    model = _converted()
    with pytest.raises(ValueError, match="shape"):
        _logits(model, H.tokens(T=7), torch.full((L, 2, 8), BIG))


def test_generate_under_random_routing_draws_per_step_and_is_seeded():
    model = _converted()
    prompt = H.tokens(B=2, T=4, seed=6)

    def run(seed):
        with torch.no_grad(), hf.routing(model, "random",
                                         generator=torch.Generator().manual_seed(seed)):
            return model.generate(prompt, max_new_tokens=8, do_sample=False)

    a, b = run(1), run(1)
    assert a.shape == (2, 12) and torch.equal(a, b)
    assert any(not torch.equal(run(s), a) for s in (2, 3, 4))  # the draws matter


def test_bf16_routing_matches_the_float32_model():
    t = H.tokens()
    ref = _logits(_converted("qwen3"), t, [SMALL, BIG, SKIP])
    model = hf.convert(H.qwen3(dtype=torch.bfloat16), D_SMALL)
    out = _logits(model, t, [SMALL, BIG, SKIP]).float()
    # bf16 rounding measured ~0.02 here; routing one layer differently moves logits by ~0.5.
    assert (out - ref).abs().max() < 0.1
    wrong = _logits(model, t, [BIG, BIG, SKIP]).float()
    assert (wrong - ref).abs().max() > 0.2


@pytest.mark.parametrize("returns", [None, (None, None), "big", (1, 2, 3)])
def test_a_router_returning_no_routes_tensor_is_named_with_its_layer(returns):
    """Returning None used to re-enter the routing plan until RecursionError."""
    model = _converted()

    def my_router(layer, hidden):
        if layer == 1:
            return returns
        return torch.full(hidden.shape[:2], BIG)

    with pytest.raises(TypeError, match=r"router .*my_router returned \w+ for layer 1"):
        _logits(model, H.tokens(), my_router)
