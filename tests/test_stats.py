"""duollm.study.stats on constructed data whose answer is known."""
import math

import pytest
import torch

from duollm.study import stats as S


def test_interval_includes_zero_for_centred_noise():
    x = torch.randn(40, generator=torch.Generator().manual_seed(1))
    x = x - x.mean()  # sample mean exactly zero: the interval must straddle it
    iv = S.bootstrap_mean(x, n_boot=500, seed=0)
    assert iv.low < 0 < iv.high and iv.sign() == 0
    assert S.verdict("c", "m", iv).outcome == S.UNRESOLVED


def test_interval_excludes_zero_for_a_clear_shift():
    x = torch.randn(40, generator=torch.Generator().manual_seed(2)) * 0.1 + 1.0
    iv = S.bootstrap_mean(x, n_boot=500, seed=0)
    assert 0 < iv.low < iv.estimate < iv.high
    assert S.verdict("c", "m", iv, +1).outcome == S.HOLDS
    assert S.verdict("c", "m", iv, -1).outcome == S.FAILS


def test_interval_covers_the_true_mean_at_about_95_percent():
    gen = torch.Generator().manual_seed(3)
    hits = 0
    for i in range(60):
        iv = S.bootstrap_mean(torch.randn(30, generator=gen) + 2.0, n_boot=300, seed=i)
        hits += iv.low <= 2.0 <= iv.high
    assert hits >= 50  # nominal 57 of 60; far fewer means the interval is too narrow


def test_paired_difference_sees_what_unpaired_spread_hides():
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(30, generator=gen) * 5  # large between-sequence spread
    a, b = base + 0.1, base  # a is b shifted by exactly 0.1 on every sequence
    d = S.paired_difference(a, b, n_boot=300)
    assert d.low == pytest.approx(0.1) and d.high == pytest.approx(0.1)
    unpaired_low = S.bootstrap_mean(a, n_boot=300).low - S.bootstrap_mean(b, n_boot=300).high
    assert unpaired_low < 0  # unpaired intervals overlap: only the pairing resolves it


def test_split_is_disjoint_and_complete():
    sel, ev = S.split_indices(11, seed=5)
    assert len(set(sel.tolist()) & set(ev.tolist())) == 0
    assert sorted(sel.tolist() + ev.tolist()) == list(range(11))
    assert sel.numel() >= 1 and ev.numel() >= 1
    assert torch.equal(S.split_indices(11, seed=5)[0], sel)


def test_selection_is_scored_on_the_other_split():
    # candidate 0 looks best on the selection split but is worst on the evaluation split:
    # select_on must pick it and report its evaluation values, not the best evaluation ones
    sel_scores = torch.tensor([0.1, 0.5, 0.9])
    ev_values = torch.tensor([[3.0, 3.0], [1.0, 1.0], [2.0, 2.0]])
    i, v = S.select_on(sel_scores, ev_values)
    assert i == 0 and v.tolist() == [3.0, 3.0]


def test_all_of_and_bad_input():
    pos = S.Interval(1.0, 0.5, 1.5, 10)
    zero = S.Interval(0.0, -1.0, 1.0, 10)
    assert S.all_of("c", "m", [S.verdict("a", "m", pos), S.verdict("b", "m", zero)]).outcome \
        == S.UNRESOLVED
    assert S.all_of("c", "m", [S.verdict("a", "m", pos), S.verdict("b", "m", pos, -1)]).outcome \
        == S.FAILS
    with pytest.raises(ValueError, match="n"):
        S.split_indices(1)
    with pytest.raises(ValueError, match="a, b"):
        S.paired_difference(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="level"):
        S.bootstrap_mean(torch.ones(3), level=1.5)
    assert math.isnan(S.Interval(math.nan, math.nan, math.nan, 0).low)
