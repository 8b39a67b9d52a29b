"""duollm.difficulty: token difficulty (gain) against brute force, and the loss-vs-gain
ranking test of the paper's claim on constructed data whose answer is known."""
import pytest
import torch

from duollm import SKIP, SMALL, BIG, DuoConfig, DuoLLM
from duollm.difficulty import (DifficultyTable, budget_name, export_csv, gain_overlap,
                               high_loss_correlation, token_difficulty)
from duollm.oracle import AtMost, Exactly
from duollm.stack import as_stack
from oracle_brute import context_losses, every_pattern, masked_min, meets, whole_sequence_losses

L, B, T = 3, 2, 8
ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = DuoConfig(n_layers=L, d_model=32, n_heads=2, vocab_size=50, d_big=64, d_small=8,
                    max_seq_len=32)
    m = DuoLLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(1))


def test_difficulty_table_and_csv(model, tokens, tmp_path):
    kinds = torch.randint(0, 4, tokens.shape)
    tab = token_difficulty(model, tokens, budgets=[1, L], kinds=kinds)
    n = B * (T - 1)
    assert len(tab) == n and tab.base == "small" and "context all small" in tab.oracle
    small = model.token_losses(tokens, "small").detach().reshape(-1)
    torch.testing.assert_close(tab.loss_small, small, atol=ATOL, rtol=0)
    # at most k big with an all-small context: the all-small pattern is a candidate
    assert (tab.difficulty >= -ATOL).all()
    assert (tab.loss_oracle["3"] <= tab.loss_oracle["1"] + 1e-7).all()
    torch.testing.assert_close(tab.difficulty, tab.loss_small - tab.loss_oracle["3"])
    pats = every_pattern(L, (SMALL, BIG))
    brute = context_losses(model, tokens, pats, base="small")
    torch.testing.assert_close(tab.loss_oracle["1"],
                               masked_min(brute, meets(model, pats, AtMost(1))).reshape(-1),
                               atol=ATOL, rtol=0)
    path = tmp_path / "d.csv"
    export_csv(path, tab)
    lines = path.read_text().splitlines()
    assert lines[0].split(",") == ["sequence", "position", "token", "target", "loss_small",
                                   "loss_big", "loss_oracle_1", "loss_oracle_3", "difficulty",
                                   "kind"]
    assert len(lines) == n + 1
    stats = high_loss_correlation(tab)
    assert stats["n_high"] >= 1 and "corr_high_loss" in stats


@pytest.mark.parametrize("skip", [False, True])
def test_difficulty_with_the_papers_oracle_equals_brute_force(model, tokens, skip):
    choices = (SKIP, SMALL, BIG) if skip else (SMALL, BIG)
    tab = token_difficulty(as_stack(model), tokens, budgets=[1, 2], base="pattern", skip=skip)
    assert tab.base == "pattern" and "paper's token oracle" in tab.oracle
    pats = every_pattern(L, choices)
    whole = whole_sequence_losses(model, tokens, pats)
    for k in (1, 2):
        want = masked_min(whole, meets(model, pats, AtMost(k))).reshape(-1)
        torch.testing.assert_close(tab.loss_oracle[str(k)], want, atol=ATOL, rtol=0)
    assert (tab.difficulty >= -ATOL).all()  # the all-small pattern is a candidate


def test_budget_names():
    assert budget_name(AtMost(2)) == "2" and budget_name(Exactly(1)) == "eq1"
    assert budget_name(AtMost(1, route=SKIP)) == "1skip"


def _table(loss, gain, seq=None):
    n = len(loss)
    z = torch.zeros(n, dtype=torch.int64)
    loss = torch.tensor(loss, dtype=torch.float32)
    gain = torch.tensor(gain, dtype=torch.float32)
    seq = z if seq is None else torch.tensor(seq)
    return DifficultyTable(sequence=seq, position=torch.arange(n), token=z, target=z,
                           loss_small=loss, loss_big=loss - 0.1, loss_oracle={"1": loss - gain},
                           difficulty=gain, reference="1")


def test_gain_overlap_on_known_rankings():
    loss = [float(i) for i in range(8)]
    same = gain_overlap(_table(loss, loss))
    assert same.n_top == 2 and same.top_overlap == 1.0 and same.spearman == pytest.approx(1.0)
    assert same.high_loss_low_gain == 0.0 and same.low_loss_high_gain == 0.0
    assert same.chance_overlap == 0.25
    opposite = gain_overlap(_table(loss, [-v for v in loss]))
    assert opposite.top_overlap == 0.0 and opposite.spearman == pytest.approx(-1.0)
    assert opposite.high_loss_low_gain == 1.0 and opposite.low_loss_high_gain == 1.0
    # the two lowest-loss tokens gain most, the two highest-loss ones neither most nor least
    mixed = gain_overlap(_table(loss, [7, 6, 0, 1, 2, 3, 4, 5]))
    assert mixed.top_overlap == 0.0 and mixed.high_loss_low_gain == 0.0
    assert mixed.low_loss_high_gain == 1.0
    assert "overlap 0.00" in mixed.describe()


def test_gain_overlap_resamples_sequences():
    loss = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    gain = [1.0, 0.0, 3.0, 2.0, 5.0, 4.0, 7.0, 6.0]
    tab = _table(loss, gain, seq=[0, 0, 0, 0, 1, 1, 1, 1])
    first = gain_overlap(tab, quantile=0.5, sequences=[0])
    want = gain_overlap(_table(loss[:4], gain[:4]), quantile=0.5)
    assert first == want and first.n == 4
    assert gain_overlap(tab, quantile=0.5, sequences=[0, 0]).n == 8
    with pytest.raises(ValueError, match="quantile"):
        gain_overlap(tab, quantile=1.0)
    with pytest.raises(ValueError, match="loss"):
        gain_overlap(tab, loss="loss_oracle")
