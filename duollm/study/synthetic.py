"""A byte corpus whose per-token difficulty is known, to check difficulty measures against.

The stream is a sequence of short segments, each a line ending in ``\\n``:

* **noise** — ``~`` then uniformly random letters: unpredictable, whatever the compute.
  Labelled ``NOISE``.
* **copy** — ``@`` then a random letter span, ``|``, and the same span again. The first span
  is noise; the repeat is copyable from the context. Labelled ``COPY``.
* **compute** — ``#`` then random digits, ``=``, and their running sums mod 10, one per
  digit: each answer needs arithmetic over earlier tokens. Labelled ``COMPUTE``.

Delimiters and line ends are ``STRUCTURE``. A token's label says how its *own* value can be
predicted; the loss at position t predicts token t+1, so position t's label is
``kinds[t + 1]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tokendata import TokenData

STRUCTURE, COPY, COMPUTE, NOISE = 0, 1, 2, 3
KIND_NAMES = {STRUCTURE: "structure", COPY: "copy", COMPUTE: "compute", NOISE: "noise"}

_LETTERS = [ord(c) for c in "abcdefghijklmnopqrstuvwxyz"]
_DIGITS = [ord(c) for c in "0123456789"]


@dataclass
class SyntheticLabels:
    """Per-token ground truth aligned with ``TokenData.train`` / ``.val``: (N,) int64 kinds."""

    train_kind: torch.Tensor
    val_kind: torch.Tensor


def _segments(n_tokens: int, gen: torch.Generator):
    """Yield (token ids, kinds) lists until at least ``n_tokens`` tokens are produced."""
    toks, kinds = [], []

    def rand(n, hi):
        return torch.randint(0, hi, (n,), generator=gen).tolist()

    def emit(ids, kind):
        toks.extend(ids)
        kinds.extend([kind] * len(ids) if isinstance(kind, int) else kind)

    while len(toks) < n_tokens:
        kind = rand(1, 3)[0]
        n = 3 + rand(1, 6)[0]  # span length 3..8
        if kind == 0:
            emit([ord("~")], STRUCTURE)
            emit([_LETTERS[i] for i in rand(n, 26)], NOISE)
        elif kind == 1:
            span = [_LETTERS[i] for i in rand(n, 26)]
            emit([ord("@")], STRUCTURE)
            emit(span, NOISE)
            emit([ord("|")], STRUCTURE)
            emit(span, COPY)
        else:
            digits = rand(n, 10)
            sums = torch.tensor(digits).cumsum(0).remainder(10).tolist()
            emit([ord("#")], STRUCTURE)
            emit([_DIGITS[d] for d in digits], NOISE)
            emit([ord("=")], STRUCTURE)
            emit([_DIGITS[s] for s in sums], COMPUTE)
        emit([ord("\n")], STRUCTURE)
    return toks[:n_tokens], kinds[:n_tokens]


def make_synthetic_data(n_tokens: int = 300_000, seed: int = 0, val_fraction: float = 0.1,
                        return_labels: bool = False):
    """The synthetic corpus as a ``duollm.data.TokenData`` (byte vocabulary, 256).

    Args:
      n_tokens: total length of the stream (train + val).
      seed: the generator seed (the corpus is a pure function of it).
      val_fraction: the last fraction of the stream is the validation split.
      return_labels: also return a ``SyntheticLabels`` with each token's kind.
    Returns: ``TokenData`` or ``(TokenData, SyntheticLabels)``.
    """

    if not isinstance(n_tokens, int) or n_tokens < 4:
        raise ValueError(f"n_tokens: expected an int >= 4, got {n_tokens!r}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction: expected a float in (0, 1), got {val_fraction!r}")
    gen = torch.Generator().manual_seed(seed)
    toks, kinds = _segments(n_tokens, gen)
    toks_N = torch.tensor(toks, dtype=torch.int64)
    kinds_N = torch.tensor(kinds, dtype=torch.int64)
    n_val = max(2, int(n_tokens * val_fraction))
    data = TokenData(toks_N[:-n_val], toks_N[-n_val:], 256, f"synthetic(seed={seed})")
    if return_labels:
        return data, SyntheticLabels(kinds_N[:-n_val], kinds_N[-n_val:])
    return data
