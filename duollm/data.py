"""Training data: corpora, a byte-level tokenizer, a deterministic split and batch samplers.

The default corpus is CPython's own documentation, ``pydoc_data.topics`` (about 466 KB of
English and Python), read from the running interpreter so no text ships with duollm. Any
UTF-8 text file works too, and ``"synthetic"`` gives a corpus whose per-token difficulty is
known (``duollm.study.synthetic``).

Every text corpus is a stream of byte ids (vocabulary 256); a token shard folder
(``duollm.shards``, ``duollm data prepare``) carries its own tokenizer's ids and vocabulary.
The validation split is the last
``val_fraction`` of the stream, contiguous and never shuffled, so the split is the same on every
machine and no validation text leaks into training windows.
"""
from __future__ import annotations

import os
from typing import List, Optional, Union

import torch

# TokenData lives in a leaf module so the synthetic corpus (duollm.study.synthetic) can build
# one without importing this module: data -> study.synthetic -> tokendata, no cycle.
from .shards import ShardedTokens, is_shard_dir, load_shards
from .study.synthetic import make_synthetic_data
from .tokendata import TokenData

__all__ = ["ByteTokenizer", "TokenData", "default_corpus_text", "eval_batches", "load_data",
           "sample_batch", "split_tokens"]

# Windows are seq_len + 1 tokens (inputs and next-token targets); a split shorter than this
# many tokens cannot feed even a tiny model.
MIN_SPLIT_TOKENS = 2


class ByteTokenizer:
    """UTF-8 bytes as tokens: id ``b`` is byte ``b``. Lossless on any text, vocabulary 256."""

    vocab_size = 256

    def encode(self, text: str, as_tensor: bool = False) -> Union[List[int], torch.Tensor]:
        """Ids of ``text``'s UTF-8 bytes: a list, or a (len,) int64 tensor if ``as_tensor``."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        raw = text.encode("utf-8")
        if as_tensor:
            # frombuffer shares the bytes object's memory; copy into an owned int64 tensor.
            return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int64)
        return list(raw)

    def decode(self, ids) -> str:
        """Text of ``ids`` (a list or 1-D tensor); invalid UTF-8 sequences become U+FFFD."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"ids: expected a 1-D tensor, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        bad = [i for i in ids if not 0 <= int(i) < 256]
        if bad:
            raise ValueError(f"ids: byte ids must lie in [0, 256), found {bad[0]}")
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def default_corpus_text() -> str:
    """The embedded corpus: ``pydoc_data.topics.topics`` values joined in sorted-key order."""
    from pydoc_data.topics import topics  # part of CPython's standard library

    return "".join(topics[key] for key in sorted(topics))


def split_tokens(tokens: torch.Tensor, val_fraction: float):
    """(train, val): the first ``1 - val_fraction`` of ``tokens`` (1-D) and the rest."""
    if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a float in (0, 1), got {val_fraction!r}")
    n_val = int(round(tokens.numel() * val_fraction))
    n_train = tokens.numel() - n_val
    if n_val < MIN_SPLIT_TOKENS or n_train < MIN_SPLIT_TOKENS:
        raise ValueError(f"corpus of {tokens.numel()} tokens is too short to split with "
                         f"val_fraction={val_fraction} ({n_train} train, {n_val} val tokens)")
    return tokens[:n_train].clone(), tokens[n_train:].clone()


def load_data(source: Optional[str] = None, val_fraction: float = 0.1) -> TokenData:
    """Load and split a corpus.

    Args:
      source: ``None`` or ``"default"`` for the embedded pydoc corpus, ``"synthetic"`` for
        ``duollm.study.synthetic.make_synthetic_data(val_fraction=...)``, a token shard folder
        (``duollm data prepare``; read by memory map, split by shard as its meta.json says),
        anything else a path to a UTF-8 text file (read into memory: the command line's
        ``--data FILE`` goes through ``duollm.shards.file_token_data`` instead).
      val_fraction: share of the stream (its end) held out for validation (not used for a
        shard folder).
    Returns: a ``TokenData`` with byte-level ids (vocab 256) for the text corpora; for a
      shard folder, ``ShardedTokens`` views and the tokenizer's vocabulary.
    Raises: FileNotFoundError for a missing file, ValueError for an empty, non-UTF-8 or too
      short one.
    """
    if source is not None and not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source: expected None, 'default', 'synthetic' or a path, got "
                        f"{type(source).__name__}")
    if source == "synthetic":
        return make_synthetic_data(val_fraction=val_fraction)
    tok = ByteTokenizer()
    if source is None or source == "default":
        text, name = default_corpus_text(), "pydoc-topics"
    else:
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"source: no such file {path!r} (use 'default', "
                                    f"'synthetic' or a path to a UTF-8 text file)")
        if is_shard_dir(path):
            return load_shards(path)
        if os.path.isdir(path):
            raise ValueError(f"source: {path!r} is a directory, expected a text file")
        with open(path, "rb") as f:
            raw = f.read()
        if not raw:
            raise ValueError(f"source: {path!r} is empty")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"source: {path!r} is not valid UTF-8 ({e})") from None
        name = os.path.basename(path)
    train, val = split_tokens(tok.encode(text, as_tensor=True), val_fraction)
    return TokenData(train=train, val=val, vocab_size=tok.vocab_size, name=name)


def _check_window_args(tokens, batch_size: int, seq_len: int) -> None:
    # ShardedTokens: memory-mapped shards, indexed like a 1-D tensor (duollm.shards)
    if not isinstance(tokens, (torch.Tensor, ShardedTokens)) or tokens.dim() != 1:
        raise ValueError("tokens: expected a 1-D tensor of token ids (or ShardedTokens)")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if tokens.numel() < seq_len + 1:
        raise ValueError(f"tokens: a split of {tokens.numel()} tokens is too short for windows "
                         f"of seq_len + 1 = {seq_len + 1} tokens; lower seq_len or use more "
                         f"text")


def sample_batch(tokens: torch.Tensor, batch_size: int, seq_len: int,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``batch_size`` windows of ``seq_len + 1`` tokens at uniformly random offsets.

    Args:
      tokens: (N,) int64 ids, N >= seq_len + 1.
      generator: a CPU ``torch.Generator``; the same state draws the same batch.
    Returns: (batch_size, seq_len + 1) int64 on ``tokens``' device; column ``:-1`` are the
      inputs and ``1:`` the next-token targets.
    """
    _check_window_args(tokens, batch_size, seq_len)
    n_starts = tokens.numel() - seq_len  # valid offsets: 0 .. N - seq_len - 1
    starts = torch.randint(n_starts, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(seq_len + 1)  # (B, T+1)
    return tokens[idx.to(tokens.device)].to(torch.int64)


def eval_batches(tokens: torch.Tensor, batch_size: int, seq_len: int,
                 n_batches: int) -> List[torch.Tensor]:
    """Fixed validation windows: ``n_batches`` tensors of shape (batch_size, seq_len + 1).

    Window offsets are spread evenly over the split (overlapping only when the split is short),
    so every call with the same arguments returns the same windows and covers the whole split.
    """
    _check_window_args(tokens, batch_size, seq_len)
    if not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"n_batches: expected a positive int, got {n_batches!r}")
    n = batch_size * n_batches
    last = tokens.numel() - (seq_len + 1)
    starts = torch.linspace(0, last, n, dtype=torch.float64).round().to(torch.int64)  # (n,)
    idx = starts[:, None] + torch.arange(seq_len + 1)  # (n, T+1)
    windows = tokens[idx.to(tokens.device)].to(torch.int64)
    return list(windows.split(batch_size))
