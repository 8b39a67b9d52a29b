"""Oracle routing: the layer pattern that minimises next-token loss under a compute budget.

The study's stage 2 (``docs/study.md``, ``docs/routes-and-budgets.md``).
``search(model, tokens, budget, granularity, method, base=..., paths=...)`` returns an
``OracleResult``; ``pattern_losses`` returns every pattern's loss (a ``PatternTable``) from
one exhaustive walk, so the oracle of every budget is a cheap ``table.select(budget)``.
``model`` is a ``DuoLLM``, a Hugging Face model converted by ``duollm.hf.convert`` or a
``RoutedStack``: the oracles see a model only through ``duollm.stack``.

Variants (``tokens`` is ``(B, T)``; the model reads ``tokens[:, :-1]`` and predicts
``tokens[:, 1:]``):

* ``granularity="sequence"``: one layer pattern per sequence, run over the whole sequence;
  ``.loss`` is the sequence's mean next-token cross-entropy ``(B,)``. *Bounds*: from below,
  the mean loss of any single pattern applied to that sequence (fixed patterns, the best of N
  random patterns), even one chosen with hindsight for that sequence. *Does not bound*: per-token
  routing (a router), which may beat it.
* ``granularity="token", base="pattern"``: **the paper's oracle**. Every candidate pattern runs
  over the whole sequence (exactly the sequence walk) and each position takes the pattern with
  its lowest loss; ``.loss`` is ``(B, T-1)`` and running ``.routes[:, b, t]`` as a pattern over
  all positions gives exactly ``.loss[b, t]``. *Bounds*: per position, the loss of every
  whole-sequence pattern, so its mean is at most the sequence oracle's. *Does not bound*: a
  per-token router. The per-position choices are not jointly realisable (running each
  position's own pattern at once changes every position's context), so it is a per-position
  minimum over realisable runs, not the loss of one routing.
* ``granularity="token", base="big"`` (the default, kept for compatibility) / ``"small"`` / a
  pattern / ``(L, B, T)`` routes: the **context-fixed** oracle. The context is routed by
  ``base`` and only position ``t``'s own path changes (its earlier positions keep the base
  routes; the model is causal, so its state at layer ``l`` depends on them and on its own earlier
  layers only). The reported loss of position ``t`` is realised by ``base`` routes with column
  ``t`` replaced by ``.routes[:, b, t]``. *Bounds*: how much one token gains from its own path
  given that context (``base="small"`` is what ``duollm.difficulty`` uses). *Does not bound*:
  the paper's oracle or a router: with an all-big context the context gets more compute than
  any budgeted routing gives it (optimistic); with all-small, less (pessimistic).

No variant is the joint optimum over every position's route (that search is exponential in
T as well as in L) and none is a lower bound on what a per-token router can reach.

Methods: ``"exhaustive"`` is exact: a depth-first walk of the tree over layers whose live
branches are partial patterns; a layer's attention is computed once per branch and shared by
its children, all live branches go through a layer as one batch, and prefixes that can no longer
meet the budget are pruned. ``"beam"`` keeps the ``beam_width`` best prefixes (per sequence,
per position, or for the paper's oracle per group of positions sharing a budget), scored by
completing the remaining layers with the biggest feasible routes; a beam as wide as the number
of patterns is exhaustive. ``"greedy"`` is ``"beam"`` with width 1.

Choices: ``skip=False`` chooses among ``(SMALL, BIG)`` (2^L patterns), ``skip=True`` among
``(SKIP, SMALL, BIG)`` (3^L); ``paths=`` picks any set, e.g. ``(SKIP, BIG)`` for the big-or-skip
oracle. Budgets (``duollm.oracle.budgets``): an int k (= ``Exactly(k)``, k big layers),
``Exactly(k, route=...)``/``AtMost(k, route=...)`` (count of big, small or skipped layers),
``FlopBudget`` (FFN FLOPs, absolute or a fraction of all-big), ``PerPosition(ks)`` (token
granularity: position t's own k; ``linear_schedule`` builds decreasing/increasing ones).
"""
from .budgets import (
    AtMost,
    Budget,
    Exactly,
    FlopBudget,
    PerPosition,
    all_patterns,
    as_budget,
    linear_schedule,
    route_choices,
    route_flops,
    spec_of,
)
from .results import OracleResult, PatternTable, oracle_label
from .walk import pattern_losses, search

__all__ = ["AtMost", "Budget", "Exactly", "FlopBudget", "PerPosition", "all_patterns",
           "as_budget", "linear_schedule", "route_choices", "route_flops", "spec_of",
           "OracleResult", "PatternTable", "oracle_label", "pattern_losses", "search"]

# Public names report the public path (reprs, docs, pickles), not the private file they live in.
for _obj in (AtMost, Exactly, FlopBudget, PerPosition, all_patterns, as_budget, linear_schedule,
             route_choices, route_flops, spec_of, OracleResult, PatternTable, oracle_label,
             pattern_losses, search):
    _obj.__module__ = __name__
del _obj
