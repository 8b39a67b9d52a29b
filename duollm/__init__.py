"""duollm: fast kernels and a research framework for adaptive computation in FFN layers.

Every FFN layer holds a big and a small SwiGLU FFN; per token and layer a route picks
``BIG``, ``SMALL`` or ``SKIP`` (after Duo-LLM, Alizadeh-Vahid et al., 2024).
"""
from . import ops
from .config import DuoConfig
from .model import DuoLLM, KVCache
from .modules import DuoFFN, RMSNorm, SwiGLU
from .reference import BIG, SKIP, SMALL, RouteGroups

__version__ = "0.1.0"

__all__ = ["ops", "DuoConfig", "DuoLLM", "KVCache", "DuoFFN", "RMSNorm", "SwiGLU",
           "RouteGroups", "SKIP", "SMALL", "BIG", "__version__"]
