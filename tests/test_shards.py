"""Token shards (``duollm.shards``, ``duollm data``): written by streaming, read by memory map.

Round trips for both id widths and both tokenizers (bytes, and a BPE tokenizer built here
from the standard library's text), random access across shard boundaries equal to the
in-memory stream, a bounded memory footprint while writing and sampling, checksums, the
command line, and ``duollm train`` on a shard folder.
"""
import json
import os
import sys
import tracemalloc

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from duollm import shards  # noqa: E402
from duollm.cli import main  # noqa: E402
from duollm.data import (ByteTokenizer, eval_batches, load_data, sample_batch,  # noqa: E402
                         split_tokens)

TEXT_A = "The quick brown fox jumps over the lazy dog.\nÜnïcödé line — “quoted”.\n" * 300
TEXT_B = "def f(x):\n    return x * 2  # twice\n" * 400


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    a, b = root / "a.txt", root / "b.txt"
    a.write_text(TEXT_A, encoding="utf-8")
    b.write_text(TEXT_B, encoding="utf-8")
    return root, [str(a), str(b)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from local_tokenizer import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tok") / "bpe")


def _expected_ids(tokenizer, texts):
    if tokenizer == "bytes":
        return np.frombuffer("".join(texts).encode("utf-8"), dtype=np.uint8).astype(np.int64)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    return np.concatenate([np.asarray(tok(t, add_special_tokens=False)["input_ids"])
                           for t in texts]).astype(np.int64)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
@pytest.mark.parametrize("kind", ["bytes", "hf"])
def test_round_trip(corpus, tokenizer_dir, tmp_path, dtype, kind):
    root, inputs = corpus
    tokenizer = "bytes" if kind == "bytes" else tokenizer_dir
    expected = _expected_ids(tokenizer, [TEXT_A, TEXT_B])
    shard_tokens = len(expected) // 5 - 7  # 5 full shards and a partial last one
    out = tmp_path / "shards"
    # chunks of 1 KB: many chunk boundaries, each cut after a newline
    meta = shards.prepare_shards(inputs, out, tokenizer, shard_tokens=shard_tokens,
                                 dtype=dtype, val_shards=2, chunk_bytes=1024)
    assert meta["dtype"] == dtype and meta["tokens"]["total"] == len(expected)
    assert meta["vocab_size"] == (256 if kind == "bytes" else 300)
    assert meta["tokenizer"]["kind"] == kind
    assert [s["tokens"] for s in meta["shards"]] == [shard_tokens] * 5 + [len(expected)
                                                                          - 5 * shard_tokens]
    assert [s["split"] for s in meta["shards"]] == ["train"] * 4 + ["val"] * 2
    assert sum(x["tokens"] for x in meta["inputs"]) == len(expected)
    for s in meta["shards"]:  # the files are what meta.json says: raw little-endian ids
        raw = (out / s["file"]).read_bytes()
        assert len(raw) == s["tokens"] * np.dtype(dtype).itemsize
    assert json.loads((out / shards.META).read_text()) == meta
    opened = shards.open_shards(out)
    stream = torch.cat([opened.train.read(), opened.val.read()])
    assert torch.equal(stream, torch.from_numpy(expected))
    assert opened.train.numel() == meta["tokens"]["train"] == 4 * shard_tokens
    shards.verify_shards(out)
    if kind == "bytes":
        assert ByteTokenizer().decode(stream) == TEXT_A + TEXT_B
        assert opened.tokenizer_dir is None
    else:  # the folder carries its tokenizer, which encodes as the source does
        from transformers import AutoTokenizer

        saved = AutoTokenizer.from_pretrained(opened.tokenizer_dir, local_files_only=True)
        source = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        assert shards.tokenizers_agree(saved, source)


def test_random_access_equals_the_in_memory_stream(corpus, tmp_path):
    _, inputs = corpus
    out = tmp_path / "shards"
    shards.prepare_shards(inputs, out, shard_tokens=997, val_shards=1)  # many boundaries
    data = load_data(str(out))
    assert data.vocab_size == 256 and isinstance(data.train, shards.ShardedTokens)
    train = data.train.read()
    assert train.numel() == data.train.numel() and train.dtype == torch.int64
    for seed in range(3):
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert torch.equal(sample_batch(data.train, 16, 64, g1), sample_batch(train, 16, 64, g2))
    val = data.val.read()
    for a, b in zip(eval_batches(data.val, 4, 32, 3), eval_batches(val, 4, 32, 3)):
        assert torch.equal(a, b)
    # ints, slices (views) and out-of-range indices
    assert data.train[0] == int(train[0]) and data.train[-1] == int(train[-1])
    view = data.train[1000:3000]
    assert isinstance(view, shards.ShardedTokens) and torch.equal(view.read(), train[1000:3000])
    assert torch.equal(view[torch.tensor([[0, 1999], [5, 6]])],
                       train[1000:3000][torch.tensor([[0, 1999], [5, 6]])])
    with pytest.raises(IndexError):
        view[torch.tensor([2000])]
    with pytest.raises(IndexError):
        data.train[data.train.numel()]


def test_memory_stays_below_a_shard_when_writing_and_sampling(tmp_path):
    # 3 MB of text, shards of 2M uint32 ids (8 MB each): neither writing (chunks of 64 KB)
    # nor sampling may hold a shard's worth of memory, let alone the corpus (24 MB as int64).
    path = tmp_path / "big.txt"
    line = "abcdefghijklmnopqrstuvwxyz0123456789 the lazy dog\n"
    with open(path, "w") as f:
        for _ in range(3_000_000 // len(line)):
            f.write(line)
    shard_bytes = 2_000_000 * 4
    tracemalloc.start()
    try:
        shards.prepare_shards([str(path)], tmp_path / "s", shard_tokens=2_000_000,
                              dtype="uint32", val_shards=1, chunk_bytes=1 << 16)
        _, write_peak = tracemalloc.get_traced_memory()
        data = load_data(str(tmp_path / "s"))
        g = torch.Generator().manual_seed(0)
        sample_batch(data.train, 8, 256, g)  # first calls import and cache what they use
        eval_batches(data.val, 8, 256, 4)
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        for _ in range(20):
            sample_batch(data.train, 8, 256, g)
        eval_batches(data.val, 8, 256, 4)
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # measured: a peak of 1.3 MB writing (a 64 KB chunk as text, int64 ids and bytes) and
    # 0.35 MB above the baseline sampling; reading a whole shard would allocate >= 8 MB.
    assert write_peak < shard_bytes / 4, write_peak
    assert read_peak - base < shard_bytes / 8, read_peak - base


def test_bad_arguments_write_nothing(corpus, tmp_path):
    _, inputs = corpus
    out = tmp_path / "never"
    size = sum(os.path.getsize(p) for p in inputs)
    with pytest.raises(ValueError, match="shard_tokens.*lower shard_tokens"):
        shards.prepare_shards(inputs, out, shard_tokens=size, val_shards=1)  # one shard
    big = shards.ShardTokenizer("bytes", "wide", 70_000)
    with pytest.raises(ValueError, match="uint16 cannot hold"):
        shards.prepare_shards(inputs, out, big, dtype="uint16")
    with pytest.raises(ValueError, match="val_shards"):
        shards.prepare_shards(inputs, out, val_shards=0)
    with pytest.raises(ValueError, match="no such file"):
        shards.prepare_shards([str(tmp_path / "missing.txt")], out)
    with pytest.raises(ValueError, match="no such folder"):
        shards.load_tokenizer(str(tmp_path / "nowhere"))
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe")
    with pytest.raises(ValueError, match="UTF-8"):
        shards.prepare_shards([str(tmp_path / "bad.txt")], out, shard_tokens=2)
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".never")]  # no temp left
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(ValueError, match="not an empty folder"):
        shards.prepare_shards(inputs, full, shard_tokens=1000)


def test_damage_is_found(corpus, tmp_path):
    _, inputs = corpus
    out = tmp_path / "s"
    shards.prepare_shards(inputs, out, shard_tokens=5000)
    f = out / "shard_00001.bin"
    raw = bytearray(f.read_bytes())
    raw[10] ^= 1
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        shards.verify_shards(out)
    f.write_bytes(bytes(raw[:-2]))
    with pytest.raises(ValueError, match="damaged"):
        shards.open_shards(out)


def test_file_token_data_keeps_the_text_file_split(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT_A, encoding="utf-8")
    data = shards.file_token_data(str(path), 0.25)
    ref_train, ref_val = split_tokens(ByteTokenizer().encode(TEXT_A, as_tensor=True), 0.25)
    assert torch.equal(data.train.read(), ref_train) and torch.equal(data.val.read(), ref_val)
    assert data.vocab_size == 256 and data.name == "corpus.txt"
    (tmp_path / "short.txt").write_text("abc")
    with pytest.raises(ValueError, match="too short"):
        shards.file_token_data(str(tmp_path / "short.txt"), 0.1)


# --------------------------------------------------------------------------- command line


def _usage_error(capsys, argv, option):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"error: {option}:" in err and "Traceback" not in err, err
    return err


def test_data_prepare_and_verify_cli(corpus, tokenizer_dir, tmp_path, capsys):
    _, inputs = corpus
    out = tmp_path / "s"
    assert main(["data", "prepare", "--tokenizer", tokenizer_dir, "--input", *inputs,
                 "--out", str(out), "--shard-tokens", "2000", "--val-shards", "1",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "tokenizer bpe (vocabulary 300)" in text and "tokens/s" in text
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"]["name"] == "bpe" and meta["dtype"] == "uint16"
    assert main(["data", "verify", str(out)]) == 0
    assert "checksums: all match" in capsys.readouterr().out


def test_data_prepare_refuses_mistakes_before_writing(corpus, tmp_path, capsys):
    _, inputs = corpus
    out = tmp_path / "never"
    base = ["data", "prepare", "--input", *inputs, "--out", str(out), "--no-progress"]
    _usage_error(capsys, base + ["--shard-tokens", "0"], "--shard-tokens")
    _usage_error(capsys, base + ["--shard-tokens", "10000000"], "--shard-tokens")
    _usage_error(capsys, base + ["--val-shards", "0"], "--val-shards")
    _usage_error(capsys, base + ["--tokenizer", str(tmp_path / "nowhere")], "--tokenizer")
    _usage_error(capsys, base + ["--tokenizer", str(tmp_path)], "--tokenizer")  # no files
    _usage_error(capsys, ["data", "prepare", "--input", str(tmp_path / "missing"), "--out",
                          str(out)], "--input")
    assert not out.exists()
    _usage_error(capsys, ["data", "verify", str(tmp_path)], "DIR")


def test_train_reads_a_shard_folder_with_its_vocabulary(corpus, tokenizer_dir, tmp_path,
                                                         capsys):
    _, inputs = corpus
    out = tmp_path / "s"
    shards.prepare_shards(inputs, out, tokenizer_dir, shard_tokens=1500, val_shards=1)
    argv = ["train", "--data", str(out), "--steps", "2", "--batch-size", "2", "--seq-len",
            "16", "--eval-batches", "1", "--no-progress", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    assert "vocabulary 300" in capsys.readouterr().out
    from duollm.checkpoint import load_checkpoint
    from duollm.train import latest_checkpoint

    model, _ = load_checkpoint(latest_checkpoint(str(tmp_path / "run")))
    assert model.config.vocab_size == 300  # the tokenizer's, not 256
    # its ids are the tokenizer's: the study refuses it on byte holdouts, before writing
    never = tmp_path / "never"
    err = _usage_error(capsys, ["study", "--checkpoint", str(tmp_path / "run"), "--quick",
                                "--out", str(never), "--no-progress"], "--data")
    assert "vocabulary of 300" in err and not never.exists()
    # a folder that is not a shard folder, and a damaged one, are refused up front
    _usage_error(capsys, ["train", "--data", str(tmp_path), "--steps", "1"], "--data")
    os.remove(out / "shard_00000.bin")
    _usage_error(capsys, ["train", "--data", str(out), "--steps", "1"], "--data")
