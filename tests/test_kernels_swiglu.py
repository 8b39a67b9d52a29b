"""The Triton SwiGLU FFN (kernels/swiglu.py) against the reference: forward, every gradient,
awkward shapes, both kernel paths (fused single kernel, gate/up + down), determinism, bad
input through ``duollm.ops``. On the CPU the kernels run in the Triton interpreter."""
import importlib

import pytest
import torch

from duollm import ops, reference
from tolerance import assert_close_to_ref, dtypes_for

swiglu = importlib.import_module("duollm.kernels.swiglu")

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _skip_dtype(dtype, device):
    if dtype not in dtypes_for(device):
        pytest.skip(f"{dtype} is tested only on a CUDA GPU (the interpreter mangles it)")


def _make(N, d, W, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g)
    wg = torch.randn(W, d, generator=g) / d ** 0.5
    wu = torch.randn(W, d, generator=g) / d ** 0.5
    wd = torch.randn(d, W, generator=g) / max(W, 1) ** 0.5
    dy = torch.randn(N, d, generator=g)
    to = dict(dtype=dtype, device=device)
    return [t.to(**to) for t in (x, wg, wu, wd)], dy.to(**to)


def _refs(inputs, dy):
    """(output, grads) of the reference in float64 and in the inputs' own dtype."""
    out = []
    for cast in (torch.float64, inputs[0].dtype):
        leaves = [t.detach().to(cast).requires_grad_() for t in inputs]
        y = reference.swiglu_ffn(*leaves)
        y.backward(dy.to(cast))
        out.append((y.detach(), [t.grad for t in leaves]))
    return out


NAMES = ("dx", "dw_gate", "dw_up", "dw_down")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("N,d,W", [(0, 17, 24), (1, 17, 24), (37, 48, 40), (37, 17, 24)])
def test_swiglu_forward_backward(device, dtype, N, d, W):
    _skip_dtype(dtype, device)
    inputs, dy = _make(N, d, W, dtype, device)
    leaves = [t.clone().requires_grad_() for t in inputs]
    y = swiglu.swiglu_ffn(*leaves)
    y.backward(dy)
    (y64, g64), (yd, gd) = _refs(inputs, dy)
    assert y.dtype == dtype
    assert_close_to_ref(y.detach(), y64, yd, "y")
    for name, leaf, r64, rd in zip(NAMES, leaves, g64, gd):
        assert_close_to_ref(leaf.grad, r64, rd, name)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("fused", [True, False])
def test_swiglu_both_forward_paths(device, dtype, fused):
    """The single fused kernel and the two-kernel path agree with the reference."""
    _skip_dtype(dtype, device)
    inputs, dy = _make(37, 48, 40, dtype, device, seed=1)
    y = swiglu.swiglu_ffn_fwd(*inputs, fused=fused)
    (y64, _), (yd, _) = _refs(inputs, dy)
    assert_close_to_ref(y, y64, yd, f"y (fused={fused})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_swiglu_wide_d_forward(device, dtype):
    """d = 341 (odd, past FUSED_MAX_D): the gate/up + down path with masked K tails."""
    inputs, dy = _make(70, 341, 24, dtype, device, seed=2)
    y = swiglu.swiglu_ffn(*inputs)
    (y64, g64), (yd, gd) = _refs(inputs, dy)
    assert_close_to_ref(y, y64, yd, "y")
    grads = swiglu.swiglu_ffn_bwd(dy, *inputs)
    for name, g, r64, rd in zip(NAMES, grads, g64, gd):
        assert_close_to_ref(g, r64, rd, name)


def test_swiglu_float64(device):
    """float64 inputs accumulate in float64 (to the reference's own precision)."""
    inputs, dy = _make(37, 48, 40, torch.float64, device, seed=7)
    leaves = [t.clone().requires_grad_() for t in inputs]
    y = swiglu.swiglu_ffn(*leaves)
    y.backward(dy)
    (y64, g64), _ = _refs(inputs, dy)
    assert_close_to_ref(y.detach(), y64, y64, "y")
    for name, leaf, r64 in zip(NAMES, leaves, g64):
        assert_close_to_ref(leaf.grad, r64, r64, name)


def test_swiglu_deterministic(device):
    inputs, dy = _make(37, 48, 40, torch.float32, device, seed=3)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y = swiglu.swiglu_ffn(*leaves)
        y.backward(dy)
        runs.append([y.detach()] + [t.grad for t in leaves])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_swiglu_via_ops_and_custom_op(device):
    inputs, _ = _make(5, 17, 24, torch.float32, device)
    y = ops.swiglu_ffn(*inputs, backend="triton")
    y2 = torch.ops.duollm.swiglu_ffn_fwd(*inputs)
    assert torch.equal(y, y2)
    torch.library.opcheck(torch.ops.duollm.swiglu_ffn_fwd, tuple(inputs),
                          test_utils=("test_schema", "test_faketensor"))


def test_swiglu_bad_input_raises(device):
    (x, wg, wu, wd), _ = _make(5, 17, 24, torch.float32, device)
    with pytest.raises(TypeError, match="w_up"):
        ops.swiglu_ffn(x, wg, wu.half(), wd, backend="triton")
    with pytest.raises(ValueError, match="w_down"):
        ops.swiglu_ffn(x, wg, wu, wd[:, :-1], backend="triton")
    with pytest.raises(ValueError, match="x"):
        ops.swiglu_ffn(x[0], wg, wu, wd, backend="triton")
    with pytest.raises(TypeError, match="x"):
        ops.swiglu_ffn(x.long(), wg, wu, wd, backend="triton")


def _check_forward_and_grads(N, d, W, dtype, seed):
    """swiglu_ffn on the GPU against the float64 reference: output and every gradient."""
    inputs, dy = _make(N, d, W, dtype, torch.device("cuda"), seed=seed)
    leaves = [t.clone().requires_grad_() for t in inputs]
    y = swiglu.swiglu_ffn(*leaves)
    y.backward(dy)
    (y64, g64), (yd, gd) = _refs(inputs, dy)
    assert_close_to_ref(y.detach(), y64, yd, "y")
    for name, leaf, r64, rd in zip(NAMES, leaves, g64, gd):
        assert_close_to_ref(leaf.grad, r64, rd, name)


@pytest.mark.gpu
@pytest.mark.parametrize("W", [640, 10240])
def test_swiglu_paper_shape_bf16_gpu(W):
    """The paper's widths in bf16 (d 2560), forward and all gradients."""
    _check_forward_and_grads(512, 2560, W, torch.bfloat16, seed=4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_swiglu_large_n_gpu(dtype):
    """N = 4096 takes the 128-row tile configurations (the CPU-sized tests never do)."""
    _check_forward_and_grads(4096, 256, 512, dtype, seed=8)


@pytest.mark.gpu
def test_swiglu_fused_small_d_bf16_gpu():
    """The single-kernel path on a GPU (d <= FUSED_MAX_D) in bf16 and fp16."""
    for dtype in (torch.bfloat16, torch.float16):
        inputs, dy = _make(1000, 256, 1000, dtype, torch.device("cuda"), seed=5)
        (y64, _), (yd, _) = _refs(inputs, dy)
        assert_close_to_ref(swiglu.swiglu_ffn_fwd(*inputs, fused=True), y64, yd, "fused")
        assert_close_to_ref(swiglu.swiglu_ffn_fwd(*inputs, fused=False), y64, yd, "2-kernel")


def test_swiglu_compile_fullgraph(device):
    """The custom op with its fake and autograd wiring inside torch.compile(fullgraph=True)."""
    inputs, dy = _make(9, 17, 24, torch.float32, device, seed=6)
    outs = []
    backend = "aot_eager" if device.type == "cpu" else "inductor"  # no C++ build on CPU CI
    torch._dynamo.reset()
    for fn in (swiglu.swiglu_ffn, torch.compile(swiglu.swiglu_ffn, fullgraph=True,
                                                backend=backend)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y = fn(*leaves)
        y.backward(dy)
        outs.append([y.detach()] + [t.grad for t in leaves])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
