"""The Triton backend of ``duollm.ops`` (installed as ``duollm.kernels``).

One file per op (docs/kernels.md). Each public function here has the signature of the matching
function in ``duollm.reference`` (inputs already validated by ``duollm.ops``).
"""
if __name__ == "duollm.kernels":
    from .grouping import group_tokens
    from .permute import gather, scatter_combine
    from .swiglu import swiglu_ffn
    from .duo_ffn import duo_ffn
# Else this folder was imported as a top-level ``kernels``: the repository root is on sys.path
# (``python -m ...`` in a checkout) and transformers probes for Hugging Face's own ``kernels``
# package by importing that name. Defining nothing here (no ``__version__``) makes the probe
# find no usable package, instead of compiling and registering every kernel a second time.

__all__ = ["group_tokens", "gather", "scatter_combine", "swiglu_ffn", "duo_ffn"]
