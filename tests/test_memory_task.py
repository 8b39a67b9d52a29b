"""The synthetic key -> value memory task (duollm.study.synthetic.make_memory_data) and the
study's synthetic check on it: a value follows only from the table, and the check is "not
testable", with the measured loss, when the model has not learned the table."""
import math

import pytest
import torch

from duollm.study import stages as St
from duollm.study import stats as S
from duollm.study import verdicts as V
from duollm.study.synthetic import (KEY, KIND_NAMES, MEMORY, NOISE, STRUCTURE, make_memory_data,
                                    memory_table)


def _lines(data, kinds):
    text = bytes(data.tolist()).decode()
    return text, kinds.tolist()


def test_memory_corpus_values_follow_from_the_table_only():
    data, labels = make_memory_data(n_tokens=5_000, n_keys=20, seed=3, return_labels=True)
    table = {bytes(k).decode(): bytes(v).decode() for k, v in memory_table(20, seed=3)}
    assert len(table) == 20
    text, kinds = _lines(data.train, labels.train_kind)
    seen = 0
    for line in text.split("\n")[1:-1]:  # whole lines only
        if line.startswith("k"):
            key, value = line[1:].split(":")
            assert table[key] == value
            seen += 1
        else:
            assert line.startswith("~") and 3 <= len(line) - 1 <= 8
    assert seen > 100
    # kinds: k and : are structure, key letters KEY, value letters MEMORY, noise NOISE
    i = text.index("k")
    assert kinds[i:i + 8] == [STRUCTURE, KEY, KEY, KEY, STRUCTURE, MEMORY, MEMORY, MEMORY]
    assert set(kinds) == {STRUCTURE, KEY, MEMORY, NOISE}
    assert KIND_NAMES[MEMORY] == "memory" and KIND_NAMES[KEY] == "key"
    # the validation split draws from the same table; the corpus is a function of its seed
    d2 = make_memory_data(n_tokens=5_000, n_keys=20, seed=3)
    assert torch.equal(d2.train, data.train) and torch.equal(d2.val, data.val)
    assert not torch.equal(make_memory_data(n_tokens=5_000, n_keys=20, seed=4).train,
                           data.train)


def test_memory_corpus_bad_arguments():
    with pytest.raises(ValueError, match="n_keys"):
        make_memory_data(n_tokens=100, n_keys=0)
    with pytest.raises(ValueError, match="n_tokens"):
        make_memory_data(n_tokens=2)
    with pytest.raises(ValueError, match="noise_share"):
        make_memory_data(n_tokens=100, noise_share=1.0)
    with pytest.raises(ValueError, match="val_fraction"):
        make_memory_data(n_tokens=100, val_fraction=0)


def test_synthetic_check_untrained_model_is_not_testable_with_the_measured_loss():
    """QUICK trains 10 steps: the memory tokens stay near a uniform guess, so the check
    must not judge the criterion on them."""
    chk = St.synthetic_check(St.QUICK, seed=0, device="cpu", progress=False)
    assert chk.task == "memory" and chk.verdict.outcome == V.NOT_TESTABLE
    assert chk.precondition.low > math.log(26) / 2
    assert "did not learn the memory tokens" in chk.reason
    assert f"{chk.precondition.estimate:.3f}" in chk.reason
    # every number comes from the evaluation split
    _, ev = S.split_indices(St.QUICK.n_sequences, 0)
    assert chk.n_sequences == ev.numel() < St.QUICK.n_sequences
    assert chk.difficulty.n_tokens == ev.numel() * St.QUICK.oracle_len
    rec = V.synthetic_record(chk)
    assert rec.verdict == V.NOT_TESTABLE and rec.p is None and rec.reason == chk.reason
    with pytest.raises(ValueError, match="task"):
        St.synthetic_check(St.QUICK, seed=0, device="cpu", progress=False, task="nope")
