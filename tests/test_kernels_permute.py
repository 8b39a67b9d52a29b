"""The Triton permutation kernels (kernels/permute.py) against the reference: gather (plain and
RMSNorm-fused) and scatter_combine, forward and every gradient, awkward shapes and route mixes,
the loop over d, strided inputs, determinism, torch.compile, bad input through ``duollm.ops``.
On the CPU the kernels run in the Triton interpreter."""
import importlib

import pytest
import torch

from duollm import ops, reference
from gradients import leaves, run_with_grads
from tolerance import assert_close_to_ref, dtypes_for

grouping = importlib.import_module("duollm.kernels.grouping")
permute = importlib.import_module("duollm.kernels.permute")
duollm_kernels = importlib.import_module("duollm.kernels")  # the triton backend's public API

SKIP = (0,)  # the Duo layout: path 0 skips, 1 small, 2 big
# (N, d, route mix): N = 0 and 1, d = 1, odd d, one path only, an empty path, all skip.
CASES = [(0, 17, "random"), (1, 1, "random"), (1, 341, "one_path"), (7, 17, "empty_path"),
         (7, 341, "all_skip"), (7, 1, "all_skip"), (100, 1, "empty_path"),
         (100, 17, "random"), (100, 341, "random"), (100, 341, "one_path")]


def _routes(n, mix, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = {"one_path": torch.full((n,), 2, dtype=torch.int64),
         "empty_path": 2 * torch.randint(0, 2, (n,), generator=g),
         "all_skip": torch.zeros(n, dtype=torch.int64),
         "random": torch.randint(0, 3, (n,), generator=g)}[mix]
    return r.to(torch.int8).to(device)


def _check_against_reference(kernel_fn, ref_fn, inputs, dout, names):
    """Kernel vs reference in float64 from the same inputs, with torch's same-dtype budget."""
    out, grads = run_with_grads(kernel_fn, leaves(*inputs), dout)
    ref, ref_grads = run_with_grads(
        ref_fn, leaves(*[None if t is None else t.double() for t in inputs]), dout.double())
    same, same_grads = run_with_grads(ref_fn, leaves(*inputs), dout)
    assert out.dtype == same.dtype
    assert_close_to_ref(out, ref, same, "out")
    for name, g, rg, sg in zip(names, grads, ref_grads, same_grads):
        if rg is not None:
            assert g is not None and g.dtype == sg.dtype, f"d{name}: {g}"
            assert_close_to_ref(g, rg, sg, f"d{name}")
    return out, grads


# --------------------------------------------------------------------------- gather


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "rmsnorm"])
@pytest.mark.parametrize("n,d,mix", CASES)
def test_gather_matches_reference(n, d, mix, norm, device):
    groups = grouping.group_tokens(_routes(n, mix, device), 3)
    for dtype in dtypes_for(device):
        g = torch.Generator().manual_seed(n * d)
        x = torch.randn(n, d, generator=g).to(device, dtype)
        w = (1 + 0.5 * torch.randn(d, generator=g)).to(device, dtype) if norm else None
        dout = torch.randn(n, d, generator=g).to(device, dtype)
        out, (dx, _) = _check_against_reference(
            lambda x, w: permute.gather(x, groups, w),
            lambda x, w: reference.gather(x, groups, w), (x, w), dout, ("x", "norm_weight"))
        if not norm:  # a permutation is exact, both ways
            assert torch.equal(out, x[groups.perm]) and torch.equal(dx, dout[groups.inv])


@pytest.mark.parametrize("d,block_d", [(341, 64), (17, 16), (5, 2)])
def test_gather_rmsnorm_loop_over_d(d, block_d, device):
    """Rows wider than one block: the two-pass norm and the partial d norm_weight buffer."""
    n = 37
    groups = grouping.group_tokens(_routes(n, "random", device), 3)
    g = torch.Generator().manual_seed(d)
    x, dy = (torch.randn(n, d, generator=g).to(device) for _ in range(2))
    w = (1 + 0.5 * torch.randn(d, generator=g)).to(device)
    out = permute.gather_fwd(x, groups.perm, w, 1e-6, block_d=block_d)
    dx, dw = permute.gather_norm_bwd(dy, x, groups.inv, w, 1e-6, block_d=block_d)
    x64, w64 = leaves(x.double(), w.double())
    ref = reference.gather(x64, groups, w64)
    ref.backward(dy.double())
    xs, ws = leaves(x, w)
    same = reference.gather(xs, groups, ws)
    same.backward(dy)
    assert_close_to_ref(out, ref.detach(), same.detach(), "out")
    assert_close_to_ref(dx, x64.grad, xs.grad, "dx")
    assert_close_to_ref(dw, w64.grad, ws.grad, "dnorm_weight")
    assert torch.equal(permute.gather_fwd(x, groups.perm, block_d=block_d), x[groups.perm])


# --------------------------------------------------------------------------- scatter_combine


@pytest.mark.parametrize("has_res,has_gate,skip", [(True, True, SKIP), (False, False, ()),
                                                    (True, False, ()), (False, True, SKIP)])
@pytest.mark.parametrize("n,d,mix", CASES)
def test_scatter_combine_matches_reference(n, d, mix, has_res, has_gate, skip, device):
    groups = grouping.group_tokens(_routes(n, mix, device), 3)
    for dtype in dtypes_for(device):
        g = torch.Generator().manual_seed(n + d)
        y, res, dout = (torch.randn(n, d, generator=g).to(device, dtype) for _ in range(3))
        gate = torch.rand(n, generator=g).to(device, dtype) if has_gate else None
        _check_against_reference(
            lambda y, r, gt: permute.scatter_combine(y, groups, r, gt, skip),
            lambda y, r, gt: reference.scatter_combine(y, groups, r, gt, skip),
            (y, res if has_res else None, gate), dout, ("y", "residual", "gate"))


@pytest.mark.parametrize("block_d", [None, 16])
def test_scatter_combine_never_reads_skip_rows(block_d, device):
    """Rows of y that belong to skip tokens are garbage (NaN): they must not leak into the
    output or d gate, and their rows of dy are zero."""
    n, d = 50, 40
    routes = _routes(n, "random", device, seed=5)
    groups = grouping.group_tokens(routes, 3)
    g = torch.Generator().manual_seed(6)
    y, res, dout = (torch.randn(n, d, generator=g).to(device) for _ in range(3))
    gate = torch.rand(n, generator=g).to(device)
    skip_rows = groups.inv[routes == 0]
    y[skip_rows] = float("nan")
    mask = permute._skip_mask(SKIP)
    out = permute.scatter_combine_fwd(y, groups.inv, groups.routes, res, gate, mask, block_d)
    dy, dgate = permute.scatter_combine_bwd(dout, groups.inv, groups.routes, gate, y, mask,
                                            True, block_d)
    assert torch.isfinite(out).all() and torch.isfinite(dgate).all()
    assert torch.equal(out[routes == 0], res[routes == 0])
    assert torch.equal(dgate[routes == 0], torch.zeros_like(dgate[routes == 0]))
    assert torch.equal(dy[skip_rows], torch.zeros_like(dy[skip_rows]))
    y_clean = torch.where(torch.isnan(y), 0.0, y)
    ref = reference.scatter_combine(y_clean.double(), groups, res.double(), gate.double(), SKIP)
    assert_close_to_ref(out, ref, reference.scatter_combine(y_clean, groups, res, gate, SKIP))


def test_scatter_combine_gate_of_another_dtype(device):
    """A float32 gate on float16 rows is cast to float16 first, as the reference does."""
    n, d = 30, 19
    groups = grouping.group_tokens(_routes(n, "random", device), 3)
    g = torch.Generator().manual_seed(7)
    y, res, dout = (torch.randn(n, d, generator=g).to(device, torch.float16) for _ in range(3))
    gate = torch.rand(n, generator=g).to(device)
    _, (_, _, dgate) = _check_against_reference(
        lambda y, r, gt: permute.scatter_combine(y, groups, r, gt, SKIP),
        lambda y, r, gt: reference.scatter_combine(y, groups, r, gt, SKIP),
        (y, res, gate), dout, ("y", "residual", "gate"))
    assert dgate.dtype == torch.float32


def test_float64_inputs(device):
    """float64 rows accumulate in float64 (the reference keeps float64 too); a large eps
    checks that eps reaches the kernel."""
    n, d = 23, 17
    groups = grouping.group_tokens(_routes(n, "random", device), 3)
    g = torch.Generator().manual_seed(12)
    x, res, dout = (torch.randn(n, d, generator=g, dtype=torch.float64).to(device)
                    for _ in range(3))
    w, gate = (torch.rand(k, generator=g, dtype=torch.float64).to(device) for k in (d, n))
    _check_against_reference(lambda x, w: permute.gather(x, groups, w, eps=0.5),
                             lambda x, w: reference.gather(x, groups, w, eps=0.5), (x, w), dout,
                             ("x", "norm_weight"))
    _check_against_reference(lambda y, r, gt: permute.scatter_combine(y, groups, r, gt, SKIP),
                             lambda y, r, gt: reference.scatter_combine(y, groups, r, gt, SKIP),
                             (x, res, gate), dout, ("y", "residual", "gate"))


# --------------------------------------------------------------------------- layouts, determinism


def test_strided_inputs(device):
    """Row-sliced views go through by their row stride, column-strided ones are copied; either
    way the answer is the reference's."""
    n, d = 23, 17
    groups = grouping.group_tokens(_routes(n, "random", device), 3)
    g = torch.Generator().manual_seed(8)
    big = torch.randn(n, 2 * d + 3, generator=g).to(device)
    x_rows = big[:, 3:3 + d]  # row stride 2d+3
    x_cols = big[:, ::2][:, :d]  # column stride 2
    res = torch.randn(1, d, generator=g).to(device).expand(n, d)  # row stride 0
    gate = torch.rand(2 * n, generator=g).to(device)[::2]
    w = torch.randn(2 * d, generator=g).to(device)[::2]
    for x in (x_rows, x_cols, x_rows.t().contiguous().t()):
        assert torch.equal(permute.gather(x, groups), x[groups.perm])
        torch.testing.assert_close(permute.gather(x, groups, w),
                                   reference.gather(x, groups, w))
        torch.testing.assert_close(permute.scatter_combine(x, groups, res, gate, SKIP),
                                   reference.scatter_combine(x, groups, res, gate, SKIP))


def test_deterministic(device):
    """Two runs give bitwise equal outputs and gradients (no atomics anywhere)."""
    n, d = 100, 341
    groups = grouping.group_tokens(_routes(n, "random", device), 3)
    g = torch.Generator().manual_seed(9)
    x, res, dout = (torch.randn(n, d, generator=g).to(device) for _ in range(3))
    w, gate = torch.randn(d, generator=g).to(device), torch.rand(n, generator=g).to(device)

    def layer(x, w, res, gate):
        return permute.scatter_combine(permute.gather(x, groups, w), groups, res, gate, SKIP)

    a, ga = run_with_grads(layer, leaves(x, w, res, gate), dout)
    b, gb = run_with_grads(layer, leaves(x, w, res, gate), dout)
    assert torch.equal(a, b) and all(torch.equal(u, v) for u, v in zip(ga, gb))


# --------------------------------------------------------------------------- torch.library


def test_custom_ops_registered_correctly(device):
    """opcheck: schema, fake (meta) kernels and autograd registration agree with the real ops."""
    n, d = 9, 12
    groups = grouping.group_tokens(_routes(n, "random", device), 3)
    g = torch.Generator().manual_seed(10)
    x, res = (torch.randn(n, d, generator=g).to(device).requires_grad_() for _ in range(2))
    w = torch.randn(d, generator=g).to(device).requires_grad_()
    gate = torch.rand(n, generator=g).to(device).requires_grad_()
    quick = ("test_schema", "test_autograd_registration", "test_faketensor")
    full = quick + ("test_aot_dispatch_dynamic",)  # also checks the backward ops' fakes
    for args, utils in [((x, groups.perm, groups.inv, None, 1e-6), quick),
                        ((x, groups.perm, groups.inv, w, 1e-6), full)]:
        torch.library.opcheck(torch.ops.duollm.gather_fwd.default, args, test_utils=utils)
    for r, gt, mask, utils in [(res, gate, 1, full), (None, None, 0, quick)]:
        torch.library.opcheck(torch.ops.duollm.scatter_combine_fwd.default,
                              (x, groups.inv, groups.routes, r, gt, mask), test_utils=utils)


def test_torch_compile_fullgraph(device):
    """group + gather (RMSNorm) + scatter_combine under torch.compile(fullgraph=True), forward
    and backward, equal to eager. The graph holds only our custom ops, so on the CPU inductor
    emits no C++ (which takes about a minute to build on a cold cache); the GPU test below
    compiles a layer with arithmetic between the ops. (Called through the backend module:
    ``duollm.ops`` dispatch is outside this file's scope.)"""
    n, d = 40, 33
    routes = _routes(n, "random", device, seed=11)
    g = torch.Generator().manual_seed(11)
    x, res, dout = (torch.randn(n, d, generator=g).to(device) for _ in range(3))
    w, gate = torch.randn(d, generator=g).to(device), torch.rand(n, generator=g).to(device)

    def layer(x, w, res, gate):
        groups = grouping.group_tokens(routes, 3)
        h = permute.gather(x, groups, w)
        return permute.scatter_combine(h, groups, res, gate, SKIP)

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    a, ga = run_with_grads(compiled, leaves(x, w, res, gate), dout)
    b, gb = run_with_grads(layer, leaves(x, w, res, gate), dout)
    assert torch.equal(a, b) and all(torch.equal(u, v) for u, v in zip(ga, gb))


# --------------------------------------------------------------------------- validation


def test_bad_input_same_errors_as_torch(device):
    n, d = 6, 8
    groups = reference.group_tokens(torch.tensor([0, 1, 2, 0, 1, 2], device=device), 3)
    x = torch.randn(n, d, device=device)
    bad_calls = [
        lambda b: ops.gather(x[0], groups, backend=b),
        lambda b: ops.gather(x[:4], groups, backend=b),
        lambda b: ops.gather(x.long(), groups, backend=b),
        lambda b: ops.gather(x, tuple(groups), backend=b),
        lambda b: ops.gather(x, groups, torch.ones(d + 1, device=device), backend=b),
        lambda b: ops.scatter_combine(x, groups, gate=torch.ones(n + 1, device=device),
                                      backend=b),
        lambda b: ops.scatter_combine(x, groups, residual=x.half(), backend=b),
        lambda b: ops.scatter_combine(x, groups, skip_paths=(3,), backend=b),
    ]
    for call in bad_calls:
        errors = []
        for backend in ("torch", "triton"):
            with pytest.raises((ValueError, TypeError)) as e:
                call(backend)
            errors.append((type(e.value), str(e.value)))
        assert errors[0] == errors[1]


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_int64_offsets_on_gpu():
    """rows * d >= 2**31: the row offsets must be computed in int64."""
    n, d = (1 << 31) // 4096 + 8, 4096
    free, _ = torch.cuda.mem_get_info()
    if free < 6 * n * d * 2:
        pytest.skip(f"needs {6 * n * d * 2 / 2**30:.0f} GiB of free GPU memory")
    routes = torch.randint(0, 3, (n,), device="cuda", dtype=torch.int8)
    groups = grouping.group_tokens(routes, 3)
    x = torch.randn(n, d, device="cuda", dtype=torch.float16)
    out = permute.gather(x, groups)
    assert torch.equal(out[-64:], x[groups.perm[-64:]])
    assert torch.equal(out[:64], x[groups.perm[:64]])
    del out
    back = permute.scatter_combine(x, groups, skip_paths=SKIP)
    last = torch.arange(n - 64, n, device="cuda")
    want = torch.where((routes[last] == 0)[:, None], 0.0, x[groups.inv[last]])
    assert torch.equal(back[-64:], want.half())


@pytest.mark.gpu
def test_cuda_graph_capture():
    """The whole chain runs inside a CUDA graph: no host synchronisation anywhere, and a
    replay with new routes gives the new answer."""
    n, d = 4096, 2560
    routes = torch.randint(0, 3, (n,), device="cuda", dtype=torch.int8)
    x, res = (torch.randn(n, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = torch.randn(d, device="cuda", dtype=torch.bfloat16)
    gate = torch.rand(n, device="cuda", dtype=torch.bfloat16)

    def layer(lib, x, w, res, gate):
        groups = lib.group_tokens(routes, 3)
        return lib.scatter_combine(lib.gather(x, groups, w) * 2, groups, res, gate, SKIP)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(duollm_kernels, x, w, res, gate)  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(duollm_kernels, x, w, res, gate)
    routes.copy_(torch.randint(0, 3, (n,), device="cuda", dtype=torch.int8))
    graph.replay()
    torch.cuda.synchronize()
    ref = layer(reference, x.double(), w.double(), res.double(), gate.double())
    assert_close_to_ref(out, ref, layer(reference, x, w, res, gate))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_torch_compile_layer_on_gpu(dtype):
    """Inductor compiles arithmetic around our opaque ops; forward and gradients against the
    float64 reference with the same-dtype budget."""
    n, d = 1000, 2560
    routes = torch.randint(0, 3, (n,), device="cuda")
    x, res, dout = (torch.randn(n, d, device="cuda", dtype=dtype) for _ in range(3))
    w = torch.randn(d, device="cuda", dtype=dtype)
    gate = torch.rand(n, device="cuda", dtype=dtype)

    def layer(lib):
        def fn(x, w, res, gate):
            groups = lib.group_tokens(routes, 3)
            h = torch.nn.functional.silu(lib.gather(x, groups, w)) * 0.5
            return lib.scatter_combine(h, groups, res, gate, SKIP)
        return fn

    torch._dynamo.reset()
    _check_against_reference(torch.compile(layer(duollm_kernels), fullgraph=True),
                             layer(reference), (x, w, res, gate), dout,
                             ("x", "norm_weight", "residual", "gate"))
