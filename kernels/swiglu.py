"""Fused SwiGLU FFN: ``y = (silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T``.

Forward, one of two paths:

* d <= ``FUSED_MAX_D``: one kernel, ``_swiglu_fused_fwd_kernel``. A program holds a block of
  rows and the whole of d, and walks W in chunks: the (BM, BW) chunk of h is computed from the
  on-chip x tile and immediately multiplied into the (BM, d) accumulator, so h never leaves
  the chip.
* otherwise: the two grouped GEMMs of ``ffn_gemm`` (gate/up with the SiLU-mul epilogue
  writing h, then the down GEMM). For large d a single kernel would need an output grid over
  d blocks, recomputing the gate/up GEMM (2/3 of the FLOPs) once per d block --
  cdiv(2560, 128) = 20x at the paper's shape -- while the h round trip of the two-kernel path
  costs about 4 bytes per h element, a few per cent of the GEMM time. So the threshold is on
  d, not on W: fused when one program's row block can hold all of d; the paper's layer
  (d 2560, widths 640 and 10240) always takes the two-kernel path.

Backward: ``ffn_gemm.ffn_bwd`` (h recomputed; dx, dWg, dWu, dWd with the weight gradients
split over tokens and reduced deterministically).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from duollm.reference import gate_residual

from ._common import (Slot, acc_dtypes, custom_op, int32_guard, interpreting as _interpreting,
                      precision)
from .decode import DECODE_MAX_N
from .duo_ffn import DECODE, duo_ffn, parse_mode
from .ffn_gemm import down_fwd, gateup_fwd
from .ffn_gemm_bwd import ffn_bwd

FUSED_MAX_D = 128


# --------------------------------------------------------------------------- kernel


@triton.jit
def _swiglu_fused_fwd_kernel(
    x_ptr,    # (N, d) input rows
    wg_ptr,   # (W, d) gate weight
    wu_ptr,   # (W, d) up weight
    wd_ptr,   # (d, W) down weight
    out_ptr,  # (N, d) out
    N, d, W,
    BM: tl.constexpr, BD: tl.constexpr, BW: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < N
    cols = tl.arange(0, BD)
    cmask = cols < d
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * d + cols[None, :],
                mask=rmask[:, None] & cmask[None, :], other=0.0)  # (BM, BD) stays on chip
    if UPCAST:
        x = x.to(ACC)
    acc = tl.zeros((BM, BD), dtype=ACC)
    for w0 in range(0, W, BW):
        ws = w0 + tl.arange(0, BW)
        wmask = ws < W
        kmask = cmask[:, None] & wmask[None, :]
        wg = tl.load(wg_ptr + ws[None, :] * d + cols[:, None], mask=kmask, other=0.0)  # (BD, BW)
        wu = tl.load(wu_ptr + ws[None, :] * d + cols[:, None], mask=kmask, other=0.0)
        if UPCAST:
            wg = wg.to(ACC)
            wu = wu.to(ACC)
        g = tl.dot(x, wg, input_precision=PREC, out_dtype=ACC)
        u = tl.dot(x, wu, input_precision=PREC, out_dtype=ACC)
        h = g * tl.sigmoid(g) * u  # (BM, BW) fp32; never written to memory
        wd = tl.load(wd_ptr + cols[None, :] * W + ws[:, None],
                     mask=wmask[:, None] & cmask[None, :], other=0.0)  # (BW, BD)
        if UPCAST:
            wd = wd.to(ACC)
        else:
            h = h.to(wd.dtype)
        acc = tl.dot(h, wd, acc, input_precision=PREC, out_dtype=ACC)
    tl.store(out_ptr + rows64[:, None] * d + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


# --------------------------------------------------------------------------- the op


def swiglu_ffn_fwd(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                   w_down: torch.Tensor, fused: Optional[bool] = None) -> torch.Tensor:
    """Forward launcher. x (N, d); w_gate, w_up (W, d); w_down (d, W). Returns (N, d).

    ``fused`` forces (True) or forbids (False) the single-kernel path; by default it runs
    when d <= FUSED_MAX_D (see the module docstring).
    """
    x = x.contiguous()
    w_gate, w_up, w_down = w_gate.contiguous(), w_up.contiguous(), w_down.contiguous()
    N, d = x.shape
    W = w_gate.shape[0]
    if N == 0 or d == 0:
        return x.new_empty((N, d))
    if W == 0:
        return x.new_zeros((N, d))
    int32_guard("w_gate", W, d)
    if fused is None:
        fused = d <= FUSED_MAX_D
    BD = triton.next_power_of_2(max(d, 16))
    max_bd = 128 if x.dtype == torch.float64 else 256  # shared memory per program
    if fused and BD > max_bd:
        raise ValueError(f"swiglu_ffn_fwd: the fused kernel holds a row block's whole d on "
                         f"chip and supports d <= {max_bd} for {x.dtype}, got d={d}; use "
                         f"fused=False")
    out = torch.empty_like(x)
    if fused:
        if _interpreting():
            BM, BW, nw = 64, 64, 4
        else:
            BM, BW, nw = (64, 64, 8) if BD <= 128 else (64, 32, 8)
        _swiglu_fused_fwd_kernel[(triton.cdiv(N, BM),)](
            x, w_gate, w_up, w_down, out, N, d, W, BM=BM, BD=BD, BW=BW,
            UPCAST=_interpreting(), PREC=precision(x.dtype), ACC=acc_dtypes(x.dtype)[0],
            num_warps=nw)
        return out
    h = torch.empty((N, W), dtype=x.dtype, device=x.device)
    slot = Slot(0, W, (w_gate, w_up, w_down))
    gateup_fwd(x, None, None, [slot], h)
    down_fwd(h, None, None, [slot], out, None, None)
    return out


def swiglu_ffn_bwd(dy: torch.Tensor, x: torch.Tensor, w_gate: torch.Tensor,
                   w_up: torch.Tensor, w_down: torch.Tensor):
    """Backward launcher: (dx, dw_gate, dw_up, dw_down), h recomputed."""
    x, dy = x.contiguous(), dy.contiguous()
    w_gate, w_up, w_down = w_gate.contiguous(), w_up.contiguous(), w_down.contiguous()
    N, d = x.shape
    W = w_gate.shape[0]
    if N == 0 or W == 0 or d == 0:
        return (torch.zeros_like(x), torch.zeros_like(w_gate), torch.zeros_like(w_up),
                torch.zeros_like(w_down))
    dx, grads, _ = ffn_bwd(x, dy, None, None, None, None,
                           [Slot(0, W, (w_gate, w_up, w_down))])
    return (dx, *grads[0])


@custom_op("swiglu_ffn_fwd")
def _swiglu_ffn_op(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                   w_down: torch.Tensor) -> torch.Tensor:
    return swiglu_ffn_fwd(x, w_gate, w_up, w_down)


@_swiglu_ffn_op.register_fake
def _(x, w_gate, w_up, w_down):
    return x.new_empty(x.shape)


@custom_op("swiglu_ffn_bwd")
def _swiglu_ffn_bwd_op(dy: torch.Tensor, x: torch.Tensor, w_gate: torch.Tensor,
                       w_up: torch.Tensor, w_down: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return swiglu_ffn_bwd(dy, x, w_gate, w_up, w_down)


@_swiglu_ffn_bwd_op.register_fake
def _(dy, x, w_gate, w_up, w_down):
    return (x.new_empty(x.shape), w_gate.new_empty(w_gate.shape),
            w_up.new_empty(w_up.shape), w_down.new_empty(w_down.shape))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    x, w_gate, w_up, w_down = ctx.saved_tensors
    return _swiglu_ffn_bwd_op(dy, x, w_gate, w_up, w_down)


_swiglu_ffn_op.register_autograd(_backward, setup_context=_setup_context)


def swiglu_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
               w_down: torch.Tensor) -> torch.Tensor:
    """SwiGLU FFN (Triton). x (N, d); w_gate, w_up (W, d); w_down (d, W). Returns (N, d).

    Differentiable in all four inputs; registered as ``torch.ops.duollm.swiglu_ffn_fwd``.
    """
    return _swiglu_ffn_op(x, w_gate, w_up, w_down)


_ZERO_ROUTES = {}  # device -> (DECODE_MAX_N,) int32 zeros: the routes of a one-path call


def _zero_routes(n: int, device: torch.device) -> torch.Tensor:
    """(n,) zeros, cached per device (made outside any CUDA-graph capture: a tensor made
    inside one holds memory whose contents are undefined until the first replay)."""
    z = _ZERO_ROUTES.get(device)
    if z is None:
        z = torch.zeros(DECODE_MAX_N, dtype=torch.int32, device=device)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _ZERO_ROUTES[device] = z
    return z[:n]


def one_path(x: torch.Tensor, weights, residual: Optional[torch.Tensor] = None,
             gate: Optional[torch.Tensor] = None, mode=None) -> torch.Tensor:
    """Every token on one path (``duollm.ops`` for an int route: policies such as
    ``generate(routes="big")`` and fixed patterns): ``residual + gate * swiglu(x)``,
    x (N, d) -> (N, d) in x's dtype, differentiable.

    With the decode path on (``DUOLLM_TRITON_DECODE=1``, or ``mode`` as in ``duo_ffn``) and
    1 <= N <= ``DECODE_MAX_N``, the decode kernels serve it as they serve a routes tensor (all
    zeros, one routed slot): two launches over every SM. Otherwise the SwiGLU op, then the
    gate and residual in torch (in place where autograd allows)."""
    if parse_mode(mode) & DECODE and 1 <= x.shape[0] <= DECODE_MAX_N:
        return duo_ffn(x, _zero_routes(x.shape[0], x.device), (tuple(weights),), residual,
                       gate, mode=mode)
    y = swiglu_ffn(x, *weights).to(x.dtype)
    return gate_residual(y, residual, gate)
