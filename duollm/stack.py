"""The routed stack: the narrow interface over "a decoder whose FFNs route".

The oracle, token difficulty and the routers never reach into a model's attention. They see a
model only through ``RoutedStack`` (``docs/architecture.md``): embed the tokens, run layer
``i``'s attention step, run layer ``i``'s routed FFN step, apply the head. ``DuoLLM`` provides it
through ``DuoStack``; a Hugging Face model converted by ``duollm.hf.convert`` provides it through
``duollm.hf``'s own stack. ``as_stack(model)`` returns the stack of either.

Routes forms (shared by ``DuoLLM.forward``, ``duollm.hf.routing`` and ``RoutedStack.forward``):

* a ``(n_layers, B, T)`` integer tensor: one route per token per layer;
* a ``(n_layers,)`` tensor or list: one route per layer for every token (a pattern);
* a router: any callable ``router(layer, hidden) -> routes`` (or ``(routes, gate)``) with
  ``hidden`` the ``(B, T, d_model)`` input of that layer's FFN and routes ``(B, T)``;
* a named policy: ``"big"``, ``"small"``, ``"skip"`` or ``"random"`` (drawn per token and layer
  from ``probs = (p_skip, p_small, p_big)``; pass ``generator=`` to seed it).
"""
from __future__ import annotations

import abc
import math
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .reference import BIG, SKIP, SMALL  # noqa: F401
from .routes import (  # noqa: F401  (re-exported: duollm.stack's documented names)
    POLICIES, Routes, layer_routes, random_routes, resolve_routes, use_saved_router)


# --------------------------------------------------------------------------- attention helper


def context_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      k_ctx: torch.Tensor, v_ctx: torch.Tensor) -> torch.Tensor:
    """Attention where position t sees the context's positions < t and its own key at t.

    Args:
      q, k, v: (W, B, H, T, hd), rotary embeddings applied; W branches of B sequences.
      k_ctx, v_ctx: (B, H, T, hd), the context's keys and values (shared by every branch).
    Returns: (W, B, H, T, hd).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    T = q.shape[-2]
    s = torch.einsum("wbhtd,bhsd->wbhts", q, k_ctx) * scale  # (W, B, H, T, T)
    s_self = (q * k).sum(-1) * scale  # (W, B, H, T)
    pos = torch.arange(T, device=q.device)
    earlier = pos[None, :] < pos[:, None]  # (T, T): key s strictly before query t
    eye = pos[None, :] == pos[:, None]
    s = torch.where(eye, s_self[..., None], s.masked_fill(~earlier, -math.inf))
    p = torch.softmax(s.float(), -1).to(q.dtype)
    p_self = p.diagonal(dim1=-2, dim2=-1)  # (W, B, H, T)
    out = torch.einsum("wbhts,bhsd->wbhtd", p.masked_fill(eye, 0.0), v_ctx)
    return out + p_self[..., None] * v


# --------------------------------------------------------------------------- the interface


class RoutedStack(abc.ABC):
    """A decoder whose FFNs route, seen layer by layer.

    Attributes: ``model`` (the wrapped ``nn.Module``), ``n_layers``, ``d_model``,
    ``vocab_size``, ``d_big``, ``d_small``, ``skip`` (whether route SKIP is allowed), ``probs``
    (``(p_skip, p_small, p_big)`` of the ``"random"`` policy).

    Hidden states ``h`` have shape ``(*lead, T, d_model)``: any number of leading batch
    dimensions, each row an ordinary sequence of positions ``0..T-1``.
    """

    model: torch.nn.Module
    n_layers: int
    d_model: int
    vocab_size: int
    d_big: int
    d_small: int
    skip: bool
    probs: Tuple[float, float, float]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @abc.abstractmethod
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 -> (B, T, d_model) input of layer 0."""

    @abc.abstractmethod
    def attend(self, i: int, h: torch.Tensor):
        """``h + attention_i(norm(h))``: causal self-attention of each row, h (*lead, T, d)."""

    @abc.abstractmethod
    def attend_record(self, i: int, h: torch.Tensor):
        """Like ``attend`` for h (B, T, d), also returning layer i's keys/values as an opaque
        context object for ``attend_in_context``."""

    @abc.abstractmethod
    def attend_in_context(self, i: int, h: torch.Tensor, context) -> torch.Tensor:
        """h (W, B, T, d): position t of every branch attends to the recorded context's
        positions < t and to its own key at t (not to the branch's other positions)."""

    @abc.abstractmethod
    def ffn_module(self, i: int):
        """Layer i's ``DuoFFN`` (its ``.big`` and ``.small`` SwiGLU modules)."""

    @abc.abstractmethod
    def ffn_input(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """The FFN's input at layer i (the normed h): what a router sees."""

    def ffn(self, i: int, h: torch.Tensor, route, gate: Optional[torch.Tensor] = None,
            backend: Optional[str] = None, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``h + gate * FFN_route(ffn_input(h))`` at layer i.

        ``route``: an int (every token takes that path) or a ``h.shape[:-1]`` tensor. ``x``:
        the FFN input when the caller already has it.
        """
        x = self.ffn_input(i, h) if x is None else x
        ffn = self.ffn_module(i)
        if isinstance(route, int) and gate is None:
            if route == SKIP:
                return h
            mod = ffn.big if route == BIG else ffn.small
            return h + mod(x, backend=backend)
        return ffn(x, route, residual=h, gate=gate, backend=backend)

    @abc.abstractmethod
    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (*lead, T, vocab_size) of the last layer's output."""

    # ---------------------------------------------------------------- built on the above

    def resolve(self, routes: Routes, B: int, T: int,
                generator: Optional[torch.Generator] = None):
        routes = use_saved_router(self.model, routes)
        return resolve_routes(routes, self.n_layers, B, T, self.device, generator, self.probs)

    def forward(self, tokens: torch.Tensor, routes: Routes = "big", *,
                generator: Optional[torch.Generator] = None, backend: Optional[str] = None,
                return_hidden: bool = False):
        """Logits (B, T, V) of tokens (B, T) under ``routes`` (any routes form), no cache.

        ``return_hidden=True`` also returns the list of each FFN's (B, T, d) input.
        """
        B, T = tokens.shape
        plan = self.resolve(routes, B, T, generator)
        h = self.embed(tokens)
        hidden: List[torch.Tensor] = []
        for i in range(self.n_layers):
            h = self.attend(i, h)
            x = self.ffn_input(i, h)
            if return_hidden:
                hidden.append(x)
            r, gate = layer_routes(plan, i, x)
            h = self.ffn(i, h, r, gate=gate, backend=backend, x=x)
        logits = self.head(h)
        return (logits, hidden) if return_hidden else logits

    __call__ = forward

    def token_losses(self, tokens: torch.Tensor, routes: Routes = "big",
                     **kw) -> torch.Tensor:
        """Next-token cross-entropy of each position, (B, T-1), predicting ``tokens[:, 1:]``."""
        if isinstance(routes, torch.Tensor) and routes.dim() == 3:
            routes = routes[:, :, :-1]
        logits = self.forward(tokens[:, :-1], routes, **kw)
        return F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none")


# --------------------------------------------------------------------------- DuoLLM


class DuoStack(RoutedStack):
    """``RoutedStack`` of a ``DuoLLM``: every step calls the model's own modules."""

    def __init__(self, model):
        c = model.config
        self.model = model
        self.n_layers, self.d_model, self.vocab_size = c.n_layers, c.d_model, c.vocab_size
        self.d_big, self.d_small, self.skip = c.d_big, c.d_small, c.skip
        self.probs = (c.p_skip, c.p_small, c.p_big)

    def embed(self, tokens):
        return self.model.embed(tokens)

    def _rope(self, T: int) -> torch.Tensor:
        return self.model.rope[:T]

    def attend(self, i, h):
        layer = self.model.layers[i]
        lead, (T, d) = h.shape[:-2], h.shape[-2:]
        out = layer.attn(layer.attn_norm(h.reshape(-1, T, d)), self._rope(T), i, None)
        return h + out.view(*lead, T, d)

    def attend_record(self, i, h):
        layer = self.model.layers[i]
        T = h.shape[-2]
        q, k, v = layer.attn.qkv(layer.attn_norm(h), self._rope(T))  # (B, H, T, hd)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return h + layer.attn.out(out), (k, v)

    def attend_in_context(self, i, h, context):
        layer = self.model.layers[i]
        T = h.shape[-2]
        q, k, v = layer.attn.qkv(layer.attn_norm(h), self._rope(T))  # (W, B, H, T, hd)
        return h + layer.attn.out(context_attention(q, k, v, *context))

    def ffn_module(self, i):
        return self.model.layers[i].ffn

    def ffn_input(self, i, h):
        return self.model.layers[i].ffn_norm(h)

    def head(self, h):
        return self.model.lm_head(self.model.norm(h))


# --------------------------------------------------------------------------- lookup

# (predicate, factory) pairs: modules that make other models routable register here
# (``duollm.hf`` does on import), so this module needs none of their imports.
_FACTORIES: List[Tuple[Callable[[object], bool], Callable[[object], RoutedStack]]] = []


def register_stack(predicate: Callable[[object], bool],
                   factory: Callable[[object], RoutedStack]) -> None:
    """Make ``as_stack`` wrap models for which ``predicate(model)`` holds with ``factory``."""
    _FACTORIES.append((predicate, factory))


def as_stack(model) -> RoutedStack:
    """The ``RoutedStack`` of ``model``: a ``DuoLLM``, a converted HF model or a stack."""
    from .model import DuoLLM

    if isinstance(model, RoutedStack):
        return model
    if isinstance(model, DuoLLM):
        return DuoStack(model)
    for predicate, factory in _FACTORIES:
        if predicate(model):
            return factory(model)
    raise TypeError(f"model: expected a DuoLLM, a Hugging Face model converted by "
                    f"duollm.hf.convert, or a RoutedStack, got {type(model).__name__}")
