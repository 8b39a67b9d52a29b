"""duollm.study.null: the null model computes big == small exactly, on a DuoLLM and on a
converted Hugging Face model, without touching the original."""
import pathlib
import sys

import pytest
import torch

from duollm.config import DuoConfig
from duollm.model import DuoLLM
from duollm.reference import BIG, SMALL
from duollm.study.null import null_model


def _duo(seed=0):
    torch.manual_seed(seed)
    return DuoLLM(DuoConfig.from_name("tiny", vocab_size=256)).eval()


def test_null_duollm_all_big_equals_all_small_exactly():
    m = _duo()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    n = null_model(m)
    t = torch.randint(0, 256, (3, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        big, small = n(t, "big"), n(t, "small")
        assert torch.equal(big, small)
        assert torch.equal(small, m(t, "small"))  # the small path is the real model's
        assert not torch.allclose(m(t, "big"), m(t, "small"))  # the real model differs
        # per-token routes mixing big and small: the same output too
        r = torch.randint(SMALL, BIG + 1, (m.config.n_layers, 3, 33),
                          generator=torch.Generator().manual_seed(2))
        assert torch.equal(n(t, r), small)
    # the original is untouched, the shapes are the real model's
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert n.layers[0].ffn.big.gate_proj.weight.shape == m.layers[0].ffn.big.gate_proj.weight.shape


def test_null_pattern_table_ties_every_big_small_pattern():
    from duollm.study import stages as St

    n = null_model(_duo())
    t = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(3))
    tab = St.pattern_table(n, t)
    bs = tab.mask(None)  # big/small patterns, no skip
    assert int(bs.sum()) == 2 ** tab.L
    assert torch.equal(tab.losses[bs].amax(0), tab.losses[bs].amin(0))


def test_null_inplace_and_bad_input():
    m = _duo()
    assert null_model(m, inplace=True) is m
    t = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(m(t, "big"), m(t, "small"))
    with pytest.raises(TypeError, match="model"):
        null_model(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="inplace"):
        null_model(m, inplace=1)


def test_null_refuses_a_small_ffn_wider_than_big_before_writing():
    cfg = DuoConfig.from_name("tiny", vocab_size=256)
    m = DuoLLM(DuoConfig.from_name("tiny", vocab_size=256, d_small=cfg.d_big * 2))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="wider than its big"):
        null_model(m, inplace=True)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_null_converted_hf_model_all_big_equals_all_small_exactly():
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import hf_models
    from duollm import hf as H

    m = hf_models.llama()
    H.convert(m, 24)
    n = null_model(m)
    t = torch.randint(0, hf_models.VOCAB, (2, 19), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        with H.routing(n, "big"):
            big = n(t).logits
        with H.routing(n, "small"):
            small = n(t).logits
        with H.routing(m, "small"):
            real_small = m(t).logits
        with H.routing(m, "big"):
            real_big = m(t).logits
    assert torch.equal(big, small) and torch.equal(small, real_small)
    assert not torch.allclose(real_big, real_small)
