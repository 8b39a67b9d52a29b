"""Token shards: a corpus tokenized once into fixed-size memory-mapped files, read by random
access (the convention of nanoGPT's and torchtitan's data: flat little-endian ``uint16`` or
``uint32`` token files).

A shard folder holds::

    meta.json          format, tokenizer, vocabulary size, dtype, shard size, counts, the
                       train/held-out split (by shard) and each shard's SHA-256
    shard_00000.bin    exactly ``shard_tokens`` ids (the last shard may hold fewer)
    shard_00001.bin    ...
    tokenizer/         the HF tokenizer's files (``--tokenizer FOLDER`` only)

``prepare_shards`` streams its inputs (text read in chunks cut after a newline, each chunk
encoded and appended to the open shard file), so neither the corpus nor a whole shard is ever
in memory. ``open_shards`` maps the files and returns ``ShardedTokens`` views: 1-D token
sequences whose indexing reads only the positions asked for, which is all ``duollm.data``'s
samplers need (``sample_batch``, ``eval_batches``).

Tokenizers: ``"bytes"`` (UTF-8 bytes, vocabulary 256, ``duollm.data.ByteTokenizer``) or the
path of a local Hugging Face tokenizer folder (loaded with ``transformers.AutoTokenizer``,
``local_files_only``: nothing is downloaded); its vocabulary is ``len(tokenizer)``.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import os
import sys
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .tokendata import TokenData

__all__ = ["DTYPES", "META", "ShardSet", "ShardedTokens", "ShardTokenizer", "file_token_data",
           "is_shard_dir", "load_shards", "load_tokenizer", "open_shards", "prepare_shards",
           "verify_shards"]

FORMAT = "duollm-shards"
VERSION = 1
META = "meta.json"
TOKENIZER_DIR = "tokenizer"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
DEFAULT_SHARD_TOKENS = 100_000_000  # nanoGPT's and torchtitan's order of magnitude
CHUNK_BYTES = 1 << 20  # text read and encoded per step
TEMP_SHARD_TOKENS = 1 << 24  # shards of the temporary folder behind --data FILE
MIN_SPLIT_TOKENS = 2  # duollm.data's: a split shorter than this cannot feed a window


# --------------------------------------------------------------------------- tokenizers


class ShardTokenizer:
    """A tokenizer for shards: ``bytes`` or a local HF tokenizer folder.

    Fields: ``kind`` (``"bytes"``/``"hf"``), ``name`` (for messages and ``meta.json``),
    ``vocab_size``, ``path`` (the folder, None for bytes), ``hf`` (the ``transformers``
    tokenizer, None for bytes).
    """

    def __init__(self, kind: str, name: str, vocab_size: int, path: Optional[str] = None,
                 hf=None):
        self.kind, self.name, self.vocab_size, self.path, self.hf = (kind, name, vocab_size,
                                                                      path, hf)

    def encode(self, text: str) -> np.ndarray:
        """(n,) int64 ids of ``text``: its UTF-8 bytes, or the HF tokenizer's ids without
        special tokens."""
        if self.kind == "bytes":
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        ids = self.hf(text, add_special_tokens=False, verbose=False)["input_ids"]
        return np.asarray(ids, dtype=np.int64)

    def info(self) -> Dict:
        """What ``meta.json`` says about the tokenizer."""
        out = {"kind": self.kind, "name": self.name, "vocab_size": self.vocab_size}
        if self.kind == "hf":
            out["class"] = type(self.hf).__name__
            out["sha256"] = tokenizer_digest(self.path) if self.path else None
        return out

    def __repr__(self) -> str:
        return f"ShardTokenizer({self.kind}: {self.name}, vocab {self.vocab_size})"


def tokenizer_digest(folder: str) -> Optional[str]:
    """SHA-256 of a tokenizer folder's ``tokenizer.json`` (None when it has none): two
    folders with the same digest encode text identically."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    return sha256_file(path)


def load_tokenizer(spec: Union[str, os.PathLike]) -> ShardTokenizer:
    """``"bytes"`` or a local HF tokenizer folder -> ``ShardTokenizer``.

    Raises ValueError for a path that is not a folder holding a tokenizer, or one
    ``transformers`` cannot load (nothing is downloaded)."""
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"tokenizer: expected 'bytes' or a folder path, got "
                        f"{type(spec).__name__}")
    spec = os.fspath(spec)
    if spec == "bytes":
        return ShardTokenizer("bytes", "bytes", 256)
    if not os.path.isdir(spec):
        raise ValueError(f"tokenizer: expected 'bytes' or a local Hugging Face tokenizer "
                         f"folder, got {spec!r} (no such folder)")
    names = os.listdir(spec)
    if not any(n in names for n in ("tokenizer.json", "tokenizer_config.json",
                                    "tokenizer.model", "vocab.json")):
        raise ValueError(f"tokenizer: {spec} holds no tokenizer files (tokenizer.json, "
                         f"tokenizer_config.json, tokenizer.model or vocab.json)")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"tokenizer: cannot load the tokenizer in {spec}: {e}") from None
    name = os.path.basename(os.path.abspath(spec))
    return ShardTokenizer("hf", name, len(tok), os.path.abspath(spec), tok)


# --------------------------------------------------------------------------- writing


def sha256_file(path: str) -> str:
    """The SHA-256 hex digest of the file ``path``, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _text_chunks(path: str, chunk_bytes: int):
    """``path``'s text in pieces of about ``chunk_bytes``, each cut after a newline (or, in
    a line longer than that, after a space) so a tokenizer that does not merge across line
    breaks encodes the pieces exactly as the whole text. Yields (text, bytes read)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry = ""
    with open(path, "rb") as f:
        while True:
            raw = f.read(chunk_bytes)
            final = not raw
            try:
                text = carry + decoder.decode(raw, final=final)
            except UnicodeDecodeError as e:
                raise ValueError(f"inputs: {path} is not valid UTF-8 ({e})") from None
            if final:
                if text:
                    yield text, len(raw)
                return
            cut = text.rfind("\n") + 1 or text.rfind(" ") + 1
            if cut == 0 and len(text) < 16 * chunk_bytes:
                carry = text  # one very long word: wait for its end
                yield "", len(raw)
                continue
            cut = cut or len(text)
            carry = text[cut:]
            yield text[:cut], len(raw)


class _ShardWriter:
    """Appends ids to ``shard_NNNNN.bin`` files of exactly ``shard_tokens`` ids each,
    hashing as it writes; holds only the ids handed to ``write``."""

    def __init__(self, folder: str, shard_tokens: int, dtype: str):
        self.folder, self.shard_tokens, self.dtype = folder, shard_tokens, np.dtype(DTYPES[dtype])
        self.shards: List[Dict] = []
        self.file = None

    def _open(self) -> None:
        name = f"shard_{len(self.shards):05d}.bin"
        self.file = open(os.path.join(self.folder, name), "wb")
        self.hash, self.count = hashlib.sha256(), 0
        self.shards.append({"file": name})

    def _close(self) -> None:
        self.file.close()
        self.shards[-1].update(tokens=self.count, sha256=self.hash.hexdigest())
        self.file = None

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype.newbyteorder("<"), copy=False)
        while ids.size:
            if self.file is None:
                self._open()
            take = min(ids.size, self.shard_tokens - self.count)
            raw = ids[:take].tobytes()
            self.file.write(raw)
            self.hash.update(raw)
            self.count += take
            ids = ids[take:]
            if self.count == self.shard_tokens:
                self._close()

    def finish(self) -> List[Dict]:
        if self.file is not None:
            self._close()
        return self.shards


def _check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def check_prepare_args(inputs: Sequence, out, tokenizer: ShardTokenizer, shard_tokens: int,
                       dtype: str, val_shards: int) -> str:
    """Every check of ``prepare_shards`` that needs no reading; returns the settled dtype.

    For the bytes tokenizer the token count is the inputs' size, so a corpus too small for
    ``val_shards`` held-out shards plus one training shard is refused here, before any work.
    """
    if isinstance(inputs, (str, os.PathLike)) or not inputs:
        raise ValueError("inputs: expected a non-empty list of text file paths")
    for p in inputs:
        if not os.path.isfile(p):
            raise ValueError(f"inputs: no such file {os.fspath(p)!r}")
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        raise ValueError(f"out: expected a folder path, got {out!r}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"out: {os.fspath(out)} exists and is not an empty folder")
    _check_positive("shard_tokens", shard_tokens)
    _check_positive("val_shards", val_shards)
    if dtype == "auto":
        dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected auto, uint16 or uint32, got {dtype!r}")
    if tokenizer.vocab_size > np.iinfo(DTYPES[dtype]).max + 1:
        raise ValueError(f"dtype: {dtype} cannot hold the ids of a vocabulary of "
                         f"{tokenizer.vocab_size}; use uint32")
    if tokenizer.kind == "bytes":
        total = sum(os.path.getsize(p) for p in inputs)
        n_shards = -(-total // shard_tokens)
        if n_shards <= val_shards:
            raise ValueError(f"shard_tokens: the inputs hold {total} byte tokens, "
                             f"{n_shards} shard(s) of {shard_tokens}; the split needs more "
                             f"than val_shards={val_shards}: lower shard_tokens")
    return dtype


def prepare_shards(inputs: Sequence[Union[str, os.PathLike]], out: Union[str, os.PathLike],
                   tokenizer: Union[str, ShardTokenizer] = "bytes",
                   shard_tokens: int = DEFAULT_SHARD_TOKENS, dtype: str = "auto",
                   val_shards: int = 1, progress: bool = False,
                   chunk_bytes: int = CHUNK_BYTES) -> Dict:
    """Tokenize ``inputs`` (UTF-8 text files, in order, back to back) into a shard folder.

    Args:
      inputs: text file paths; their token streams are concatenated in this order.
      out: the folder to create (new or empty); written in a temporary sibling and renamed
        at the end, so a failed or interrupted run leaves nothing behind.
      tokenizer: ``"bytes"``, a tokenizer folder, or a ``ShardTokenizer``.
      shard_tokens: ids per shard file (the last may hold fewer).
      dtype: ``"uint16"``, ``"uint32"`` or ``"auto"`` (uint16 when the vocabulary fits).
      val_shards: the last this many shards are the held-out split; the rest train.
      progress: a tqdm bar over the input bytes with the tokens/s rate.
    Returns: the ``meta.json`` dict.
    Raises: ValueError for bad arguments, a non-UTF-8 input, or a corpus that makes no more
      than ``val_shards`` shards.
    """
    tok = tokenizer if isinstance(tokenizer, ShardTokenizer) else load_tokenizer(tokenizer)
    inputs = [os.fspath(p) for p in inputs] if not isinstance(inputs, (str, os.PathLike)) \
        else inputs
    dtype = check_prepare_args(inputs, out, tok, shard_tokens, dtype, val_shards)
    _check_positive("chunk_bytes", chunk_bytes)
    out = os.path.abspath(os.fspath(out))
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)
    try:
        meta = _write(inputs, tmp, tok, shard_tokens, dtype, val_shards, progress, chunk_bytes)
        if os.path.isdir(out):
            os.rmdir(out)  # checked empty above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _write(inputs, folder, tok, shard_tokens, dtype, val_shards, progress, chunk_bytes):
    total_bytes = sum(os.path.getsize(p) for p in inputs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="data prepare")
    writer = _ShardWriter(folder, shard_tokens, dtype)
    n_tokens, t0, sources = 0, time.perf_counter(), []
    try:
        for path in inputs:
            before = n_tokens
            for text, n_read in _text_chunks(path, chunk_bytes):
                if text:
                    ids = tok.encode(text)
                    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= tok.vocab_size):
                        raise ValueError(f"tokenizer: {tok.name} produced id "
                                         f"{int(ids.max())} outside its vocabulary of "
                                         f"{tok.vocab_size}")
                    writer.write(ids)
                    n_tokens += int(ids.size)
                if bar is not None:
                    bar.update(n_read)
                    rate = n_tokens / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix_str(f"{n_tokens:,} tokens, {rate:,.0f} tokens/s")
            sources.append({"path": os.path.abspath(path), "bytes": os.path.getsize(path),
                            "tokens": n_tokens - before})
    finally:
        if bar is not None:
            bar.close()
    shards = writer.finish()
    if val_shards and len(shards) <= val_shards:
        raise ValueError(f"shard_tokens: the inputs make {n_tokens} tokens, {len(shards)} "
                         f"shard(s) of {shard_tokens}; the split needs more than "
                         f"val_shards={val_shards}: lower shard_tokens")
    for i, s in enumerate(shards):
        s["split"] = "val" if i >= len(shards) - val_shards else "train"
    if tok.kind == "hf":
        tok.hf.save_pretrained(os.path.join(folder, TOKENIZER_DIR))
    n_val = sum(s["tokens"] for s in shards if s["split"] == "val")
    meta = {"format": FORMAT, "version": VERSION, "tokenizer": tok.info(),
            "vocab_size": tok.vocab_size, "dtype": dtype, "byteorder": "little",
            "shard_tokens": shard_tokens, "val_shards": val_shards,
            "tokens": {"total": n_tokens, "train": n_tokens - n_val, "val": n_val},
            "inputs": sources, "shards": shards,
            "seconds": round(time.perf_counter() - t0, 3)}
    with open(os.path.join(folder, META), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


# --------------------------------------------------------------------------- reading


class ShardedTokens:
    """A read-only 1-D token sequence over memory-mapped shard files: positions
    ``[start, stop)`` of the shards' concatenation.

    Indexing reads only the positions asked for (the OS pages in what they touch): an int
    gives a Python int, a slice a new view (step 1), an integer tensor of any shape an int64
    tensor of that shape. Enough of a tensor's interface (``numel``, ``dim``, ``shape``,
    ``device``, ``__len__``) for ``duollm.data.sample_batch`` and ``eval_batches``;
    ``read()`` copies the whole view into an int64 tensor (small views only).
    """

    device = torch.device("cpu")
    dtype = torch.int64  # what indexing returns

    def __init__(self, maps: Sequence[np.ndarray], start: int = 0, stop: Optional[int] = None,
                 name: str = "shards"):
        self._maps = list(maps)
        sizes = [int(m.shape[0]) for m in self._maps]
        self._offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        total = int(self._offsets[-1])
        stop = total if stop is None else stop
        if not 0 <= start <= stop <= total:
            raise ValueError(f"start/stop: [{start}, {stop}) is outside [0, {total}]")
        self.start, self.stop, self.name = start, stop, name

    def numel(self) -> int:
        return self.stop - self.start

    def __len__(self) -> int:
        return self.numel()

    def dim(self) -> int:
        return 1

    @property
    def shape(self) -> torch.Size:
        return torch.Size([self.numel()])

    def _gather(self, pos: np.ndarray) -> np.ndarray:
        """int64 ids at global positions ``pos`` (1-D int64)."""
        which = np.searchsorted(self._offsets, pos, side="right") - 1
        out = np.empty(pos.shape, dtype=np.int64)
        for s in np.unique(which):
            sel = which == s
            out[sel] = self._maps[s][pos[sel] - self._offsets[s]]
        return out

    def __getitem__(self, key):
        n = self.numel()
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                raise ValueError("ShardedTokens: slices with a step are not supported")
            return ShardedTokens(self._maps, self.start + start,
                                 self.start + max(start, stop), self.name)
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            i = int(key) + (n if key < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"index {key} is out of range for {n} tokens")
            return int(self._gather(np.array([self.start + i], dtype=np.int64))[0])
        if isinstance(key, torch.Tensor) and not key.dtype.is_floating_point \
                and key.dtype != torch.bool:
            idx = key.detach().cpu().to(torch.int64).numpy()
            if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
                raise IndexError(f"indices must lie in [0, {n}), got "
                                 f"[{int(idx.min())}, {int(idx.max())}]")
            flat = self._gather(idx.reshape(-1) + self.start)
            return torch.from_numpy(flat.reshape(idx.shape))
        raise TypeError(f"ShardedTokens: index with an int, a slice or an integer tensor, "
                        f"got {type(key).__name__}")

    def read(self) -> torch.Tensor:
        """The whole view as an (n,) int64 tensor (copied into memory)."""
        parts = []
        for s, m in enumerate(self._maps):
            lo = max(self.start, int(self._offsets[s]))
            hi = min(self.stop, int(self._offsets[s + 1]))
            if lo < hi:
                parts.append(np.asarray(m[lo - self._offsets[s]:hi - self._offsets[s]],
                                        dtype=np.int64))
        return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.int64))

    def __repr__(self) -> str:
        return f"ShardedTokens({self.name}: {self.numel()} tokens in {len(self._maps)} shards)"


@dataclass
class ShardSet:
    """An opened shard folder: ``meta`` (its meta.json), ``train`` and ``val`` token views,
    ``folder``, and ``tokenizer_dir`` (its saved HF tokenizer, or None for bytes)."""

    folder: str
    meta: Dict
    train: ShardedTokens
    val: ShardedTokens
    tokenizer_dir: Optional[str]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def tokenizer_name(self) -> str:
        return str(self.meta["tokenizer"]["name"])


def is_shard_dir(path) -> bool:
    """Whether ``path`` is a folder written by ``prepare_shards`` (has its meta.json)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        return False
    try:
        with open(os.path.join(path, META)) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_meta(folder) -> Dict:
    """A shard folder's meta.json, checked against the files (sizes) without reading them."""
    folder = os.fspath(folder)
    path = os.path.join(folder, META)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"shards: cannot read {path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"shards: {folder} is not a shard folder (meta.json of format "
                         f"{FORMAT!r}; write one with `duollm data prepare`)")
    if meta.get("dtype") not in DTYPES:
        raise ValueError(f"shards: {path} names an unknown dtype {meta.get('dtype')!r}")
    width = np.dtype(DTYPES[meta["dtype"]]).itemsize
    for s in meta["shards"]:
        f = os.path.join(folder, s["file"])
        if not os.path.isfile(f):
            raise ValueError(f"shards: {f} is missing")
        if os.path.getsize(f) != s["tokens"] * width:
            raise ValueError(f"shards: {f} holds {os.path.getsize(f)} bytes, meta.json says "
                             f"{s['tokens']} {meta['dtype']} tokens: the folder is damaged")
    return meta


def open_shards(folder) -> ShardSet:
    """Map a shard folder's files (read-only) and return its train and held-out views."""
    folder = os.path.abspath(os.fspath(folder))
    meta = read_meta(folder)
    dt = np.dtype(DTYPES[meta["dtype"]]).newbyteorder("<")
    views = {}
    for split in ("train", "val"):
        files = [s for s in meta["shards"] if s["split"] == split]
        maps = [np.memmap(os.path.join(folder, s["file"]), dtype=dt, mode="r",
                          shape=(s["tokens"],)) for s in files if s["tokens"]]
        views[split] = ShardedTokens(maps, name=f"{os.path.basename(folder)}:{split}")
    tdir = os.path.join(folder, TOKENIZER_DIR)
    return ShardSet(folder, meta, views["train"], views["val"],
                    tdir if os.path.isdir(tdir) else None)


def verify_shards(folder) -> Dict:
    """Re-hash every shard and compare with meta.json; ValueError on a mismatch."""
    meta = read_meta(folder)
    for s in meta["shards"]:
        digest = sha256_file(os.path.join(os.fspath(folder), s["file"]))
        if digest != s["sha256"]:
            raise ValueError(f"shards: {s['file']} fails its checksum (meta.json "
                             f"{s['sha256'][:12]}..., file {digest[:12]}...)")
    return meta


def load_shards(folder) -> TokenData:
    """A shard folder as ``TokenData``: train and val are ``ShardedTokens`` views, the
    vocabulary the tokenizer's."""
    s = open_shards(folder)
    return TokenData(train=s.train, val=s.val, vocab_size=s.vocab_size,
                     name=f"{os.path.basename(s.folder)} ({s.tokenizer_name} tokens)")


def file_token_data(path, val_fraction: float = 0.1,
                    tokenizer: Union[str, ShardTokenizer] = "bytes",
                    name: Optional[str] = None) -> TokenData:
    """``--data FILE``: the file prepared on the fly into a temporary shard folder, its last
    ``val_fraction`` of the token stream held out (the split of ``duollm.data.split_tokens``,
    at a token offset rather than a shard). The folder is removed once its files are mapped
    (on POSIX the maps stay valid), else at exit.

    Raises ValueError for a bad ``val_fraction``, an empty or non-UTF-8 file, or one too
    short to split."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
            or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a float in (0, 1), got {val_fraction!r}")
    tok = tokenizer if isinstance(tokenizer, ShardTokenizer) else load_tokenizer(tokenizer)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"source: no such file {path!r}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"source: {path!r} is empty")
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    tmp = tempfile.mkdtemp(prefix="duollm-shards-")
    try:
        _write([path], tmp, tok, TEMP_SHARD_TOKENS, dtype, 0, False, CHUNK_BYTES)
        s = open_shards(tmp)
    finally:
        if os.name == "posix":
            shutil.rmtree(tmp, ignore_errors=True)
        else:  # a mapped file cannot be removed while mapped: at exit
            import atexit

            atexit.register(shutil.rmtree, tmp, True)
    stream = ShardedTokens(s.train._maps, name=os.path.basename(path))
    n = stream.numel()
    n_val = int(round(n * val_fraction))
    n_train = n - n_val
    if n_val < MIN_SPLIT_TOKENS or n_train < MIN_SPLIT_TOKENS:
        raise ValueError(f"corpus of {n} tokens is too short to split with "
                         f"val_fraction={val_fraction} ({n_train} train, {n_val} val tokens)")
    label = name or (os.path.basename(path) if tok.kind == "bytes"
                     else f"{os.path.basename(path)} ({tok.name} tokens)")
    return TokenData(train=stream[:n_train], val=stream[n_train:], vocab_size=tok.vocab_size,
                     name=label)


# A probe of prose, code and odd characters: two tokenizers that encode it alike (and have
# the same vocabulary size) are taken to be the same tokenizer.
PROBE = ("The quick brown fox jumps over the lazy dog.\n"
         "def f(x):\n    return {'a': [1, 2.5e-3]}  # comment\n"
         "Ünïcödé — “quotes” … 東京 🙂\t\r\n  indented   spaces\n")


def tokenizers_agree(a, b) -> bool:
    """Whether two ``transformers`` tokenizers give the same ids (same vocabulary size, same
    ids on ``PROBE`` and on the start of the embedded corpus)."""
    from pydoc_data.topics import topics

    text = PROBE + "".join(topics[k] for k in sorted(topics))[:4000]
    if len(a) != len(b):
        return False

    def ids(t):
        return t(text, add_special_tokens=False, verbose=False)["input_ids"]

    return ids(a) == ids(b)


def check_shards_for_model(shard_set: ShardSet, tokenizer, vocab_size: int) -> None:
    """ValueError unless ``shard_set``'s ids are a model's: they fit its vocabulary and were
    made by its tokenizer (``tokenizer``: its ``transformers`` tokenizer, None for bytes)."""
    kind = shard_set.meta["tokenizer"]["kind"]
    name = shard_set.tokenizer_name
    if shard_set.vocab_size > vocab_size:
        raise ValueError(f"shards: {shard_set.folder} holds ids of a vocabulary of "
                         f"{shard_set.vocab_size} ({name}), more than the model's "
                         f"{vocab_size}")
    if tokenizer is None:
        if kind != "bytes":
            raise ValueError(f"shards: {shard_set.folder} was tokenized with {name}, but the "
                             f"model has no tokenizer (it reads bytes); prepare the data with "
                             f"--tokenizer bytes")
        return
    if kind == "bytes":
        raise ValueError(f"shards: {shard_set.folder} holds byte ids, but the model has its "
                         f"own tokenizer; prepare the data with --tokenizer set to the model's "
                         f"folder")
    if shard_set.tokenizer_dir is None:
        raise ValueError(f"shards: {shard_set.folder} lacks its tokenizer/ folder")
    saved = load_tokenizer(shard_set.tokenizer_dir).hf
    if not tokenizers_agree(saved, tokenizer):
        raise ValueError(f"shards: {shard_set.folder} was tokenized with {name}, which "
                         f"encodes text differently from the model's tokenizer")


def describe_tokenizer(tokenizer) -> str:
    """A ``transformers`` tokenizer in words: its folder's name, class and vocabulary size
    (``"bytes"`` for None)."""
    if tokenizer is None:
        return "bytes"
    where = os.path.basename(os.path.normpath(str(getattr(tokenizer, "name_or_path", "")
                                                  or "")))
    return f"{where or 'unnamed'} ({type(tokenizer).__name__}, vocabulary {len(tokenizer)})"


def announce_tokenizer(reader: str, tokenizer, path: str) -> None:
    """Say which tokenizer ``reader`` (e.g. ``"train --hf reads the text"``) uses for the
    checkpoint at ``path``; a warning on stderr when it has none and bytes are used instead.
    Said whether or not progress lines are on: which ids are read decides the numbers."""
    if tokenizer is None:
        print(f"warning: {path} holds no tokenizer; {reader} as UTF-8 bytes (ids 0-255), "
              f"which the model was probably not trained on. Save the tokenizer with the "
              f"model (duollm convert and train --hf do when the source folder has one)",
              file=sys.stderr, flush=True)
    else:
        print(f"tokenizer: {describe_tokenizer(tokenizer)} from {path}", flush=True)

