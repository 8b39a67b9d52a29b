"""Helpers shared by the kernel files: the custom-op convention, knobs that depend on where a
kernel runs (GPU or interpreter), and small launcher utilities.

Custom-op convention: every op is ``torch.library.custom_op`` in the ``duollm`` namespace
(``duollm::<op>_fwd`` / ``duollm::<op>_bwd``), with a ``register_fake`` meta function and,
for differentiable ops, ``register_autograd`` wiring the backward op, so that
``torch.compile(fullgraph=True)`` sees one opaque node per kernel launch and no graph breaks.
Custom ops cannot return None or alias an input: an output that is not needed is returned as
an empty tensor (``unused_grad``) and the Python wrapper maps it back to None.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

NAMESPACE = "duollm"


def custom_op(name: str, **kwargs):
    """``torch.library.custom_op("duollm::<name>", mutates_args=())`` as a decorator."""
    kwargs.setdefault("mutates_args", ())
    return torch.library.custom_op(f"{NAMESPACE}::{name}", **kwargs)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    """The smallest power of two >= max(n, 1)."""
    return triton.next_power_of_2(max(int(n), 1))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in for the interpreter."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else
                         torch.cuda.current_device())
    return 4


def acc_dtype(*tensors: Optional[torch.Tensor]):
    """The Triton accumulation dtype for these inputs: float64 if any is float64, else float32.

    Half-precision inputs are always upcast after loading (the interpreter cannot do bf16
    arithmetic, and fp32 accumulation is what the reference does)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return tl.float64
    return tl.float32


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` (N, d) with unit stride along d, copying only if needed; kernels take the row
    stride (``t.stride(0)``) as an argument, so row-sliced or row-broadcast views go through
    without a copy (kernels only ever read them)."""
    if t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] <= 1):
        return t
    return t.contiguous()


def vec_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor with unit stride (a copy only when it is strided)."""
    t = t.reshape(-1)
    return t if t.stride(0) == 1 or t.numel() <= 1 else t.contiguous()


def unused_grad(like: torch.Tensor) -> torch.Tensor:
    """The placeholder a backward op returns for a gradient nobody asked for."""
    return like.new_empty(0)
