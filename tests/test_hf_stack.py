"""HFStack: the RoutedStack of a converted HF model computes what the HF model computes."""
import hf_models as H
import pytest
import torch
import torch.nn.functional as F
from stack_contract import check_attend_in_context_with_own_context

from duollm.reference import BIG, SKIP, SMALL
from duollm.stack import RoutedStack, as_stack

hf = pytest.importorskip("duollm.hf")

L = H.N_LAYERS


def _stack(family):
    model = hf.convert(H.FAMILIES[family](), 24)
    stack = as_stack(model)
    assert isinstance(stack, hf.HFStack) and isinstance(stack, RoutedStack)
    return model, stack


def _routes(form, t):
    if form == "per-token":
        return torch.randint(0, 3, (L, *t.shape), generator=torch.Generator().manual_seed(2))
    if form == "router":
        return lambda layer, hidden: torch.where(hidden[..., 1] > 0, BIG, SMALL)
    return form


@pytest.mark.parametrize("family", sorted(H.FAMILIES))
@pytest.mark.parametrize("form", ["big", "small", [SMALL, SKIP, BIG], "per-token", "router"])
def test_stack_forward_equals_the_model_under_routing(family, form):
    model, stack = _stack(family)
    t = H.tokens(T=12)  # longer than Mistral's sliding window of 8
    routes = _routes(form, t)
    with torch.no_grad():
        with hf.routing(model, routes):
            ref = model(t).logits
        out = stack(t, routes)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_stack_token_losses_equal_the_models_cross_entropy():
    model, stack = _stack("qwen2")
    t = H.tokens(T=10)
    with torch.no_grad():
        with hf.routing(model, "small"):
            logits = model(t[:, :-1]).logits
        ref = F.cross_entropy(logits.transpose(1, 2), t[:, 1:], reduction="none")
        torch.testing.assert_close(stack.token_losses(t, "small"), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(H.FAMILIES))
def test_attend_in_context_with_its_own_context_is_causal_attention(family):
    _, stack = _stack(family)
    check_attend_in_context_with_own_context(stack, stack.embed(H.tokens(T=12)), L)


@pytest.mark.parametrize("family", ["qwen3", "mistral", "llama_gqa"])
def test_attend_in_context_equals_brute_force(family):
    """Branch position t == plain causal attention over [context[:t], branch[t]], last row."""
    _, stack = _stack(family)
    B, T, d = 2, 11, H.D_MODEL
    g = torch.Generator().manual_seed(7)
    h_ctx = torch.randn(B, T, d, generator=g)
    branches = torch.randn(2, B, T, d, generator=g)  # W = 2 branches
    with torch.no_grad():
        for i in (0, L - 1):
            _, ctx = stack.attend_record(i, h_ctx)
            out = stack.attend_in_context(i, branches, ctx)
            for w in range(2):
                for t in range(T):
                    seq = torch.cat([h_ctx[:, :t], branches[w, :, t:t + 1]], dim=1)
                    ref = stack.attend(i, seq)[:, -1]
                    torch.testing.assert_close(out[w, :, t], ref, atol=1e-5, rtol=1e-5)


def test_attend_takes_extra_leading_dims():
    _, stack = _stack("llama")
    h = torch.randn(3, 2, 7, H.D_MODEL, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = stack.attend(0, h)
        for w in range(3):
            torch.testing.assert_close(out[w], stack.attend(0, h[w]), atol=1e-6, rtol=1e-6)


def test_stack_of_a_converted_base_model_is_refused():
    base = hf.convert(H.llama().model, 8)
    with pytest.raises(TypeError, match="ForCausalLM"):
        as_stack(base)


def test_stack_attributes():
    model, stack = _stack("qwen3")
    assert (stack.n_layers, stack.d_model, stack.vocab_size) == (L, H.D_MODEL, H.VOCAB)
    assert (stack.d_big, stack.d_small, stack.skip) == (H.D_FF, 24, True)
    assert stack.ffn_module(1) is model.model.layers[1].mlp


def test_stack_refuses_a_layer_it_would_not_replay_exactly():
    # OLMo2: a SwiGLU MLP (so convert and routing work) but post-norms instead of pre-norms.
    config = H.transformers.Olmo2Config(**H._common())
    model = hf.convert(H.transformers.Olmo2ForCausalLM(config).eval(), 8)
    with pytest.raises(ValueError, match="layer 0: the RoutedStack replays pre-norm"):
        as_stack(model)


def test_cache_keyword_is_read_from_the_signature():
    from duollm.hf_compat import cache_keyword

    def new(input_ids=None, cache=None, **kwargs):
        pass

    def old(input_ids=None, past_key_values=None, **kwargs):
        pass

    def neither(input_ids=None, **kwargs):
        pass

    assert cache_keyword(new) == "cache"
    assert cache_keyword(old) == "past_key_values"
    with pytest.raises(TypeError, match="neither cache= nor past_key_values="):
        cache_keyword(neither)
