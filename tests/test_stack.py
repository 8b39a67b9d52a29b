"""The routed-stack interface over DuoLLM computes exactly what DuoLLM.forward computes."""
import pytest
import torch
from stack_contract import check_attend_in_context_with_own_context

from duollm import DuoConfig, DuoLLM
from duollm.reference import BIG, SKIP, SMALL
from duollm.stack import DuoStack, RoutedStack, as_stack


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DuoLLM(DuoConfig.from_name("tiny", vocab_size=61)).eval()


def _tokens(B=2, T=9, V=61):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("routes", ["big", "small", "skip", [BIG, SMALL, SKIP, BIG],
                                    "per-token", "router"])
def test_stack_forward_equals_model(model, routes):
    tokens = _tokens()
    L, (B, T) = model.config.n_layers, tokens.shape
    if routes == "per-token":
        routes = torch.randint(0, 3, (L, B, T), generator=torch.Generator().manual_seed(2))
    elif routes == "router":
        def routes(layer, hidden):
            return (hidden[..., 0] > 0).long() + 1
    stack = as_stack(model)
    assert isinstance(stack, DuoStack) and as_stack(stack) is stack
    with torch.no_grad():
        torch.testing.assert_close(stack(tokens, routes), model(tokens, routes),
                                   rtol=0, atol=0)
        torch.testing.assert_close(stack.token_losses(tokens, "small"),
                                   model.token_losses(tokens, "small"), rtol=0, atol=0)


def test_attend_in_context_with_own_context_is_causal_attention(model):
    # When every branch's own keys are the context's, position t sees exactly positions <= t.
    stack = as_stack(model)
    check_attend_in_context_with_own_context(stack, stack.embed(_tokens()),  # (B, T, d)
                                             model.config.n_layers)


def test_as_stack_rejects_other_models():
    with pytest.raises(TypeError, match="model: expected a DuoLLM"):
        as_stack(torch.nn.Linear(2, 2))
    assert issubclass(DuoStack, RoutedStack)
