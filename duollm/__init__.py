"""duollm: fast kernels and a research framework for adaptive computation in FFN layers.

Every FFN layer holds a big and a small SwiGLU FFN; per token and layer a route picks
``BIG``, ``SMALL`` or ``SKIP`` (after Duo-LLM, Alizadeh-Vahid et al., 2024).

The core (ops, modules, model, routes constants) is imported here; the public submodules
(``duollm.oracle``, ``duollm.routers``, ``duollm.hf``, ...) are imported on first attribute
access, so ``import duollm; duollm.oracle.search(...)`` works while a bare ``import duollm``
stays light: it never imports ``transformers`` (``duollm.hf`` needs it) or matplotlib.
"""
import importlib

from . import ops
from .config import DuoConfig
from .model import DuoLLM, KVCache
from .modules import DuoFFN, RMSNorm, SwiGLU
from .reference import BIG, SKIP, SMALL, RouteGroups

__version__ = "0.1.0"

# Public submodules loaded on first access (see docs/architecture.md, "Optional pieces").
_LAZY_SUBMODULES = ("bench", "checkpoint", "cli", "config", "data", "difficulty",
                    "distributed", "hf", "model", "modules", "oracle", "reference", "routers",
                    "stack", "study", "train", "usage")

__all__ = ["ops", "DuoConfig", "DuoLLM", "KVCache", "DuoFFN", "RMSNorm", "SwiGLU",
           "RouteGroups", "SKIP", "SMALL", "BIG", "__version__", *_LAZY_SUBMODULES]


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        # import_module binds the submodule as an attribute of this package, so this hook
        # runs once per name; an ImportError inside it (e.g. duollm.hf without transformers)
        # propagates with its own message.
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
