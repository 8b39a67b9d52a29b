"""``duollm data``: token shards for training and the study (``duollm.shards``).

``duollm data prepare --tokenizer {bytes|FOLDER} --input FILE... --out DIR`` streams the
inputs into fixed-size memory-mapped token shards plus ``meta.json``; ``duollm data verify
DIR`` re-hashes them. ``duollm train --data DIR``, ``train --hf --data DIR`` and ``duollm
study --data DIR`` read the folder by memory map. Every option is checked before any file is
written (``duollm.usage``).
"""
from __future__ import annotations

import argparse
import os

from duollm.usage import UsageError, check_data_file, check_int, check_out_dir, show_progress

DESCRIPTION = ("Token shards (the nanoGPT/torchtitan convention): a corpus tokenized once "
               "into fixed-size uint16/uint32 files read by memory map, with a meta.json "
               "(tokenizer, vocabulary, counts, checksums, train/held-out split by shard).")


def add_cli(p: argparse.ArgumentParser) -> None:
    """Arguments of ``duollm data`` and its subcommands."""
    from duollm.shards import DEFAULT_SHARD_TOKENS

    p.description = DESCRIPTION
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    q = sub.add_parser("prepare", help="tokenize text files into token shards",
                       description="Stream UTF-8 text files (in order, back to back) through "
                                   "a tokenizer into shard_NNNNN.bin files of --shard-tokens "
                                   "ids each and a meta.json; the last --val-shards shards are "
                                   "the held-out split. Neither the corpus nor a shard is "
                                   "held in memory. Nothing is downloaded.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("--tokenizer", default="bytes", metavar="bytes|FOLDER",
                   help="'bytes' (UTF-8 bytes, vocabulary 256) or a local Hugging Face "
                        "tokenizer folder (tokenizer.json ...)")
    q.add_argument("--input", dest="inputs", nargs="+", required=True, metavar="FILE",
                   default=argparse.SUPPRESS, help="UTF-8 text files")
    q.add_argument("--out", dest="out_dir", required=True, metavar="DIR",
                   default=argparse.SUPPRESS, help="the shard folder to create (new or empty)")
    q.add_argument("--shard-tokens", dest="shard_tokens", type=int,
                   default=DEFAULT_SHARD_TOKENS, metavar="N", help="token ids per shard")
    q.add_argument("--dtype", choices=("auto", "uint16", "uint32"), default="auto",
                   help="id width on disk (auto: uint16 when the vocabulary fits)")
    q.add_argument("--val-shards", dest="val_shards", type=int, default=1, metavar="N",
                   help="the last N shards are held out (validation and the study's oracle)")
    q.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    q.set_defaults(data_run=run_prepare)
    v = sub.add_parser("verify", help="re-hash a shard folder against its meta.json",
                       description="Check every shard's size and SHA-256 against meta.json "
                                   "and print the folder's summary.")
    v.add_argument("folder", metavar="DIR", help="a shard folder")
    v.set_defaults(data_run=run_verify)


def run_cli(args: argparse.Namespace) -> int:
    run = getattr(args, "data_run", None)
    if run is None:
        raise UsageError("SUBCOMMAND", "expected prepare or verify (duollm data --help)")
    return int(run(args) or 0)


def check_prepare(args: argparse.Namespace):
    """Every ``data prepare`` check, before anything is written; returns the tokenizer and
    the settled dtype."""
    from duollm import shards

    for path in args.inputs:
        check_data_file("--input", path)
    check_out_dir("--out", args.out_dir)
    if os.path.isdir(args.out_dir) and os.listdir(args.out_dir):
        raise UsageError("--out", f"{args.out_dir} is not empty; pick a new folder")
    if any(os.path.abspath(args.out_dir) == os.path.abspath(p) for p in args.inputs):
        raise UsageError("--out", "must differ from every --input")
    check_int("--shard-tokens", args.shard_tokens, low=1)
    check_int("--val-shards", args.val_shards, low=1)
    if args.tokenizer != "bytes":
        if not os.path.isdir(args.tokenizer):
            raise UsageError("--tokenizer", f"expected 'bytes' or a local Hugging Face "
                                            f"tokenizer folder, got {args.tokenizer!r} (no "
                                            f"such folder; nothing is downloaded)")
        import importlib.util

        if importlib.util.find_spec("transformers") is None:
            raise UsageError("--tokenizer", "a Hugging Face tokenizer folder needs the "
                                            "transformers package: pip install transformers")
    try:
        tok = shards.load_tokenizer(args.tokenizer)
    except ValueError as e:
        raise UsageError("--tokenizer", str(e).removeprefix("tokenizer: ")) from None
    options = {"dtype": "--dtype", "shard_tokens": "--shard-tokens",
               "val_shards": "--val-shards", "out": "--out", "inputs": "--input"}
    try:
        dtype = shards.check_prepare_args(args.inputs, args.out_dir, tok, args.shard_tokens,
                                          args.dtype, args.val_shards)
    except ValueError as e:
        field, _, text = str(e).partition(": ")
        raise UsageError(options.get(field, ""), _flags(text) if field in options
                         else str(e)) from None
    return tok, dtype


def _flags(text: str) -> str:
    """A library message in the command line's words."""
    return (text.replace("val_shards=", "--val-shards ").replace("lower shard_tokens",
                                                                  "lower --shard-tokens"))


def run_prepare(args: argparse.Namespace) -> int:
    from duollm import shards

    tok, dtype = check_prepare(args)
    print(f"data prepare: {len(args.inputs)} file(s) with the {tok.name} tokenizer "
          f"(vocabulary {tok.vocab_size}, {dtype}) into {args.out_dir}", flush=True)
    try:
        meta = shards.prepare_shards(args.inputs, args.out_dir, tok, args.shard_tokens, dtype,
                                     args.val_shards, progress=show_progress(args.progress))
    except ValueError as e:  # only known after encoding (an HF tokenizer's count): nothing kept
        field, _, text = str(e).partition(": ")
        if field != "shard_tokens":
            raise
        raise UsageError("--shard-tokens", _flags(text) + " (nothing was written)") from None
    _print_summary(args.out_dir, meta)
    return 0


def _print_summary(folder: str, meta) -> None:
    n = meta["tokens"]
    splits = [s["split"] for s in meta["shards"]]
    rate = n["total"] / max(meta.get("seconds", 0.0), 1e-9)
    print(f"{folder}: {len(splits)} shards of up to {meta['shard_tokens']:,} {meta['dtype']} "
          f"tokens; train {splits.count('train')} shards ({n['train']:,} tokens), held out "
          f"{splits.count('val')} ({n['val']:,} tokens); tokenizer "
          f"{meta['tokenizer']['name']} (vocabulary {meta['vocab_size']})"
          + (f"; {rate:,.0f} tokens/s" if meta.get("seconds") else ""))


def run_verify(args: argparse.Namespace) -> int:
    from duollm import shards

    if not shards.is_shard_dir(args.folder):
        raise UsageError("DIR", f"{args.folder} is not a shard folder (no meta.json of "
                                f"duollm data prepare)")
    try:
        meta = shards.verify_shards(args.folder)
    except ValueError as e:
        raise UsageError("DIR", str(e).removeprefix("shards: ")) from None
    meta = dict(meta, seconds=0)
    _print_summary(args.folder, meta)
    print("checksums: all match")
    return 0


# --------------------------------------------------------------------------- --data of train


def check_data_source(option: str, source) -> None:
    """``--data``: ``default``, ``synthetic``, a shard folder (its meta.json and file sizes
    checked) or a UTF-8 text file; UsageError otherwise. Reads no tokens."""
    from duollm import shards

    if source in ("default", "synthetic"):
        return
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, shards.META)):
            raise UsageError(option, f"{source} is a folder but not a shard folder (no "
                                     f"meta.json; write one with duollm data prepare), and "
                                     f"not a text file")
        try:
            shards.read_meta(source)
        except ValueError as e:
            raise UsageError(option, str(e).removeprefix("shards: ")) from None
        return
    check_data_file(option, source)


def cli_token_data(option: str, source, val_fraction: float, tokenizer=None):
    """The ``TokenData`` a command's ``--data`` names (after ``check_data_source``).

    ``default``/``synthetic``: ``duollm.data.load_data``. A shard folder: its memory-mapped
    splits. A text file: prepared on the fly into a temporary shard folder
    (``duollm.shards.file_token_data``) with ``tokenizer`` (a ``ShardTokenizer``; bytes when
    None), its last ``val_fraction`` held out. UsageError for a corpus too short to split.
    """
    from duollm import shards
    from duollm.data import load_data

    try:
        if source in ("default", "synthetic"):
            return load_data(source, val_fraction=val_fraction)
        if shards.is_shard_dir(source):
            return shards.load_shards(source)
        return shards.file_token_data(source, val_fraction, tokenizer or "bytes")
    except ValueError as e:
        field, _, text = str(e).partition(": ")
        if field == "val_fraction":
            raise UsageError("--val-fraction", text) from None
        raise UsageError(option, text if field in ("source", "shards") else str(e)) from None
