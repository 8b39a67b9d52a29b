"""Typed results shared by the study's stages (the writer) and its report (the reader).

The report reads these dataclasses by attribute, never a dict by string key, so a renamed
field fails loudly (AttributeError) instead of leaving a blank column. ``results.json`` is
``dataclasses.asdict`` of a ``StudyResult``.

Conventions: losses are mean next-token cross-entropy in nats; every ``Interval`` is a
bootstrap 95% interval over the *evaluation* sequences of a holdout; ``k`` counts big layers
per token; usage fractions are over (token, layer) pairs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .stats import Interval, Verdict


@dataclass
class Curve:
    """Loss vs k = 0..L for one method (Figure 4b). ``points[k]`` is None where the method
    has no routing with exactly k big layers (e.g. a router trained at other budgets)."""

    name: str
    label: str
    points: List[Optional[Interval]]
    vs_all_big: List[Optional[Interval]]  # paired difference to all big, same sequences
    patterns: Dict[int, List[int]] = field(default_factory=dict)  # chosen pattern per k


@dataclass
class RouterResult:
    """One trained router scored on a holdout's evaluation split.

    ``paths`` the routes it chooses among ("small,big" or "skip,small,big"); ``target_big``
    or ``target_compute`` (FFN FLOPs over all big's) the budget it was trained and calibrated
    to; ``threshold`` chosen on the selection split; realised fractions of big/small/skip over
    (token, layer) pairs."""

    name: str
    paths: str
    target_big: float
    target_compute: Optional[float]
    threshold: Optional[float]
    loss: Interval
    realised_big: float
    realised_small: float
    realised_skip: float
    big_by_layer: List[float]
    skip_by_layer: List[float]
    big_by_position: List[float]
    objective_first: float
    objective_last: float


@dataclass
class CapacityResult:
    """Figure 2a-c: the oracle's big usage per layer at a low, middle and high budget."""

    budgets: List[int]
    oracle_big_by_layer: Dict[int, List[Interval]]
    router_big_by_layer: Dict[int, List[float]]
    late_minus_early: Dict[int, Interval]  # big usage of the later half minus the earlier
    verdict: Verdict
    router_verdict: Verdict


@dataclass
class SkipResult:
    """Figures 2d and 3d: per-layer skip profiles and the early-exit test."""

    big_or_skip_k: int
    big_or_skip_loss: Interval
    full_loss: Optional[Interval]  # 3^L oracle, exactly k big, the rest small or skip (None
    # when the table is two 2^L walks, beyond FULL_SKIP_LIMIT)
    big_or_skip_skip_by_layer: List[float]
    full_skip_by_layer: Optional[List[float]]
    router_skip_by_layer: Optional[List[float]]
    suffix_share: Dict[str, float]  # share of tokens whose skips are a suffix of the layers
    verdict_oracle: Verdict
    verdict_router: Optional[Verdict]


@dataclass
class PositionBudgetResult:
    """Figure 4c: per-position budgets with the same mean as a constant budget."""

    constant_k: int
    schedules: Dict[str, List[int]]  # "decreasing"/"increasing": k at each position
    loss: Dict[str, Interval]  # "constant", "decreasing", "increasing"
    verdict: Verdict  # varying minus constant > 0 for both schedules


@dataclass
class DifficultyResult:
    """Token difficulty (Figures 5, 6): small-model loss vs gain = loss(all small) - oracle.

    The shares are ``duollm.difficulty.rank_overlap``'s with ``low=0.5`` (see
    ``stages.LOW``). ``overlap``: share of the top-quartile-by-loss tokens that are also
    top-quartile by gain (1: the two rankings pick the same tokens; 0.25: chance).
    ``high_loss_low_gain``: share of top-quartile-by-loss tokens whose gain is below the
    median gain; ``low_loss_high_gain``: share of bottom-half-by-loss tokens in the top
    quartile by gain."""

    n_tokens: int
    spearman: Interval
    overlap: Interval
    high_loss_low_gain: Interval
    low_loss_high_gain: Interval
    verdict: Verdict
    snippet_tokens: List[int]  # the first evaluation sequence, rendered in the text figure
    snippet_loss_small: List[float]  # its per-position loss with every layer small
    snippet_gain: List[float]  # and its gain (loss all small minus the oracle's)
    points_loss_small: List[float]  # every evaluation token (scatter plot)
    points_gain: List[float]
    by_kind: Optional[Dict[str, Dict[str, float]]] = None


@dataclass
class ApproxGap:
    """An approximate search of the paper's token oracle (beam or greedy) against the
    exhaustive one, at ``k`` big layers on the evaluation split."""

    method: str  # "beam" or "greedy"
    beam_width: int
    k: int
    loss: Interval
    gap: Interval  # approximate minus exhaustive loss, paired over sequences (>= 0)
    exact_share: float  # share of positions whose loss equals the exhaustive one
    seconds: float  # wall time of the approximate search


@dataclass
class HoldoutResult:
    """Everything measured on one holdout."""

    name: str
    source: str
    n_sequences: int
    seq_len: int
    n_selection: int
    n_evaluation: int
    all_big: Interval
    all_small: Interval
    curves: List[Curve]
    headline_k: int
    oracle_vs_random: Verdict  # Fig 4a: best random minus oracle at headline_k
    router_vs: Dict[str, Interval]  # router minus oracle / best random at headline_k
    router_near_random: Verdict  # abs(router - oracle) - abs(router - best random) > 0
    one_big_beats_all_big: Verdict  # oracle(k=1) below all big
    routers: List[RouterResult]
    capacity: CapacityResult
    skip: SkipResult
    position_budget: PositionBudgetResult
    oracle_big_by_position: List[float]
    difficulty: DifficultyResult
    routing_map: Dict[str, List[List[int]]]  # router name -> (L, T) routes of one sequence
    approx_gaps: List[ApproxGap]  # beam and greedy vs exhaustive at headline_k


@dataclass
class SyntheticCheck:
    """The difficulty criterion on the synthetic corpus, whose token kinds are known: noise
    tokens cannot be predicted at any compute, copy/compute tokens can."""

    preset: str
    steps: int
    difficulty: DifficultyResult
    noise_minus_rest_loss: Interval  # loss(all small): noise minus the known kind
    rest_minus_noise_gain: Interval  # gain: the known kind (memory, or copy/compute) minus noise
    verdict: Verdict
    task: str = "copy"  # "memory" (key -> value table) or "copy" (copy spans, running sums)
    precondition: Optional[Interval] = None  # the known tokens' loss with every layer big
    parts: List = field(default_factory=list)  # (name, Interval, p) of each part
    setting: str = ""
    reason: str = ""  # why "not testable", with the measured numbers
    n_sequences: int = 0  # evaluation sequences the numbers come from


@dataclass
class StudyResult:
    """The whole study (``results.json``)."""

    name: str
    preset: str
    config: Dict
    data: str
    source: str  # "duollm" (trained here) or the HF checkpoint path
    steps: int
    train_probs: List[float]  # (p_skip, p_small, p_big) of random-routing training
    train_val_loss: Dict[str, float]
    seed: int
    device: str
    n_random: int
    holdouts: List[HoldoutResult]
    synthetic: Optional[SyntheticCheck]
    timings: Dict[str, float]
    # the verdict family (duollm.study.verdicts.record_dict per verdict, Holm-corrected):
    # what verdicts.json holds and the report's verdict table shows
    verdicts: List[Dict] = field(default_factory=list)
    null_control: bool = False  # every verdict also measured on the null model
    seeds: List[int] = field(default_factory=list)  # training seeds of the verdicts'
    # hierarchical bootstrap (the figures show the first)
