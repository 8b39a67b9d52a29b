"""The lean hot path (docs/speed.md): no value read back in the GPU's code path, out-of-range
routes and tokens handled on the device (residual written, flag raised later), the CPU's tiny-N
paths equal to the reference, error messages that name the caller's argument, the static KV
cache / CUDA-graph decode and ``torch.compile(fullgraph=True)``."""
import contextlib
import os

import pytest
import torch

from duollm import BIG, SKIP, SMALL, DuoConfig, DuoLLM, KVCache, checks, ops
from duollm import reference as R
from duollm.modules import DuoFFN

from conftest import HAS_CUDA

BACKENDS = ["torch", "triton"]


@pytest.fixture
def device_mode(monkeypatch):
    """The GPU's check mode, on whatever device is here: values stay on the device."""
    monkeypatch.setenv("DUOLLM_CHECK_ROUTES", "device")
    _clear_flags()
    yield
    _clear_flags()


def _clear_flags():
    """Every owner's flags (each model has its own, besides the shared ones)."""
    for owner in list(checks._OWNERS):
        owner.flags.clear()


def _ffn(d=16, d_big=24, d_small=6, seed=0, skip=True):
    torch.manual_seed(seed)
    return DuoFFN(d, d_big, d_small, skip=skip).eval()


def _inputs(n, d, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    res = torch.randn(n, d, generator=g)
    gate = torch.rand(n, generator=g)
    routes = torch.randint(0, 3, (n,), generator=g)
    return x.to(device), res.to(device), gate.to(device), routes.to(device)


def _ref(ffn, x, routes, res=None, gate=None):
    """The reference layer, out-of-range routes counted as skip (what every backend does)."""
    ok = (routes >= 0) & (routes < 3)
    return R.duo_ffn(x, torch.where(ok, routes, SKIP), ffn.params(), res, gate)


# --------------------------------------------------------------------------- no reads


@contextlib.contextmanager
def _count_reads():
    """Count ``.item()``, ``.tolist()``, ``.cpu()`` and ``nonzero`` calls on any tensor (the
    calls that read a value back to the host); yields the list of (method, tensor)."""
    calls = []
    names = ("item", "tolist", "cpu", "nonzero")
    originals = {n: getattr(torch.Tensor, n) for n in names}
    orig_nonzero = torch.nonzero

    def wrap(n):
        def f(self, *a, **k):
            calls.append((n, self))
            return originals[n](self, *a, **k)
        return f

    def nonzero(t, *a, **k):
        calls.append(("torch.nonzero", t))
        return orig_nonzero(t, *a, **k)

    for n in names:
        setattr(torch.Tensor, n, wrap(n))
    torch.nonzero = nonzero
    try:
        yield calls
    finally:
        for n in names:
            setattr(torch.Tensor, n, originals[n])
        torch.nonzero = orig_nonzero


def _not_flag(calls):
    flags = [f for owner in checks._OWNERS for f in owner.flags.values()]  # every model's
    return [(n, t) for n, t in calls if not any(t is f for f in flags)]


@pytest.mark.parametrize("n", [1, 5, 64])
def test_duo_ffn_forward_reads_nothing_back(device_mode, n):
    ffn = _ffn()
    x, res, gate, routes = _inputs(n, 16)
    with torch.no_grad():
        ffn(x, routes, residual=res, gate=gate)  # warm (lazy flag allocation)
        with _count_reads() as calls:
            out = ffn(x, routes, residual=res, gate=gate)
            out_int = ffn(x, BIG, residual=res)
    assert calls == [], f"host reads in DuoFFN.forward: {[c[0] for c in calls]}"
    torch.testing.assert_close(out, _ref(ffn, x, routes, res, gate), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_int, R.swiglu_ffn(x, *ffn.big.weights) + res,
                               rtol=1e-5, atol=1e-5)


def test_counting_catches_a_read(device_mode):
    """The counter itself: a DuoFFN whose skip check reads the routes back is caught."""
    with _count_reads() as calls:
        torch.tensor([1, 2]).tolist()
        bool((torch.tensor([1]) == 0).any().item())
    assert [c[0] for c in calls] == ["tolist", "item"]


def test_model_forward_and_decode_step_read_nothing_back(device_mode):
    torch.manual_seed(0)
    model = DuoLLM(DuoConfig.from_name("tiny", n_layers=2, max_seq_len=32)).eval()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, model.config.vocab_size, (2, 6), generator=g)
    routes = torch.randint(0, 3, (2, 2, 6), generator=g)
    pattern = torch.tensor([BIG, SMALL])

    def router(i, h):
        return torch.where(h.sum(-1) > 0, BIG, SMALL)

    with torch.no_grad():
        model(tokens, routes)
        with _count_reads() as calls:
            for r in (routes, "big", pattern, [SMALL, SKIP], router):
                model(tokens, r)
        assert calls == [], f"host reads in DuoLLM.forward: {[c[0] for c in calls]}"
        for static in (False, True):  # one decode step on a filled cache
            cache = KVCache.empty(model.config, 2, 8, tokens.device, torch.float32,
                                  static=static)
            model(tokens, "small", cache=cache)
            with _count_reads() as calls:
                model(tokens[:, :1], router, cache=cache)
            assert calls == [], f"host reads in a decode step: {[c[0] for c in calls]}"
        with _count_reads() as calls:
            out = model.generate(tokens, 3, router)
        # generate reads the device's error flag once at the end, and nothing else
        assert _not_flag(calls) == [], [c[0] for c in _not_flag(calls)]
        assert len(calls) <= 1
    assert out.shape == (2, 9)


# --------------------------------------------------------------------------- out of range


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_routes_skip_and_raise_later(device_mode, backend, device):
    ffn = _ffn().to(device)
    x, res, gate, routes = _inputs(9, 16, device=device)
    routes[[1, 4, 8]] = torch.tensor([3, -1, 100], device=device)
    with torch.no_grad():
        out = ffn(x, routes, residual=res, gate=gate, backend=backend)
        out_nores = ffn(x, routes, backend=backend)
    ref = _ref(ffn, x, routes, res, gate)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[[1, 4, 8]], res[[1, 4, 8]], rtol=0, atol=0)
    assert (out_nores[[1, 4, 8]] == 0).all()  # written (zeros), never left uninitialised
    with pytest.raises(ValueError, match="routes"):
        ops.check_errors()
    ops.check_errors()  # the flag was cleared: nothing more to report


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_without_a_skip_path(device_mode, backend, device):
    """A layer with no skip path still writes the residual for a bad token (an extra path)."""
    g = torch.Generator().manual_seed(3)
    params = tuple(tuple((torch.randn(*s, generator=g) / 4).to(device)
                         for s in ((w, 8), (w, 8), (8, w))) for w in (4, 12))
    x = torch.randn(4, 8, generator=g).to(device)
    res = torch.randn(4, 8, generator=g).to(device)
    routes = torch.tensor([0, 2, 1, -3], device=device)
    out = ops.duo_ffn(x, routes, params, residual=res, backend=backend)
    torch.testing.assert_close(out[[1, 3]], res[[1, 3]], rtol=0, atol=0)
    ref = R.duo_ffn(x[[0, 2]], routes[[0, 2]], params, res[[0, 2]])
    torch.testing.assert_close(out[[0, 2]], ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="routes"):
        ops.check_errors(device)


def test_skip_false_flags_skip_routes_on_the_device(device_mode):
    ffn = _ffn(skip=False)
    x, res, _, _ = _inputs(3, 16)
    out = ffn(x, torch.tensor([BIG, SKIP, SMALL]), residual=res)
    torch.testing.assert_close(out[1], res[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="routes"):
        ops.check_errors()


def test_bad_tokens_are_flagged_and_generate_raises(device_mode):
    torch.manual_seed(0)
    model = DuoLLM(DuoConfig.from_name("tiny", n_layers=2, max_seq_len=32)).eval()
    V = model.config.vocab_size
    tokens = torch.tensor([[1, 2, V + 5]])
    logits = model(tokens)  # no raise here: nothing is read back
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="tokens"):
        ops.check_errors()
    with pytest.raises(ValueError, match="tokens"):
        model.generate(tokens, 2)


def test_default_mode_raises_at_once_on_the_cpu(monkeypatch):
    monkeypatch.delenv("DUOLLM_CHECK_ROUTES", raising=False)
    ffn = _ffn()
    x, res, _, _ = _inputs(3, 16)
    with pytest.raises(ValueError, match=r"routes.*\[0, 3\).*7"):
        ffn(x, torch.tensor([0, 7, 1]))
    with pytest.raises(ValueError, match="routes"):
        ffn(x, 3)
    with pytest.raises(ValueError, match="SKIP"):
        _ffn(skip=False)(x, SKIP)
    with pytest.raises(ValueError, match=r"routes.*\[1, 3\)"):
        _ffn(skip=False)(x, torch.tensor([1, 0, 2]))


def test_sync_and_off_modes(monkeypatch):
    ffn = _ffn()
    x, res, _, _ = _inputs(3, 16)
    bad = torch.tensor([0, 5, 1])
    monkeypatch.setenv("DUOLLM_CHECK_ROUTES", "sync")
    with pytest.raises(ValueError, match="routes"):
        ffn(x, bad)
    monkeypatch.setenv("DUOLLM_CHECK_ROUTES", "0")
    checks._flags.clear()
    with pytest.raises(ValueError, match="routes"):
        ffn(x, bad)  # a few CPU tokens are read anyway (decode path): checking them is free
    x20, res20, _, _ = _inputs(20, 16)
    bad20 = torch.zeros(20, dtype=torch.int64)
    bad20[3] = 5
    ffn(x20, bad20, residual=res20)  # more tokens: nothing checked, nothing flagged
    assert not checks._flags
    monkeypatch.setenv("DUOLLM_CHECK_ROUTES", "bogus")
    with pytest.raises(ValueError, match="DUOLLM_CHECK_ROUTES"):
        ffn(x, bad)


# --------------------------------------------------------------------------- every path == ref


@pytest.mark.parametrize("mode", ["1", "device"])
@pytest.mark.parametrize("n", [1, 2, 7, 16, 17, 64, 65])
@pytest.mark.parametrize("mix", ["mixed", "big", "small", "skip"])
def test_torch_paths_equal_reference(monkeypatch, mode, n, mix):
    """The CPU's list path (N <= 16), the static masked path (N <= 64 without reads) and the
    sorted plan all compute the reference's layer."""
    monkeypatch.setenv("DUOLLM_CHECK_ROUTES", mode)
    ffn = _ffn(seed=n)
    x, res, gate, routes = _inputs(n, 16, seed=n)
    if mix != "mixed":
        routes = torch.full((n,), {"big": BIG, "small": SMALL, "skip": SKIP}[mix])
    with torch.no_grad():
        for r, g in ((res, gate), (None, None), (res, None)):
            out = ffn(x, routes, residual=r, gate=g, backend="torch")
            torch.testing.assert_close(out, _ref(ffn, x, routes, r, g), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["1", "device"])
def test_torch_paths_gradients(monkeypatch, mode):
    monkeypatch.setenv("DUOLLM_CHECK_ROUTES", mode)
    ffn = _ffn().double()
    x, res, gate, routes = (t.double() if t.is_floating_point() else t
                            for t in _inputs(5, 16))
    x.requires_grad_(), res.requires_grad_(), gate.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: ffn(a, routes, residual=b, gate=c),
                                    (x, res, gate))


def test_int_route_equals_routes_tensor():
    """A policy (int route) and the equivalent tensor agree bit for bit on the torch backend."""
    ffn = _ffn()
    for n in (1, 5, 40):
        x, res, gate, _ = _inputs(n, 16, seed=n)
        for p in (SKIP, SMALL, BIG):
            full = torch.full((n,), p)
            with torch.no_grad():
                assert torch.equal(ffn(x, p, residual=res, gate=gate),
                                   ffn(x, full, residual=res, gate=gate))


# --------------------------------------------------------------------------- messages


def test_messages_name_the_callers_argument():
    ffn = _ffn(d=32)
    x = torch.randn(2, 5, 32)
    r = torch.randint(0, 3, (2, 5))

    def msg(exc_type, *a, **k):
        with pytest.raises(exc_type) as info:
            ffn(*a, **k)
        text = str(info.value)
        for internal in ("params[", "w_gate", "w_up", "w_down"):
            assert internal not in text, text
        return text

    m = msg(TypeError, x.double(), r)
    assert m.startswith("x:") and "float64" in m and "float32" in m and "weights" in m
    m = msg(ValueError, torch.randn(2, 5, 7), r)
    assert m.startswith("x:") and "7" in m and "d_model=32" in m
    m = msg(ValueError, x, r[:, :4])
    assert m.startswith("routes:") and "(2, 4)" in m and "(2, 5)" in m
    assert msg(TypeError, x, r.float()).startswith("routes:")
    assert msg(TypeError, x, "big").startswith("routes:")
    m = msg(ValueError, x, r, residual=torch.randn(2, 4, 32))
    assert m.startswith("residual:") and "(2, 4, 32)" in m
    m = msg(TypeError, x, r, residual=x.double())
    assert m.startswith("residual:") and "float64" in m
    m = msg(ValueError, x, r, gate=torch.rand(2, 4))
    assert m.startswith("gate:") and "(2, 5)" in m
    assert msg(TypeError, x, r, gate=torch.ones(2, 5, dtype=torch.int64)).startswith("gate:")
    assert msg(TypeError, [[1.0]], r).startswith("x:")
    ffn.small.half()  # the layer itself is inconsistent: say which weight
    with pytest.raises(TypeError, match="DuoFFN.*small.gate_proj.weight"):
        ffn(x, r)


def test_a_routers_mistake_is_told_as_the_routers():
    """DuoLLM with a router: a bad output is reported as the router's, at its layer, never
    as the internal FFN input ``x``."""
    cfg = DuoConfig.from_name("tiny", n_layers=2, vocab_size=32)
    model = DuoLLM(cfg).eval()
    tokens = torch.randint(0, 32, (2, 5))
    bad = {
        "shape": (ValueError, lambda i, h: torch.zeros(3, dtype=torch.long), "has shape (3,)"),
        "dtype": (TypeError, lambda i, h: torch.zeros(2, 5), "torch.float32"),
        "value": (ValueError, lambda i, h: torch.full((2, 5), 7), "found 7"),
        "gate": (ValueError, lambda i, h: (torch.ones(2, 5, dtype=torch.long),
                                            torch.ones(3)), "gate"),
        "late": (ValueError, lambda i, h: torch.full((2, 5), 1 if i == 0 else 9), "found 9"),
    }
    for name, (exc, router, fragment) in bad.items():
        with pytest.raises(exc) as info:
            model(tokens, router)
        text = str(info.value)
        layer = 1 if name == "late" else 0
        assert text.startswith(f"routes: the router's {'gate' if name == 'gate' else 'routes'} "
                               f"at layer {layer}:"), text
        assert fragment in text and "x " not in text and "x:" not in text, text


def test_cast_layer_revalidates():
    """The cached weight signature follows .to()/.double(): no stale acceptance."""
    ffn = _ffn()
    x, _, _, r = _inputs(3, 16)
    ffn(x, r)
    ffn.double()
    with pytest.raises(TypeError, match="x: has dtype torch.float32"):
        ffn(x, r)
    assert ffn(x.double(), r).dtype == torch.float64


# --------------------------------------------------------------------------- generate / compile


@pytest.mark.parametrize("routes", ["big", "small", [BIG, SKIP], "router"])
def test_static_cache_generate_equals_dynamic(routes):
    torch.manual_seed(0)
    model = DuoLLM(DuoConfig.from_name("tiny", n_layers=2, max_seq_len=32)).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 5),
                           generator=torch.Generator().manual_seed(1))
    if routes == "router":
        def routes(i, h):
            return torch.where(h.sum(-1) > 0, BIG, SMALL)
    dynamic = model.generate(tokens, 6, routes)
    static = model._generate_cached(tokens, 6, routes, 0.0, None, None, None, static=True)
    assert torch.equal(dynamic, static)


def test_cuda_graph_needs_cuda_and_refuses_random():
    model = DuoLLM(DuoConfig.from_name("tiny", n_layers=2)).eval()
    tokens = torch.zeros(1, 3, dtype=torch.int64)
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="cuda_graph"):
            model.generate(tokens, 2, cuda_graph=True)
    with pytest.raises(ValueError, match="random|cuda_graph"):
        model.to("cuda" if HAS_CUDA else "cpu").generate(
            tokens.to("cuda" if HAS_CUDA else "cpu"), 2, "random", cuda_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) traces the model (no graph break) for every routes form;
    the "eager" compiler backend keeps the test fast (dynamo's tracing is what is tested)."""
    torch.manual_seed(0)
    model = DuoLLM(DuoConfig.from_name("tiny", n_layers=2)).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 5))
    routes = torch.randint(0, 3, (2, 2, 5), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        with torch.no_grad():
            for r in (routes, "small", [BIG, SKIP]):
                torch.testing.assert_close(compiled(tokens, r, backend=backend),
                                           model(tokens, r, backend=backend),
                                           rtol=1e-4, atol=1e-4)
    finally:
        torch._dynamo.reset()


def test_compile_loads_the_triton_backend_inside_the_trace():
    """A fresh process whose first triton call is inside torch.compile(fullgraph=True): the
    backend loads by an import statement, which dynamo runs (import_module would break the
    graph; in one pytest process an earlier test has always loaded it)."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from duollm import DuoConfig, DuoLLM\n"
        "assert 'duollm.kernels' not in sys.modules\n"
        "model = DuoLLM(DuoConfig.from_name('tiny', n_layers=1)).eval()\n"
        "tokens = torch.randint(0, model.config.vocab_size, (2, 3))\n"
        "routes = torch.tensor([[[2, 1, 0], [1, 1, 2]]])\n"
        "compiled = torch.compile(model, fullgraph=True, backend='eager')\n"
        "with torch.no_grad():\n"
        "    out = compiled(tokens, routes, backend='triton')\n"
        "    torch.testing.assert_close(out, model(tokens, routes), rtol=1e-4, atol=1e-4)\n"
        "assert 'duollm.kernels' in sys.modules\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


# --------------------------------------------------------------------------- GPU


def _gpu_backend(backend):
    if not ops.is_available(backend, torch.device("cuda")):
        pytest.skip(f"backend {backend} is not available here")


@pytest.mark.gpu  # sync debug mode and CUDA graphs exist only on a CUDA device
@pytest.mark.parametrize("backend", ["triton", "torch", "cuda"])
def test_decode_step_does_not_synchronise(backend):
    _gpu_backend(backend)
    torch.manual_seed(0)
    model = DuoLLM(DuoConfig.from_name("tiny", n_layers=2)).cuda().eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 5), device="cuda")
    routes = torch.tensor([BIG, SMALL], device="cuda")

    def router(i, h):
        return torch.where(h.sum(-1) > 0, BIG, SMALL)

    for static in (False, True):
        cache = KVCache.empty(model.config, 2, 16, "cuda", torch.float32, static=static)
        with torch.no_grad():
            model(tokens, "big", cache=cache, backend=backend)
            model(tokens[:, :1], router, cache=cache, backend=backend)  # warm
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for r in (router, routes, "small"):
                    model(tokens[:, :1], r, cache=cache, backend=backend)
            finally:
                torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu  # CUDA-graph capture needs a CUDA device
@pytest.mark.parametrize("backend", ["triton", "torch", "cuda"])
@pytest.mark.parametrize("routes", ["big", [BIG, SMALL], "router"])
def test_cuda_graph_generate_equals_eager(backend, routes):
    _gpu_backend(backend)
    torch.manual_seed(0)
    model = DuoLLM(DuoConfig.from_name("tiny", n_layers=2)).cuda().eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 5), device="cuda")
    if routes == "router":
        def routes(i, h):
            return torch.where(h.sum(-1) > 0, BIG, SMALL)
    # The same static-cache arithmetic eagerly: replaying the graph must give the same tokens.
    eager = model._generate_cached(tokens, 7, routes, 0.0, None, None, backend, static=True)
    graph = model.generate(tokens, 7, routes, backend=backend, cuda_graph=True)
    assert torch.equal(eager, graph)
    dynamic = model.generate(tokens, 7, routes, backend=backend)  # the usual cache
    assert (dynamic == graph).float().mean() > 0.9  # argmax ties may differ by rounding


def test_int_route_on_a_backend_without_swiglu():
    """A backend that implements only the routed layer (the bench's dense stand-in) still runs
    policies and patterns: it is handed a routes tensor."""
    from duollm.bench.dense_backend import register

    name = register()
    ffn = _ffn()
    x, res, _, _ = _inputs(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(ffn(x, BIG, residual=res, backend=name),
                                   ffn(x, BIG, residual=res), rtol=1e-5, atol=1e-5)


def test_llama_comparison_rows():
    """bench decode --levels llama: the dense Llama has the DuoLLM's shape and every row has a
    ratio (tiny shape, two timed rounds: a smoke test of the plumbing, not a measurement)."""
    pytest.importorskip("transformers")
    from duollm.bench import llama_compare as lc

    cfg = DuoConfig.from_name("tiny", n_layers=2)
    llama = lc.llama_of(cfg, cfg.d_small, torch.float32, torch.device("cpu"))
    duo = DuoLLM(cfg)
    n_duo_small = sum(p.numel() for n, p in duo.named_parameters() if "big" not in n)
    assert sum(p.numel() for p in llama.parameters()) == n_duo_small  # same shape, width small
    # The plain loop's calls use the cache (a step sees the cached positions: its logits are
    # the full forward's) and decode what generate does, so the loop times cached decoding.
    from transformers import DynamicCache

    from duollm.hf_compat import cache_keyword

    prompt = torch.randint(0, cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = {cache_keyword(llama.forward): DynamicCache()}  # cache= from 5.25, else past_
        llama(input_ids=prompt[:, :4], **cache, use_cache=True)
        step = llama(input_ids=prompt[:, 4:], **cache, use_cache=True).logits[:, -1]
        alone = llama(input_ids=prompt[:, 4:]).logits[:, -1]
        torch.testing.assert_close(step, llama(input_ids=prompt).logits[:, -1])
        assert not torch.allclose(step, alone, rtol=1e-6, atol=1e-6)  # the check can fail
        assert torch.equal(lc._llama_loop(llama, prompt, 6), lc._llama_generate(llama, prompt, 6))
    rows = lc.model_pairs(cfg, torch.device("cpu"), torch.float32, 3, 2, 4, 2, 0.01,
                          log=lambda *_: None)
    rows += lc.layer_pairs([(8, 16, 4)], torch.device("cpu"), torch.float32, 2, 0.01,
                           log=lambda *_: None)
    levels = {r["level"] for r in rows}
    assert levels == {"llama-decode", "llama-prefill", "llama-layer"}
    assert all(r.get("vs_llama", r.get("vs_plain", 0)) > 0 for r in rows)
