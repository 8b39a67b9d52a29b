"""A Hugging Face tokenizer built on the spot, for tests: nothing is downloaded.

``build_tokenizer(folder)`` trains a tiny BPE (whitespace pre-tokenizer, byte fallback off,
an ``[UNK]`` token) on a few KB of the standard library's own text with the ``tokenizers``
library that ``transformers`` installs, wraps it as a ``PreTrainedTokenizerFast`` and saves it
to ``folder`` (``tokenizer.json`` and ``tokenizer_config.json``).
"""
from __future__ import annotations

import os

import pytest

tokenizers = pytest.importorskip("tokenizers", reason="the tokenizer tests need tokenizers "
                                 "(installed with transformers)")

VOCAB = 300  # above 256: a model on these ids cannot be a byte-level one


def training_text(n_chars: int = 20_000) -> str:
    """The start of the embedded pydoc corpus (CPython's help texts)."""
    from duollm.data import default_corpus_text

    return default_corpus_text()[:n_chars]


def build_tokenizer(folder, vocab_size: int = VOCAB) -> str:
    """Train and save a tiny BPE tokenizer; returns the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]"],
                                  show_progress=False)
    tok.train_from_iterator([training_text()], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    folder = os.fspath(folder)
    fast.save_pretrained(folder)
    return folder
