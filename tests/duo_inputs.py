"""Inputs and runners shared by the routed-layer kernel tests (test_kernels_duo_ffn.py,
test_kernels_paths.py): routes per named mix, weights, fresh leaves, and the check of a
layer's output and every gradient against ``duollm.reference.duo_ffn``."""
import importlib

import torch

from duollm import BIG, SKIP, SMALL, reference
from tolerance import assert_close_to_ref

MIXES = ("big", "small", "skip", "no_small", "random", "bad")


def make_routes(mix, N, P, g):
    """Routes for a named mix: 'big', 'small', 'skip', 'no_small' (the small path empty),
    'random', 'bad' (random, with out-of-range values -2, -1, P, P + 1 mixed in)."""
    if mix == "big":
        return torch.full((N,), BIG, dtype=torch.int64)
    if mix == "small":
        return torch.full((N,), SMALL, dtype=torch.int64)
    if mix == "skip":
        return torch.full((N,), SKIP, dtype=torch.int64)
    if mix == "no_small":
        return torch.where(torch.rand(N, generator=g) < 0.5, BIG, SKIP).long()
    if mix == "bad":
        return torch.randint(-2, P + 2, (N,), generator=g)
    return torch.randint(0, P, (N,), generator=g)


def make(N, d, widths, dtype, device, residual=True, gate=True, seed=0):
    """Inputs as a flat list of leaves: [x, residual?, gate?, *weights] plus the layout."""
    g = torch.Generator().manual_seed(seed)
    to = dict(dtype=dtype, device=device)
    x = torch.randn(N, d, generator=g).to(**to)
    res = torch.randn(N, d, generator=g).to(**to) if residual else None
    gt = (torch.rand(N, generator=g) + 0.5).to(**to) if gate else None
    params = []
    for w in widths:
        if w == 0:
            params.append(None)
            continue
        params.append([(torch.randn(w, d, generator=g) / d ** 0.5).to(**to),
                       (torch.randn(w, d, generator=g) / d ** 0.5).to(**to),
                       (torch.randn(d, w, generator=g) / w ** 0.5).to(**to)])
    dy = torch.randn(N, d, generator=g).to(**to)
    return x, res, gt, params, dy, g


def leaves(x, res, gt, params, cast=None):
    """Fresh leaf copies (optionally cast) of all differentiable inputs, and their names."""
    def leaf(t):
        return None if t is None else t.detach().to(cast or t.dtype).clone().requires_grad_()
    x, res, gt = leaf(x), leaf(res), leaf(gt)
    params = [None if p is None else [leaf(t) for t in p] for p in params]
    named = [("x", x), ("residual", res), ("gate", gt)]
    for i, p in enumerate(params):
        if p is not None:
            named += [(f"params[{i}].{n}", t) for n, t in zip(("w_gate", "w_up", "w_down"), p)]
    return x, res, gt, params, [(n, t) for n, t in named if t is not None]


def run(fn, x, routes, res, gt, params, dy, cast=None):
    x, res, gt, params, named = leaves(x, res, gt, params, cast)
    y = fn(x, routes, params, res, gt)
    y.backward(dy.to(y.dtype))
    return y.detach(), [(n, t.grad if t.grad is not None else torch.zeros_like(t))
                        for n, t in named]


def check(device, dtype, N, d, widths, mix, residual=True, gate=True, seed=0, fn=None):
    """``fn`` (default: the triton layer) against the reference in float64, output and every
    gradient, with plain torch's same-dtype error as the budget."""
    if fn is None:
        fn = importlib.import_module("duollm.kernels.duo_ffn").duo_ffn
    x, res, gt, params, dy, g = make(N, d, widths, dtype, device, residual, gate, seed)
    routes = make_routes(mix, N, len(widths), g).to(device)
    y, grads = run(fn, x, routes, res, gt, params, dy)
    y64, g64 = run(reference.duo_ffn, x, routes, res, gt, params, dy, torch.float64)
    yd, gd = run(reference.duo_ffn, x, routes, res, gt, params, dy)
    assert y.dtype == dtype
    assert_close_to_ref(y, y64, yd, "y")
    for (name, a), (_, r64), (_, rd) in zip(grads, g64, gd):
        assert a.dtype == rd.dtype, name
        assert_close_to_ref(a, r64, rd, name)


