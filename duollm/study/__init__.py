"""The Duo-LLM study as a pipeline (``duollm study``): one function per stage
(``stages``), typed results (``results``), the report (``report``), statistics (``stats``),
the prose and code holdouts (``holdouts``) and the synthetic corpus (``synthetic``).

The oracle, routers and difficulty stay library tools (``duollm.oracle``, ``duollm.routers``,
``duollm.difficulty``); this package runs them in the paper's experiments. Attributes are
imported lazily so that ``duollm.data`` can use ``duollm.study.synthetic`` without loading the
pipeline.
"""
from __future__ import annotations

import importlib

# public name -> submodule that defines it
_EXPORTS = {"run_study": "pipeline", "add_cli": "cli", "run_cli": "cli"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
