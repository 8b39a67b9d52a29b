"""The Triton backend of ``duollm.ops`` (installed as ``duollm.kernels``).

One file per op (docs/kernels.md). Each public function here has the signature of the matching
function in ``duollm.reference`` (inputs already validated by ``duollm.ops``).
"""
from .grouping import group_tokens
from .permute import gather, scatter_combine
from .swiglu import swiglu_ffn
from .duo_ffn import duo_ffn

__all__ = ["group_tokens", "gather", "scatter_combine", "swiglu_ffn", "duo_ffn"]
