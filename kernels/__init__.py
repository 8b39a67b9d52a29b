"""The Triton backend of ``duollm.ops`` (installed as ``duollm.kernels``).

One file per op (docs/kernels.md). Each public function here has the signature of the matching
function in ``duollm.reference`` (inputs already validated by ``duollm.ops``).

Imported under any other name, this folder stands aside (see ``_hand_over`` below).
"""
if __name__ == "duollm.kernels":
    from .grouping import group_tokens
    from .permute import gather, scatter_combine
    from .swiglu import swiglu_ffn
    from .duo_ffn import duo_ffn

    __all__ = ["group_tokens", "gather", "scatter_combine", "swiglu_ffn", "duo_ffn"]
else:
    # Imported as a top-level ``kernels``: the checkout root is on sys.path (``python -m ...``
    # or a script run from the checkout, ``PYTHONPATH=<checkout>``) and shadows any installed
    # distribution of that name, such as Hugging Face's ``kernels``, which transformers imports.
    # Hand the name to that distribution: find its spec on sys.path without this checkout,
    # execute it and leave it in sys.modules, which is what the ``import`` statement returns.
    # With no such distribution this module defines nothing (no ``__version__``), so probes
    # for an optional ``kernels`` package find none, and no kernel is compiled twice.
    def _hand_over() -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        here = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = [p for p in sys.path
                if isinstance(p, str) and os.path.realpath(p or os.getcwd()) != here]
        spec = importlib.machinery.PathFinder.find_spec(__name__, path)
        if spec is None or spec.origin is None or spec.loader is None or \
                os.path.realpath(spec.origin) == os.path.realpath(__file__):
            return
        module = importlib.util.module_from_spec(spec)
        sys.modules[__name__] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[__name__]  # the import fails with the distribution's own error
            raise

    _hand_over()
    del _hand_over
