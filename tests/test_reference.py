"""The reference ops (the spec) against hand-worked cases, and their gradients by gradcheck."""
import math

import pytest
import torch

from duollm import reference as R
from duollm.reference import BIG, SKIP, SMALL


def silu(v: float) -> float:
    return v / (1.0 + math.exp(-v))


def _i64(values):
    return torch.tensor(values, dtype=torch.int64)


# --------------------------------------------------------------------------- group_tokens


def test_route_constants():
    assert (SKIP, SMALL, BIG) == (0, 1, 2)


def test_group_tokens_hand_case():
    # routes [2,0,1,2,1,0]: path 0 holds tokens 1,5; path 1 holds 2,4; path 2 holds 0,3.
    g = R.group_tokens(_i64([2, 0, 1, 2, 1, 0]), 3)
    assert g.perm.tolist() == [1, 5, 2, 4, 0, 3]
    assert g.inv.tolist() == [4, 0, 2, 5, 3, 1]
    assert g.counts.tolist() == [2, 2, 2]
    assert g.offsets.tolist() == [0, 2, 4, 6]
    assert g.routes.tolist() == [2, 0, 1, 2, 1, 0]
    assert g.num_paths == 3
    for field in (g.perm, g.inv, g.counts, g.offsets, g.routes):
        assert field.dtype == torch.int64


def test_group_tokens_empty_and_unused_paths():
    # P=5: path 1 and path 4 are empty; tokens of one path keep ascending order (stable).
    g = R.group_tokens(_i64([3, 3, 0, 2, 3, 0, 2]), 5)
    assert g.perm.tolist() == [2, 5, 3, 6, 0, 1, 4]
    assert g.inv.tolist() == [4, 5, 0, 2, 6, 1, 3]
    assert g.counts.tolist() == [2, 0, 2, 3, 0]
    assert g.offsets.tolist() == [0, 2, 2, 4, 7, 7]


def test_group_tokens_flattens_and_accepts_int8():
    g = R.group_tokens(torch.tensor([[1, 0], [1, 1]], dtype=torch.int8), 2)
    assert g.perm.tolist() == [1, 0, 2, 3]
    assert g.inv.tolist() == [1, 0, 2, 3]
    assert g.counts.tolist() == [1, 3]
    assert g.routes.dtype == torch.int64


def test_group_tokens_zero_tokens():
    g = R.group_tokens(torch.zeros(0, dtype=torch.int64), 3)
    assert g.perm.numel() == 0 and g.inv.numel() == 0
    assert g.counts.tolist() == [0, 0, 0]
    assert g.offsets.tolist() == [0, 0, 0, 0]


# --------------------------------------------------------------------------- gather


def _x_hand():
    # Token t's row is [t, 10 + t], so a gathered row names its token.
    return torch.tensor([[0.0, 10.0], [1.0, 11.0], [2.0, 12.0], [3.0, 13.0]],
                        dtype=torch.float64)


def test_gather_hand_case():
    g = R.group_tokens(_i64([1, 0, 1, 0]), 2)  # perm [1, 3, 0, 2]
    out = R.gather(_x_hand(), g)
    expected = torch.tensor([[1.0, 11.0], [3.0, 13.0], [0.0, 10.0], [2.0, 12.0]],
                            dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_gather_rmsnorm_hand_case():
    x = torch.tensor([[3.0, 4.0], [1.0, -1.0]], dtype=torch.float64)
    w = torch.tensor([2.0, 0.5], dtype=torch.float64)
    g = R.group_tokens(_i64([1, 0]), 2)  # perm [1, 0]
    eps = 1e-6
    out = R.gather(x, g, norm_weight=w, eps=eps)
    # row [1, -1]: mean square 1; row [3, 4]: mean square (9 + 16) / 2 = 12.5.
    r1 = 1.0 / math.sqrt(1.0 + eps)
    r0 = 1.0 / math.sqrt(12.5 + eps)
    expected = torch.tensor([[1.0 * r1 * 2.0, -1.0 * r1 * 0.5],
                             [3.0 * r0 * 2.0, 4.0 * r0 * 0.5]], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-14)


def test_rms_norm_float32_hand_case():
    x = torch.tensor([[3.0, 4.0]])
    out = R.rms_norm(x, torch.ones(2), eps=0.0)
    r = 1.0 / math.sqrt(12.5)
    torch.testing.assert_close(out, torch.tensor([[3.0 * r, 4.0 * r]]), rtol=1e-6, atol=0)
    assert out.dtype == torch.float32


def test_rms_norm_half_input_is_computed_in_float32_and_cast_back():
    x = torch.tensor([[300.0, 400.0]], dtype=torch.float16)  # squares overflow float16
    out = R.rms_norm(x, torch.ones(2, dtype=torch.float16))
    assert out.dtype == torch.float16
    r = 1.0 / math.sqrt(125000.0)
    torch.testing.assert_close(out.float(), torch.tensor([[300.0 * r, 400.0 * r]]),
                               rtol=1e-3, atol=0)


# --------------------------------------------------------------------------- scatter_combine


def test_scatter_combine_hand_case():
    # routes [1, 0, 1]: perm [1, 0, 2], inv [1, 0, 2]. Grouped row i of y is [i+1, -(i+1)].
    g = R.group_tokens(_i64([1, 0, 1]), 2)
    y = torch.tensor([[1.0, -1.0], [2.0, -2.0], [3.0, -3.0]], dtype=torch.float64)
    out = R.scatter_combine(y, g)
    torch.testing.assert_close(out, torch.tensor([[2.0, -2.0], [1.0, -1.0], [3.0, -3.0]],
                                                 dtype=torch.float64), rtol=0, atol=0)


def test_scatter_combine_residual_gate_skip_hand_case():
    g = R.group_tokens(_i64([1, 0, 1]), 2)  # inv [1, 0, 2]; path 0 skips
    # The skip token 1's row (inv[1] = 0) holds garbage: it must never be read.
    y = torch.tensor([[float("nan"), float("inf")], [2.0, -2.0], [3.0, -3.0]],
                     dtype=torch.float64)
    residual = torch.tensor([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]], dtype=torch.float64)
    gate = torch.tensor([0.5, 7.0, -1.0], dtype=torch.float64)
    out = R.scatter_combine(y, g, residual=residual, gate=gate, skip_paths=(0,))
    expected = torch.tensor([[10.0 + 0.5 * 2.0, 20.0 + 0.5 * -2.0],
                             [30.0, 40.0],
                             [50.0 - 3.0, 60.0 + 3.0]], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_scatter_combine_gate_only_and_residual_only():
    g = R.group_tokens(_i64([0, 0]), 1)  # identity permutation
    y = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    out = R.scatter_combine(y, g, gate=torch.tensor([2.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(out, torch.tensor([[2.0, 4.0], [-3.0, -4.0]],
                                                 dtype=torch.float64), rtol=0, atol=0)
    out = R.scatter_combine(y, g, residual=torch.ones(2, 2, dtype=torch.float64))
    torch.testing.assert_close(out, y + 1, rtol=0, atol=0)


def test_scatter_combine_all_skip_returns_residual_or_zero():
    g = R.group_tokens(_i64([0, 0, 0]), 2)
    y = torch.full((3, 2), float("nan"), dtype=torch.float64)
    residual = torch.arange(6, dtype=torch.float64).view(3, 2)
    torch.testing.assert_close(R.scatter_combine(y, g, residual, skip_paths=(0,)), residual,
                               rtol=0, atol=0)
    torch.testing.assert_close(R.scatter_combine(y, g, skip_paths=(0,)),
                               torch.zeros(3, 2, dtype=torch.float64), rtol=0, atol=0)


def test_scatter_inverts_gather():
    torch.manual_seed(0)
    routes = torch.randint(0, 4, (37,))
    x = torch.randn(37, 5, dtype=torch.float64)
    g = R.group_tokens(routes, 4)
    torch.testing.assert_close(R.scatter_combine(R.gather(x, g), g), x, rtol=0, atol=0)


# --------------------------------------------------------------------------- swiglu_ffn


def _hand_ffn():
    """x (1, 2) and small integer weights with the expected output worked out by hand."""
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    w_gate = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)  # g = [3, -1]
    w_up = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # u = [2, 2]
    w_down = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=torch.float64)
    h0, h1 = silu(3.0) * 2.0, silu(-1.0) * 2.0
    expected = torch.tensor([[h0 + 2.0 * h1, -h1]], dtype=torch.float64)
    return x, (w_gate, w_up, w_down), expected


def test_swiglu_ffn_hand_case():
    x, weights, expected = _hand_ffn()
    torch.testing.assert_close(R.swiglu_ffn(x, *weights), expected, rtol=1e-14, atol=1e-14)


def test_swiglu_ffn_width_one_hand_case():
    x = torch.tensor([[1.0, -1.0], [0.5, 0.5]], dtype=torch.float64)
    w_gate = torch.tensor([[2.0, 1.0]], dtype=torch.float64)  # g = [1, 1.5]
    w_up = torch.tensor([[1.0, 3.0]], dtype=torch.float64)  # u = [-2, 2]
    w_down = torch.tensor([[1.0], [-2.0]], dtype=torch.float64)
    h = [silu(1.0) * -2.0, silu(1.5) * 2.0]
    expected = torch.tensor([[h[0], -2.0 * h[0]], [h[1], -2.0 * h[1]]], dtype=torch.float64)
    torch.testing.assert_close(R.swiglu_ffn(x, w_gate, w_up, w_down), expected,
                               rtol=1e-14, atol=1e-14)


# --------------------------------------------------------------------------- duo_ffn


def test_duo_ffn_hand_case():
    # 3 tokens, d = 2; routes [BIG, SKIP, SMALL]; small width 1, big width 2.
    x_big, big, big_out = _hand_ffn()
    x = torch.tensor([[1.0, 2.0], [5.0, 5.0], [1.0, -1.0]], dtype=torch.float64)
    small = (torch.tensor([[2.0, 1.0]], dtype=torch.float64),  # g = 1
             torch.tensor([[1.0, 3.0]], dtype=torch.float64),  # u = -2
             torch.tensor([[1.0], [-2.0]], dtype=torch.float64))
    hs = silu(1.0) * -2.0
    routes = _i64([BIG, SKIP, SMALL])
    residual = torch.tensor([[100.0, 200.0], [300.0, 400.0], [500.0, 600.0]],
                            dtype=torch.float64)
    gate = torch.tensor([0.5, 9.0, 3.0], dtype=torch.float64)
    out = R.duo_ffn(x, routes, (None, small, big), residual=residual, gate=gate)
    b0, b1 = big_out[0].tolist()
    expected = torch.tensor([[100.0 + 0.5 * b0, 200.0 + 0.5 * b1],
                             [300.0, 400.0],
                             [500.0 + 3.0 * hs, 600.0 + 3.0 * -2.0 * hs]], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-12)
    # Without residual and gate: the bare FFN term, zero for the skip token.
    out = R.duo_ffn(x, routes, (None, small, big))
    expected = torch.tensor([[b0, b1], [0.0, 0.0], [hs, -2.0 * hs]], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-14)


def test_duo_ffn_matches_group_gather_scatter_composition():
    # The masked spec and the grouped ops describe the same layer.
    torch.manual_seed(1)
    N, d, widths = 29, 6, (0, 3, 0, 5)
    x = torch.randn(N, d, dtype=torch.float64)
    routes = torch.randint(0, 4, (N,))
    params = [None if w == 0 else tuple(torch.randn(*s, dtype=torch.float64) for s in
                                        ((w, d), (w, d), (d, w))) for w in widths]
    residual = torch.randn(N, d, dtype=torch.float64)
    gate = torch.rand(N, dtype=torch.float64)
    g = R.group_tokens(routes, 4)
    xg = R.gather(x, g)
    y = torch.zeros_like(xg)
    for p, w in enumerate(params):
        lo, hi = g.offsets[p].item(), g.offsets[p + 1].item()
        if w is not None:
            y[lo:hi] = R.swiglu_ffn(xg[lo:hi], *w)
    grouped = R.scatter_combine(y, g, residual, gate, skip_paths=(0, 2))
    torch.testing.assert_close(R.duo_ffn(x, routes, params, residual, gate), grouped,
                               rtol=1e-12, atol=1e-12)


def test_duo_ffn_keeps_x_dtype_under_autocast():
    torch.manual_seed(2)
    x = torch.randn(5, 8)
    params = (None, tuple(torch.randn(s) for s in ((4, 8), (4, 8), (8, 4))),
              tuple(torch.randn(s) for s in ((16, 8), (16, 8), (8, 16))))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = R.duo_ffn(x, _i64([0, 1, 2, 1, 2]), params, residual=x)
    assert out.dtype == torch.float32
    ref = R.duo_ffn(x, _i64([0, 1, 2, 1, 2]), params, residual=x)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    torch.testing.assert_close(out[0], x[0], rtol=0, atol=0)  # the skip token


# --------------------------------------------------------------------------- gradients


def _rand64(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_()


def test_gradcheck_gather():
    g = R.group_tokens(_i64([2, 0, 1, 2, 0]), 3)
    x, w = _rand64(5, 4, seed=1), _rand64(4, seed=2)
    assert torch.autograd.gradcheck(lambda x: R.gather(x, g), (x,))
    assert torch.autograd.gradcheck(lambda x, w: R.gather(x, g, w), (x, w))


def test_gradcheck_scatter_combine():
    g = R.group_tokens(_i64([2, 0, 1, 2, 0, 1]), 3)
    y, res, gate = _rand64(6, 3, seed=1), _rand64(6, 3, seed=2), _rand64(6, seed=3)
    assert torch.autograd.gradcheck(
        lambda y, r, s: R.scatter_combine(y, g, r, s, skip_paths=(0,)), (y, res, gate))
    assert torch.autograd.gradcheck(lambda y, s: R.scatter_combine(y, g, gate=s), (y, gate))


def test_gradcheck_swiglu_ffn():
    x = _rand64(3, 4, seed=1)
    w = (_rand64(5, 4, seed=2), _rand64(5, 4, seed=3), _rand64(4, 5, seed=4))
    assert torch.autograd.gradcheck(R.swiglu_ffn, (x, *w))


@pytest.mark.parametrize("with_extras", [False, True])
def test_gradcheck_duo_ffn(with_extras):
    N, d = 7, 3
    x = _rand64(N, d, seed=1)
    routes = _i64([2, 0, 1, 1, 2, 0, 2])
    small = (_rand64(2, d, seed=2), _rand64(2, d, seed=3), _rand64(d, 2, seed=4))
    big = (_rand64(5, d, seed=5), _rand64(5, d, seed=6), _rand64(d, 5, seed=7))
    res, gate = _rand64(N, d, seed=8), _rand64(N, seed=9)

    def f(x, s0, s1, s2, b0, b1, b2, *extras):
        return R.duo_ffn(x, routes, (None, (s0, s1, s2), (b0, b1, b2)), *extras)

    inputs = (x, *small, *big) + ((res, gate) if with_extras else ())
    assert torch.autograd.gradcheck(f, inputs)
