"""Policy routes (``generate(routes="big")``, fixed patterns: an int route for every token) on
the triton backend: with the decode switch on they take the decode kernels like a routes
tensor does (``kernels/swiglu.py: one_path``), not the SwiGLU op and the default down GEMM;
with it off nothing changes. Interpreter on the CPU, checked against duollm/reference.py."""
import importlib

import pytest
import torch

from duollm import ops, reference

duo = importlib.import_module("duollm.kernels.duo_ffn")
swiglu = importlib.import_module("duollm.kernels.swiglu")


def _inputs(n, d=20, widths=(None, 12, 36), seed=0):
    g = torch.Generator().manual_seed(seed)
    params = tuple(None if w is None else tuple(
        torch.randn(*s, generator=g) * 0.3 for s in ((w, d), (w, d), (d, w))) for w in widths)
    x, res = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    gate = torch.rand(n, generator=g) + 0.5
    return x, params, res, gate


@pytest.fixture
def decode_calls(monkeypatch):
    calls = []
    real = duo.duo_ffn_decode
    monkeypatch.setattr(duo, "duo_ffn_decode",
                        lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    return calls


@pytest.mark.parametrize("n", [1, 7, 64])
@pytest.mark.parametrize("path", [1, 2])
def test_policy_route_takes_the_decode_kernels_when_switched_on(monkeypatch, decode_calls,
                                                                 n, path):
    monkeypatch.setattr(duo, "ENV_MODE", duo.DECODE)  # DUOLLM_TRITON_DECODE=1
    x, params, res, gate = _inputs(n, seed=n)
    want = reference.duo_ffn(x, torch.full((n,), path), params, res, gate)
    with torch.no_grad():
        got = ops.run_duo_ffn(x, path, params, res, gate, backend="triton")
    assert decode_calls == [n]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    again = ops.run_duo_ffn(x, path, params, res, gate, backend="triton")
    assert torch.equal(got, again.detach())  # bit-equal on reruns


def test_policy_route_without_the_switch_or_beyond_decode_sizes(monkeypatch, decode_calls):
    """Switch off: the SwiGLU op as before. Switch on, N > 64: the same, and equal."""
    for mode, n in ((duo.DEFAULT, 7), (duo.DECODE, 70)):
        monkeypatch.setattr(duo, "ENV_MODE", mode)
        x, params, res, gate = _inputs(n, seed=3)
        want = reference.duo_ffn(x, torch.full((n,), 2), params, res, gate)
        with torch.no_grad():
            got = ops.run_duo_ffn(x, 2, params, res, gate, backend="triton")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert decode_calls == []


@pytest.mark.parametrize("residual,gate", [(False, False), (True, False), (False, True)])
def test_one_path_decode_gradients_match_the_reference(decode_calls, residual, gate):
    x, params, res, g = _inputs(5, seed=11)
    w = [t.clone().requires_grad_() for t in params[2]]
    xs = x.clone().requires_grad_()
    gs = g.clone().requires_grad_() if gate else None
    rs = res if residual else None
    out = swiglu.one_path(xs, w, rs, gs, mode="decode")
    assert decode_calls == [5]
    wr = [t.clone().requires_grad_() for t in params[2]]
    xr = x.clone().requires_grad_()
    gr = g.clone().requires_grad_() if gate else None
    want = reference.duo_ffn(xr, torch.full((5,), 0), (tuple(wr),), rs, gr)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(dy)
    want.backward(dy)
    for a, b in zip([xs, *w] + ([gs] if gate else []), [xr, *wr] + ([gr] if gate else [])):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu  # CUDA-graph capture needs a CUDA device
@pytest.mark.parametrize("routes", ["big", "router"])
def test_generate_cuda_graph_on_the_decode_path(monkeypatch, decode_calls, routes):
    """generate(cuda_graph=True) with the decode switch on: the captured step runs the decode
    kernels (a policy through one_path, a router's routes tensor directly) and replays to the
    tokens the same static-cache arithmetic gives eagerly."""
    from duollm import BIG, SMALL, DuoConfig, DuoLLM

    monkeypatch.setattr(duo, "ENV_MODE", duo.DECODE)
    torch.manual_seed(0)
    model = DuoLLM(DuoConfig.from_name("tiny", n_layers=2)).cuda().eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 5), device="cuda")
    if routes == "router":
        def routes(i, h):
            return torch.where(h.sum(-1) > 0, BIG, SMALL)
    eager = model._generate_cached(tokens, 7, routes, 0.0, None, None, "triton", static=True)
    assert decode_calls and all(n == 2 for n in decode_calls[-4:])  # batch 2: decode steps
    graph = model.generate(tokens, 7, routes, backend="triton", cuda_graph=True)
    assert torch.equal(eager, graph)
