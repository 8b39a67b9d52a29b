"""Brute-force oracles for the tests: enumerate every pattern, run the model's own plain forward
(``RoutedStack.token_losses``) on the whole sequence, take the minimum. Shared by the oracle,
difficulty and router tests; independent of ``duollm.oracle``'s walk, pruning and budget code."""
import itertools

import torch

from duollm.config import swiglu_flops
from duollm.oracle import AtMost, Exactly, FlopBudget, PerPosition
from duollm.reference import BIG
from duollm.stack import as_stack


def every_pattern(n_layers, choices):
    """(n, n_layers) int64: every pattern over ``choices``."""
    return torch.tensor(list(itertools.product(choices, repeat=n_layers)),
                        dtype=torch.int64).view(-1, n_layers)


def meets(model, pats, budget, n_positions=None):
    """Which patterns meet ``budget``, counted directly: (n,) bool, or (n, T-1) for a
    per-position budget."""
    if isinstance(budget, int):
        budget = Exactly(budget)
    if isinstance(budget, Exactly):
        return (pats == budget.route).sum(1) == budget.k
    if isinstance(budget, AtMost):
        return (pats == budget.route).sum(1) <= budget.k
    if isinstance(budget, FlopBudget):
        s = as_stack(model)
        small, big = swiglu_flops(s.d_model, s.d_small), swiglu_flops(s.d_model, s.d_big)
        flops = ((pats == BIG) * big + (pats == 1) * small).sum(1).double()
        cap = (budget.max_flops_per_token if budget.fraction is None
               else budget.fraction * s.n_layers * big)
        return flops <= cap * (1 + 1e-9)
    if isinstance(budget, PerPosition):
        ks = torch.tensor(budget.ks)
        count = (pats == budget.route).sum(1, keepdim=True)  # (n, 1)
        return count == ks if budget.kind == "exactly" else count <= ks
    raise TypeError(budget)


@torch.no_grad()
def whole_sequence_losses(model, tokens, pats):
    """(n, B, T-1): each pattern run over the whole sequence, one plain forward for all."""
    stack = as_stack(model)
    n, L = pats.shape
    B, T = tokens.shape
    routes = pats.t()[:, :, None, None].expand(L, n, B, T).reshape(L, n * B, T)
    toks = tokens[None].expand(n, B, T).reshape(n * B, T)
    return stack.token_losses(toks, routes).view(n, B, T - 1)


def masked_min(losses, mask):
    """Per-position minimum (B, T-1) of losses (n, B, T-1) over patterns where mask holds."""
    m = mask[:, None, None] if mask.dim() == 1 else mask[:, None, :]
    return torch.where(m, losses, torch.tensor(float("inf"))).min(0).values


def sequence_min(losses, mask):
    """(B,) minimum over patterns in mask of each sequence's mean loss."""
    return torch.where(mask[:, None], losses.mean(-1), torch.tensor(float("inf"))).min(0).values


@torch.no_grad()
def context_losses(model, tokens, pats, base="big"):
    """(n, B, T-1): position t re-routed by pattern p, every other position by ``base``; one
    batched plain forward over every (pattern, position, sequence) variant."""
    stack = as_stack(model)
    n, L = pats.shape
    B, T = tokens.shape
    base_r = stack.resolve(base, B, T)
    routes = base_r[:, None, None].expand(L, n, T - 1, B, T).clone()  # (L, n, t, B, T)
    for t in range(T - 1):
        routes[:, :, t, :, t] = pats.t()[:, :, None]
    flat = routes.reshape(L, n * (T - 1) * B, T)
    toks = tokens[None, None].expand(n, T - 1, B, T).reshape(-1, T)
    losses = stack.token_losses(toks, flat).view(n, T - 1, B, T - 1)
    idx = torch.arange(T - 1)
    return losses[:, idx, :, idx].permute(1, 2, 0)  # (n, B, T-1)
