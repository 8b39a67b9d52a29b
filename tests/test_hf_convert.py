"""duollm.hf.convert against transformers' own modeling code, on small random models."""
import copy

import hf_models as H
import pytest
import torch
import torch.nn.functional as F

hf = pytest.importorskip("duollm.hf")

D_SMALL = 24


@pytest.mark.parametrize("family", sorted(H.FAMILIES))
def test_converted_logits_equal_original(family):
    model = H.FAMILIES[family]()
    t = H.tokens()
    with torch.no_grad():
        ref = model(t).logits
        hf.convert(model, D_SMALL)
        out = model(t).logits
        with hf.routing(model, "big"):
            out_big = model(t).logits
    # The same modules run the same expression: bit-exact, not merely close.
    assert torch.equal(out, ref)
    assert torch.equal(out_big, ref)


def test_converted_bf16_logits_equal_original():
    model = H.llama_gqa(dtype=torch.bfloat16)
    t = H.tokens()
    with torch.no_grad():
        ref = model(t).logits
        hf.convert(model, D_SMALL)
        assert model.model.layers[0].mlp.small.gate_proj.weight.dtype == torch.bfloat16
        with hf.routing(model, "big"):
            out = model(t).logits
    assert torch.equal(out, ref)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_big_path_shares_the_original_parameters(family):
    model = H.FAMILIES[family]()
    before = [(layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight)
              for layer in model.model.layers]
    n_before = sum(p.numel() for p in model.parameters())
    hf.convert(model, D_SMALL)
    for layer, (g, u, d) in zip(model.model.layers, before):
        big = layer.mlp.big
        assert big.gate_proj.weight is g and big.up_proj.weight is u and big.down_proj.weight is d
        assert big.gate_proj.weight.data_ptr() == g.data_ptr()
        small_ptrs = {p.data_ptr() for p in layer.mlp.small.parameters()}
        assert not small_ptrs & {g.data_ptr(), u.data_ptr(), d.data_ptr()}
    n_after = sum(p.numel() for p in model.parameters())
    assert n_after - n_before == 3 * H.D_MODEL * D_SMALL * H.N_LAYERS


@pytest.mark.parametrize("family", sorted(H.FAMILIES))
def test_all_small_equals_plain_swiglu_of_the_small_weights(family):
    """Reference by hand: the unconverted model with every MLP's weights replaced by the
    small path's, run by transformers' own MLP code."""
    model = H.FAMILIES[family]()
    ref_model = copy.deepcopy(model)
    hf.convert(model, D_SMALL, init="random")
    for ref_layer, layer in zip(ref_model.model.layers, model.model.layers):
        s = layer.mlp.small
        for name in ("gate_proj", "up_proj", "down_proj"):
            w = getattr(s, name).weight.detach().clone()
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight = torch.nn.Parameter(w)
            setattr(ref_layer.mlp, name, lin)
    t = H.tokens()
    with torch.no_grad():
        ref = ref_model(t).logits
        with hf.routing(model, "small"):
            out = model(t).logits
        with hf.routing(model, "small", backend="torch"):
            out_torch = model(t).logits
    # The default path runs the HF MLP expression on the small Linears: exactly the reference.
    assert torch.equal(out, ref)
    torch.testing.assert_close(out_torch, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        big = model(t).logits
    assert (big - ref).abs().max() > 1e-2  # the small paths really are in use


def test_base_model_converts():
    model = H.llama().model  # LlamaModel: layers at model.layers
    t = H.tokens()
    with torch.no_grad():
        ref = model(t).last_hidden_state
        hf.convert(model, D_SMALL)
        assert torch.equal(model(t).last_hidden_state, ref)
        with hf.routing(model, "small"):
            assert not torch.equal(model(t).last_hidden_state, ref)


def _snapshot(model):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.detach().clone() for k, v in model.state_dict().items()})


@pytest.mark.parametrize("case", sorted(H.UNSUPPORTED))
def test_unsupported_models_raise_and_stay_unmodified(case):
    build, reason = H.UNSUPPORTED[case]
    model = build()
    types, state = _snapshot(model)
    with pytest.raises((ValueError, TypeError), match=reason) as err:
        hf.convert(model, 8, calibration=torch.zeros(1, 4, dtype=torch.int64))
    if case != "no_layers":
        assert "layer" in str(err.value)  # names the layer
    types_after, state_after = _snapshot(model)
    assert types_after == types
    assert state_after.keys() == state.keys()
    assert all(torch.equal(state[k], state_after[k]) for k in state)
    assert not hf.is_converted(model)


def test_custom_mlp_error_names_the_last_layer():
    model = H.llama_custom_last_layer()
    with pytest.raises(ValueError, match=f"layer {H.N_LAYERS - 1}"):
        hf.convert(model, 8)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(d_small=0), ValueError, "d_small"),
    (dict(d_small=H.D_FF), ValueError, "d_small"),
    (dict(d_small=True), ValueError, "d_small"),
    (dict(d_small=8, init="magic"), ValueError, "init"),
    (dict(d_small=8, calibration=torch.zeros(1, 4)), TypeError, "calibration"),
    (dict(d_small=8, calibration=torch.full((1, 4), H.VOCAB)), ValueError, "calibration"),
    (dict(d_small=8, init="random", calibration=torch.zeros(1, 4, dtype=torch.int64)),
     ValueError, "calibration"),
    (dict(d_small=8, probs=(0.5, 0.5, 0.5)), ValueError, "probs"),
    (dict(d_small=8, skip=False, probs=(0.2, 0.4, 0.4)), ValueError, "p_skip"),
    (dict(d_small=8, skip=1), TypeError, "skip"),
])
def test_bad_arguments_raise_before_modifying(kwargs, exc, match):
    model = H.llama()
    types, _ = _snapshot(model)
    with pytest.raises(exc, match=match):
        hf.convert(model, **kwargs)
    assert _snapshot(model)[0] == types and not hf.is_converted(model)


def test_converting_twice_raises():
    model = hf.convert(H.llama(), 8)
    with pytest.raises(ValueError, match="already converted"):
        hf.convert(model, 8)


def _mean_kl_to_big(model, t):
    with torch.no_grad():
        big = F.log_softmax(model(t).logits.float(), -1)
        with hf.routing(model, "small"):
            small = F.log_softmax(model(t).logits.float(), -1)
    return F.kl_div(small, big, log_target=True, reduction="none").sum(-1).mean().item()


def test_pruned_init_is_closer_to_all_big_than_random():
    """Measured on held-out tokens (not the calibration ones): mean KL(all-big || all-small)."""
    held_out = H.tokens(B=4, T=24, seed=11)
    calibration = H.tokens(B=4, T=24, seed=12)
    kls = {}
    for name, kw in {"random": dict(init="random"), "weights": dict(init="prune"),
                     "calibrated": dict(init="prune", calibration=calibration)}.items():
        torch.manual_seed(0)
        kls[name] = _mean_kl_to_big(hf.convert(H.llama(seed=3), D_SMALL, **kw), held_out)
    assert kls["calibrated"] < kls["random"], kls
    assert kls["weights"] < kls["random"], kls


def test_prune_keeps_the_most_important_channels_in_order():
    model = H.llama()
    mlp = model.model.layers[1].mlp
    g, u, d = (mlp.gate_proj.weight.detach().clone(), mlp.up_proj.weight.detach().clone(),
               mlp.down_proj.weight.detach().clone())
    score = g.norm(dim=1) * u.norm(dim=1) * d.norm(dim=0)
    keep = torch.topk(score, D_SMALL).indices.sort().values
    hf.convert(model, D_SMALL)
    small = model.model.layers[1].mlp.small
    assert torch.equal(small.gate_proj.weight, g[keep])
    assert torch.equal(small.up_proj.weight, u[keep])
    assert torch.equal(small.down_proj.weight, d[:, keep])


def test_calibrated_prune_matches_a_hand_computed_score():
    model = H.llama()
    calibration = H.tokens(B=2, T=16, seed=5)
    captured = {}
    layer = model.model.layers[2]

    def grab(module, args):
        captured["x"] = args[0]

    h = layer.mlp.register_forward_pre_hook(grab)
    with torch.no_grad():
        model(calibration)
    h.remove()
    mlp = layer.mlp
    x = captured["x"].reshape(-1, H.D_MODEL)
    a = F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
    score = a.abs().mean(0) * mlp.down_proj.weight.norm(dim=0)
    keep = torch.topk(score, D_SMALL).indices.sort().values
    w_up = mlp.up_proj.weight.detach().clone()
    hf.convert(model, D_SMALL, calibration=calibration)
    assert torch.equal(model.model.layers[2].mlp.small.up_proj.weight, w_up[keep])


def test_import_duollm_does_not_import_transformers():
    import subprocess
    import sys
    code = "import sys, duollm; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_duollm_hf_without_transformers_says_what_to_install():
    import subprocess
    import sys
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import importlib.util as u; orig = u.find_spec\n"
            "u.find_spec = lambda n, *a: None if n == 'transformers' else orig(n, *a)\n"
            "try:\n    import duollm.hf\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert "pip install transformers" in out.stdout


def test_duollm_hf_with_transformers_4_says_to_upgrade():
    import subprocess
    import sys
    code = ("import importlib.machinery, sys, types\n"
            "fake = types.ModuleType('transformers'); fake.__version__ = '4.46.3'\n"
            "fake.__spec__ = importlib.machinery.ModuleSpec('transformers', None)\n"
            "sys.modules['transformers'] = fake\n"
            "try:\n    import duollm.hf\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert "transformers>=5" in out.stdout and "4.46.3" in out.stdout
