"""The device-side route/token error flags (issue 15, items 1-5, 8, 10, 11; issue 19's routed
layer launch count): who owns a flag, when it is made, who reads it, and that every path that
cannot read values back still records a bad route instead of dropping it."""
import importlib
import threading
import time

import pytest
import torch

from duollm import BIG, SKIP, SMALL, DuoConfig, DuoLLM, checks, ops, torch_backend
from duollm import reference as R
from duollm.modules import DuoFFN


@pytest.fixture
def device_mode(monkeypatch):
    """The GPU's check mode on the CPU: values stay where they are, the flags record."""
    monkeypatch.setenv("DUOLLM_CHECK_ROUTES", "device")
    _clear_all()
    yield
    _clear_all()


def _clear_all():
    for owner in list(checks._OWNERS):
        owner.flags.clear()


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return DuoLLM(DuoConfig.from_name("tiny", n_layers=2, max_seq_len=32, **kw))


def _ffn(d=16, d_big=24, d_small=6, seed=0, skip=True):
    torch.manual_seed(seed)
    return DuoFFN(d, d_big, d_small, skip=skip).eval()


def _ref(ffn, x, routes, res=None, gate=None):
    ok = (routes >= 0) & (routes < 3)
    return R.duo_ffn(x, torch.where(ok, routes, SKIP), ffn.params(), res, gate)


# --------------------------------------------------------------------------- 1. inference mode


def test_a_flag_first_made_in_inference_mode_still_works_outside_it(device_mode):
    model = _model()
    tok = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.inference_mode():
        model.generate(tok[:, :4], 2, "big")  # the flag is made here
    assert model.route_errors.flags, "generate in device mode made no flag"
    assert not any(f.is_inference() for f in model.route_errors.flags.values())
    model(tok, "big").mean().backward()  # updates the flag outside inference mode
    # a bad token inside inference mode, checked outside it: the ValueError, then clear
    bad = tok.clone()
    bad[0, 2] = model.config.vocab_size + 3
    with torch.inference_mode():
        model(bad, "big")
    with pytest.raises(ValueError, match="tokens"):
        model.check_errors()
    model.check_errors()  # cleared by the raise that reported it


def test_the_shared_flag_made_in_inference_mode_is_a_normal_tensor(device_mode):
    ffn = _ffn()
    x = torch.randn(3, 16)
    with torch.inference_mode():
        ffn(x, torch.tensor([0, 9, 1]))
    assert not checks._flags[torch.device("cpu")].is_inference()
    with pytest.raises(ValueError, match="routes"):
        ops.check_errors()


# --------------------------------------------------------------------------- 2. creation race


def test_two_threads_on_a_fresh_flag_share_one(monkeypatch):
    """Both threads ask for a flag that does not exist yet, with its creation slowed down so
    that both are inside it at once: they must get the same tensor (a lost flag is a lost
    error)."""
    errors = checks.RouteErrors("race test")
    zeros = torch.zeros

    def slow_zeros(*a, **k):
        time.sleep(0.05)
        return zeros(*a, **k)

    monkeypatch.setattr(torch, "zeros", slow_zeros)
    barrier = threading.Barrier(2)
    got = []

    def take():
        barrier.wait()
        got.append(errors.flag(torch.device("cpu")))

    threads = [threading.Thread(target=take) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 2 and got[0] is got[1] is errors.flags[torch.device("cpu")]


def test_a_bad_and_a_good_call_racing_on_a_fresh_flag_never_lose_the_error(monkeypatch,
                                                                          device_mode):
    ffn = _ffn()
    x = torch.randn(3, 16)
    good, bad = torch.tensor([0, 1, 2]), torch.tensor([0, 5, 2])
    zeros = torch.zeros

    def slow_zeros(*a, **k):
        time.sleep(0.01)
        return zeros(*a, **k)

    monkeypatch.setattr(torch, "zeros", slow_zeros)
    lost = 0
    for _ in range(15):
        checks._flags.clear()  # a fresh flag each trial
        barrier = threading.Barrier(2)

        def call(routes):
            barrier.wait()
            with torch.no_grad():
                ffn(x, routes)

        threads = [threading.Thread(target=call, args=(r,)) for r in (bad, good)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        try:
            ops.check_errors()
            lost += 1
        except ValueError:
            pass
    assert lost == 0, f"the bad call's error was lost in {lost} of 15 trials"


# --------------------------------------------------------------------------- 3. HF path


def test_hf_routing_block_raises_bad_router_routes_at_exit(device_mode):
    H = pytest.importorskip("hf_models")
    hf = pytest.importorskip("duollm.hf")
    model = hf.convert(H.FAMILIES["llama"](), 24)
    t = H.tokens()

    def router(layer, hidden):
        return torch.full(hidden.shape[:-1], 7, dtype=torch.int64)

    with pytest.raises(ValueError, match=r"LlamaForCausalLM at .*routes"):
        with torch.no_grad(), hf.routing(model, router):
            model.generate(t[:, :4], max_new_tokens=2, do_sample=False)
    ops.check_errors()  # the block's exit reported and cleared it
    # a good router: nothing to report, and an exception inside is never masked
    with torch.no_grad(), hf.routing(model, lambda i, h: torch.full(h.shape[:-1], BIG)):
        model(t)
    with pytest.raises(KeyError):
        with hf.routing(model, router):
            with torch.no_grad():
                model(t)
            raise KeyError("mine")
    with pytest.raises(ValueError, match="routes"):  # still recorded, for a later check
        ops.check_errors()


# --------------------------------------------------------------------------- 4. low-level ops


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["device", "0"])
def test_group_tokens_and_scatter_combine_skip_a_bad_route(monkeypatch, backend, mode):
    monkeypatch.setenv("DUOLLM_CHECK_ROUTES", mode)
    _clear_all()
    routes = torch.tensor([0, 1, 2, 3, 1, 0])
    g = torch.Generator().manual_seed(0)
    y = torch.randn(6, 5, generator=g)
    res = torch.randn(6, 5, generator=g)
    groups = ops.group_tokens(routes, 3, backend=backend)
    assert groups.counts.tolist() == [2, 2, 1]
    assert groups.offsets.tolist() == [0, 2, 4, 5]
    assert sorted(groups.perm.tolist()) == list(range(6))
    assert groups.perm[5].item() == 3  # after every path
    out = ops.scatter_combine(y, groups, residual=res, backend=backend)
    torch.testing.assert_close(out[3], res[3], rtol=0, atol=0)
    ok = [0, 1, 2, 4, 5]
    torch.testing.assert_close(out[ok], res[ok] + y[groups.inv[ok]], rtol=0, atol=0)
    if mode == "device":
        with pytest.raises(ValueError, match="routes"):
            ops.check_errors()
    else:
        ops.check_errors()  # mode 0 records nothing


def test_group_tokens_negative_route_on_torch_backend_is_no_raw_error(device_mode):
    groups = ops.group_tokens(torch.tensor([2, -4, 0]), 3, backend="torch")
    assert groups.counts.tolist() == [1, 0, 1]
    assert groups.perm[2].item() == 1
    with pytest.raises(ValueError, match="routes"):
        ops.check_errors()


# --------------------------------------------------------------------------- 5. torch.compile


def test_compile_on_the_cpu_records_a_bad_route_and_token(monkeypatch):
    monkeypatch.delenv("DUOLLM_CHECK_ROUTES", raising=False)  # the default mode
    _clear_all()
    torch._dynamo.reset()
    ffn = _ffn()
    x, res = torch.randn(3, 16), torch.randn(3, 16)

    def f(x, routes, res):
        return ffn(x, routes, residual=res)

    cf = torch.compile(f, backend="eager", fullgraph=True)
    with torch.no_grad():
        out = cf(x, torch.tensor([1, 7, 2]), res)
    torch.testing.assert_close(out[1], res[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="routes"):
        ops.check_errors()
    with torch.no_grad():
        cf(x, torch.tensor([1, 0, 2]), res)
    ops.check_errors()  # a good call under the same graph records nothing

    model = _model().eval()
    tok = torch.tensor([[1, 2, model.config.vocab_size + 4]])
    cm = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        cm(tok, "big")
    with pytest.raises(ValueError, match="tokens"):
        model.check_errors()
    torch._dynamo.reset()


# --------------------------------------------------------------------------- 8. mode 0


def test_mode_0_huge_route_costs_nothing_and_writes_every_row(monkeypatch):
    monkeypatch.setenv("DUOLLM_CHECK_ROUTES", "0")
    ffn = _ffn().double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 16, generator=g, dtype=torch.float64)
    res = torch.randn(40, 16, generator=g, dtype=torch.float64)
    routes = torch.randint(0, 3, (40,), generator=g)
    routes[[3, 17]] = torch.tensor([2 ** 40, -2 ** 40])
    t0 = time.perf_counter()
    with torch.no_grad():
        out = ffn(x, routes, residual=res, backend="torch")
    assert time.perf_counter() - t0 < 5.0
    torch.testing.assert_close(out, _ref(ffn, x, routes, res), rtol=1e-9, atol=1e-9)

    def grads():
        xx, rr = x.clone().requires_grad_(), res.clone().requires_grad_()
        ffn.zero_grad()
        ffn(xx, routes, residual=rr, backend="torch").pow(2).sum().backward()
        return xx.grad, ffn.big.gate_proj.weight.grad.clone()

    (gx1, gw1), (gx2, gw2) = grads(), grads()
    assert torch.equal(gx1, gx2) and torch.equal(gw1, gw2)
    assert torch.isfinite(gx1).all()
    xx = x.clone().requires_grad_()
    _ref(ffn, xx, routes, res).pow(2).sum().backward()
    torch.testing.assert_close(gx1, xx.grad, rtol=1e-9, atol=1e-9)


def test_torch_backend_called_directly_with_a_bad_route_list_is_a_skip():
    ffn = _ffn()
    x, res = torch.randn(2, 16), torch.randn(2, 16)
    with torch.no_grad():
        out = torch_backend.duo_ffn_host(x, [5, 5], ffn.params(), res)
    torch.testing.assert_close(out, res, rtol=0, atol=0)


# --------------------------------------------------------------------------- 10. device keys


@pytest.mark.parametrize("dev", ["cpu:0", torch.device("cpu", 0), "cpu", torch.device("cpu")])
def test_check_errors_accepts_any_spelling_of_the_cpu(device_mode, dev):
    _ffn()(torch.randn(2, 16), torch.tensor([0, 4]))
    assert ops.flag_exists(dev)
    with pytest.raises(ValueError, match="routes"):
        ops.check_errors(dev)
    ops.check_errors(dev)


def test_check_errors_rejects_a_bad_device():
    with pytest.raises(ValueError, match="device"):
        ops.check_errors("not-a-device")
    with pytest.raises(TypeError, match="device"):
        ops.check_errors(3.5)


# --------------------------------------------------------------------------- 11. per model


def test_one_models_bad_input_never_fails_another_models_generate(device_mode):
    a, b = _model(0).eval(), _model(1).eval()
    V = a.config.vocab_size
    with torch.no_grad():
        a(torch.tensor([[1, V + 2, 3]]), "big")
    out = b.generate(torch.tensor([[1, 2, 3]]), 2)  # valid: no raise from a's error
    assert out.shape == (1, 5)
    with pytest.raises(ValueError, match=rf"DuoLLM at {id(a):#x}.*tokens"):
        a.generate(torch.tensor([[1, 2, 3]]), 1)
    a.generate(torch.tensor([[1, 2, 3]]), 1)  # reported once


def test_global_check_names_the_model_the_error_came_from(device_mode):
    a = _model(0).eval()
    ffn = _ffn()
    with torch.no_grad():
        a(torch.tensor([[1, 2, 3]]), torch.full((2, 1, 3), 5))  # bad routes in a
        ffn(torch.randn(2, 16), torch.tensor([0, 9]))  # a standalone layer's
    with pytest.raises(ValueError) as e:
        ops.check_errors()
    msg = str(e.value)
    assert f"DuoLLM at {id(a):#x}" in msg and "outside a model" in msg
    ops.check_errors()


def test_a_deep_copy_or_pickle_has_its_own_clear_flags(device_mode, tmp_path):
    import copy
    a = _model(0).eval()
    with torch.no_grad():
        a(torch.tensor([[1, a.config.vocab_size, 3]]), "big")
    b = copy.deepcopy(a)
    assert b.route_errors is not a.route_errors
    assert all(blk.ffn.route_errors is b.route_errors for blk in b.layers)
    b.check_errors()  # clear: the copy did nothing wrong
    torch.save(a, tmp_path / "m.pt")
    c = torch.load(tmp_path / "m.pt", weights_only=False)
    c.check_errors()
    assert c.route_errors in checks._OWNERS  # ops.check_errors() sees the loaded model too
    with pytest.raises(ValueError, match="tokens"):
        a.check_errors()


# --------------------------------------------------------------------------- issue 19: launches


_META = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::_unsafe_view",
         "aten::as_strided", "aten::alias", "aten::detach", "aten::lift_fresh",
         "aten::contiguous", "aten::expand", "aten::unsqueeze", "aten::squeeze",
         "aten::select", "aten::slice", "aten::t", "aten::transpose", "aten::permute"}
_ALLOC = {"aten::empty", "aten::empty_strided", "aten::empty_like"}


def _profile_call(monkeypatch, fn):
    """(leaf aten ops outside Triton launches, Triton kernels launched) of one ``fn()``.

    Leaves: aten events with no aten child (an ``empty_like`` is counted once, as its
    ``empty_strided``). The interpreter's own copies inside a launch are not the layer's."""
    from triton.runtime.interpreter import InterpretedFunction
    launches = []
    run = InterpretedFunction.run

    def counted(self, *a, **k):
        launches.append(self.fn.__name__)
        with torch.profiler.record_function("triton_launch"):
            return run(self, *a, **k)

    monkeypatch.setattr(InterpretedFunction, "run", counted)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    monkeypatch.setattr(InterpretedFunction, "run", run)
    leaves = []
    for e in prof.events():
        if not e.name.startswith("aten::") or any(c.name.startswith("aten::")
                                                  for c in e.cpu_children):
            continue
        p = e.cpu_parent
        while p is not None and p.name != "triton_launch":
            p = p.cpu_parent
        if p is None:
            leaves.append(e.name)
    return leaves, launches


@pytest.fixture
def triton_mode(monkeypatch):
    """Set the triton layer's path switches for one test (they are read once, at import)."""
    pytest.importorskip("triton")
    kd = importlib.import_module("duollm.kernels.duo_ffn")  # the module, not the function

    def set_mode(name):
        monkeypatch.setattr(kd, "ENV_MODE", kd.parse_mode(name))
    return set_mode


@pytest.mark.parametrize("path", ["decode", "default"])
def test_decode_step_duo_ffn_on_triton_launches_only_its_kernels(monkeypatch, device_mode,
                                                                 triton_mode, path):
    """Issue 19: in the GPU's default check mode ("device"), one decode-step DuoFFN call on
    the triton backend runs its kernels and nothing else: no sanitising step (the ~9 launches
    lt, ge, or, any, to, mul, bitwise_or_, full, where); the kernel sets the flag itself."""
    triton_mode(path)
    ffn = _ffn()
    g = torch.Generator().manual_seed(4)
    h = torch.randn(2, 1, 16, generator=g)  # (B, T=1, d): a decode step of 2 sequences
    x = torch.randn(2, 1, 16, generator=g)
    routes = torch.tensor([[SMALL], [BIG]])

    def step():
        with torch.no_grad():
            return ffn(x, routes, residual=h, backend="triton")

    step()  # warm: the flag and the decode workspaces are made once
    monkeypatch.setattr(ops, "sanitize_values", None)  # the triton path must not call it
    leaves, launches = _profile_call(monkeypatch, step)
    other = [n for n in leaves if n not in _META and n not in _ALLOC]
    allocs = [n for n in leaves if n in _ALLOC]
    assert other == [], f"aten work besides the kernels: {other}"
    if path == "decode":
        assert launches == ["_decode_gateup_kernel", "_decode_down_kernel"], launches
        assert len(allocs) <= 1, f"allocations: {allocs}"
    else:
        assert launches == ["_group_scatter_kernel", "_gateup_fwd_kernel", "_down_kernel"], \
            launches
    out = step()
    torch.testing.assert_close(out, _ref(ffn, x, routes, h), rtol=1e-5, atol=1e-5)
    ops.check_errors()
    # a bad route: residual row, and the flag set by the kernel (sanitize_values is gone)
    bad = torch.tensor([[7], [BIG]])
    with torch.no_grad():
        out = ffn(x, bad, residual=h, backend="triton")
    torch.testing.assert_close(out[0], h[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="routes"):
        ops.check_errors()


@pytest.mark.parametrize("path", ["decode", "default"])
def test_skip_false_layer_flags_route_0_in_the_kernel(monkeypatch, device_mode, triton_mode,
                                                      path):
    triton_mode(path)
    ffn = _ffn(skip=False)
    x, res = torch.randn(3, 16), torch.randn(3, 16)
    monkeypatch.setattr(ops, "sanitize_values", None)
    with torch.no_grad():
        out = ffn(x, torch.tensor([BIG, SKIP, SMALL]), residual=res, backend="triton")
    torch.testing.assert_close(out[1], res[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="routes"):
        ops.check_errors()
    with torch.no_grad():
        ffn(x, torch.tensor([BIG, SMALL, SMALL]), residual=res, backend="triton")
    ops.check_errors()


@pytest.mark.parametrize("block_n, one_launch", [(16, False), (16, True), (None, False)])
def test_grouping_kernels_flag_bad_routes_in_any_block(block_n, one_launch):
    from duollm.kernels.grouping import group_tokens_fwd
    g = torch.Generator().manual_seed(5)
    routes = torch.randint(0, 3, (50,), generator=g)
    for pos, val in ((0, None), (41, 3), (49, -2), (7, 2 ** 40)):
        r = routes.clone()
        if val is not None:
            r[pos] = val
        flag = torch.zeros((), dtype=torch.int32)
        perm, _, counts, offsets, _ = group_tokens_fwd(r, 3, block_n=block_n, flag=flag,
                                                       one_launch=one_launch)
        assert flag.item() == (0 if val is None else checks.ROUTE_ERROR), (pos, val)
        assert sorted(perm.tolist()) == list(range(50))
        ok = r[(r >= 0) & (r < 3)]
        assert counts.tolist() == torch.bincount(ok, minlength=3).tolist()
    # lo: routes below it are flagged too, and bits already set stay set
    flag = torch.full((), checks.TOKEN_ERROR, dtype=torch.int32)
    group_tokens_fwd(torch.tensor([1, 0, 2]), 3, flag=flag, lo=1)
    assert flag.item() == checks.TOKEN_ERROR | checks.ROUTE_ERROR


_W = (None, 24, 6)  # skip, a wide path, a narrow one


def _params(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(None if w is None else tuple(
        (torch.randn(*s, generator=g, dtype=dtype) / 4).requires_grad_()
        for s in ((w, 16), (w, 16), (16, w))) for w in _W)


@pytest.mark.parametrize("mode", ["default", "decode", "persistent"])
@pytest.mark.parametrize("n", [1, 2, 7, 16, 64,
                               pytest.param(1000, marks=pytest.mark.slow)])  # ~1 min each
def test_flagged_layer_equals_reference_forward_and_backward(mode, n):
    """The flagged kernels (raw routes, bad ones included) against duollm/reference.py with
    bad routes sent to the skip path: output, every gradient, bit-equal reruns, the flag."""
    if n == 1000 and mode == "decode":
        pytest.skip("decode serves N <= 64: above, it is the default path, tested already")
    from duollm import kernels
    params = _params()
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 16, generator=g, dtype=torch.float64, requires_grad=True)
    res = torch.randn(n, 16, generator=g, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(n, generator=g, dtype=torch.float64, requires_grad=True)
    routes = torch.randint(0, 3, (n,), generator=g)
    if n > 1:
        routes[n // 2] = 3
        routes[-1] = -1
    else:
        routes[0] = 5
    dy = torch.randn(n, 16, generator=g, dtype=torch.float64)
    weights = [w for p in params if p is not None for w in p]

    def run(fn, r, **kw):
        out = fn(x, r, params, res, gate, **kw)
        grads = torch.autograd.grad(out, [x, res, gate, *weights], dy)
        return out.detach(), grads

    flag = torch.zeros((), dtype=torch.int32)
    out, grads = run(kernels.duo_ffn, routes, mode=mode, flag=flag)
    assert flag.item() == checks.ROUTE_ERROR
    ref_out, ref_grads = run(R.duo_ffn, torch.where((routes >= 0) & (routes < 3), routes, 0))
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-9)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    out2, grads2 = run(kernels.duo_ffn, routes, mode=mode, flag=flag)
    assert torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))
    good = torch.where((routes >= 0) & (routes < 3), routes, 1)
    flag.zero_()
    with torch.no_grad():
        kernels.duo_ffn(x, good, params, res, gate, mode=mode, flag=flag)
    assert flag.item() == 0


def test_flagged_op_passes_opcheck():
    from duollm import kernels  # noqa: F401  (registers the ops)
    params = _params(torch.float32)
    weights = [w.detach() for p in params if p is not None for w in p]
    x, res = torch.randn(9, 16), torch.randn(9, 16)
    flag = torch.zeros((), dtype=torch.int32)
    torch.library.opcheck(torch.ops.duollm.duo_ffn_fwd_flagged,
                          (x, torch.tensor([0, 1, 2, 7, 1, 2, 0, -1, 2]), weights,
                           [-1, 24, 6], res, None, 0, flag, 0),
                          test_utils=("test_schema", "test_faketensor"))


def test_kernels_duo_ffn_rejects_a_bad_flag_or_min_route():
    from duollm import kernels
    params = _params(torch.float32)
    x = torch.randn(2, 16)
    r = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="flag"):
        kernels.duo_ffn(x, r, params, flag=torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="flag"):
        kernels.duo_ffn(x, r, params, flag=torch.zeros((), dtype=torch.int64))
    with pytest.raises(ValueError, match="min_route"):
        kernels.duo_ffn(x, r, params, flag=torch.zeros((), dtype=torch.int32), min_route=2)


def test_compiled_triton_layer_records_the_flag(device_mode):
    """torch.compile(fullgraph=True) through the flagged op (a mutated input) still sets the
    model's flag; the output equals eager."""
    from duollm import kernels  # noqa: F401
    torch._dynamo.reset()
    ffn = _ffn()
    x, res = torch.randn(4, 16), torch.randn(4, 16)

    def f(x, routes, res):
        return ffn(x, routes, residual=res, backend="triton")

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        out = cf(x, torch.tensor([1, 9, 2, 0]), res)
        eager = f(x, torch.tensor([1, 9, 2, 0]), res)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    with pytest.raises(ValueError, match="routes"):
        ops.check_errors()
    torch._dynamo.reset()
