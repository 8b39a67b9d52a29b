"""``RMSNorm``, ``SwiGLU`` and ``DuoFFN``: the routed layer against its plain FFNs."""
import math

import pytest
import torch

from duollm import BIG, SKIP, SMALL, DuoFFN, RMSNorm, SwiGLU


@pytest.fixture
def ffn():
    torch.manual_seed(0)
    return DuoFFN(d_model=24, d_big=40, d_small=6)


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_layout_and_names(ffn):
    assert ffn.widths == (0, 6, 40)
    assert ffn.num_paths == 3
    assert ffn.big.gate_proj.weight.shape == (40, 24)
    assert ffn.big.up_proj.weight.shape == (40, 24)
    assert ffn.big.down_proj.weight.shape == (24, 40)
    assert ffn.small.down_proj.weight.shape == (24, 6)
    for lin in (ffn.big.gate_proj, ffn.big.up_proj, ffn.big.down_proj, ffn.small.gate_proj):
        assert lin.bias is None
    params = ffn.params()
    assert params[SKIP] is None
    assert params[SMALL][0] is ffn.small.gate_proj.weight
    assert params[BIG][2] is ffn.big.down_proj.weight
    names = {n for n, _ in ffn.named_parameters()}
    assert names == {f"{m}.{p}_proj.weight" for m in ("big", "small")
                     for p in ("gate", "up", "down")}
    assert "skip=True" in repr(ffn)


def test_swiglu_module_hand_case():
    m = SwiGLU(2, 1)
    with torch.no_grad():
        m.gate_proj.weight.copy_(torch.tensor([[1.0, 1.0]]))
        m.up_proj.weight.copy_(torch.tensor([[2.0, -1.0]]))
        m.down_proj.weight.copy_(torch.tensor([[1.0], [3.0]]))
    x = torch.tensor([[[1.0, 0.5]]])  # (1, 1, 2): g = 1.5, u = 1.5
    h = 1.5 / (1 + math.exp(-1.5)) * 1.5
    torch.testing.assert_close(m(x), torch.tensor([[[h, 3 * h]]]), rtol=1e-6, atol=1e-6)


def test_all_big_equals_big_ffn(ffn):
    x = _x(3, 5, 24)
    out = ffn(x, torch.full((3, 5), BIG))
    torch.testing.assert_close(out, ffn.big(x), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out, ffn.small(x), atol=1e-3)


def test_all_small_equals_small_ffn(ffn):
    x = _x(3, 5, 24)
    out = ffn(x, torch.full((3, 5), SMALL))
    torch.testing.assert_close(out, ffn.small(x), rtol=1e-6, atol=1e-6)


def test_all_skip_is_zero_or_residual(ffn):
    x, res = _x(3, 5, 24), _x(3, 5, 24, seed=2)
    routes = torch.full((3, 5), SKIP)
    torch.testing.assert_close(ffn(x, routes), torch.zeros_like(x), rtol=0, atol=0)
    torch.testing.assert_close(ffn(x, routes, residual=res), res, rtol=0, atol=0)


def test_mixed_routes_and_gate(ffn):
    x, res = _x(2, 4, 24), _x(2, 4, 24, seed=2)
    routes = torch.tensor([[BIG, SMALL, SKIP, BIG], [SMALL, SMALL, BIG, SKIP]])
    gate = torch.rand(2, 4)
    out = ffn(x, routes, residual=res, gate=gate)
    per_path = {BIG: ffn.big(x), SMALL: ffn.small(x), SKIP: torch.zeros_like(x)}
    expected = torch.stack([torch.stack([
        res[b, t] + (gate[b, t] if routes[b, t] != SKIP else 1.0)
        * per_path[int(routes[b, t])][b, t] for t in range(4)]) for b in range(2)])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_x_of_shape_batch_time_d(ffn):
    x = _x(2, 7, 24)
    routes = torch.randint(0, 3, (2, 7), generator=torch.Generator().manual_seed(3))
    out = ffn(x, routes)
    assert out.shape == (2, 7, 24)
    flat = ffn(x.reshape(14, 24), routes.reshape(14))
    torch.testing.assert_close(out.reshape(14, 24), flat, rtol=0, atol=0)
    with pytest.raises(ValueError, match="routes"):
        ffn(x, routes.reshape(14))


def test_skip_false_rejects_skip_routes():
    m = DuoFFN(8, 16, 4, skip=False)
    x = _x(3, 8)
    with pytest.raises(ValueError, match="routes"):
        m(x, torch.tensor([BIG, SKIP, SMALL]))
    out = m(x, torch.tensor([BIG, SMALL, SMALL]))  # no skip: fine
    assert out.shape == (3, 8)
    assert "skip=False" in repr(m)


def test_gradients_reach_only_the_used_module(ffn):
    x = _x(4, 24).requires_grad_()
    ffn(x, torch.full((4,), SMALL)).sum().backward()
    assert ffn.small.gate_proj.weight.grad is not None
    assert ffn.small.gate_proj.weight.grad.abs().sum() > 0
    big_grad = ffn.big.gate_proj.weight.grad
    assert big_grad is None or big_grad.abs().sum() == 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_gradcheck_duo_ffn_module():
    torch.manual_seed(4)
    m = DuoFFN(4, 5, 2).double()
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    res = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(6, dtype=torch.float64, requires_grad=True)
    routes = torch.tensor([2, 1, 0, 2, 1, 1])
    assert torch.autograd.gradcheck(lambda x, r, g: m(x, routes, residual=r, gate=g),
                                    (x, res, gate))


def test_rmsnorm_hand_case_and_float64():
    norm = RMSNorm(2, eps=0.0)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0]))
    r = 1 / math.sqrt(12.5)
    torch.testing.assert_close(norm(torch.tensor([[3.0, 4.0]])),
                               torch.tensor([[3 * r, 8 * r]]), rtol=1e-6, atol=0)
    norm64 = RMSNorm(3, eps=1e-5).double()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert norm64(x).dtype == torch.float64
    assert torch.autograd.gradcheck(norm64, (x,))
    half = norm(torch.tensor([[300.0, 400.0]], dtype=torch.float16))  # squares overflow fp16
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
