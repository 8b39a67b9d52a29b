"""``duollm.ops`` on the torch backend: awkward shapes, input validation and dispatch."""
import sys
import types

import pytest
import torch

from duollm import ops
from duollm import reference as R
from duollm.ops import BackendUnavailableError

from tolerance import assert_close_to_ref

TORCH = "torch"


def _weights(d, width, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=g, dtype=dtype) / s[1] ** 0.5
                 for s in ((width, d), (width, d), (d, width)))


def _duo_params(d, d_small=5, d_big=12, dtype=torch.float32):
    return (None, _weights(d, d_small, dtype, seed=1), _weights(d, d_big, dtype, seed=2))


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _masked_ref(x, routes, params, residual=None, gate=None):
    """duo_ffn written token by token in float64: an independent check of the op."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    x64 = x.double()
    for t in range(x.shape[0]):
        w = params[int(routes[t])]
        if w is not None:
            y = R.swiglu_ffn(x64[t:t + 1], *(wi.double() for wi in w))[0]
            out[t] = y * (1.0 if gate is None else float(gate[t]))
    if residual is not None:
        out = out + residual.double()
    return out


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("N", [0, 1, 7])
@pytest.mark.parametrize("d", [8, 341])
def test_duo_ffn_sizes(N, d):
    params = _duo_params(d)
    x, res, gate = _randn(N, d, seed=3), _randn(N, d, seed=4), torch.rand(N)
    routes = torch.arange(N) % 3
    out = ops.duo_ffn(x, routes, params, residual=res, gate=gate, backend=TORCH)
    assert out.shape == (N, d) and out.dtype == torch.float32
    ref = _masked_ref(x, routes, params, res, gate)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("N", [0, 1, 9])
def test_grouped_ops_sizes(N):
    d = 341
    routes = torch.arange(N) % 3
    g = ops.group_tokens(routes, 3, backend=TORCH)
    assert g.perm.shape == (N,) and g.counts.sum().item() == N
    x = _randn(N, d, seed=5)
    w = torch.rand(d) + 0.5
    xg = ops.gather(x, g, backend=TORCH)
    assert xg.shape == (N, d)
    xn = ops.gather(x, g, norm_weight=w, backend=TORCH)
    torch.testing.assert_close(xn, R.rms_norm(x, w)[g.perm], rtol=1e-6, atol=1e-6)
    y = ops.swiglu_ffn(xg, *_weights(d, 7), backend=TORCH)
    assert y.shape == (N, d)
    out = ops.scatter_combine(xg, g, residual=x, gate=torch.full((N,), 2.0),
                              skip_paths=(0,), backend=TORCH)
    expected = torch.where((routes == 0).unsqueeze(-1), x, 3 * x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_empty_path_and_all_on_one_path():
    d = 16
    params = _duo_params(d)
    x = _randn(10, d, seed=6)
    for routes in (torch.full((10,), 2), torch.full((10,), 1),
                   torch.tensor([1, 2] * 5)):  # the last: the skip path is empty
        out = ops.duo_ffn(x, routes, params, backend=TORCH)
        torch.testing.assert_close(out.double(), _masked_ref(x, routes, params),
                                   rtol=1e-5, atol=1e-5)
    big_only = ops.duo_ffn(x, torch.full((10,), 2), params, backend=TORCH)
    torch.testing.assert_close(big_only, ops.swiglu_ffn(x, *params[2], backend=TORCH),
                               rtol=1e-6, atol=1e-6)


def test_all_skip():
    d = 16
    x, res = _randn(6, d, seed=7), _randn(6, d, seed=8)
    routes = torch.zeros(6, dtype=torch.int64)
    params = _duo_params(d)
    torch.testing.assert_close(ops.duo_ffn(x, routes, params, backend=TORCH),
                               torch.zeros(6, d), rtol=0, atol=0)
    torch.testing.assert_close(ops.duo_ffn(x, routes, params, residual=res, backend=TORCH),
                               res, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32,
                                   torch.int64])
def test_route_dtypes(dtype):
    d = 8
    params = _duo_params(d)
    x = _randn(11, d, seed=9)
    routes64 = torch.tensor([2, 0, 1, 1, 2, 0, 0, 2, 1, 2, 2])
    expected = ops.duo_ffn(x, routes64, params, backend=TORCH)
    out = ops.duo_ffn(x, routes64.to(dtype), params, backend=TORCH)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    g = ops.group_tokens(routes64.to(dtype), 3, backend=TORCH)
    g64 = ops.group_tokens(routes64, 3, backend=TORCH)
    for a, b in zip(g, g64):
        assert torch.equal(a, b)


def test_non_contiguous_inputs_equal_contiguous():
    d, N = 12, 10
    params = _duo_params(d)
    base = _randn(d, N, seed=10)
    x_t = base.t()  # (N, d), transposed view
    assert not x_t.is_contiguous()
    routes_strided = torch.tensor([2, 0, 1, 2, 1, 0, 2, 2, 1, 0] * 2)[::2]  # stride 2
    assert not routes_strided.is_contiguous()
    res_t = _randn(d, N, seed=11).t()
    gate_strided = torch.rand(2 * N)[::2]
    out = ops.duo_ffn(x_t, routes_strided, params, residual=res_t, gate=gate_strided,
                      backend=TORCH)
    expected = ops.duo_ffn(x_t.contiguous(), routes_strided.contiguous(), params,
                           residual=res_t.contiguous(), gate=gate_strided.contiguous(),
                           backend=TORCH)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    g = ops.group_tokens(routes_strided, 3, backend=TORCH)
    torch.testing.assert_close(ops.gather(x_t, g, backend=TORCH), x_t.contiguous()[g.perm],
                               rtol=0, atol=0)
    w_t = tuple(w.t().contiguous().t() for w in params[2])  # column-major weights
    torch.testing.assert_close(ops.swiglu_ffn(x_t, *w_t, backend=TORCH),
                               ops.swiglu_ffn(x_t.contiguous(), *params[2], backend=TORCH),
                               rtol=1e-6, atol=1e-6)


def test_leading_dims_are_flattened():
    d = 8
    params = _duo_params(d)
    x = _randn(2, 3, d, seed=12)
    routes = torch.tensor([[2, 0, 1], [1, 1, 2]])
    out = ops.duo_ffn(x, routes, params, gate=torch.rand(2, 3), backend=TORCH)
    assert out.shape == (2, 3, d)
    flat = ops.duo_ffn(x.reshape(6, d), routes.reshape(6), params, backend=TORCH)
    out = ops.duo_ffn(x, routes, params, backend=TORCH)
    torch.testing.assert_close(out.reshape(6, d), flat, rtol=0, atol=0)


def test_generic_paths_with_two_skip_paths():
    d, N = 10, 23
    widths = (0, 24, 0, 40)
    params = [None if w == 0 else _weights(d, w, seed=20 + p) for p, w in enumerate(widths)]
    x, res, gate = _randn(N, d, seed=13), _randn(N, d, seed=14), torch.rand(N)
    routes = torch.tensor([p for p in range(4)] * 6)[:N]
    out = ops.duo_ffn(x, routes, params, residual=res, gate=gate, backend=TORCH)
    torch.testing.assert_close(out.double(), _masked_ref(x, routes, params, res, gate),
                               rtol=1e-5, atol=1e-5)
    skipped = (routes == 0) | (routes == 2)
    torch.testing.assert_close(out[skipped], res[skipped], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_against_float64(dtype):
    d, N = 32, 20
    params64 = _duo_params(d, dtype=torch.float64)
    x64, res64 = _randn(N, d, dtype=torch.float64, seed=15), _randn(N, d, dtype=torch.float64)
    routes = torch.arange(N) % 3
    ref = ops.duo_ffn(x64, routes, params64, residual=res64, backend=TORCH)
    params = tuple(None if w is None else tuple(t.to(dtype) for t in w) for w in params64)
    out = ops.duo_ffn(x64.to(dtype), routes, params, residual=res64.to(dtype), backend=TORCH)
    assert out.dtype == dtype
    # The torch backend is itself the "plain torch in the same dtype": the budget is its
    # own error, so this checks the helper's contract and that low precision runs at all.
    same = R.duo_ffn(x64.to(dtype), routes, params, residual=res64.to(dtype))
    assert_close_to_ref(out, ref, same, name="duo_ffn")
    assert (out.double() - ref).abs().max() < 0.1


def test_float64_gradcheck_through_ops():
    d = 3
    x = _randn(5, d, dtype=torch.float64, seed=16).requires_grad_()
    w = tuple(t.requires_grad_() for t in _weights(d, 4, torch.float64, seed=17))
    routes = torch.tensor([1, 0, 1, 1, 0])
    assert torch.autograd.gradcheck(
        lambda x, a, b, c: ops.duo_ffn(x, routes, (None, (a, b, c)), backend=TORCH),
        (x, *w))


# --------------------------------------------------------------------------- validation


def test_bad_x_dtype():
    params = _duo_params(4)
    with pytest.raises(TypeError, match="x"):
        ops.duo_ffn(torch.ones(3, 4, dtype=torch.int64), torch.zeros(3, dtype=torch.int64),
                    params, backend=TORCH)
    with pytest.raises(TypeError, match="x"):
        ops.swiglu_ffn(torch.ones(3, 4, dtype=torch.int32), *params[1], backend=TORCH)
    with pytest.raises(TypeError, match="x"):
        ops.duo_ffn([[1.0] * 4], torch.zeros(1, dtype=torch.int64), params, backend=TORCH)


def test_bad_routes_dtype_and_values():
    params = _duo_params(4)
    x = torch.ones(3, 4)
    with pytest.raises(TypeError, match="routes"):
        ops.duo_ffn(x, torch.zeros(3), params, backend=TORCH)
    with pytest.raises(TypeError, match="routes"):
        ops.duo_ffn(x, torch.zeros(3, dtype=torch.bool), params, backend=TORCH)
    with pytest.raises(TypeError, match="routes"):
        ops.group_tokens(torch.zeros(3), 3, backend=TORCH)
    with pytest.raises(ValueError, match=r"routes.*3"):
        ops.duo_ffn(x, torch.tensor([0, 3, 1]), params, backend=TORCH)
    with pytest.raises(ValueError, match=r"routes.*-1"):
        ops.duo_ffn(x, torch.tensor([0, -1, 1]), params, backend=TORCH)
    with pytest.raises(ValueError, match="routes"):
        ops.group_tokens(torch.tensor([0, 5]), 3, backend=TORCH)
    with pytest.raises(ValueError, match="routes"):
        ops.group_tokens(torch.tensor([-2, 1], dtype=torch.int8), 3, backend=TORCH)
    with pytest.raises(ValueError, match="num_paths"):
        ops.group_tokens(torch.tensor([0, 1]), 0, backend=TORCH)


def test_routes_shape_must_match_x():
    params = _duo_params(4)
    with pytest.raises(ValueError, match="routes"):
        ops.duo_ffn(torch.ones(3, 4), torch.zeros(4, dtype=torch.int64), params, backend=TORCH)
    with pytest.raises(ValueError, match="routes"):
        ops.duo_ffn(torch.ones(2, 3, 4), torch.zeros(6, dtype=torch.int64), params,
                    backend=TORCH)


def test_mismatched_weight_shapes_and_dtypes():
    d = 4
    good = _weights(d, 6)
    x = torch.ones(3, d)
    routes = torch.tensor([2, 1, 0])
    bad_gate = (torch.ones(6, d + 1), good[1], good[2])
    bad_up = (good[0], torch.ones(5, d), good[2])
    bad_down = (good[0], good[1], torch.ones(d, 5))
    for bad in (bad_gate, bad_up):
        with pytest.raises(ValueError, match=r"params\[2\]"):
            ops.duo_ffn(x, routes, (None, good, bad), backend=TORCH)
    with pytest.raises(ValueError, match=r"params\[2\]\.w_down"):
        ops.duo_ffn(x, routes, (None, good, bad_down), backend=TORCH)
    with pytest.raises(ValueError, match="w_down"):
        ops.swiglu_ffn(x, *bad_down, backend=TORCH)
    with pytest.raises(ValueError, match="w_gate"):
        ops.swiglu_ffn(x, torch.ones(6), good[1], good[2], backend=TORCH)
    with pytest.raises(TypeError, match=r"params\[1\]\.w_up"):
        ops.duo_ffn(x, routes, (None, (good[0], good[1].double(), good[2]), good),
                    backend=TORCH)
    with pytest.raises(TypeError, match=r"params\[1\]"):
        ops.duo_ffn(x, routes, (None, good[:2], good), backend=TORCH)


def test_bad_params_container():
    x, routes = torch.ones(2, 4), torch.tensor([0, 0])
    with pytest.raises(ValueError, match="params"):
        ops.duo_ffn(x, routes, (), backend=TORCH)
    with pytest.raises(TypeError, match="params"):
        ops.duo_ffn(x, routes, None, backend=TORCH)
    # A single skip path is a valid (if idle) layer.
    torch.testing.assert_close(ops.duo_ffn(x, routes, [None], residual=x, backend=TORCH), x)


def test_mismatched_residual_and_gate():
    d = 4
    params = _duo_params(d)
    x, routes = torch.ones(3, d), torch.tensor([2, 1, 0])
    with pytest.raises(ValueError, match="residual"):
        ops.duo_ffn(x, routes, params, residual=torch.ones(3, d + 1), backend=TORCH)
    with pytest.raises(ValueError, match="gate"):
        ops.duo_ffn(x, routes, params, gate=torch.ones(3, 1), backend=TORCH)
    with pytest.raises(TypeError, match="gate"):
        ops.duo_ffn(x, routes, params, gate=torch.ones(3, dtype=torch.int64), backend=TORCH)
    # A residual in another dtype would be silently rounded to x's: refused.
    with pytest.raises(TypeError, match="residual"):
        ops.duo_ffn(x, routes, params, residual=torch.ones(3, d, dtype=torch.float64),
                    backend=TORCH)
    # A gate in another float dtype is only a scale: accepted and cast.
    out = ops.duo_ffn(x, routes, params, gate=torch.ones(3, dtype=torch.float64),
                      backend=TORCH)
    torch.testing.assert_close(out, ops.duo_ffn(x, routes, params, backend=TORCH))
    g = ops.group_tokens(routes, 3, backend=TORCH)
    with pytest.raises(ValueError, match="residual"):
        ops.scatter_combine(x, g, residual=torch.ones(2, d), backend=TORCH)
    with pytest.raises(TypeError, match="residual"):
        ops.scatter_combine(x, g, residual=x.half(), backend=TORCH)
    with pytest.raises(ValueError, match="gate"):
        ops.scatter_combine(x, g, gate=torch.ones(4), backend=TORCH)
    with pytest.raises(ValueError, match="norm_weight"):
        ops.gather(x, g, norm_weight=torch.ones(d + 1), backend=TORCH)


def test_bad_groups_and_skip_paths():
    x = torch.ones(3, 4)
    g = ops.group_tokens(torch.tensor([1, 0, 1]), 2, backend=TORCH)
    with pytest.raises(ValueError, match="groups"):
        ops.gather(torch.ones(4, 4), g, backend=TORCH)
    with pytest.raises(TypeError, match="groups"):
        ops.gather(x, (g.perm, g.inv), backend=TORCH)
    with pytest.raises(ValueError, match="skip_paths"):
        ops.scatter_combine(x, g, skip_paths=(2,), backend=TORCH)
    with pytest.raises(ValueError, match="skip_paths"):
        ops.scatter_combine(x, g, skip_paths=(-1,), backend=TORCH)
    with pytest.raises(TypeError, match="skip_paths"):
        ops.scatter_combine(x, g, skip_paths=(0.5,), backend=TORCH)  # not truncated to 0
    out = ops.scatter_combine(x, g, skip_paths=(torch.tensor(0),), backend=TORCH)
    torch.testing.assert_close(out[1], torch.zeros(4), rtol=0, atol=0)
    with pytest.raises(ValueError, match="x"):
        ops.gather(torch.ones(3), g, backend=TORCH)
    with pytest.raises(ValueError, match="y"):
        ops.scatter_combine(torch.ones(1, 3, 4), g, backend=TORCH)


def test_mismatched_devices_use_meta_as_second_device():
    # Without a second real device, "meta" stands in: a device mismatch must be refused
    # by name before any computation reads the meta tensor.
    d = 4
    params = _duo_params(d)
    x, routes = torch.ones(3, d), torch.tensor([2, 1, 0])
    with pytest.raises(ValueError, match="routes"):
        ops.duo_ffn(x, routes.to("meta"), params, backend=TORCH)
    with pytest.raises(ValueError, match="residual"):
        ops.duo_ffn(x, routes, params, residual=x.to("meta"), backend=TORCH)
    with pytest.raises(ValueError, match="gate"):
        ops.duo_ffn(x, routes, params, gate=torch.ones(3, device="meta"), backend=TORCH)
    meta_big = tuple(w.to("meta") for w in params[2])
    with pytest.raises(ValueError, match=r"params\[2\]\.w_gate"):
        ops.duo_ffn(x, routes, (None, params[1], meta_big), backend=TORCH)
    with pytest.raises(ValueError, match="groups"):
        g = ops.group_tokens(routes, 3, backend=TORCH)
        ops.gather(x.to("meta"), g, backend=TORCH)
    with pytest.raises(ValueError, match="norm_weight"):
        ops.gather(x, ops.group_tokens(routes, 3, backend=TORCH),
                   norm_weight=torch.ones(d, device="meta"), backend=TORCH)


def test_route_check_skips_values_on_meta():
    # Meta tensors have no values to read back: the check keeps dtype, shape and device.
    meta = torch.empty(5, dtype=torch.int64, device="meta")
    ops.check_routes(meta, 3, shape=torch.Size([5]), device=torch.device("meta"))
    with pytest.raises(ValueError, match="routes"):
        ops.check_routes(meta, 3, shape=torch.Size([4]))
    with pytest.raises(TypeError, match="routes"):
        ops.check_routes(torch.empty(5, device="meta"), 3)


# --------------------------------------------------------------------------- dispatch


def _torch_impl(op):
    return getattr(ops._BACKENDS["torch"].load(), op)


@pytest.fixture
def fake_backend(monkeypatch):
    """A registered backend "fake" whose duo_ffn returns a marker, to see who ran."""
    module = types.ModuleType("duollm_test_fake_backend")
    module.duo_ffn = lambda x, routes, params, residual, gate: torch.full_like(x, 42.0)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(ops._BACKENDS, "fake",
                        ops.Backend("fake", module.__name__, lambda device: None))
    monkeypatch.delenv("DUOLLM_BACKEND", raising=False)
    return module


def _who_ran(**kw):
    out = ops.duo_ffn(torch.ones(2, 4), torch.tensor([2, 1]), _duo_params(4), **kw)
    return "fake" if bool((out == 42).all()) else "torch"


def test_dispatch_precedence(fake_backend, monkeypatch):
    assert _who_ran() == "torch"  # auto on the CPU
    assert _who_ran(backend="fake") == "fake"
    with ops.use_backend("fake"):
        assert ops.current_backend() == "fake"
        assert _who_ran() == "fake"
        assert _who_ran(backend="torch") == "torch"  # per call beats scope
    assert _who_ran() == "torch"  # the scope ended
    monkeypatch.setenv("DUOLLM_BACKEND", "fake")
    assert ops.current_backend() == "fake"
    assert _who_ran() == "fake"
    with ops.use_backend("torch"):
        assert _who_ran() == "torch"  # scope beats the environment
        with ops.use_backend("fake"):
            assert _who_ran() == "fake"  # scopes nest
        assert _who_ran() == "torch"
    assert _who_ran(backend="torch") == "torch"  # per call beats the environment


def test_scope_is_reset_on_error(fake_backend):
    with pytest.raises(RuntimeError, match="boom"):
        with ops.use_backend("fake"):
            raise RuntimeError("boom")
    assert ops.current_backend() == "auto"


def test_backend_missing_an_op(fake_backend):
    with pytest.raises(BackendUnavailableError, match="gather"):
        ops.gather(torch.ones(2, 4), ops.group_tokens(torch.tensor([0, 1]), 2),
                   backend="fake")


def test_auto_on_cpu_picks_torch(monkeypatch):
    monkeypatch.delenv("DUOLLM_BACKEND", raising=False)
    assert ops.current_backend() == "auto"
    for op in ops.OPS:
        assert ops.resolve(op, torch.device("cpu"), "auto") is _torch_impl(op)
        assert ops.resolve(op, torch.device("cpu")) is _torch_impl(op)


def test_unknown_backend_name(monkeypatch):
    with pytest.raises(ValueError, match="backend.*nope"):
        ops.duo_ffn(torch.ones(1, 4), torch.tensor([0]), _duo_params(4), backend="nope")
    with pytest.raises(ValueError, match="backend.*nope"):
        with ops.use_backend("nope"):
            pass
    monkeypatch.setenv("DUOLLM_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend.*nope"):
        ops.duo_ffn(torch.ones(1, 4), torch.tensor([0]), _duo_params(4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a CPU-only machine")
def test_cuda_backend_unavailable_names_what_is_missing():
    with pytest.raises(BackendUnavailableError, match="cuda.*CUDA GPU"):
        ops.duo_ffn(torch.ones(1, 4), torch.tensor([0]), _duo_params(4), backend="cuda")
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        with ops.use_backend("cuda"):
            ops.group_tokens(torch.tensor([0, 1]), 2)
    status = ops.backend_status()
    assert status["torch"] is None
    assert isinstance(status["cuda"], str) and "CUDA" in status["cuda"]
    assert not ops.is_available("cuda") and ops.is_available("torch")
    assert not ops.is_available("no-such-backend")
    assert set(ops.backends()) >= {"torch", "triton", "cuda"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a CPU-only machine")
def test_triton_status_without_gpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = ops.backend_status(torch.device("cpu"))["triton"]
    assert isinstance(reason, str) and ("CUDA" in reason or "triton" in reason)
    with pytest.raises(BackendUnavailableError, match="triton"):
        ops.resolve("duo_ffn", torch.device("cpu"), "triton")


def test_route_checks_can_be_disabled(monkeypatch):
    monkeypatch.setenv("DUOLLM_CHECK_ROUTES", "0")
    assert not ops.route_checks_enabled()
    ops.check_routes(torch.tensor([7]), 3)  # values not read back
    with pytest.raises(TypeError, match="routes"):
        ops.check_routes(torch.tensor([0.0]), 3)  # dtype and shape are always checked
