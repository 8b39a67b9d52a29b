"""``DuoConfig``: presets, validation, serialisation, parameter and FLOP accounting."""
import pytest
import torch

from duollm import DuoConfig, DuoLLM
from duollm.config import router_flops, swiglu_flops


def test_presets_exist():
    assert {"tiny", "small", "paper-1.4b"} <= set(DuoConfig.presets())
    for name in DuoConfig.presets():
        assert isinstance(DuoConfig.from_name(name), DuoConfig)


def test_paper_shape():
    c = DuoConfig.from_name("paper-1.4b")
    assert (c.n_layers, c.d_model, c.d_big, c.d_small, c.vocab_size) == (12, 2560, 10240, 640,
                                                                        32000)
    assert c.head_dim == 128
    # 12 * (4 d^2 + 3 d (d_big + d_small) + 2 d) + V d (tied) + d
    assert c.param_count() == 1_399_257_600
    assert round(c.param_count() / 1e9, 2) == 1.40


def test_tiny_param_count_by_hand():
    c = DuoConfig.from_name("tiny")
    per_layer = 4 * 64 * 64 + 3 * 64 * (256 + 16) + 2 * 64
    assert c.param_count() == 4 * per_layer + 256 * 64 + 64 == 291_392
    untied = DuoConfig.from_name("tiny", tie_embeddings=False)
    assert untied.param_count() == 291_392 + 256 * 64


@pytest.mark.parametrize("name,overrides", [("tiny", {}), ("tiny", {"tie_embeddings": False}),
                                            ("small", {}), ("paper-1.4b", {})])
def test_model_on_meta_has_param_count_parameters(name, overrides):
    c = DuoConfig.from_name(name, **overrides)
    with torch.device("meta"):
        model = DuoLLM(c)
    # parameters() yields a tied weight once.
    assert sum(p.numel() for p in model.parameters()) == c.param_count()
    assert model.num_params() == c.param_count()
    assert (model.lm_head.weight is model.embed.weight) == c.tie_embeddings


def test_from_name_overrides_and_unknown():
    c = DuoConfig.from_name("tiny", n_layers=2, d_small=8)
    assert (c.n_layers, c.d_small, c.d_model) == (2, 8, 64)
    assert DuoConfig.from_name("tiny").n_layers == 4  # the preset itself is unchanged
    with pytest.raises(ValueError, match="nope"):
        DuoConfig.from_name("nope")
    with pytest.raises(ValueError, match="n_layers"):
        DuoConfig.from_name("tiny", n_layers=0)


@pytest.mark.parametrize("field,value", [
    ("n_layers", 0), ("n_layers", 2.0), ("n_layers", True), ("d_model", -64),
    ("n_heads", 0), ("vocab_size", 0), ("d_big", 0), ("d_small", -1), ("max_seq_len", 0),
    ("rope_theta", 0.0), ("norm_eps", -1e-5), ("norm_eps", "1e-5"),
])
def test_bad_fields_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DuoConfig(**{field: value})


def test_bad_combinations():
    with pytest.raises(ValueError, match="n_heads"):
        DuoConfig(d_model=66, n_heads=4)
    with pytest.raises(ValueError, match="head_dim"):
        DuoConfig(d_model=12, n_heads=4)  # head_dim 3
    with pytest.raises(ValueError, match="p_skip"):
        DuoConfig(p_skip=0.0, p_small=0.5, p_big=0.6)
    with pytest.raises(ValueError, match="p_skip"):
        DuoConfig(p_skip=-0.1, p_small=0.6, p_big=0.5)
    with pytest.raises(ValueError, match="skip"):
        DuoConfig(skip=False, p_skip=0.2, p_small=0.4, p_big=0.4)
    c = DuoConfig(skip=True, p_skip=0.2, p_small=0.4, p_big=0.4)
    assert c.p_skip == 0.2


def test_dict_round_trip():
    c = DuoConfig.from_name("small", p_skip=0.1, p_small=0.3, p_big=0.6, tie_embeddings=False)
    d = c.to_dict()
    assert "head_dim" not in d  # derived, not a constructor field
    assert d["d_model"] == 192 and d["p_skip"] == 0.1
    c2 = DuoConfig.from_dict(d)
    assert c2 == c and c2.head_dim == 32
    with pytest.raises(ValueError, match="bogus"):
        DuoConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="d_model"):
        DuoConfig.from_dict({**d, "d_model": 0})


def test_flop_helpers_by_hand():
    assert swiglu_flops(64, 256) == 2 * 3 * 64 * 256 == 98_304
    assert router_flops(64, 3) == 384


def test_ffn_flops_per_token_by_hand():
    c = DuoConfig.from_name("tiny")  # d 64, big 256, small 16
    assert c.ffn_flops_per_token(1.0, 0.0) == 98_304
    assert c.ffn_flops_per_token(0.0, 1.0) == 6_144
    assert c.ffn_flops_per_token(0.25, 0.5) == 0.25 * 98_304 + 0.5 * 6_144 == 27_648
    assert c.ffn_flops_per_token(0.0, 0.0) == 0  # all skip


def test_flops_per_token_by_hand():
    c = DuoConfig.from_name("tiny")  # 4 layers, d 64, V 256, max_seq_len 128
    lm_head = 2 * 64 * 256  # 32,768
    # per layer: projections 2*4*d^2 = 32,768; scores 2*T*d (causal half of 4*T*d); FFN.
    assert c.flops_per_token() == 4 * (32_768 + 2 * 128 * 64 + 98_304) + lm_head == 622_592
    assert c.flops_per_token(0.0, 1.0, seq_len=10) == \
        4 * (32_768 + 2 * 10 * 64 + 6_144) + lm_head == 193_536
    # seq_len=0 means no attention scores, not "use max_seq_len".
    assert c.flops_per_token(seq_len=0) == 4 * (32_768 + 98_304) + lm_head == 557_056


def test_active_params_per_token_by_hand():
    c = DuoConfig.from_name("tiny")
    base = 4 * (4 * 64 * 64 + 2 * 64) + 256 * 64 + 64
    assert c.active_params_per_token(1.0, 0.0) == base + 4 * 3 * 64 * 256
    assert c.active_params_per_token(0.0, 1.0) == base + 4 * 3 * 64 * 16
    assert c.active_params_per_token(0.5, 0.5) <= c.param_count()
