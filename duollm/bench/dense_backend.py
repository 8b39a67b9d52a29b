"""A bench-only op backend whose routed layer is the dense big FFN on every token.

Registered as ``"bench-dense"`` by the decode and model benchmarks (never by the package) so
that a ``DuoLLM`` run with it *is* the dense model (no grouping, no gather, no scatter): the
baseline routed models are compared against. Only meaningful with all-big routes.
"""
from .baselines import dense_ffn as duo_ffn  # noqa: F401

NAME = "bench-dense"


def register() -> str:
    """Register the backend with ``duollm.ops`` (idempotent); returns its name."""
    from .. import ops

    ops.register_backend(NAME, __name__, lambda device: None)
    return NAME
