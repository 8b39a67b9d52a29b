"""The study's oracle table with memory per rank that shrinks with the ranks, and resumable.

``duollm.study.parallel.sharded_pattern_losses`` walks a share of the sequences on each
``torchrun`` rank and then gathers the whole float64 table (patterns x sequences x positions)
onto every rank: at the paper's size (4,096 patterns x 1,024 x 1,024 positions, twice) that is
about 137 GB per holdout on each. Here each rank keeps only its own sequences' losses
(``LocalTable``) and the ranks exchange *sufficient statistics*, each far smaller than the
table and independent of the number of ranks:

* ``seq_means``: the mean loss of every pattern on every sequence, (n, B): the best fixed and
  random patterns (chosen on the selection split), all big, all small, and every bootstrap
  over sequences (a bootstrap resamples sequences, so per-sequence values suffice);
* ``oracle(mask)``: the per-token minimum over the allowed patterns and its argmin, (B, T-1)
  each, for a per-pattern or per-position (budget) mask: the oracle's losses, its usage per
  layer and position (``patterns[argmin]``), and the per-position budgets;
* ``token_losses(i)``: one pattern's per-token losses (B, T-1): the small-model loss of the
  difficulty analysis.

Every gathered statistic is computed on the rank that holds the sequence, with the same
operations one process applies, and concatenated in sequence order, so two ranks give
exactly (bit for bit) what one process gives.

Resume: with ``checkpoint_dir`` the walk runs in chunks of ``chunk`` sequences (at global
offsets, so any number of ranks reads the same files) and saves each finished chunk's losses
atomically (``rows_<start>_<stop>.pt``, with digests of its tokens and of the model, to refuse
another job's files). A run
killed midway (even by SIGKILL) redoes only the chunks it had not saved.

Memory per rank: its share of the table, ``n * ceil(B / R) * (T-1) * 4`` bytes (float32, as
the walk returns it), plus the gathered statistics, ``8 * n * B + 16 * B * (T-1)`` bytes per
mask asked, plus one chunk's walk. See docs/study.md for the measured figures.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .. import distributed
from ..reference import BIG, SKIP, SMALL

__all__ = ["FULL_SKIP_LIMIT", "LocalTable", "ReducedPatternLosses", "build_local_table",
           "chunk_ranges", "table_mode"]

# Beyond this many 3^L patterns the table is two 2^L walks (big/small and big/skip) instead of
# one 3^L walk: 3^12 = 531,441 patterns (the paper's depth) against 2 * 4,096. (Re-exported
# by duollm.study.stages, where the study reads it.)
FULL_SKIP_LIMIT = 3 ** 10
# DUOLLM_ORACLE_TABLE: "auto" (per rank under torchrun, whole in one process), "per-rank" or
# "whole" (every rank gathers the whole table, duollm.study.parallel.sharded_pattern_losses).
TABLE_MODES = ("auto", "per-rank", "whole")


def table_mode() -> str:
    """``"per-rank"`` or ``"whole"``: how ``stages.pattern_table`` keeps the oracle table,
    from ``DUOLLM_ORACLE_TABLE`` (default ``auto``: per rank when ``WORLD_SIZE`` > 1)."""
    mode = os.environ.get("DUOLLM_ORACLE_TABLE", "auto")
    if mode not in TABLE_MODES:
        raise ValueError(f"DUOLLM_ORACLE_TABLE: expected one of {', '.join(TABLE_MODES)}, "
                         f"got {mode!r}")
    if mode == "auto":
        return "per-rank" if distributed.env_world_size() > 1 else "whole"
    return mode


def chunk_ranges(n_sequences: int, chunk: int) -> List[Tuple[int, int]]:
    """[(start, stop)] of consecutive chunks of ``chunk`` sequences covering ``n_sequences``."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: expected a positive int, got {chunk!r}")
    return [(s, min(s + chunk, n_sequences)) for s in range(0, n_sequences, chunk)]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def model_digest(model) -> str:
    """SHA-256 over a model's parameters and buffers (names, shapes, bytes): chunk files of
    another model's walk are refused, not mixed in."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class LocalTable:
    """This rank's part of the pattern table and the collective reductions over all parts.

    Fields: ``patterns`` (n, L) int64; ``losses`` (n, b, T-1) float32 of this rank's
    sequences ``rows`` (a range of global sequence indices); ``n_sequences`` (B, all ranks);
    ``info`` (the process group; one process when not enabled). Every method that returns a
    statistic over all sequences is collective: every rank must call it, in the same order.
    """

    patterns: torch.Tensor
    losses: torch.Tensor
    rows: range
    n_sequences: int
    info: distributed.DistInfo

    @property
    def L(self) -> int:
        return int(self.patterns.shape[1])

    @property
    def table_bytes(self) -> int:
        """Bytes of this rank's losses (what grows with the job and shrinks with the ranks)."""
        return self.losses.numel() * self.losses.element_size()

    def index(self, pattern) -> int:
        hit = (self.patterns == torch.as_tensor(list(pattern))).all(1).nonzero()
        if hit.numel() == 0:
            raise ValueError(f"pattern {list(pattern)} is not in the table")
        return int(hit[0])

    def mask(self, big: Optional[int] = None, at_most: bool = False, small: bool = True,
             skip: bool = False) -> torch.Tensor:
        """(n,) patterns with exactly (or at most) ``big`` big layers (as
        ``duollm.study.stages.PatternLosses.mask``)."""
        return _mask_of(self.patterns, big, at_most, small, skip)

    def _gather_rows(self, local: torch.Tensor, dim: int) -> torch.Tensor:
        """Per-rank pieces along the sequence dimension ``dim``, in sequence order."""
        parts = distributed.gather_objects(self.info, local.cpu())
        return torch.cat(parts, dim=dim)

    def seq_means(self) -> torch.Tensor:
        """(n, B) float64: every pattern's mean loss on every sequence."""
        local = self.losses.double().mean(2) if self.losses.shape[1] else \
            torch.zeros(self.patterns.shape[0], 0, dtype=torch.float64)
        return self._gather_rows(local, 1)

    def oracle(self, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The paper's token oracle over the allowed patterns, for all sequences.

        Args: mask (n,) or (n, T-1) (a per-position budget).
        Returns: (loss (B, T-1) float64, chosen pattern index (B, T-1) int64).
        """
        if not bool(mask.any(0).all()):
            raise ValueError("mask: some position has no allowed pattern")
        m = mask[:, None, :] if mask.dim() == 2 else mask[:, None, None]
        b, t = self.losses.shape[1], self.losses.shape[2]
        loss = torch.empty(b, t, dtype=torch.float64)
        idx = torch.empty(b, t, dtype=torch.int64)
        for j in range(b):  # one sequence at a time: a float64 copy of (n, T-1), not (n, b, T-1)
            tab = torch.where(m[:, 0], self.losses[:, j].double(),
                              torch.full((), float("inf"), dtype=torch.float64))
            loss[j], idx[j] = tab.min(0)
        return self._gather_rows(loss, 0), self._gather_rows(idx, 0)

    def token_losses(self, i: int) -> torch.Tensor:
        """(B, T-1) float64: pattern ``i``'s per-token losses."""
        return self._gather_rows(self.losses[i].double(), 0)

    def tie_usage(self, mask: torch.Tensor, route: int,
                  patterns: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, L) float64: per sequence and layer, the share of tokens the oracle over
        ``mask`` sends to ``route``, ties split evenly among the tied patterns (as
        ``duollm.study.verdicts.oracle_usage``), computed one sequence at a time.
        ``patterns``: the rows' labels (default the walk's; a relabelled table's
        otherwise)."""
        m = mask[:, None] if mask.dim() == 1 else mask  # (n, 1) or (n, T-1)
        pats = self.patterns if patterns is None else patterns
        uses = (pats == route).double()  # (n, L)
        out = torch.empty(self.losses.shape[1], self.L, dtype=torch.float64)
        for j in range(self.losses.shape[1]):
            tab = torch.where(m, self.losses[:, j].double(),
                              torch.full((), float("inf"), dtype=torch.float64))  # (n, T-1)
            tied = (tab == tab.min(0).values[None]).double()
            w = tied / tied.sum(0, keepdim=True)
            out[j] = torch.einsum("nt,nl->tl", w, uses).mean(0)
        return self._gather_rows(out, 0)


class ReducedPatternLosses:
    """``duollm.study.stages.PatternLosses``' interface over a ``LocalTable``: what the
    study's analyses and verdicts read, served from the reductions instead of the whole
    table, so no rank holds more than its share.

    ``oracle``, ``oracle_usage`` and ``losses[i]`` (one pattern's tokens) gather (B, T-1)
    statistics; ``losses[cand].mean(2)`` and ``.mean((1, 2))`` read the per-sequence pattern
    means; ``subset`` selects sequences of those. Anything else on ``losses`` raises
    TypeError. Every call is collective (the first time for a mask or pattern; results are
    cached and shared by the subsets): every rank must make the same calls in the same order,
    as the study's code, run alike on every rank, does.

    ``relabelled(perm)``: the same losses under permuted pattern labels (the verdicts'
    relabelled-table control, ``duollm.study.verdicts.relabelled_inputs``): its statistics
    that depend on the losses only (oracles over a mask of rows, one row's tokens,
    per-sequence means) are read from this table's cache and its own results are kept in a
    cache of its own, dropped with it.
    """

    def __init__(self, table: LocalTable, seqs: Optional[torch.Tensor] = None,
                 cache: Optional[dict] = None, patterns: Optional[torch.Tensor] = None,
                 base_cache: Optional[dict] = None):
        self._table, self.L = table, table.L
        self.patterns = table.patterns if patterns is None else patterns
        self._seqs = torch.arange(table.n_sequences) if seqs is None else seqs
        self._cache = {} if cache is None else cache
        self._base = {} if base_cache is None else base_cache  # read-only: the real table's
        self.n_big = (self.patterns == BIG).sum(1)
        self.n_small = (self.patterns == SMALL).sum(1)
        self.n_skip = (self.patterns == SKIP).sum(1)
        self.n_positions = int(table.losses.shape[2])

    def _cached(self, key, compute):
        if key in self._base:
            return self._base[key]
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    @staticmethod
    def _key(name: str, mask: torch.Tensor, *extra):
        return (name, tuple(mask.shape), mask.to(torch.bool).numpy().tobytes(), *extra)

    def subset(self, seqs: torch.Tensor) -> "ReducedPatternLosses":
        return ReducedPatternLosses(self._table, self._seqs[seqs], self._cache, self.patterns,
                                    self._base)

    def relabelled(self, perm: torch.Tensor) -> "ReducedPatternLosses":
        """This table with row ``i`` labelled ``patterns[perm[i]]`` (the losses unchanged)."""
        perm = torch.as_tensor(perm, dtype=torch.int64)
        if perm.shape != (self.patterns.shape[0],):
            raise ValueError(f"perm: expected ({self.patterns.shape[0]},) row indices, got "
                             f"{tuple(perm.shape)}")
        # What this table has computed is read, never written, by the relabelled one: an
        # oracle depends on its mask of rows only, a usage profile's key carries the labels.
        shared = {**self._base, **self._cache}
        return ReducedPatternLosses(self._table, self._seqs, {}, self.patterns[perm], shared)

    def mask(self, big: Optional[int] = None, at_most: bool = False, small: bool = True,
             skip: bool = False) -> torch.Tensor:
        return _mask_of(self.patterns, big, at_most, small, skip)

    def index(self, pattern) -> int:
        hit = (self.patterns == torch.as_tensor(list(pattern))).all(1).nonzero()
        if hit.numel() == 0:
            raise ValueError(f"pattern {list(pattern)} is not in the table")
        return int(hit[0])

    def oracle(self, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        loss, idx = self._cached(self._key("oracle", mask), lambda: self._table.oracle(mask))
        return loss[self._seqs], idx[self._seqs]

    def oracle_usage(self, mask: torch.Tensor, route: int) -> torch.Tensor:
        u = self._cached(self._key("usage", mask, route, self.patterns.numpy().tobytes()),
                         lambda: self._table.tie_usage(mask, route, self.patterns))
        return u[self._seqs]

    def routes(self, idx: torch.Tensor) -> torch.Tensor:
        return self.patterns[idx]

    @property
    def losses(self) -> "_Losses":
        return _Losses(self)


class _Losses:
    """``ReducedPatternLosses.losses``: the reads of ``PatternLosses.losses`` the study makes."""

    def __init__(self, owner: ReducedPatternLosses):
        self._o = owner
        self.shape = torch.Size([owner.patterns.shape[0], len(owner._seqs),
                                 owner.n_positions])

    def __getitem__(self, key):
        o = self._o
        if isinstance(key, (int,)) and not isinstance(key, bool):
            tok = o._cached(("tokens", int(key)), lambda: o._table.token_losses(int(key)))
            return tok[o._seqs]
        if isinstance(key, torch.Tensor) and key.dim() == 1:
            means = o._cached(("seq_means",), o._table.seq_means)  # (n, B)
            return _PatternRows(means[key][:, o._seqs])
        raise TypeError(f"ReducedPatternLosses.losses[{type(key).__name__}]: the per-rank "
                        f"table serves one pattern's token losses (an int) or per-sequence "
                        f"means of a set of patterns (a 1-D index tensor)")


class _PatternRows:
    """``losses[cand]``: the per-sequence means of the patterns ``cand`` (k, b)."""

    def __init__(self, seq_means: torch.Tensor):
        self._m = seq_means

    def mean(self, dim):
        if dim == 2:
            return self._m
        if tuple(dim) == (1, 2):  # over sequences and positions: every sequence has T-1
            return self._m.mean(1)
        raise TypeError(f"mean({dim!r}): the per-rank table holds per-sequence means only")


def _mask_of(patterns: torch.Tensor, big: Optional[int], at_most: bool, small: bool,
             skip: bool) -> torch.Tensor:
    """``PatternLosses.mask`` over the labels ``patterns`` (n, L)."""
    n_big = (patterns == BIG).sum(1)
    m = torch.ones(patterns.shape[0], dtype=torch.bool)
    if big is not None:
        m &= (n_big <= big) if at_most else (n_big == big)
    if not small:
        m &= (patterns == SMALL).sum(1) == 0
    if not skip:
        m &= (patterns == SKIP).sum(1) == 0
    return m


def _walk(model, tokens: torch.Tensor, full: Optional[bool]):
    """(patterns, losses float32) of ``tokens`` in this process: ``stages.pattern_table``'s
    walks (one 3^L walk, or big/small and big/skip 2^L walks), without sharding."""
    from ..oracle import pattern_losses
    from ..stack import as_stack

    L = as_stack(model).n_layers
    full = 3 ** L <= FULL_SKIP_LIMIT if full is None else full
    if full:
        tab = pattern_losses(model, tokens, "token", base="pattern", skip=True)
        return tab.patterns.cpu(), tab.losses.float().cpu()
    a = pattern_losses(model, tokens, "token", base="pattern", paths=(SMALL, BIG))
    b = pattern_losses(model, tokens, "token", base="pattern", paths=(SKIP, BIG))
    keep = (b.patterns == SKIP).any(1)  # all big is in both walks
    return (torch.cat([a.patterns, b.patterns[keep]]).cpu(),
            torch.cat([a.losses, b.losses[keep]]).float().cpu())


def build_local_table(model, tokens: torch.Tensor, full: Optional[bool] = None,
                      checkpoint_dir: Optional[str] = None, chunk: Optional[int] = None,
                      log=None) -> LocalTable:
    """Walk this rank's sequences of ``tokens`` (B, T) and keep only their losses.

    Under ``torchrun`` the ``ceil(B / chunk)`` chunks are shared among the ranks as
    ``duollm.distributed.shard_range`` shares items (contiguous, sizes differing by one);
    in one process it walks them all. ``chunk`` (default: ``ceil(B / ranks)``, at most 8)
    bounds the sequences one walk holds. ``checkpoint_dir``: save each finished chunk there
    and reuse the chunks found (their tokens must match: ValueError otherwise); a resumed run
    reuses them when it asks for the same chunk size.
    """
    from .parallel import device_of

    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError("tokens: expected a (B, T) integer tensor")
    info = distributed.join(device_of(model))
    B = tokens.shape[0]
    if chunk is None:
        chunk = max(1, min(8, -(-B // max(1, info.world_size))))
    chunks = chunk_ranges(B, chunk)
    mine = [chunks[i] for i in distributed.shard_range(info, len(chunks))]
    rows = range(mine[0][0], mine[-1][1]) if mine else range(0)
    model_key = None
    if checkpoint_dir is not None:
        os.makedirs(checkpoint_dir, exist_ok=True)
        model_key = model_digest(model)
    device = next(iter(model.parameters()), torch.empty(0)).device \
        if isinstance(model, torch.nn.Module) else torch.device("cpu")
    pats, parts = None, []
    for start, stop in mine:
        piece = tokens[start:stop]
        path = (os.path.join(checkpoint_dir, f"rows_{start:07d}_{stop:07d}.pt")
                if checkpoint_dir is not None else None)
        if path is not None and os.path.isfile(path):
            saved = torch.load(path, weights_only=True)
            if saved["tokens_sha256"] != _digest(piece) or saved["model_sha256"] != model_key:
                raise ValueError(f"checkpoint_dir: {path} holds another job's walk of "
                                 f"sequences {start}..{stop - 1} (other tokens or another "
                                 f"model); use a fresh folder")
            p, losses = saved["patterns"], saved["losses"]
            if log is not None:
                log(f"oracle rows {start}..{stop - 1}: resumed from {path}")
        else:
            p, losses = _walk(model, piece.to(device), full)
            if path is not None:
                tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
                torch.save({"patterns": p, "losses": losses, "tokens_sha256": _digest(piece),
                            "model_sha256": model_key}, tmp)
                os.replace(tmp, path)  # a chunk file is whole or absent
        if pats is not None and not torch.equal(p, pats):
            raise RuntimeError("chunks walked different patterns")
        pats = p
        parts.append(losses)
    # A rank without sequences still knows the patterns (the same walk on any input).
    if pats is None:
        pats, _ = _walk(model, tokens[:1].to(device), full)
        local = torch.zeros(pats.shape[0], 0, tokens.shape[1] - 1, dtype=torch.float32)
    else:
        local = torch.cat(parts, dim=1)
    return LocalTable(pats, local, rows, B, info)
