"""Tests of duollm.data: corpora, the byte tokenizer, the split and the batch samplers."""
import pydoc_data.topics

import pytest
import torch

from duollm.data import (ByteTokenizer, TokenData, default_corpus_text, eval_batches,
                         load_data, sample_batch, split_tokens)


def test_tokenizer_round_trip_unicode():
    tok = ByteTokenizer()
    text = "héllo, wörld — ∑ 🐍\n\ttabs"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    t = tok.encode(text, as_tensor=True)
    assert t.dtype == torch.int64 and t.tolist() == ids
    assert tok.decode(ids) == text
    assert tok.decode(t) == text
    assert tok.vocab_size == 256


def test_tokenizer_rejects_bad_input():
    tok = ByteTokenizer()
    with pytest.raises(TypeError, match="text"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="ids"):
        tok.decode([65, 256])
    with pytest.raises(ValueError, match="ids"):
        tok.decode(torch.zeros(2, 2, dtype=torch.int64))


def test_default_corpus_is_pydoc_topics_in_key_order():
    topics = pydoc_data.topics.topics
    text = default_corpus_text()
    assert text == "".join(topics[k] for k in sorted(topics))
    data = load_data()
    assert data.name == "pydoc-topics" and data.vocab_size == 256
    total = data.train.numel() + data.val.numel()
    assert total == len(text.encode("utf-8"))
    assert data.train.dtype == data.val.dtype == torch.int64
    assert data.train.dim() == data.val.dim() == 1
    # The split is the stream cut at 90%: train then val, contiguous, not shuffled.
    stream = torch.cat([data.train, data.val])
    assert torch.equal(stream, ByteTokenizer().encode(text, as_tensor=True))
    assert data.val.numel() == round(0.1 * total)
    assert torch.equal(load_data("default").val, data.val)  # deterministic


def test_text_file_source(tmp_path):
    path = tmp_path / "corpus.txt"
    text = "the quick brown fox jumps over the lazy dog. " * 20
    path.write_text(text, encoding="utf-8")
    data = load_data(str(path), val_fraction=0.25)
    assert isinstance(data, TokenData) and data.name == "corpus.txt"
    assert data.val.numel() == round(0.25 * len(text))
    assert ByteTokenizer().decode(torch.cat([data.train, data.val])) == text


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_data(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_data(str(empty))
    short = tmp_path / "short.txt"
    short.write_text("abc")
    with pytest.raises(ValueError, match="too short"):
        load_data(str(short))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc" * 10)
    with pytest.raises(ValueError, match="UTF-8"):
        load_data(str(binary))
    with pytest.raises(ValueError, match="directory"):
        load_data(str(tmp_path))
    with pytest.raises(ValueError, match="val_fraction"):
        split_tokens(torch.arange(100), 1.5)
    with pytest.raises(TypeError, match="source"):
        load_data(42)


def test_sample_batch_windows_are_contiguous_and_seeded():
    tokens = torch.arange(1000, dtype=torch.int64)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = sample_batch(tokens, 8, 16, g1)
    b = sample_batch(tokens, 8, 16, g2)
    assert a.shape == (8, 17) and a.dtype == torch.int64
    assert torch.equal(a, b)
    # Each row is a window of consecutive ids (tokens = arange), inside the split.
    assert torch.equal(a - a[:, :1], torch.arange(17).expand(8, 17))
    assert int(a.max()) < 1000 and int(a.min()) >= 0
    c = sample_batch(tokens, 8, 16, g1)  # the generator advanced: a new batch
    assert not torch.equal(a, c)


def test_sample_batch_reaches_both_ends():
    tokens = torch.arange(10, dtype=torch.int64)
    batch = sample_batch(tokens, 400, 8, torch.Generator().manual_seed(0))
    assert set(batch[:, 0].tolist()) == {0, 1}  # the only valid offsets for 9-token windows


def test_sample_batch_errors():
    tokens = torch.arange(10)
    with pytest.raises(ValueError, match="too short"):
        sample_batch(tokens, 2, 10)
    with pytest.raises(ValueError, match="batch_size"):
        sample_batch(tokens, 0, 4)
    with pytest.raises(ValueError, match="seq_len"):
        sample_batch(tokens, 2, -1)
    with pytest.raises(ValueError, match="tokens"):
        sample_batch(tokens.view(2, 5), 2, 2)


def test_eval_batches_fixed_and_cover_the_split():
    tokens = torch.arange(500, dtype=torch.int64)
    batches = eval_batches(tokens, 4, 31, 3)
    assert len(batches) == 3 and all(b.shape == (4, 32) for b in batches)
    again = eval_batches(tokens, 4, 31, 3)
    assert all(torch.equal(x, y) for x, y in zip(batches, again))
    starts = torch.cat(batches)[:, 0]
    assert int(starts[0]) == 0 and int(starts[-1]) == 500 - 32  # first and last window
    assert bool((starts[1:] > starts[:-1]).all())
    with pytest.raises(ValueError, match="n_batches"):
        eval_batches(tokens, 4, 31, 0)
    with pytest.raises(ValueError, match="too short"):
        eval_batches(tokens[:10], 1, 31, 1)


def test_synthetic_corpus_does_not_import_data():
    """data -> study.synthetic -> tokendata: the synthetic corpus builds its TokenData without
    importing duollm.data, so the two modules no longer import each other."""
    import subprocess
    import sys

    code = ("import sys, duollm.study.synthetic as s; "
            "d = s.make_synthetic_data(n_tokens=100); "
            "print('duollm.data' in sys.modules, type(d).__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "duollm.tokendata"]
    assert load_data("synthetic", val_fraction=0.2).val.numel() == 60_000


def test_synthetic_source_real_module():
    data = load_data("synthetic")
    assert isinstance(data, TokenData) and data.vocab_size == 256
    assert data.train.dtype == torch.int64 and data.val.numel() > 0
