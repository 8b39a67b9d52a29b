"""Routers that ship with the model (duollm.router_io): bit-exact round trips through a DuoLLM
checkpoint and a converted HF folder, ``routes="router"`` in forward, generate and
``hf.routing``, and the refusals."""
import json
import os

import pytest
import torch

from duollm import BIG, SKIP, SMALL, DuoConfig, DuoLLM
from duollm import router_io
from duollm.checkpoint import load_checkpoint, save_checkpoint
from duollm.routers import (LinearRouter, calibrate, route_and_loss, train_router,
                            train_supervised_router)
from duollm.routes import attach_router, attached_router


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = DuoConfig(n_layers=3, d_model=32, n_heads=2, vocab_size=40, d_big=64, d_small=8,
                    max_seq_len=64)
    m = DuoLLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m


def _stream():
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 40, (30,), generator=gen).repeat(60)


def _routers(model):
    """One router of every saved variant: trained on big usage, trained on compute with a
    skip path and calibrated, imitation-trained, and an argmax router with random weights."""
    stream = _stream()
    tokens = stream[:4 * 17].view(4, 17)
    big, _ = train_router(model, stream, target_big=0.4, steps=4, batch_size=2, seq_len=16)
    calibrate(model, big, tokens, target_big=0.3)
    comp, _ = train_router(model, stream, paths=(SKIP, SMALL, BIG), target_compute=0.5,
                           steps=4, batch_size=2, seq_len=16)
    calibrate(model, comp, tokens, target_compute=0.5)
    comp.calibration = {"target_compute": 0.5, "tokens": int(tokens.numel())}
    oracle = torch.randint(1, 3, (3, 4, 17), generator=torch.Generator().manual_seed(1))
    sup, _ = train_supervised_router(model, tokens, oracle, steps=5)
    plain = LinearRouter(model, (SMALL, BIG))
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 1.0)
    return {"big": big, "compute": comp, "supervised": sup, "argmax": plain}


def _assert_same_router(a, b):
    assert type(a) is type(b)
    assert a.paths == b.paths and a.mode == b.mode
    assert a.threshold == b.threshold  # exact: the float's repr round-trips through JSON
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert torch.equal(a.prices, b.prices)
    assert getattr(a, "target_big", None) == getattr(b, "target_big", None)
    assert getattr(a, "target_compute", None) == getattr(b, "target_compute", None)
    assert getattr(a, "calibration", None) == getattr(b, "calibration", None)


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def routers(model):
    return _routers(model)


@pytest.mark.parametrize("kind", ["big", "compute", "supervised", "argmax"])
def test_router_round_trips_bit_exactly_through_a_checkpoint(tmp_path, model, routers, kind):
    router = routers[kind]
    attach_router(model, router)
    try:
        save_checkpoint(str(tmp_path / "ck"), model, step=3)
    finally:
        attach_router(model, None)
    assert os.path.isfile(tmp_path / "ck" / "router" / "router.safetensors")
    loaded, _ = load_checkpoint(str(tmp_path / "ck"))
    again = attached_router(loaded)
    assert again is not None and again is not router
    _assert_same_router(router, again)
    # Same routes on the same hidden states: nothing of the decision was lost.
    x = torch.randn(2, 7, 32)
    for i in range(3):
        assert torch.equal(router(i, x), again(i, x))
    tokens = _stream()[:34].view(2, 17)
    assert torch.equal(model(tokens, router), loaded(tokens, "router"))


def test_a_checkpoint_without_router_loads_without_one(tmp_path, model):
    save_checkpoint(str(tmp_path / "ck"), model)
    assert not os.path.exists(tmp_path / "ck" / "router")
    loaded, _ = load_checkpoint(str(tmp_path / "ck"))
    assert attached_router(loaded) is None
    with pytest.raises(ValueError, match=r"^routes: 'router' needs a router saved"):
        loaded(torch.zeros(1, 4, dtype=torch.int64), "router")
    with pytest.raises(ValueError, match="routes: 'router'"):
        loaded.generate(torch.zeros(1, 4, dtype=torch.int64), 2, routes="router")


def test_router_is_not_a_submodule(model, routers):
    before = set(model.state_dict())
    attach_router(model, routers["big"])
    try:
        assert set(model.state_dict()) == before
        assert all(not n.startswith("duollm_router") for n, _ in model.named_parameters())
    finally:
        attach_router(model, None)
    with pytest.raises(TypeError, match="router"):
        attach_router(model, torch.zeros(3))


def test_generate_with_the_saved_router_equals_the_no_cache_forward(tmp_path, model, routers):
    attach_router(model, routers["compute"])
    try:
        save_checkpoint(str(tmp_path / "ck"), model)
    finally:
        attach_router(model, None)
    loaded, _ = load_checkpoint(str(tmp_path / "ck"))
    prompt = _stream()[:10].view(2, 5)
    # Record every route the cached decode takes: per step (B, 1) at each layer.
    seen = []
    router = attached_router(loaded)

    def recording(layer, hidden):
        r = router(layer, hidden)
        seen.append((layer, r))
        return r

    out = loaded.generate(prompt, 12, routes="router")
    recorded = loaded.generate(prompt, 12, routes=recording)
    assert torch.equal(out, recorded)
    nocache = loaded.generate(prompt, 12, routes=router, use_cache=False)
    assert torch.equal(out, nocache)
    # The no-cache forward of the whole sequence takes the same routes at every position
    # and predicts every generated token.
    losses, routes = route_and_loss(loaded, router, out)  # routes (L, B, T-1)
    logits = loaded(out[:, :-1], "router")
    assert torch.equal(logits.argmax(-1)[:, 4:], out[:, 5:])
    cached = torch.full_like(routes, -1)
    steps = [r for _, r in seen]
    L = 3
    prefill, decode = steps[:L], steps[L:]
    for i in range(L):
        cached[i, :, :5] = prefill[i]
    for s in range(len(decode) // L):
        for i in range(L):
            cached[i, :, 5 + s] = decode[s * L + i][:, 0]
    assert torch.equal(cached[:, :, :out.shape[1] - 1], routes)
    assert set(routes.unique().tolist()) > {BIG}  # the router really mixes paths here


def test_write_router_replaces_atomically_and_refuses_foreign_routers(tmp_path, model,
                                                                      routers):
    save_checkpoint(str(tmp_path / "ck"), model)
    router_io.write_router(str(tmp_path / "ck"), routers["big"])
    router_io.write_router(str(tmp_path / "ck"), routers["compute"], model)
    assert attached_router(model) is routers["compute"]
    attach_router(model, None)
    assert sorted(os.listdir(tmp_path / "ck")) == ["meta.json", "model.safetensors", "router",
                                                   "state.pt"]
    loaded, _ = load_checkpoint(str(tmp_path / "ck"))
    _assert_same_router(routers["compute"], attached_router(loaded))

    with pytest.raises(TypeError, match="router: cannot save a function"):
        router_io.write_router(str(tmp_path / "ck"), lambda i, h: h[..., 0].long())
    _assert_same_router(routers["compute"],
                        router_io.load_router(str(tmp_path / "ck"), loaded))  # untouched
    with pytest.raises(ValueError, match="path: .* is not a folder"):
        router_io.write_router(str(tmp_path / "nope"), routers["big"])


def test_load_router_refuses_a_mismatched_model_and_a_foreign_record(tmp_path, model,
                                                                      routers):
    save_checkpoint(str(tmp_path / "ck"), model)
    router_io.write_router(str(tmp_path / "ck"), routers["big"])
    other = DuoLLM(DuoConfig(n_layers=2, d_model=32, n_heads=2, vocab_size=40, d_big=64,
                             d_small=8, max_seq_len=64))
    with pytest.raises(ValueError, match="routes 3 layers of width 32, the model has 2"):
        router_io.load_router(str(tmp_path / "ck"), other)
    meta = tmp_path / "ck" / "router" / "router.json"
    record = json.loads(meta.read_text())
    meta.write_text(json.dumps(dict(record, kind="mlp")))
    with pytest.raises(ValueError, match="kind 'mlp'"):
        load_checkpoint(str(tmp_path / "ck"))
    with pytest.raises(FileNotFoundError, match="no router saved"):
        router_io.read_record(str(tmp_path))


# --------------------------------------------------------------------------- HF


def _converted():
    H = pytest.importorskip("tests.hf_models")
    from duollm import hf

    return hf.convert(H.llama(), 16, init="prune")


def test_router_round_trips_through_a_converted_folder_and_routes_generate(tmp_path):
    from duollm import hf

    model = _converted()
    stream = torch.randint(0, 97, (600,), generator=torch.Generator().manual_seed(0))
    router, _ = train_router(model, stream, target_big=0.3, steps=3, batch_size=2, seq_len=16)
    calibrate(model, router, stream[:64].view(4, 16), target_big=0.3)
    attach_router(model, router)
    hf.save_converted(model, tmp_path / "conv")
    loaded = hf.load_converted(tmp_path / "conv")
    again = attached_router(loaded)
    _assert_same_router(router, again)
    prompt = stream[:6].view(1, 6)
    with torch.no_grad():
        with hf.routing(loaded, "router"):
            out = loaded.generate(prompt, max_new_tokens=10, do_sample=False)
            logits = loaded(out[:, :-1]).logits
        with hf.routing(model, router):
            ref = model(out[:, :-1]).logits
    # The no-cache forward under the same router predicts every generated token.
    assert torch.equal(logits.argmax(-1)[:, 5:], out[:, 6:])
    assert torch.equal(logits, ref)
    # A converted folder without a router loads without one; "router" is then refused.
    attach_router(model, None)
    hf.save_converted(model, tmp_path / "bare")
    bare = hf.load_converted(tmp_path / "bare")
    assert attached_router(bare) is None
    with pytest.raises(ValueError, match="routes: 'router' needs a router"):
        with hf.routing(bare, "router"):
            pass


def test_readme_router_example_runs_as_written(tmp_path, monkeypatch):
    import re
    import tempfile

    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "README.md")
    text = open(readme).read()
    start = text.index("## Routers that ship with the model")
    code = re.search(r"```python\n(.*?)```", text[start:text.index("\n## ", start + 1)],
                     re.DOTALL).group(1)
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: str(tmp_path))
    ns = {"__name__": "readme_router"}
    exec(compile(code, "README.md (routers)", "exec"), ns)
    _assert_same_router(ns["router"], attached_router(ns["again"]))
    assert ns["out"].shape == (1, 18)
    assert (tmp_path / "ck" / "router" / "router.json").is_file()


def test_a_bf16_router_round_trips_in_bf16(tmp_path, model, routers):
    import copy

    router = copy.deepcopy(routers["big"]).to(torch.bfloat16)
    router.threshold = 0.1 + 0.2  # a float whose decimal repr is long: still exact
    router_io.write_router(str(tmp_path), router)
    again = router_io.load_router(str(tmp_path), model)
    assert again.proj[0].weight.dtype == torch.bfloat16
    _assert_same_router(router, again)
