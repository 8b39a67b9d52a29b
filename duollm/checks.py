"""Route and token value checks, below ``duollm.ops`` and its backends (both import it).

How values are checked is set by ``DUOLLM_CHECK_ROUTES`` (docs/ops.md, docs/speed.md). The
names here are re-exported by ``duollm.ops`` (``duollm.ops.check_errors`` and friends), the
documented import path.
"""
from __future__ import annotations

import os
import threading
import weakref
from typing import Dict, List, Optional, Tuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def check_tensor(name: str, t, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


# --------------------------------------------------------------------------- route values
#
# How route (and token) values are checked, by ``DUOLLM_CHECK_ROUTES`` (docs/speed.md):
#
# * ``"1"`` (default): on the CPU the values are read and a bad one raises at once (reading a
#   CPU tensor is not a synchronisation). On any other device nothing is read back: a token
#   whose route is out of range skips the layer (its output row is the residual, never left
#   unwritten) and a flag on the device records it; ``check_errors()`` raises from the flag
#   (``DuoLLM.generate`` calls it once, after its last step).
# * ``"device"``: the GPU behaviour everywhere, the CPU included (what tests use to run the
#   GPU's code path here).
# * ``"sync"``: debug mode: read the values back and raise at once on every device (one host
#   synchronisation per call).
# * ``"0"``: no check and no flag; the kernels stay memory-safe but rows of out-of-range
#   tokens are unspecified.

_MODES = {"1": "eager", "": "eager", "device": "device", "sync": "sync", "0": "off"}
_mode_cache = ("1", "eager")
ROUTE_ERROR, TOKEN_ERROR = 1, 2  # bits of the device-side error flag


def env(name: str, default: str) -> str:
    """``os.environ.get(name, default)`` at the cost of one dict lookup: the hot path reads a
    few settings per call, and ``os.environ.get`` (encode, look up, decode) costs about a
    microsecond each, a tenth of a decode step's whole budget on a small model."""
    if _ENV_DATA is None or torch.compiler.is_compiling():
        return os.environ.get(name, default)
    raw = _ENV_DATA.get(_ENV_KEYS.get(name) or _ENV_KEYS.setdefault(name, name.encode()))
    return default if raw is None else raw.decode()


# os.environ's own storage (bytes to bytes on POSIX; os.environ writes through to it)
_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
_ENV_KEYS: Dict[str, bytes] = {}


def check_mode() -> str:
    """``"eager"``, ``"device"``, ``"sync"`` or ``"off"``, from ``DUOLLM_CHECK_ROUTES``."""
    global _mode_cache
    raw = env("DUOLLM_CHECK_ROUTES", "1")
    if raw != _mode_cache[0]:
        if raw not in _MODES:
            raise ValueError(f"DUOLLM_CHECK_ROUTES: expected one of {sorted(_MODES)}, "
                             f"got {raw!r}")
        _mode_cache = (raw, _MODES[raw])
    return _mode_cache[1]


def cannot_sync() -> bool:
    # Graph capture and compilation cannot read values back: the device path runs instead.
    if torch.compiler.is_compiling():
        return True
    # is_initialized is cheap, is_available is not; no capture can run before CUDA starts.
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def route_checks_enabled() -> bool:
    """Whether route/token values are checked at all (``DUOLLM_CHECK_ROUTES`` is not 0)."""
    return check_mode() != "off"


def host_reads(device: torch.device) -> bool:
    """Whether values on ``device`` are read back and checked at once (eagerly) here."""
    mode = check_mode()
    if mode == "off" or mode == "device" or device.type == "meta" or cannot_sync():
        return False
    return mode == "sync" or device.type == "cpu"


def device_key(device) -> torch.device:
    """``device`` (a ``torch.device``, a string such as ``"cpu:0"``, or a CUDA index) as the
    key its error flag is stored under: the device tensors report (``cpu`` has no index; a
    CUDA device without one is the current device)."""
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, (str, int)) and not isinstance(device, bool):
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"device: {device!r} is not a device ({e})") from None
    else:
        raise TypeError(f"device: expected a torch.device, a string or an int, got "
                        f"{type(device).__name__}")
    if dev.type == "cpu":
        return torch.device("cpu")  # CPU tensors report "cpu"; "cpu:0" is the same device
    if dev.type == "cuda" and dev.index is None:  # tensors carry an index
        return torch.device("cuda", torch.cuda.current_device())
    return dev


_LOCK = threading.Lock()  # creation of flags, and CPU read-modify-writes of them
_OWNERS: "weakref.WeakSet[RouteErrors]" = weakref.WeakSet()


class RouteErrors:
    """The device-side error flags of one owner: an int32 0-d tensor per device whose bits
    (``ROUTE_ERROR``, ``TOKEN_ERROR``) record out-of-range routes and token ids seen there
    without a host synchronisation (the "device" check mode, docs/ops.md).

    Each ``DuoLLM`` and each converted Hugging Face model owns one (``model.route_errors``),
    shared by its layers, so one model's bad input never makes another model's ``generate``
    raise; ``duollm.ops`` calls outside a model (and a standalone ``DuoFFN``) share
    ``DEFAULT_ERRORS``. ``source`` names the owner in the error message.

    A flag is an ordinary tensor even when first made under ``torch.inference_mode`` (a later
    check or backward outside it can update it); creation is locked, so two threads racing
    on a fresh flag share one; CPU updates are locked too. On a GPU the Triton kernels set their
    bit with an atomic OR; the torch ops that set it elsewhere (a read-modify-write) are ordered
    only within one stream, so two streams updating one model's flag at the same moment may
    lose a bit: run one model's calls on one stream, or check after each stream. Pickling or
    deep-copying an owner (a model saved whole, ``copy.deepcopy``) gives a fresh, clear one.
    """

    def __init__(self, source: str):
        if not isinstance(source, str):
            raise TypeError(f"source: expected a str, got {type(source).__name__}")
        self.source = source
        self.flags: Dict[torch.device, torch.Tensor] = {}
        _OWNERS.add(self)

    def __repr__(self) -> str:
        return f"RouteErrors({self.source!r})"

    def __getstate__(self):
        return {"source": self.source}

    def __setstate__(self, state):
        self.__init__(state["source"])

    def flag(self, device: torch.device) -> Optional[torch.Tensor]:
        """The flag of ``device`` (a tensor's ``.device``), created on first use; None inside
        a CUDA-graph capture that finds none (nothing is allocated into a graph)."""
        f = self.flags.get(device)
        if f is not None:
            return f
        if torch.compiler.is_compiling():  # dynamo traces the creation and the dict store
            f = self.flags[device] = torch.zeros((), dtype=torch.int32, device=device)
            return f
        if cannot_sync():  # a capture: no allocation into the graph's pool
            return None
        with _LOCK:
            f = self.flags.get(device)
            if f is None:
                # never an inference tensor: a check or a forward outside inference_mode
                # later updates it in place
                with torch.inference_mode(False), torch.no_grad():
                    f = torch.zeros((), dtype=torch.int32, device=device)
                self.flags[device] = f
        return f

    def record(self, bad: torch.Tensor, bit: int) -> None:
        """OR ``bit`` into the flag of ``bad``'s device where any element of the bool tensor
        ``bad`` is set; no host synchronisation."""
        f = self.flag(bad.device)
        if f is None:
            return
        hit = bad.any().to(torch.int32) * bit
        if f.device.type == "cpu" and not torch.compiler.is_compiling():
            with _LOCK:  # a CPU read-modify-write: two threads must not interleave
                f.bitwise_or_(hit)
        else:
            f.bitwise_or_(hit)

    def check(self, device=None) -> None:
        """Raise ``ValueError`` if this owner's flag of ``device`` (default: every device)
        is set, and clear it; reads one int per flag (a host synchronisation)."""
        problems = self._collect(None if device is None else device_key(device))
        if problems:
            raise ValueError(_message(problems))

    def _collect(self, device: Optional[torch.device]) -> List[Tuple[str, torch.device, int]]:
        devices = [device] if device is not None else list(self.flags)
        found = []
        for dev in devices:
            f = self.flags.get(dev)
            if f is None:
                continue
            with _LOCK:
                bits = int(f.item())
                if bits:
                    with torch.inference_mode(False), torch.no_grad():
                        f.zero_()
            if bits:
                found.append((self.source, dev, bits))
        return found


def _message(problems: List[Tuple[str, torch.device, int]]) -> str:
    parts = []
    for source, dev, bits in problems:
        what = []
        if bits & ROUTE_ERROR:
            what.append("routes: a route outside the layer's paths (those tokens skipped "
                        "the layer: their output is the residual)")
        if bits & TOKEN_ERROR:
            what.append("tokens: an id outside [0, vocab_size) (read as id 0)")
        parts.append(f"found on {dev} in {source} since the last check: " + "; ".join(what))
    return ("; and ".join(parts) + ". Set DUOLLM_CHECK_ROUTES=sync to raise at the call that "
            "passed it.")


DEFAULT_ERRORS = RouteErrors("duollm.ops calls outside a model")
_flags = DEFAULT_ERRORS.flags  # the shared per-device flags (tests clear them)


def errors_of(errors: Optional[RouteErrors]) -> RouteErrors:
    """``errors``, or the shared ``DEFAULT_ERRORS`` for None."""
    return DEFAULT_ERRORS if errors is None else errors


def _flag(device: torch.device) -> Optional[torch.Tensor]:
    """The shared (``DEFAULT_ERRORS``) flag of ``device``."""
    return DEFAULT_ERRORS.flag(device)


def _record(bad: torch.Tensor, bit: int, errors: Optional[RouteErrors] = None) -> None:
    """OR ``bit`` into the flag of ``errors`` (default: the shared one) where ``bad`` has a
    set element; no host synchronisation (the flag stays on the device)."""
    errors_of(errors).record(bad, bit)


def check_errors(device=None) -> None:
    """Raise ``ValueError`` if a route or token out of range was seen on the device since the
    last check (the flag of the "device" check mode), and clear the flag.

    Checks every owner's flags (each model's and the shared one of calls outside a model) and
    names where each error came from. Reads one int per flag: a host synchronisation, so call
    it at a point where the stream may wait (after a generation, a training step's
    ``loss.item()``...). ``device``: only that device's flags (default: every device's);
    ``"cpu:0"`` and ``torch.device("cpu", 0)`` mean the CPU. ``model.route_errors.check()``
    checks one model's flags only.
    """
    dev = None if device is None else device_key(device)
    owners = [DEFAULT_ERRORS] + [o for o in list(_OWNERS) if o is not DEFAULT_ERRORS]
    problems = []
    for owner in owners:
        problems += owner._collect(dev)
    if problems:
        raise ValueError(_message(problems))


def raise_range(name: str, lo_ok: int, hi_ok: int, lo: int, hi: int, what: str) -> None:
    if lo < lo_ok or hi >= hi_ok:
        bad = lo if lo < lo_ok else hi
        raise ValueError(f"{name}: {what} must lie in [{lo_ok}, {hi_ok}), found {bad}")


def host_range_check(t: torch.Tensor, lo_ok: int, hi_ok: int, name: str,
                     what: str = "values") -> Optional[list]:
    """Read ``t``'s min and max back (one read; free on the CPU) and raise ``ValueError``
    naming ``name`` if a value lies outside ``[lo_ok, hi_ok)``. Returns the values as a
    list when ``t`` is tiny (at most ``HOST_VALUES_MAX`` elements, read whole), else None."""
    if t.numel() <= HOST_VALUES_MAX:  # decode: one small list beats aminmax's reductions
        vals = (t if t.dim() == 1 else t.reshape(-1)).tolist()
        lo, hi = min(vals), max(vals)
        if lo < lo_ok or hi >= hi_ok:
            raise_range(name, lo_ok, hi_ok, lo, hi, what)
        return vals
    lo, hi = torch.stack(torch.aminmax(t)).tolist()
    raise_range(name, lo_ok, hi_ok, lo, hi, what)
    return None


HOST_VALUES_MAX = 16


def sanitize_values(t: torch.Tensor, lo_ok: int, hi_ok: int, fill: int, bit: int,
                    errors: Optional[RouteErrors] = None) -> torch.Tensor:
    """``t`` with values outside ``[lo_ok, hi_ok)`` replaced by ``fill``, the error flag of
    ``errors`` (default: the shared one) set if any was; no host synchronisation."""
    if lo_ok == 0:
        bad = (t < 0) | (t >= hi_ok)
    else:
        bad = (t < lo_ok) | (t >= hi_ok)
    errors_of(errors).record(bad, bit)
    return torch.where(bad, torch.full((), fill, dtype=t.dtype, device=t.device), t)


def check_routes(routes, num_paths: int, shape: Optional[torch.Size] = None,
                 device: Optional[torch.device] = None, name: str = "routes") -> None:
    """Validate a routes tensor: integer dtype, expected shape and device; values in range
    where they can be read without a host synchronisation (see ``check_mode``)."""
    check_tensor(name, routes, INT_DTYPES)
    if shape is not None and routes.shape != shape:
        raise ValueError(f"{name}: expected shape {tuple(shape)} (one route per token), "
                         f"got {tuple(routes.shape)}")
    if device is not None and routes.device != device:
        raise ValueError(f"{name}: on {routes.device}, but x is on {device}")
    if not isinstance(num_paths, int) or num_paths < 1:
        raise ValueError(f"num_paths: expected a positive int, got {num_paths!r}")
    if routes.numel() and host_reads(routes.device):
        host_range_check(routes, 0, num_paths, name)


def triton_interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def flag_exists(device, errors: Optional[RouteErrors] = None) -> bool:
    """Whether ``device`` has an error flag of ``errors`` (default: the shared one) yet."""
    return device_key(device) in errors_of(errors).flags
