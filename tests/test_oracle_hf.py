"""The oracle, token difficulty and routers on a Hugging Face model converted by
``duollm.hf.convert``, against brute force through ``duollm.hf.routing`` and the model's own
HF forward (no duollm stack code in the reference)."""
import pytest
import torch
import torch.nn.functional as F

import hf_models
from duollm.reference import BIG, SKIP, SMALL
from oracle_brute import every_pattern, masked_min, meets, sequence_min

hf = pytest.importorskip("duollm.hf")
from duollm.difficulty import token_difficulty  # noqa: E402
from duollm.oracle import AtMost, Exactly, PerPosition, linear_schedule, search  # noqa: E402
from duollm.routers import calibrate, route_and_loss, train_router  # noqa: E402

L, B, T = hf_models.N_LAYERS, 2, 8
ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    m = hf_models.llama_gqa(seed=0)
    return hf.convert(m, 16, init="random", skip=True)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, hf_models.VOCAB, (B, T), generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def _hf_losses(model, tokens, routes):
    """(B, T-1) next-token losses of the HF forward under any routes form."""
    with hf.routing(model, routes):
        logits = model(input_ids=tokens[:, :-1]).logits.float()
    return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")


@pytest.fixture(scope="module")
def whole(model, tokens):
    pats = every_pattern(L, (SKIP, SMALL, BIG))
    return pats, torch.stack([_hf_losses(model, tokens, p.tolist()) for p in pats])


def test_papers_token_oracle_and_sequence_oracle_on_a_converted_model(model, tokens, whole):
    pats, losses = whole
    for budget in (Exactly(1), AtMost(2), AtMost(1, route=SKIP)):
        ok = meets(model, pats, budget)
        tok = search(model, tokens, budget, "token", base="pattern", skip=True)
        torch.testing.assert_close(tok.loss, masked_min(losses, ok), atol=ATOL, rtol=0)
        seq = search(model, tokens, budget, "sequence", skip=True)
        torch.testing.assert_close(seq.loss, sequence_min(losses, ok), atol=ATOL, rtol=0)
    ks = linear_schedule(T - 1, 1.0, L)
    pp = search(model, tokens, PerPosition(ks), "token", base="pattern", skip=True)
    torch.testing.assert_close(pp.loss, masked_min(losses, meets(model, pats, PerPosition(ks))),
                               atol=ATOL, rtol=0)
    assert ((pp.routes[:, :, :-1] == BIG).sum(0) == torch.tensor(ks)).all()


def test_context_token_oracle_on_a_converted_model(model, tokens):
    pats = every_pattern(L, (SMALL, BIG))
    # brute force: position t re-routed by the pattern, the rest all big, via hf.routing
    want = torch.full((len(pats), B, T - 1), float("nan"))
    for j, p in enumerate(pats):
        for t in range(T - 1):
            routes = torch.full((L, B, T - 1), BIG, dtype=torch.int64)
            routes[:, :, t] = p[:, None]
            want[j, :, t] = _hf_losses(model, tokens, routes)[:, t]
    res = search(model, tokens, AtMost(1), "token", base="big")
    torch.testing.assert_close(res.loss, masked_min(want, meets(model, pats, AtMost(1))),
                               atol=ATOL, rtol=0)


def test_difficulty_and_routers_on_a_converted_model(model, tokens):
    tab = token_difficulty(model, tokens, budgets=[1], base="pattern")
    torch.testing.assert_close(tab.loss_small, _hf_losses(model, tokens, "small").reshape(-1),
                               atol=ATOL, rtol=0)
    assert (tab.difficulty >= -ATOL).all()
    stream = torch.randint(0, hf_models.VOCAB, (400,), generator=torch.Generator().manual_seed(0))
    grads = [p.requires_grad for p in model.parameters()]
    router, hist = train_router(model, stream, target_compute=0.5, paths=(SKIP, SMALL, BIG),
                                steps=3, batch_size=2, seq_len=8, seed=0)
    assert len(hist) == 3 and grads == [p.requires_grad for p in model.parameters()]
    calibrate(model, router, tokens, target_compute=0.5)
    losses, routes = route_and_loss(model, router, tokens)
    torch.testing.assert_close(losses, _hf_losses(model, tokens, routes), atol=ATOL, rtol=0)
