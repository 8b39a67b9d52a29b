"""CPU microbenchmarks of the torch backend (pytest-benchmark).

    pytest benchmarks/ --benchmark-only                 # all
    pytest benchmarks/ --benchmark-only -k routed       # the routed layer vs dense

Shape "small" (d 512, big 2048, small 128), float32. The routed-layer group holds the dense
FFN, the torch backend, the reference and the plain-PyTorch baselines at the same token
count and mix, so pytest-benchmark's table compares them directly (``--benchmark-group-by``).
"""
import pytest
import torch

from duollm import ops, reference
from duollm.bench import accounting as acc
from duollm.bench.baselines import dense_ffn, naive_routing, sorted_routing

SHAPE = acc.SHAPES["small"]
N_OPS = 4096


@pytest.fixture(scope="module")
def layer():
    gen = torch.Generator().manual_seed(0)
    params = acc.weights_for(SHAPE, "cpu", torch.float32, gen)
    w_router = torch.randn(3, SHAPE.d_model, generator=gen) * 0.02
    return params, w_router


def _inputs(n, mix, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, SHAPE.d_model, generator=gen)
    res = torch.randn(n, SHAPE.d_model, generator=gen)
    routes = acc.draw_routes(acc.MIXES[mix], n, gen)
    return x, res, routes


# --------------------------------------------------------------------------- single ops


def test_op_group_tokens(benchmark):
    _, _, routes = _inputs(N_OPS, "1/12")
    benchmark.group = "ops"
    benchmark(ops.group_tokens, routes, 3, backend="torch")


def test_op_gather(benchmark):
    x, _, routes = _inputs(N_OPS, "1/12")
    groups = ops.group_tokens(routes, 3, backend="torch")
    benchmark.group = "ops"
    benchmark(ops.gather, x, groups, backend="torch")


def test_op_scatter_combine(benchmark):
    x, res, routes = _inputs(N_OPS, "quarter-skip")
    groups = ops.group_tokens(routes, 3, backend="torch")
    benchmark.group = "ops"
    benchmark(ops.scatter_combine, x, groups, residual=res, skip_paths=(0,), backend="torch")


@pytest.mark.parametrize("width", [SHAPE.d_small, SHAPE.d_big])
def test_op_swiglu_ffn(benchmark, layer, width):
    params, _ = layer
    w = params[1] if width == SHAPE.d_small else params[2]
    x, _, _ = _inputs(1024, "big")
    benchmark.group = "ops"
    with torch.inference_mode():
        benchmark(ops.swiglu_ffn, x, *w, backend="torch")


# --------------------------------------------------------------------------- routed layer

IMPLS = {
    "dense": lambda x, r, p, res, wr: dense_ffn(x, None, p, res),
    "torch-backend": lambda x, r, p, res, wr: (torch.mm(x, wr.t()),
                                               ops.duo_ffn(x, r, p, res, backend="torch")),
    "reference": lambda x, r, p, res, wr: (torch.mm(x, wr.t()),
                                           reference.duo_ffn(x, r, p, res)),
    "naive": lambda x, r, p, res, wr: (torch.mm(x, wr.t()), naive_routing(x, r, p, res)),
    "sorted": lambda x, r, p, res, wr: (torch.mm(x, wr.t()), sorted_routing(x, r, p, res)),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mix", ["1/12", "quarter-skip"])
@pytest.mark.parametrize("n", [1024, 4096])
def test_routed_layer(benchmark, layer, impl, mix, n):
    """Forward of the routed layer (router GEMM included) vs the dense FFN, no autograd."""
    params, w_router = layer
    x, res, routes = _inputs(n, mix)
    counts = acc.exact_counts(acc.MIXES[mix], n)
    ideal = acc.ideal_speedup(SHAPE, counts[0], counts[1], n)
    benchmark.group = f"routed N={n} mix={mix} (ideal {ideal:.2f}x)"
    benchmark.extra_info.update(ideal=ideal)
    fn = IMPLS[impl]
    with torch.inference_mode():
        benchmark.pedantic(fn, args=(x, routes, params, res, w_router), rounds=15,
                           warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("impl", ["torch-backend", "reference", "sorted"])
def test_routed_layer_train_step(benchmark, layer, impl):
    """Forward + backward of the routed layer (mix 1/12, N 1024)."""
    params, w_router = layer
    x, res, routes = _inputs(1024, "1/12")
    p = tuple(None if w is None else tuple(t.clone().requires_grad_(True) for t in w)
              for w in params)
    x = x.requires_grad_(True)
    fwd = {"torch-backend": lambda: ops.duo_ffn(x, routes, p, res, backend="torch"),
           "reference": lambda: reference.duo_ffn(x, routes, p, res),
           "sorted": lambda: sorted_routing(x, routes, p, res)}[impl]
    benchmark.group = "routed train step N=1024 mix=1/12"

    def step():
        fwd().sum().backward()

    benchmark.pedantic(step, rounds=10, warmup_rounds=1, iterations=1)
