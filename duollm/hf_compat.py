"""What differs between the transformers releases ``duollm`` supports, resolved in one place.

Imports nothing from transformers itself, so ``duollm.bench`` can use it before deciding
whether transformers is needed.
"""
from __future__ import annotations

import inspect
from typing import Callable


def cache_keyword(forward: Callable) -> str:
    """The keyword under which ``forward`` (an HF model's or attention module's ``forward``)
    takes its KV cache: ``"cache"`` (transformers 5.25 renamed it) or ``"past_key_values"``
    (earlier 5.x releases).

    Resolved from the signature, never guessed: passing the wrong name is not an error in
    transformers (``**kwargs`` swallows it) but silently runs without the cache. A forward that
    takes neither raises ``TypeError``.
    """
    params = inspect.signature(forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TypeError(f"{getattr(forward, '__qualname__', forward)!r} takes neither cache= nor "
                    f"past_key_values=; this transformers release is not supported")
