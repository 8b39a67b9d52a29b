"""Runs a routed stack layer by layer on a batch of branches (W, B, T, d) for the oracles."""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from ..stack import RoutedStack

# Heads are not part of the stack interface; the chunk size of context attention assumes up to
# this many, so a (W, B, H, T, T) score tensor stays within ``max_elems`` for typical models.
_ASSUMED_HEADS = 16


class Runner:
    """One search's view of the stack.

    ``mode="rows"``: each (w, b) row is an ordinary causal sequence routed by one pattern (the
    sequence oracle and the paper's token oracle). ``mode="context"``: each (w, b, t) element is
    position t of sequence b with its own route history; it attends to the recorded base run's
    keys/values of positions < t and to its own (the fixed-context token oracle).
    """

    def __init__(self, stack: RoutedStack, tokens: torch.Tensor, mode: str, base,
                 max_elems: int):
        self.stack, self.mode, self.max_elems = stack, mode, max_elems
        self.inp, self.tgt = tokens[:, :-1], tokens[:, 1:]  # (B, T-1)
        B, T = self.inp.shape
        self.B, self.T = B, T
        self.h0 = stack.embed(self.inp)[None]  # (1, B, T, d)
        self.base_routes = None
        self.contexts: List[object] = []
        if mode == "context":
            plan = stack.resolve(base, B, T + 1)
            if not isinstance(plan, torch.Tensor):
                raise TypeError("base: expected a policy name, a (n_layers,) pattern or "
                                "(n_layers, B, T) routes, not a router")
            self.base_routes = plan.to(torch.int64).clone()  # (L, B, T+1)
            h = self.h0[0]
            for i in range(stack.n_layers):
                h, ctx = stack.attend_record(i, h)
                self.contexts.append(ctx)
                h = stack.ffn(i, h, self.base_routes[i, :, :T])

    def chunks(self, W: int, per_branch: int):
        step = max(1, self.max_elems // max(1, per_branch))
        return [slice(s, min(W, s + step)) for s in range(0, W, step)]

    def attend(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Layer i's attention step on h (W, B, T, d)."""
        if self.mode == "rows":
            return self.stack.attend(i, h)
        per_branch = self.B * _ASSUMED_HEADS * self.T * self.T
        return torch.cat([self.stack.attend_in_context(i, h[sl], self.contexts[i])
                          for sl in self.chunks(h.shape[0], per_branch)], 0)

    def ffn(self, i: int, h: torch.Tensor, route) -> torch.Tensor:
        """Layer i's FFN step; ``route`` an int or a (W, B, T) tensor."""
        return self.stack.ffn(i, h, route)

    def losses(self, h: torch.Tensor) -> torch.Tensor:
        """(W, B, T) per-position next-token cross-entropy, float32."""
        out = []
        for sl in self.chunks(h.shape[0], self.B * self.T * self.stack.vocab_size):
            logits = self.stack.head(h[sl]).float()  # (w, B, T, V)
            w = logits.shape[0]
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                 self.tgt.expand(w, -1, -1).reshape(-1), reduction="none")
            out.append(ce.view(w, self.B, self.T))
        return torch.cat(out, 0)
