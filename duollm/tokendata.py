"""``TokenData``: a tokenized corpus split, in a leaf module (torch only) so that
``duollm.data`` and the synthetic corpus (``duollm.study.synthetic``) both use it without
importing each other."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenData:
    """A tokenized corpus split for training.

    Fields:
      train: (N_train,) int64 token ids.
      val:   (N_val,) int64 token ids, the text after ``train`` in the stream.
      vocab_size: ids lie in ``[0, vocab_size)``.
      name: where the text came from (for reports).
    """

    train: torch.Tensor
    val: torch.Tensor
    vocab_size: int
    name: str

    def __repr__(self) -> str:
        return (f"TokenData(name={self.name!r}, train={self.train.numel()} tokens, "
                f"val={self.val.numel()} tokens, vocab_size={self.vocab_size})")
