"""duollm.study.synthetic: the generator's structure, and (slow) difficulty against ground
truth."""
import pytest
import torch

from duollm.study.synthetic import (COMPUTE, COPY, NOISE, STRUCTURE, SyntheticLabels,
                                    make_synthetic_data)


def _split(n=5000, seed=0):
    data, labels = make_synthetic_data(n_tokens=n, seed=seed, return_labels=True)
    toks = torch.cat([data.train, data.val])
    kinds = torch.cat([labels.train_kind, labels.val_kind])
    return data, labels, toks, kinds


def test_shapes_split_and_determinism():
    data, labels, toks, kinds = _split()
    assert isinstance(labels, SyntheticLabels)
    assert toks.numel() == 5000 and data.vocab_size == 256
    assert data.val.numel() == 500
    assert labels.train_kind.shape == data.train.shape
    assert labels.val_kind.shape == data.val.shape
    assert toks.dtype == torch.int64 and int(toks.max()) < 256
    again = make_synthetic_data(n_tokens=5000, seed=0)
    assert torch.equal(again.train, data.train)
    other = make_synthetic_data(n_tokens=5000, seed=1)
    assert not torch.equal(other.train, data.train)
    assert set(kinds.unique().tolist()) == {STRUCTURE, COPY, COMPUTE, NOISE}


def test_labels_match_the_construction():
    _, _, toks, kinds = _split(20000, seed=3)
    text = bytes(toks.tolist()).decode()
    lines = text.split("\n")[:-1]  # the last line may be cut
    pos = 0
    n_checked = 0
    for line in lines:
        k = kinds[pos:pos + len(line)].tolist()
        if line[0] == "#":
            digits, answers = line[1:].split("=")
            sums = [int(c) for c in torch.tensor([int(c) for c in digits]).cumsum(0)
                    .remainder(10).tolist().__str__() if c.isdigit()]
            assert [int(c) for c in answers] == sums
            assert k == [STRUCTURE] + [NOISE] * len(digits) + [STRUCTURE] + [COMPUTE] * len(answers)
        elif line[0] == "@":
            src, rep = line[1:].split("|")
            assert src == rep
            assert k == [STRUCTURE] + [NOISE] * len(src) + [STRUCTURE] + [COPY] * len(rep)
        else:
            assert line[0] == "~" and line[1:].isalpha()
            assert k == [STRUCTURE] + [NOISE] * (len(line) - 1)
        assert kinds[pos + len(line)] == STRUCTURE  # the newline
        pos += len(line) + 1
        n_checked += 1
    assert n_checked > 100


def test_load_data_synthetic():
    from duollm.data import TokenData, load_data

    data = load_data("synthetic")
    assert isinstance(data, TokenData) and data.vocab_size == 256


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_tokens"):
        make_synthetic_data(n_tokens=1)
    with pytest.raises(ValueError, match="val_fraction"):
        make_synthetic_data(n_tokens=100, val_fraction=1.5)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "known open problem, failing since the test was written (also at 3af7cc0): the tiny model "
    "does not learn the copy or running-sum spans in 600 steps (their loss stays at the "
    "uniform-guess level), so compute tokens gain no more than noise; the study's synthetic "
    "check reports the same. Needs a corpus a small model learns in minutes, or more steps."))
def test_difficulty_ranks_compute_above_noise():
    """Train a tiny model briefly on the synthetic corpus (a few minutes on 2 cores): tokens
    that need computation gain more from big layers than pure noise does."""
    from duollm import DuoConfig
    from duollm.difficulty import token_difficulty
    from duollm.train import TrainConfig, train

    data, labels = make_synthetic_data(n_tokens=200_000, seed=0, return_labels=True)
    cfg = DuoConfig.from_name("tiny")
    res = train(cfg, data, TrainConfig(steps=600, batch_size=16, seq_len=64, eval_every=600,
                                       progress=False))
    idx = torch.arange(0, 16 * 65, 65)[:, None] + torch.arange(65)
    tab = token_difficulty(res.model.eval(), data.val[idx], budgets=[4],
                           kinds=labels.val_kind[idx])
    d_compute = tab.difficulty[tab.kind == COMPUTE].mean()
    d_noise = tab.difficulty[tab.kind == NOISE].mean()
    loss_noise = tab.loss_big[tab.kind == NOISE].mean()
    assert d_compute > d_noise
    assert loss_noise > 1.0  # noise stays hard whatever the compute
