"""The null model: a routed model whose big FFN computes exactly what its small FFN does.

``null_model(model)`` returns a copy of a ``DuoLLM`` (or of a Hugging Face model converted by
``duollm.hf.convert``) in which every layer's big SwiGLU holds the small SwiGLU's weights
zero-padded to ``d_big``::

    big.gate_proj.weight = [small.gate_proj.weight; 0]     (d_big, d_model)
    big.up_proj.weight   = [small.up_proj.weight;   0]     (d_big, d_model)
    big.down_proj.weight = [small.down_proj.weight, 0]     (d_model, d_big)

The padded units compute ``silu(0) * 0 = 0`` and their down-projection columns are zero, so
``big(x) == small(x)``: every pattern that differs only in where big and small sit gives the
same output. The shapes (and so every FLOP count, budget and checkpoint layout) are the real
model's; attention, norms, embeddings, skip paths and the small FFNs are untouched.

Running an analysis on the null model beside the real one is the study's *null control*: any
"big helps" effect the real model shows that the null model shows as well comes from the
analysis (selection among patterns that skip, the choice of a minimum, the criterion itself),
not from the big FFN. What the null does *not* reproduce is selection among big/small patterns
whose losses differ by chance: in the null those patterns tie exactly, so for a claim that
compares big/small patterns only, the null's estimate is zero. That selection is what the
study's second control reproduces, the *relabelled table*
(``duollm.study.verdicts.relabelled_inputs``): the real model's table with its big/small
labels shuffled among the patterns that skip the same layers, so the candidates' losses
spread as on the real table while "big" carries no effect. It needs no model run and is
applied to every claim that needs big != small (docs/study.md, *The relabelled table*).
"""
from __future__ import annotations

import copy

import torch


def _pad_into(big, small) -> None:
    """Overwrite ``big``'s weights (a SwiGLU of width d_big) with ``small``'s zero-padded."""
    ds = small.gate_proj.weight.shape[0]
    with torch.no_grad():
        for name in ("gate_proj", "up_proj"):
            w = getattr(big, name).weight
            w.zero_()
            w[:ds].copy_(getattr(small, name).weight)
        w = big.down_proj.weight
        w.zero_()
        w[:, :ds].copy_(small.down_proj.weight)


def null_model(model, inplace: bool = False):
    """The null model of ``model``: its big FFNs replaced by its small FFNs zero-padded to
    ``d_big`` (module docstring), so that the all-big and all-small outputs are equal.

    Args:
      model: a ``DuoLLM``, a Hugging Face model converted by ``duollm.hf.convert`` or a
        ``duollm.stack.RoutedStack`` of one.
      inplace: overwrite ``model``'s own big weights instead of returning a copy.
    Returns: the null model (a deep copy of ``model`` unless ``inplace``), in ``model``'s
      training/eval mode, dtype and device.
    Raises: TypeError for anything ``duollm.stack.as_stack`` does not accept; ValueError when
      a layer's small FFN is not narrower than its big one, or their input widths differ.
    """
    from ..stack import RoutedStack, as_stack

    if not isinstance(inplace, bool):
        raise TypeError(f"inplace: expected a bool, got {type(inplace).__name__}")
    target = model.model if isinstance(model, RoutedStack) else model
    st = as_stack(target)  # TypeError for anything else, before any copy
    ffns = [st.ffn_module(i) for i in range(st.n_layers)]
    for i, f in enumerate(ffns):  # every check before any weight is written
        db, ds = f.big.gate_proj.weight.shape[0], f.small.gate_proj.weight.shape[0]
        if ds > db:
            raise ValueError(f"model: layer {i}'s small FFN ({ds}) is wider than its big FFN "
                             f"({db}); it cannot be zero-padded to the big width")
        if f.big.gate_proj.weight.shape[1] != f.small.gate_proj.weight.shape[1]:
            raise ValueError(f"model: layer {i}'s big and small FFNs read different widths")
        if any(p is q for p in f.big.parameters() for q in f.small.parameters()):
            raise ValueError(f"model: layer {i}'s big and small FFNs share a parameter")
    out = target if inplace else copy.deepcopy(target)
    st = as_stack(out)
    for i in range(st.n_layers):
        f = st.ffn_module(i)
        _pad_into(f.big, f.small)  # in place: dtype and device (what DuoFFN caches) unchanged
    return out
