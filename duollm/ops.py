"""Op dispatch: one public function per op, validated once here, run by a chosen backend.

Backends (docs/backends.md):

* ``"torch"``  — ``duollm.torch_backend``: plain PyTorch tuned for speed (sorted grouping,
  matmuls on contiguous slices), runs anywhere (CPU default); checked against
  ``duollm.reference``, the specification.
* ``"triton"`` — ``duollm.kernels``: Triton kernels (a CUDA GPU, or the interpreter when
  ``TRITON_INTERPRET=1``).
* ``"cuda"``   — ``duollm._C``: the compiled CUDA extension.
* ``"auto"``   — the fastest available backend for the inputs' device.

Choose per call (``backend="triton"``), per scope (``with use_backend("triton"): ...``) or by
the ``DUOLLM_BACKEND`` environment variable, in that order of precedence. Asking for a
backend that cannot run raises ``BackendUnavailableError`` saying what is missing; only
``"auto"`` ever falls back.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import operator
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch

from .reference import FFNWeights, RouteGroups

OPS = ("group_tokens", "gather", "scatter_combine", "swiglu_ffn", "duo_ffn")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says what is missing."""


# --------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class Backend:
    """A backend: a module implementing (some of) ``OPS`` and a check of what it needs.

    ``check(device)`` returns None when the backend can run on ``device`` (a ``torch.device``,
    or None for "anywhere it can run"), else a sentence saying what is missing.
    """

    name: str
    module: str
    check: Callable[[Optional[torch.device]], Optional[str]]

    def load(self):
        # sys.modules first: dynamo cannot trace import_module, and this keeps
        # torch.compile(fullgraph=True) of code calling duollm.ops free of graph breaks.
        return sys.modules.get(self.module) or importlib.import_module(self.module)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# What is installed cannot change within a process; looking it up once here also keeps
# find_spec (which dynamo refuses to trace) out of torch.compile'd code.
_HAS_TRITON = _installed("triton")
_HAS_CUDA_EXT = _installed("duollm._C")


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_torch(device: Optional[torch.device]) -> Optional[str]:
    return None


def _check_triton(device: Optional[torch.device]) -> Optional[str]:
    if not _HAS_TRITON:
        return "the triton package is not installed (pip install triton)"
    if _triton_interpreting():
        return None
    if not torch.cuda.is_available():
        return ("no CUDA GPU is visible to torch; run on a GPU or set TRITON_INTERPRET=1 "
                "before importing duollm to use the (slow) interpreter")
    if device is not None and device.type != "cuda":
        return f"tensors are on {device}, the triton backend needs CUDA tensors"
    return None


def _check_cuda(device: Optional[torch.device]) -> Optional[str]:
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    if not _HAS_CUDA_EXT:
        return ("the CUDA extension duollm._C is not built; reinstall on a machine with CUDA "
                "torch and nvcc (pip install --no-build-isolation -e .) without "
                "DUOLLM_SKIP_CUDA_BUILD=1")
    if device is not None and device.type != "cuda":
        return f"tensors are on {device}, the cuda backend needs CUDA tensors"
    return None


_BACKENDS: Dict[str, Backend] = {}


def register_backend(name: str, module: str,
                     check: Callable[[Optional[torch.device]], Optional[str]]) -> None:
    """Register (or replace) a backend implemented by the importable ``module``."""
    _BACKENDS[name] = Backend(name, module, check)


register_backend("torch", "duollm.torch_backend", _check_torch)
register_backend("triton", "duollm.kernels", _check_triton)
register_backend("cuda", "duollm.cuda_backend", _check_cuda)

# Preference of "auto" on a GPU; the CPU always gets torch.
_AUTO_ORDER_CUDA = ("triton", "cuda", "torch")


def backends() -> Tuple[str, ...]:
    """Names of the registered backends."""
    return tuple(_BACKENDS)


def backend_status(device: Optional[torch.device] = None) -> Dict[str, Optional[str]]:
    """``{name: None if available else the reason it is not}`` for every backend."""
    return {name: b.check(device) for name, b in _BACKENDS.items()}


def is_available(name: str, device: Optional[torch.device] = None) -> bool:
    return name in _BACKENDS and _BACKENDS[name].check(device) is None


_scoped_backend: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "duollm_backend", default=None)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the ``with`` block on backend ``name`` (unless a call says otherwise)."""
    _check_name(name)
    token = _scoped_backend.set(name)
    try:
        yield
    finally:
        _scoped_backend.reset(token)


def current_backend() -> str:
    """The backend name in force here: the scope's, else ``DUOLLM_BACKEND``, else ``"auto"``."""
    return _scoped_backend.get() or os.environ.get("DUOLLM_BACKEND", "auto")


def _check_name(name: str) -> None:
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"backend: unknown backend {name!r}; expected 'auto' or one of "
                         f"{sorted(_BACKENDS)}")


def resolve(op: str, device: torch.device, backend: Optional[str] = None) -> Callable:
    """The implementation of ``op`` that runs for tensors on ``device``."""
    name = backend or current_backend()
    _check_name(name)
    if name == "auto":
        order = _AUTO_ORDER_CUDA if device.type == "cuda" else ("torch",)
        for candidate in order:
            if _BACKENDS[candidate].check(device) is None:
                fn = getattr(_BACKENDS[candidate].load(), op, None)
                if fn is not None:
                    return fn
        raise BackendUnavailableError(f"no backend implements {op} on {device}")
    why = _BACKENDS[name].check(device)
    if why is not None:
        raise BackendUnavailableError(f"backend {name!r} is not available: {why}")
    fn = getattr(_BACKENDS[name].load(), op, None)
    if fn is None:
        raise BackendUnavailableError(f"backend {name!r} does not implement {op}; use "
                                      f"backend='auto' or 'torch' for it")
    return fn


# --------------------------------------------------------------------------- validation


def _check_tensor(name: str, t, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def _check_same(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str,
                dtype: bool = True) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: on {t.device}, but {ref_name} is on {ref.device}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name}: dtype {t.dtype} differs from {ref_name}'s {ref.dtype}")


def route_checks_enabled() -> bool:
    # Reading route values back needs a host sync; skip it where a sync is impossible
    # (graph capture, compilation). The kernels stay memory-safe on any value regardless.
    if torch.compiler.is_compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return os.environ.get("DUOLLM_CHECK_ROUTES", "1") != "0"


def check_routes(routes, num_paths: int, shape: Optional[torch.Size] = None,
                 device: Optional[torch.device] = None, name: str = "routes") -> None:
    """Validate a routes tensor: integer dtype, expected shape and device, values in range."""
    _check_tensor(name, routes, INT_DTYPES)
    if shape is not None and routes.shape != shape:
        raise ValueError(f"{name}: expected shape {tuple(shape)} (one route per token), "
                         f"got {tuple(routes.shape)}")
    if device is not None and routes.device != device:
        raise ValueError(f"{name}: on {routes.device}, but x is on {device}")
    if not isinstance(num_paths, int) or num_paths < 1:
        raise ValueError(f"num_paths: expected a positive int, got {num_paths!r}")
    if routes.numel() and routes.device.type != "meta" and route_checks_enabled():
        lo, hi = torch.stack(torch.aminmax(routes)).tolist()  # one host sync, not two
        if lo < 0 or hi >= num_paths:
            raise ValueError(f"{name}: values must lie in [0, {num_paths}), found "
                             f"{lo if lo < 0 else hi}")


def _check_groups(groups, n_tokens: Optional[int], device: torch.device) -> None:
    if not isinstance(groups, RouteGroups):
        raise TypeError(f"groups: expected RouteGroups from group_tokens, got "
                        f"{type(groups).__name__}")
    if n_tokens is not None and groups.perm.numel() != n_tokens:
        raise ValueError(f"groups: built for {groups.perm.numel()} tokens, the input has "
                         f"{n_tokens} rows")
    if groups.perm.device != device:
        raise ValueError(f"groups: on {groups.perm.device}, but the input is on {device}")


def _check_rows(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D (N, d) tensor, got shape {tuple(t.shape)}")


def _check_weights(name: str, weights, x: torch.Tensor) -> int:
    """Check a ``(w_gate, w_up, w_down)`` triple against ``x`` (N, d); return its width."""
    if not isinstance(weights, (tuple, list)) or len(weights) != 3:
        raise TypeError(f"{name}: expected (w_gate, w_up, w_down), got {type(weights).__name__}")
    w_gate, w_up, w_down = weights
    d = x.shape[-1]
    for wname, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        _check_tensor(f"{name}.{wname}", w)
        _check_same(f"{name}.{wname}", w, x, "x")
        if w.dim() != 2:
            raise ValueError(f"{name}.{wname}: expected 2-D, got shape {tuple(w.shape)}")
    width = w_gate.shape[0]
    if w_gate.shape != (width, d) or w_up.shape != (width, d):
        raise ValueError(f"{name}: w_gate and w_up must be (width, {d}), got "
                         f"{tuple(w_gate.shape)} and {tuple(w_up.shape)}")
    if w_down.shape != (d, width):
        raise ValueError(f"{name}.w_down: expected ({d}, {width}), got {tuple(w_down.shape)}")
    return width


def _check_like_rows(name: str, t, x: torch.Tensor, shape: Tuple[int, ...],
                     ref_name: str = "x", same_dtype: bool = False) -> None:
    if t is None:
        return
    _check_tensor(name, t)
    _check_same(name, t, x, ref_name, dtype=same_dtype)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")


# --------------------------------------------------------------------------- the ops


def group_tokens(routes: torch.Tensor, num_paths: int, *,
                 backend: Optional[str] = None) -> RouteGroups:
    """Group token ids by path (a stable counting sort); see ``reference.RouteGroups``.

    Args:
      routes: (...) integer path index per token, in ``[0, num_paths)``.
      num_paths: P.
    """
    check_routes(routes, num_paths)
    return resolve("group_tokens", routes.device, backend)(routes.reshape(-1), num_paths)


def gather(x: torch.Tensor, groups: RouteGroups, norm_weight: Optional[torch.Tensor] = None,
           eps: float = 1e-6, *, backend: Optional[str] = None) -> torch.Tensor:
    """``x[groups.perm]`` (N, d), optionally fused with RMSNorm (``norm_weight`` (d,))."""
    _check_tensor("x", x)
    _check_rows("x", x)
    _check_groups(groups, x.shape[0], x.device)
    _check_like_rows("norm_weight", norm_weight, x, (x.shape[1],))
    return resolve("gather", x.device, backend)(x, groups, norm_weight, eps)


def scatter_combine(y: torch.Tensor, groups: RouteGroups,
                    residual: Optional[torch.Tensor] = None,
                    gate: Optional[torch.Tensor] = None, skip_paths: Sequence[int] = (), *,
                    backend: Optional[str] = None) -> torch.Tensor:
    """``out[t] = residual[t] + gate[t] * y[inv[t]]``, skip-path tokens get ``residual[t]``.

    Args: y (N, d) in grouped order; residual (N, d) token order, y's dtype; gate (N,), any
    float dtype (cast to y's); skip_paths ints.
    """
    _check_tensor("y", y)
    _check_rows("y", y)
    _check_groups(groups, y.shape[0], y.device)
    # The output has y's dtype, so a residual of another dtype would be silently rounded.
    _check_like_rows("residual", residual, y, tuple(y.shape), "y", same_dtype=True)
    _check_like_rows("gate", gate, y, (y.shape[0],), "y")
    try:  # operator.index: an int (or integer 0-d tensor), never a truncated float
        skip_paths = tuple(operator.index(p) for p in skip_paths)
    except TypeError:
        raise TypeError(f"skip_paths: expected a sequence of ints, got {skip_paths!r}") from None
    for p in skip_paths:
        if not 0 <= p < groups.num_paths:
            raise ValueError(f"skip_paths: {p} is not a path index in [0, {groups.num_paths})")
    return resolve("scatter_combine", y.device, backend)(y, groups, residual, gate, skip_paths)


def swiglu_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
               w_down: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """SwiGLU FFN ``(silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T`` on x (N, d)."""
    _check_tensor("x", x)
    _check_rows("x", x)
    _check_weights("weights", (w_gate, w_up, w_down), x)
    return resolve("swiglu_ffn", x.device, backend)(x, w_gate, w_up, w_down)


def duo_ffn(x: torch.Tensor, routes: torch.Tensor, params: Sequence[Optional[FFNWeights]],
            residual: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None, *,
            backend: Optional[str] = None) -> torch.Tensor:
    """The routed layer: ``residual + gate * FFN_route(x)`` per token, zero FFN term on skip.

    Args:
      x: (..., d) FFN input.
      routes: x.shape[:-1], integer path per token in ``[0, len(params))``.
      params: one ``(w_gate, w_up, w_down)`` per path, or None for a skip path.
      residual: x.shape and x's dtype, or None.
      gate: x.shape[:-1], any float dtype (cast to x's), or None.
    Returns: x.shape, dtype of x.
    """
    _check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x: expected shape (..., d), got a scalar")
    if not isinstance(params, (tuple, list)):
        raise TypeError(f"params: expected a sequence of (w_gate, w_up, w_down) or None per "
                        f"path, got {type(params).__name__}")
    if not params:
        raise ValueError("params: expected at least one path, got an empty sequence")
    lead, d = x.shape[:-1], x.shape[-1]
    check_routes(routes, len(params), shape=lead, device=x.device)
    x_ND = x.reshape(-1, d)
    for p, weights in enumerate(params):
        if weights is not None:
            _check_weights(f"params[{p}]", weights, x_ND)
    # The output has x's dtype, so a residual of another dtype would be silently rounded.
    _check_like_rows("residual", residual, x, tuple(x.shape), same_dtype=True)
    _check_like_rows("gate", gate, x, tuple(lead))
    fn = resolve("duo_ffn", x.device, backend)
    out = fn(x_ND, routes.reshape(-1), tuple(params),
             None if residual is None else residual.reshape(-1, d),
             None if gate is None else gate.reshape(-1))
    return out.reshape(x.shape)
