"""``HFStack``: the ``RoutedStack`` of a converted Hugging Face model.

Every step calls the HF decoder layer's own modules (``input_layernorm``, ``self_attn`` with the
model's ``rotary_emb``, ``post_attention_layernorm``, the converted ``mlp``, the final ``norm``
and ``lm_head``), so the oracle, token difficulty and the routers see exactly the model HF runs:
q/k norms (Qwen3), grouped-query heads, attention biases (Qwen2) and sliding windows (Mistral)
are HF's code, not a copy of it. The context attention of the oracle (``attend_in_context``)
hands HF's attention a small cache object whose ``update`` returns the recorded context's keys
and values followed by the branch's own, and a mask where query t sees context positions < t
and its own key. See ``docs/hf.md``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..hf_compat import cache_keyword
from ..stack import RoutedStack
from .convert import decoder_layers
from .routing import spec_of

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")  # the ones that honour an explicit additive mask
# The pre-norm decoder HFStack replays step by step. convert accepts any SwiGLU MLP, but the
# stack would silently compute another model for a layer built otherwise (post-norms as in
# OLMo2, parallel attention and MLP as in Cohere), so it checks the modules by name.
LAYER_MODULES = {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}
BASE_MODULES = {"embed_tokens", "layers", "norm", "rotary_emb"}


class _KVTap:
    """A stand-in for an HF ``Cache`` (HF attention calls only its ``update``).

    Without a context it records the layer's keys/values (rotary and any q/k norm applied,
    (B, H_kv, T, hd)) and returns them unchanged; with a context ``(k, v)`` of B sequences it
    returns ``cat([context, own], seq dim)`` for W * B branch rows (the context repeated per
    branch), so the attention sees 2T keys: the context's, then the branch's own.
    """

    def __init__(self, context: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        self.context = context
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    def update(self, key_states, value_states, *args, **kwargs):
        if self.context is None:
            self.k, self.v = key_states, value_states
            return key_states, value_states
        k_ctx, v_ctx = self.context  # (B, H_kv, T, hd)
        W = key_states.shape[0] // k_ctx.shape[0]
        return (torch.cat([k_ctx.repeat(W, 1, 1, 1), key_states], dim=2),
                torch.cat([v_ctx.repeat(W, 1, 1, 1), value_states], dim=2))


def _cache_kwarg(attn: nn.Module) -> str:
    # transformers renamed past_key_values to cache (5.25); pass whichever this class takes.
    return cache_keyword(attn.forward)


def _check_structure(model: nn.Module) -> None:
    base = {name for name, _ in model.model.named_children()}
    if base != BASE_MODULES:
        raise ValueError(f"model: the RoutedStack of a converted model needs a decoder made of "
                         f"{sorted(BASE_MODULES)}, {type(model.model).__name__} has "
                         f"{sorted(base)}")
    for i, layer in enumerate(decoder_layers(model)):
        names = {name for name, _ in layer.named_children()}
        if names != LAYER_MODULES:
            raise ValueError(f"model layer {i}: the RoutedStack replays pre-norm layers made of "
                             f"{sorted(LAYER_MODULES)}; {type(layer).__name__} has "
                             f"{sorted(names)}")


class HFStack(RoutedStack):
    """``RoutedStack`` of a ``...ForCausalLM`` converted by ``duollm.hf.convert``."""

    def __init__(self, model: nn.Module):
        spec = spec_of(model)
        lm_head = getattr(model, "lm_head", None)
        if not isinstance(lm_head, nn.Module) or not hasattr(getattr(model, "model", None),
                                                            "embed_tokens"):
            raise TypeError(f"model: the RoutedStack of a converted model needs a ...ForCausalLM "
                            f"(model.model.embed_tokens and model.lm_head), got "
                            f"{type(model).__name__}")
        _check_structure(model)
        impl = getattr(model.config, "_attn_implementation", None) or "eager"
        if impl not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"model: attn_implementation {impl!r} ignores explicit attention "
                             f"masks; load the model with attn_implementation='sdpa' or 'eager'")
        self.model = model
        self.base = model.model
        self.layers = decoder_layers(model)
        self.n_layers, self.d_model = spec.n_layers, spec.d_model
        self.vocab_size = lm_head.weight.shape[0]
        self.d_big, self.d_small, self.skip = spec.d_big, spec.d_small, spec.skip
        self.probs = spec.probs
        self._cache_kw = [_cache_kwarg(layer.self_attn) for layer in self.layers]

    # ---------------------------------------------------------------- helpers

    def _window(self, i: int) -> Optional[int]:
        attn = self.layers[i].self_attn
        if hasattr(attn, "sliding_window"):  # Qwen2/Qwen3: per layer type
            return attn.sliding_window
        return getattr(self.model.config, "sliding_window", None)  # Mistral: every layer

    def _mask(self, i: int, T: int, context: bool, like: torch.Tensor) -> torch.Tensor:
        """Additive (1, 1, T, S) mask: 0 where query t may look, the dtype's min elsewhere.

        S = T (causal) or 2T (the context's T keys, then the branch's own T keys)."""
        pos = torch.arange(T, device=like.device)
        q, k = pos[:, None], pos[None, :]
        window = self._window(i)
        near = (q - k < window) if window is not None else torch.ones(T, T, dtype=torch.bool,
                                                                       device=like.device)
        if context:
            seen = torch.cat([(k < q) & near, q == k], dim=1)  # (T, 2T)
        else:
            seen = (k <= q) & near
        mask = torch.zeros(seen.shape, dtype=like.dtype, device=like.device)
        return mask.masked_fill(~seen, torch.finfo(like.dtype).min)[None, None]

    def _attention(self, i: int, h: torch.Tensor, cache, context: bool) -> torch.Tensor:
        """Layer i's attention output (not yet added to h) for h (N, T, d)."""
        layer = self.layers[i]
        T = h.shape[-2]
        position_ids = torch.arange(T, device=h.device)[None]  # (1, T)
        x = layer.input_layernorm(h)
        cos_sin = self.base.rotary_emb(x, position_ids)
        out, _ = layer.self_attn(hidden_states=x, position_embeddings=cos_sin,
                                 attention_mask=self._mask(i, T, context, x),
                                 **{self._cache_kw[i]: cache})
        return out

    # ---------------------------------------------------------------- the interface

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.base.embed_tokens(tokens)

    def attend(self, i, h):
        lead, (T, d) = h.shape[:-2], h.shape[-2:]
        out = self._attention(i, h.reshape(-1, T, d), None, context=False)
        return h + out.view(*lead, T, d)

    def attend_record(self, i, h):
        tap = _KVTap()
        out = self._attention(i, h, tap, context=False)
        return h + out, (tap.k, tap.v)

    def attend_in_context(self, i, h, context):
        W, B, T, d = h.shape
        out = self._attention(i, h.reshape(W * B, T, d), _KVTap(context), context=True)
        return h + out.view(W, B, T, d)

    def ffn_module(self, i):
        return self.layers[i].mlp

    def ffn_input(self, i, h):
        return self.layers[i].post_attention_layernorm(h)

    def head(self, h):
        return self.model.lm_head(self.base.norm(h))
