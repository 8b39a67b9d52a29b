"""``duollm.torch_backend`` (the fast torch backend) against ``duollm.reference``.

Forward and every gradient (x, weights, residual, gate) in float64 and float32, gradcheck,
awkward shapes (N = 0 and 1, odd d, all skip, an empty path, a skip path that is not first),
the inference (no-autograd, in-place) path, autocast, and the ops registration.
"""
import pytest
import torch

from duollm import ops
from duollm import reference as R
from duollm import torch_backend as TB
from duollm.reference import BIG, SKIP, SMALL

from tolerance import assert_close_to_ref


def _weights(d, width, dtype, gen):
    return tuple((torch.randn(*s, generator=gen, dtype=torch.float64) / s[1] ** 0.5).to(dtype)
                 for s in ((width, d), (width, d), (d, width)))


def _case(N, d, widths, dtype=torch.float64, seed=0, routes=None, residual=True, gate=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=gen, dtype=torch.float64).to(dtype)
    params = tuple(None if w == 0 else _weights(d, w, dtype, gen) for w in widths)
    if routes is None:
        routes = torch.randint(0, len(widths), (N,), generator=gen)
    res = torch.randn(N, d, generator=gen, dtype=torch.float64).to(dtype) if residual else None
    gt = (torch.rand(N, generator=gen, dtype=torch.float64) + .5).to(dtype) if gate else None
    return x, routes, params, res, gt


def _leaves(x, params, res, gate):
    leaves = [x] + [w for p in params if p is not None for w in p]
    leaves += [t for t in (res, gate) if t is not None]
    return [t.detach().clone().requires_grad_(True) for t in leaves]


def _rebuild(leaves, params, has_res, has_gate):
    x, rest = leaves[0], leaves[1:]
    out_params, k = [], 0
    for p in params:
        if p is None:
            out_params.append(None)
        else:
            out_params.append(tuple(rest[k:k + 3]))
            k += 3
    rest = rest[k:]
    res = rest.pop(0) if has_res else None
    gate = rest.pop(0) if has_gate else None
    return x, tuple(out_params), res, gate


def _run(fn, leaves, routes, params, has_res, has_gate, seed=1):
    x, p, res, gate = _rebuild(leaves, params, has_res, has_gate)
    out = fn(x, routes, p, res, gate)
    # A random linear functional of the output, so each gradient entry is exercised.
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad((out * w).sum(), leaves, allow_unused=True) \
        if out.numel() else [None] * len(leaves)
    grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]
    return out, grads


CASES = [
    # (N, d, widths, routes or None)
    (24, 16, (0, 5, 12), None),
    (37, 341, (0, 7, 29), None),  # odd d, non-power-of-two widths
    (1, 8, (0, 3, 6), None),
    (0, 8, (0, 3, 6), None),
    (10, 8, (0, 3, 6), torch.full((10,), SKIP)),  # all skip
    (10, 8, (0, 3, 6), torch.full((10,), BIG)),  # all on one path, small path empty
    (12, 8, (0, 3, 6), torch.tensor([0, 1] * 6)),  # big path empty
    (15, 8, (4, 0, 6), None),  # the skip path is not the first
    (15, 8, (4, 5, 6), None),  # no skip path
    (9, 8, (0, 0, 6), None),  # two skip paths
]


@pytest.mark.parametrize("N,d,widths,routes", CASES)
@pytest.mark.parametrize("residual,gate", [(False, False), (True, False), (True, True),
                                           (False, True)])
def test_duo_ffn_matches_reference_float64(N, d, widths, routes, residual, gate):
    x, routes, params, res, gt = _case(N, d, widths, routes=routes, residual=residual,
                                       gate=gate)
    leaves = _leaves(x, params, res, gt)
    out_ref, g_ref = _run(R.duo_ffn, leaves, routes, params, residual, gate)
    out, g = _run(TB.duo_ffn, leaves, routes, params, residual, gate)
    assert out.dtype == x.dtype and out.shape == (N, d)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    for i, (a, b) in enumerate(zip(g, g_ref)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"gradient of leaf {i}")
    with torch.no_grad():  # the in-place inference path
        x_, p_, r_, gt_ = _rebuild(leaves, params, residual, gate)
        torch.testing.assert_close(TB.duo_ffn(x_, routes, p_, r_, gt_), out_ref,
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("N,d,widths,routes", CASES[:3] + CASES[6:8])
def test_duo_ffn_float32_within_torch_error(N, d, widths, routes):
    """|backend - ref64| <= 2 |reference in float32 - ref64| + atol (docs/style.md), all grads."""
    x, routes, params, res, gt = _case(N, d, widths, dtype=torch.float32, routes=routes)
    leaves32 = _leaves(x, params, res, gt)
    leaves64 = [leaf.detach().double().requires_grad_(True) for leaf in leaves32]
    params64 = tuple(None if p is None else tuple(w.double() for w in p) for p in params)
    out64, g64 = _run(R.duo_ffn, leaves64, routes, params64, True, True)
    out_t, g_t = _run(R.duo_ffn, leaves32, routes, params, True, True)
    out, g = _run(TB.duo_ffn, leaves32, routes, params, True, True)
    assert_close_to_ref(out, out64, out_t, "out")
    for i, (a, ref, same) in enumerate(zip(g, g64, g_t)):
        assert_close_to_ref(a, ref, same, f"grad {i}", atol=1e-4)


def test_duo_ffn_gradcheck():
    x, routes, params, res, gt = _case(9, 5, (0, 3, 4), routes=torch.tensor(
        [0, 1, 2, 2, 1, 0, 2, 1, 2]))
    leaves = _leaves(x, params, res, gt)

    def f(*leaves_):
        x_, p_, r_, g_ = _rebuild(list(leaves_), params, True, True)
        return TB.duo_ffn(x_, routes, p_, r_, g_)

    assert torch.autograd.gradcheck(f, tuple(leaves))


def test_swiglu_ffn_matches_reference_and_gradcheck():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    w = [t.requires_grad_(True) for t in _weights(6, 5, torch.float64, gen)]
    torch.testing.assert_close(TB.swiglu_ffn(x, *w), R.swiglu_ffn(x, *w))
    assert torch.autograd.gradcheck(TB.swiglu_ffn, (x, *w))
    with torch.no_grad():
        torch.testing.assert_close(TB.swiglu_ffn(x, *w), R.swiglu_ffn(x, *w))
        assert TB.swiglu_ffn(x[:0], *w).shape == (0, 6)


def test_gather_and_scatter_combine_match_reference():
    gen = torch.Generator().manual_seed(4)
    routes = torch.randint(0, 3, (11,), generator=gen)
    groups = R.group_tokens(routes, 3)
    x = torch.randn(11, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    nw = torch.rand(6, dtype=torch.float64, generator=gen) + .5
    torch.testing.assert_close(TB.gather(x, groups), R.gather(x, groups))
    torch.testing.assert_close(TB.gather(x, groups, nw), R.gather(x, groups, nw))
    y = torch.randn(11, 6, dtype=torch.float64, generator=gen)
    y[groups.inv[routes == SKIP]] = float("nan")  # a skipped token's row is never read
    y.requires_grad_(True)
    res = torch.randn(11, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    gate = torch.rand(11, dtype=torch.float64, generator=gen, requires_grad=True)
    for kw in ({}, {"residual": res}, {"gate": gate}, {"residual": res, "gate": gate}):
        for skip in ((), (SKIP,), (SKIP, SMALL)):
            a = TB.scatter_combine(y, groups, skip_paths=skip, **kw)
            b = R.scatter_combine(y, groups, skip_paths=skip, **kw)
            if not skip:  # without a skip path the NaN rows are real outputs
                assert torch.equal(a.isnan(), b.isnan())
                continue
            torch.testing.assert_close(a, b)
            # Gradients on finite rows (the reference's gate gradient is 0 * NaN there).
            y_ok = torch.nan_to_num(y.detach()).requires_grad_(True)
            a = TB.scatter_combine(y_ok, groups, skip_paths=skip, **kw)
            b = R.scatter_combine(y_ok, groups, skip_paths=skip, **kw)
            ga = torch.autograd.grad(a.sum(), [y_ok] + list(kw.values()))
            gb = torch.autograd.grad(b.sum(), [y_ok] + list(kw.values()))
            for u, v in zip(ga, gb):
                torch.testing.assert_close(u, v)
            with torch.no_grad():
                torch.testing.assert_close(TB.scatter_combine(y, groups, skip_paths=skip, **kw), b)


def test_duo_ffn_under_cpu_autocast_keeps_dtype():
    x, routes, params, res, gt = _case(16, 8, (0, 3, 6), dtype=torch.float32)
    ref = R.duo_ffn(x, routes, params, res, gt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = TB.duo_ffn(x, routes, params, res, gt)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=5e-2, atol=5e-2)


def test_duo_ffn_accepts_int8_routes_and_noncontiguous_x():
    x, routes, params, res, gt = _case(12, 8, (0, 3, 6), dtype=torch.float32)
    xt = x.t().contiguous().t()  # same values, column-major
    assert not xt.is_contiguous()
    torch.testing.assert_close(TB.duo_ffn(xt, routes.to(torch.int8), params, res, gt),
                               R.duo_ffn(x, routes, params, res, gt))


def test_torch_backend_is_registered():
    assert ops._BACKENDS["torch"].module == "duollm.torch_backend"
    assert ops.resolve("duo_ffn", torch.device("cpu"), "torch") is TB.duo_ffn
