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


# --------------------------------------------------------------------------- memory task

# Kinds of the key -> value memory corpus (``make_memory_data``); STRUCTURE and NOISE as above.
MEMORY, KEY = 4, 5
KIND_NAMES.update({MEMORY: "memory", KEY: "key"})


def memory_table(n_keys: int, seed: int = 0, key_len: int = 3, value_len: int = 3):
    """``n_keys`` distinct random letter keys, each with a random letter value: a list of
    (key ids, value ids), a pure function of the arguments."""
    if not isinstance(n_keys, int) or not 1 <= n_keys <= 26 ** key_len:
        raise ValueError(f"n_keys: expected an int in 1..{26 ** key_len}, got {n_keys!r}")
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randperm(26 ** key_len, generator=gen)[:n_keys].tolist()
    table = []
    for k in keys:
        key = [_LETTERS[(k // 26 ** i) % 26] for i in range(key_len)]
        value = [_LETTERS[i] for i in torch.randint(0, 26, (value_len,), generator=gen).tolist()]
        table.append((key, value))
    return table


def make_memory_data(n_tokens: int = 200_000, n_keys: int = 512, seed: int = 0,
                     val_fraction: float = 0.1, noise_share: float = 0.4,
                     return_labels: bool = False):
    """A byte corpus whose answer lives in the FFN: a memorised key -> value table.

    Lines are ``k KEY : VALUE \\n`` (no spaces; KEY and VALUE 3 random letters, the pair drawn
    from a fixed table of ``n_keys`` entries) or, with probability ``noise_share``, ``~`` and
    3..8 random letters (``NOISE``). A value's letters (``MEMORY``) follow from nothing in the
    context, only from the table the model stored in its weights: copying (attention's job)
    cannot produce them. A table large enough for the big FFNs and too large for the small
    ones makes memory tokens the ones that gain from compute. Key letters are ``KEY``,
    ``k``, ``:`` and line ends ``STRUCTURE``. The validation split draws from the same table.

    Returns ``TokenData`` or ``(TokenData, SyntheticLabels)`` like ``make_synthetic_data``.
    """
    if not isinstance(n_tokens, int) or n_tokens < 4:
        raise ValueError(f"n_tokens: expected an int >= 4, got {n_tokens!r}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction: expected a float in (0, 1), got {val_fraction!r}")
    if not 0 <= noise_share < 1:
        raise ValueError(f"noise_share: expected a float in [0, 1), got {noise_share!r}")
    table = memory_table(n_keys, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    toks, kinds = [], []
    while len(toks) < n_tokens:
        if float(torch.rand((), generator=gen)) < noise_share:
            n = 3 + int(torch.randint(0, 6, (), generator=gen))
            toks += [ord("~")] + [_LETTERS[i] for i in
                                  torch.randint(0, 26, (n,), generator=gen).tolist()]
            kinds += [STRUCTURE] + [NOISE] * n
        else:
            key, value = table[int(torch.randint(0, n_keys, (), generator=gen))]
            toks += [ord("k")] + key + [ord(":")] + value
            kinds += [STRUCTURE] + [KEY] * len(key) + [STRUCTURE] + [MEMORY] * len(value)
        toks.append(ord("\n"))
        kinds.append(STRUCTURE)
    toks_N = torch.tensor(toks[:n_tokens], dtype=torch.int64)
    kinds_N = torch.tensor(kinds[:n_tokens], dtype=torch.int64)
    n_val = max(2, int(n_tokens * val_fraction))
    data = TokenData(toks_N[:-n_val], toks_N[-n_val:], 256,
                     f"memory(n_keys={n_keys}, seed={seed})")
    if return_labels:
        return data, SyntheticLabels(kinds_N[:-n_val], kinds_N[-n_val:])
    return data
