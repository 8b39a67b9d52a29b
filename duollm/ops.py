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

from .checks import (  # noqa: F401  (re-exported: duollm.ops is the documented path)
    DEFAULT_ERRORS, FLOAT_DTYPES, HOST_VALUES_MAX, INT_DTYPES, ROUTE_ERROR, TOKEN_ERROR,
    RouteErrors, cannot_sync, check_errors, check_mode, check_routes, check_tensor,
    device_key, env, errors_of, flag_exists, host_range_check, host_reads, raise_range,
    route_checks_enabled, sanitize_values, triton_interpreting)
from .reference import FFNWeights, RouteGroups, gate_residual

OPS = ("group_tokens", "gather", "scatter_combine", "swiglu_ffn", "duo_ffn")
# os.environ's own storage (bytes to bytes on POSIX), read directly on the hot path (checks.env)
_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None


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
    # A function that imports ``module`` with an import statement: dynamo cannot trace
    # import_module (a graph break) but runs an import statement while it traces, so a
    # built-in backend first used inside torch.compile(fullgraph=True) still loads.
    loader: Optional[Callable[[], object]] = None

    def load(self):
        # sys.modules first: no import machinery on the hot path or in a trace.
        mod = sys.modules.get(self.module)
        if mod is not None:
            return mod
        return self.loader() if self.loader is not None else importlib.import_module(
            self.module)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# What is installed cannot change within a process; looking it up once here also keeps
# find_spec (which dynamo refuses to trace) out of torch.compile'd code.
_HAS_TRITON = _installed("triton")
_HAS_CUDA_EXT = _installed("duollm._C")


def _check_torch(device: Optional[torch.device]) -> Optional[str]:
    return None


def _check_triton(device: Optional[torch.device]) -> Optional[str]:
    if not _HAS_TRITON:
        return "the triton package is not installed (pip install triton)"
    if triton_interpreting():
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
# (op, backend name, device, TRITON_INTERPRET) -> implementation: what can run does not change
# within a process, and the checks (CUDA availability, imports) cost microseconds per call.
_resolved: Dict[tuple, Callable] = {}


def register_backend(name: str, module: str,
                     check: Callable[[Optional[torch.device]], Optional[str]],
                     loader: Optional[Callable[[], object]] = None) -> None:
    """Register (or replace) a backend implemented by the importable ``module``.

    ``loader``: optional, a function that imports ``module`` with an import statement and
    returns it, so that the backend can load inside ``torch.compile`` (``Backend.loader``)."""
    _BACKENDS[name] = Backend(name, module, check, loader)
    _resolved.clear()


def _load_triton():
    from . import kernels
    return kernels


def _load_cuda():
    from . import cuda_backend
    return cuda_backend


register_backend("torch", "duollm.torch_backend", _check_torch)  # imported up front, below
register_backend("triton", "duollm.kernels", _check_triton, _load_triton)
register_backend("cuda", "duollm.cuda_backend", _check_cuda, _load_cuda)

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
# The innermost scope's name as a plain global, for code being compiled (dynamo guards on it).
_scope_mirror: Optional[str] = None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the ``with`` block on backend ``name`` (unless a call says otherwise)."""
    global _scope_mirror
    _check_name(name)
    token = _scoped_backend.set(name)
    outer, _scope_mirror = _scope_mirror, name
    try:
        yield
    finally:
        _scoped_backend.reset(token)
        _scope_mirror = outer


def current_backend() -> str:
    """The backend name in force here: the scope's, else ``DUOLLM_BACKEND``, else ``"auto"``."""
    if torch.compiler.is_compiling():  # dynamo cannot trace ContextVar.get: read the mirror
        return _scope_mirror or env("DUOLLM_BACKEND", "auto")
    return _scoped_backend.get() or env("DUOLLM_BACKEND", "auto")


def _check_name(name: str) -> None:
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"backend: unknown backend {name!r}; expected 'auto' or one of "
                         f"{sorted(_BACKENDS)}")


def resolve(op: str, device: torch.device, backend: Optional[str] = None,
            optional: bool = False) -> Callable:
    """The implementation of ``op`` that runs for tensors on ``device``.

    ``optional=True``: a backend that runs here but lacks ``op`` gives ``None`` instead of an
    error (an unavailable backend still raises)."""
    if torch.compiler.is_compiling():  # traced once per graph; dynamo mis-guards the cache
        return _resolve(op, device, backend or current_backend(), optional)
    # current_backend() and env() inlined: this runs once per layer call at decode
    if _ENV_DATA is not None:
        name = backend or _scoped_backend.get()
        if not name:
            raw = _ENV_DATA.get(b"DUOLLM_BACKEND")
            name = "auto" if raw is None else raw.decode()
        key = (op, name, device, _ENV_DATA.get(b"TRITON_INTERPRET"))
    else:
        name = backend or current_backend()
        key = (op, name, device, os.environ.get("TRITON_INTERPRET"))
    fn = _resolved.get(key)
    if fn is None:
        fn = _resolved[key] = _resolve(op, device, name, True) or False
    if fn is False and not optional:
        _resolve(op, device, name)  # raises, saying what is missing
    return fn or None


def _resolve(op: str, device: torch.device, name: str, optional: bool = False):
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
    if fn is None and not optional:
        raise BackendUnavailableError(f"backend {name!r} does not implement {op}; use "
                                      f"backend='auto' or 'torch' for it")
    return fn


# --------------------------------------------------------------------------- validation


def _check_same(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str,
                dtype: bool = True) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: on {t.device}, but {ref_name} is on {ref.device}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name}: dtype {t.dtype} differs from {ref_name}'s {ref.dtype}")


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
        check_tensor(f"{name}.{wname}", w)
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
    check_tensor(name, t)
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

    Route values are checked as ``check_mode`` says. Where they are not read (the "device"
    mode, ``DUOLLM_CHECK_ROUTES=0``, a trace or capture) an out-of-range route is grouped
    after every path (it counts in no path: ``perm[offsets[P]:]``), its ``groups.routes``
    entry is ``P``, and ``scatter_combine`` gives it the residual; the device's error flag
    records it (not in mode 0), for ``check_errors``.
    """
    check_routes(routes, num_paths)
    fn = resolve("group_tokens", routes.device, backend)
    r_N = routes.reshape(-1)
    if not r_N.numel() or routes.device.type == "meta" or host_reads(routes.device):
        return fn(r_N, num_paths)
    bad = (r_N < 0) | (r_N >= num_paths)
    if route_checks_enabled():
        errors_of(None).record(bad, ROUTE_ERROR)
    # one more bucket, P, after all paths: every backend sorts it last, memory-safe
    g = fn(torch.where(bad, torch.full((), num_paths, dtype=r_N.dtype, device=r_N.device),
                       r_N), num_paths + 1)
    return RouteGroups(g.perm, g.inv, g.counts[:num_paths], g.offsets[:num_paths + 1],
                       g.routes)


def gather(x: torch.Tensor, groups: RouteGroups, norm_weight: Optional[torch.Tensor] = None,
           eps: float = 1e-6, *, backend: Optional[str] = None) -> torch.Tensor:
    """``x[groups.perm]`` (N, d), optionally fused with RMSNorm (``norm_weight`` (d,))."""
    check_tensor("x", x)
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
    check_tensor("y", y)
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
    # A token group_tokens could not check (its route became P) skips too: the residual.
    # (Path indices are bits of an int64 mask in the triton backend: at most 62 paths here.)
    if groups.num_paths < 63:
        skip_paths = skip_paths + (groups.num_paths,)
    return resolve("scatter_combine", y.device, backend)(y, groups, residual, gate, skip_paths)


def swiglu_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
               w_down: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """SwiGLU FFN ``(silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T`` on x (N, d)."""
    check_tensor("x", x)
    _check_rows("x", x)
    _check_weights("weights", (w_gate, w_up, w_down), x)
    return resolve("swiglu_ffn", x.device, backend)(x, w_gate, w_up, w_down)


def duo_ffn(x: torch.Tensor, routes, params: Sequence[Optional[FFNWeights]],
            residual: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None, *,
            backend: Optional[str] = None) -> torch.Tensor:
    """The routed layer: ``residual + gate * FFN_route(x)`` per token, zero FFN term on skip.

    Args:
      x: (..., d) FFN input.
      routes: x.shape[:-1], integer path per token in ``[0, len(params))``; or a Python int:
        every token takes that path.
      params: one ``(w_gate, w_up, w_down)`` per path, or None for a skip path.
      residual: x.shape and x's dtype, or None.
      gate: x.shape[:-1], any float dtype (cast to x's), or None.
    Returns: x.shape, dtype of x. Route values are checked as ``check_mode`` says: at once on
    the CPU, on the device (out-of-range tokens skip, ``check_errors`` raises) elsewhere.
    """
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x: expected shape (..., d), got a scalar")
    if not isinstance(params, (tuple, list)):
        raise TypeError(f"params: expected a sequence of (w_gate, w_up, w_down) or None per "
                        f"path, got {type(params).__name__}")
    if not params:
        raise ValueError("params: expected at least one path, got an empty sequence")
    lead, d = x.shape[:-1], x.shape[-1]
    if not _is_int_route(routes):
        check_tensor("routes", routes, INT_DTYPES)
        if routes.shape != lead:
            raise ValueError(f"routes: expected shape {tuple(lead)} (one route per token), "
                             f"got {tuple(routes.shape)}")
        if routes.device != x.device:
            raise ValueError(f"routes: on {routes.device}, but x is on {x.device}")
    x_ND = x.reshape(-1, d)
    for p, weights in enumerate(params):
        if weights is not None:
            _check_weights(f"params[{p}]", weights, x_ND)
    # The output has x's dtype, so a residual of another dtype would be silently rounded.
    _check_like_rows("residual", residual, x, tuple(x.shape), same_dtype=True)
    _check_like_rows("gate", gate, x, tuple(lead))
    return run_duo_ffn(x, routes, tuple(params), residual, gate, backend)


def _is_int_route(routes) -> bool:
    return isinstance(routes, int) and not isinstance(routes, bool)


def run_duo_ffn(x: torch.Tensor, routes, params: Tuple[Optional[FFNWeights], ...],
                residual: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
                backend: Optional[str] = None, min_route: int = 0,
                errors: Optional[RouteErrors] = None) -> torch.Tensor:
    """``duo_ffn`` after validation: the lean hot path that modules call once they have
    checked shapes, dtypes and devices (``DuoFFN`` does, naming its caller's arguments).

    Route values are checked here (see ``check_mode``); routes below ``min_route`` count as
    out of range too (``DuoFFN(skip=False)`` passes 1). Nothing here reads a value back to
    the host except on the CPU in the default mode, where that is free. An int ``routes``
    sends every token down that path without any routes tensor (policies, patterns).
    ``errors``: whose flags record out-of-range routes (a model's ``RouteErrors``; None: the
    shared ones). A backend whose kernels set the flag themselves (``FLAGS_ROUTES``: the
    triton backend, one masked atomic store) gets the flag and the raw routes; the others
    get the routes sanitised here (bad ones sent to a skip path, the flag set by torch ops).
    """
    P = len(params)
    d = x.shape[-1]
    if _is_int_route(routes):
        if not min_route <= routes < P:
            raise ValueError(f"routes: route {routes} is not a path of this layer; expected "
                             f"an int in [{min_route}, {P})")
        out = _one_path(x, params[routes], residual, gate, backend)
        if out is not None:
            return out
        # a backend with only the routed layer (e.g. a bench stand-in) gets a routes tensor
        routes = torch.full(x.shape[:-1], routes, dtype=torch.int64, device=x.device)
    flat = x.dim() == 2  # (N, d) already: no reshapes (each costs a microsecond at decode)
    r_N = routes if flat else routes.reshape(-1)  # (N,)
    device = x.device
    n = r_N.numel()
    mode = check_mode()
    if device.type == "cpu" and 0 < n <= HOST_VALUES_MAX and mode != "device" and \
            not cannot_sync():
        # Decode on the CPU: read the few route values (free here), check them (even with
        # checks off: on a list it costs nothing) and hand them to a backend that can use
        # them (the torch backend's ``duo_ffn_host``), so nothing reads them twice.
        vals = r_N.tolist()
        lo, hi = min(vals), max(vals)
        if lo < min_route or hi >= P:
            raise_range("routes", min_route, P, lo, hi, "values")
        fn = resolve("duo_ffn", device, backend)
        host = _host_impl.get(fn)
        if host is None:
            host = _host_impl[fn] = getattr(sys.modules.get(fn.__module__), "duo_ffn_host",
                                            False)
        if host:
            if flat:
                return host(x, vals, params, residual, gate)
            return host(x.reshape(-1, d), vals, params,
                        None if residual is None else residual.reshape(-1, d),
                        None if gate is None else gate.reshape(-1)).view(x.shape)
    elif n and mode != "off" and device.type != "meta":
        if (mode == "sync" or (mode == "eager" and device.type == "cpu")) and \
                not cannot_sync():
            host_range_check(r_N, min_route, P, "routes")
        else:
            fn = resolve("duo_ffn", device, backend)
            if torch.compiler.is_compiling():
                kflag = getattr(sys.modules.get(fn.__module__), "FLAGS_ROUTES", False)
            else:
                kflag = _kernel_flags.get(fn)
            if kflag is None:
                kflag = _kernel_flags[fn] = bool(getattr(sys.modules.get(fn.__module__),
                                                         "FLAGS_ROUTES", False))
            # routes below min_route must still land on a skip path in the kernels
            f = (errors_of(errors).flag(device) if kflag and
                 all(params[p] is None for p in range(min_route)) else None)
            if f is not None:
                if flat:
                    return fn(x, r_N, params, residual, gate, flag=f, min_route=min_route)
                return fn(x.reshape(-1, d), r_N, params,
                          None if residual is None else residual.reshape(-1, d),
                          None if gate is None else gate.reshape(-1), flag=f,
                          min_route=min_route).reshape(x.shape)
            skip = next((p for p, w in enumerate(params) if w is None), None)
            if skip is None:  # no skip path: bad tokens go to an extra one
                params, skip = params + (None,), P
            r_N = sanitize_values(r_N, min_route, P, skip, ROUTE_ERROR, errors)
    fn = resolve("duo_ffn", device, backend)
    if flat:
        return fn(x, r_N, params, residual, gate)
    out = fn(x.reshape(-1, d), r_N, params,
             None if residual is None else residual.reshape(-1, d),
             None if gate is None else gate.reshape(-1))
    return out.reshape(x.shape)


_one_path_impl: Dict[Callable, Callable] = {}
_host_impl: Dict[Callable, Callable] = {}
_kernel_flags: Dict[Callable, bool] = {}  # duo_ffn implementation -> sets the flag itself


def _one_path(x: torch.Tensor, weights: Optional[FFNWeights], residual, gate,
              backend: Optional[str]) -> Optional[torch.Tensor]:
    """Every token on one path: the path's SwiGLU (or nothing for a skip path), gate and
    residual applied; no routes tensor, no grouping. None if the backend has no SwiGLU."""
    if weights is None:
        return torch.zeros_like(x) if residual is None else residual.to(x.dtype, copy=True)
    d = x.shape[-1]
    swiglu = resolve("swiglu_ffn", x.device, backend, optional=True)
    if swiglu is None:
        return None
    # A backend may fuse the residual and gate into its GEMMs: its ``one_path``.
    if torch.compiler.is_compiling():
        fused = getattr(sys.modules.get(swiglu.__module__), "one_path", False)
    else:
        fused = _one_path_impl.get(swiglu)
        if fused is None:
            fused = _one_path_impl[swiglu] = getattr(sys.modules.get(swiglu.__module__),
                                                     "one_path", False)
    if fused:
        if x.dim() == 2:
            return fused(x, weights, residual, gate)
        out = fused(x.reshape(-1, d), weights,
                    None if residual is None else residual.reshape(-1, d),
                    None if gate is None else gate.reshape(-1))
        return out.view(x.shape)
    y = swiglu(x.reshape(-1, d), *weights)  # (N, d)
    y = y.to(x.dtype).view(x.shape)
    return gate_residual(y, residual, gate)


# The CPU's backend is loaded up front: code compiled by torch.compile cannot import a module
# (dynamo refuses import_module), and every process that uses duollm.ops can use this one.
from . import torch_backend as _torch_backend  # noqa: E402,F401
