"""The study's two holdouts, both read at run time from the running interpreter (nothing is
copied into the repository):

* **prose**: ``pydoc_data.topics`` (CPython's help texts, English with some Python), the
  default corpus of ``duollm.data``;
* **code**: the Python source files of the interpreter's standard library (the top-level
  ``*.py`` files of ``sysconfig.get_paths()["stdlib"]``, sorted by name, up to
  ``max_bytes``).

The paper evaluated on 1,024 C4 samples and 1,024 GitHub Python files; these are the closest
corpora every machine already has. Each corpus is split like ``duollm.data``: its last
``val_fraction`` is held out (never in a training window) and the study's training stream is
the two training parts back to back, so the model sees prose and code as the paper's did.
"""
from __future__ import annotations

import glob
import os
import sys
import sysconfig
from dataclasses import dataclass
from typing import List, Optional

import torch

from ..data import ByteTokenizer, TokenData, default_corpus_text, split_tokens

PROSE, CODE = "prose", "code"


@dataclass
class Holdout:
    """One holdout corpus: ``name`` (``"prose"``/``"code"`` or a file name), ``source`` (where
    it was read), ``train`` (N_train,) and ``val`` (N_val,) int64 byte ids -- or, for a token
    shard folder (``duollm.shards``), memory-mapped ``ShardedTokens`` of its ``tokenizer``'s
    ids (its held-out shards are ``val``)."""

    name: str
    source: str
    train: torch.Tensor
    val: torch.Tensor
    val_kind: Optional[torch.Tensor] = None  # (N_val,) known token kinds (synthetic corpus)
    vocab_size: int = 256
    tokenizer: str = "bytes"  # "bytes", or the shard folder's tokenizer name


def stdlib_dir() -> str:
    """The running interpreter's standard library folder (where ``os.py`` lives)."""
    path = sysconfig.get_paths()["stdlib"]
    if not os.path.isfile(os.path.join(path, "os.py")):
        # Some installations report a different layout; os.py's own file is authoritative.
        path = os.path.dirname(os.__file__)
    return path


def code_files(max_bytes: int = 600_000) -> List[str]:
    """Paths of the stdlib's top-level ``*.py`` files in sorted order, at most ``max_bytes``
    in total (the first file always counts). Raises FileNotFoundError when the interpreter
    ships no Python sources (e.g. a bytecode-only install)."""
    if not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes: expected a positive int, got {max_bytes!r}")
    root = stdlib_dir()
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    if not files:
        raise FileNotFoundError(f"the interpreter's standard library at {root} holds no .py "
                                f"files, so the code holdout cannot be built")
    out, total = [], 0
    for f in files:
        size = os.path.getsize(f)
        if out and total + size > max_bytes:
            continue  # a smaller later file may still fit; the order stays sorted
        out.append(f)
        total += size
    return out


def code_text(max_bytes: int = 600_000) -> str:
    """The code corpus: each selected stdlib file's text, joined in sorted order."""
    parts = []
    for f in code_files(max_bytes):
        with open(f, "rb") as fh:
            parts.append(fh.read().decode("utf-8", errors="replace"))
    return "".join(parts)


def load_holdout(name: str, val_fraction: float = 0.1, max_code_bytes: int = 600_000,
                 path: str = None) -> Holdout:
    """``"prose"``, ``"code"``, or (with ``path``) a UTF-8 text file named ``name``."""
    tok = ByteTokenizer()
    if path is not None:
        with open(path, "rb") as f:
            text, source = f.read().decode("utf-8"), path
    elif name == PROSE:
        text, source = default_corpus_text(), "pydoc_data.topics"
    elif name == CODE:
        text = code_text(max_code_bytes)
        # Named, not located: a report must not carry this machine's interpreter path.
        source = (f"the Python standard library ({len(code_files(max_code_bytes))} files, "
                  f"Python {sys.version_info.major}.{sys.version_info.minor})")
    else:
        raise ValueError(f"name: expected 'prose' or 'code' (or a path), got {name!r}")
    train, val = split_tokens(tok.encode(text, as_tensor=True), val_fraction)
    return Holdout(name, source, train, val)


def shard_holdout(folder: str) -> Holdout:
    """A token shard folder (``duollm data prepare``) as the study's one holdout: its training
    shards train the model, its held-out shards give the oracle's sequences; both stay
    memory-mapped."""
    from ..shards import open_shards

    s = open_shards(folder)
    return Holdout(os.path.basename(s.folder.rstrip(os.sep)), s.folder, s.train, s.val,
                   vocab_size=s.vocab_size, tokenizer=s.tokenizer_name)


def check_shard_holdout(h: Holdout, tokenizer, vocab_size: int) -> None:
    """ValueError unless a shard holdout's ids are a model's (its vocabulary of
    ``vocab_size``, its ``transformers`` tokenizer or None for bytes); other holdouts pass."""
    if not isinstance(h.train, torch.Tensor):
        from ..shards import check_shards_for_model, open_shards

        try:
            check_shards_for_model(open_shards(h.source), tokenizer, vocab_size)
        except ValueError as e:
            raise ValueError(f"data: {str(e).removeprefix('shards: ')}") from None


def training_data(holdouts: List[Holdout]) -> TokenData:
    """The study's training stream: every holdout's training part back to back (byte ids).
    Its ``val`` is the first holdout's (what ``train`` reports during training). A shard
    holdout is its own stream (memory-mapped, never concatenated)."""
    if not holdouts:
        raise ValueError("holdouts: expected at least one")
    if any(h.tokenizer != "bytes" or not isinstance(h.train, torch.Tensor) for h in holdouts):
        if len(holdouts) != 1:
            raise ValueError("holdouts: a token shard holdout is studied alone")
        h = holdouts[0]
        return TokenData(h.train, h.val, h.vocab_size, f"{h.name} ({h.tokenizer} tokens)")
    train = torch.cat([h.train for h in holdouts])
    name = "+".join(h.name for h in holdouts)
    return TokenData(train, holdouts[0].val, 256, name)


def windows(tokens: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """``n`` evenly spaced windows (n, length) of a 1-D split (non-overlapping when the
    split is long enough)."""
    last = tokens.numel() - length
    if last < 0:
        raise ValueError(f"tokens: a split of {tokens.numel()} tokens is shorter than a "
                         f"window of {length}")
    starts = torch.linspace(0, last, n, dtype=torch.float64).round().long()
    return tokens[starts[:, None] + torch.arange(length)]


def synthetic_holdout(n_tokens: int, seed: int = 0) -> Holdout:
    """The synthetic corpus of known difficulty as a holdout (its kinds kept)."""
    from .synthetic import make_synthetic_data

    data, labels = make_synthetic_data(n_tokens=n_tokens, seed=seed, return_labels=True)
    return Holdout("synthetic", data.name, data.train, data.val, labels.val_kind)
