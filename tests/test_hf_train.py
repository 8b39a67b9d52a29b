"""Stage 1 for a converted HF model: ``duollm.hf.train_small``."""
import os

import pytest
import torch
import torch.nn.functional as F

import hf_models  # skips the module without transformers
from duollm import hf
from duollm.data import TokenData
from duollm.hf.train import MODEL_DIR, evaluate, small_modules, train_small
from duollm.train import TrainConfig, latest_checkpoint


@pytest.fixture(scope="module")
def data():
    # Text with structure a model can learn: a repeated random phrase plus noise tokens.
    g = torch.Generator().manual_seed(0)
    phrase = torch.randint(0, hf_models.VOCAB, (37,), generator=g)
    stream = phrase.repeat(120)
    noise = torch.rand(stream.shape, generator=g) < 0.1
    stream[noise] = torch.randint(0, hf_models.VOCAB, (int(noise.sum()),), generator=g)
    n = stream.numel()
    return TokenData(train=stream[: n * 9 // 10], val=stream[n * 9 // 10:],
                     vocab_size=hf_models.VOCAB, name="phrase")


def _cfg(**kw):
    base = dict(steps=6, batch_size=4, seq_len=16, eval_every=3, eval_batches=2, lr=1e-2,
                warmup=2, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _converted(seed=0, **kw):
    return hf.convert(hf_models.llama(seed), 8, **kw)


def test_only_the_small_paths_change(data):
    model = _converted()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    train_small(model, data, _cfg(), distill=0.5)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    small = {n for n, _ in model.named_parameters() if ".small." in n}
    assert changed == small  # every small weight moved, nothing else did
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def _small_vs_big_kl(model, tokens):
    with torch.no_grad():
        big = model(input_ids=tokens).logits.log_softmax(-1)
        with hf.routing(model, "small"):
            small = model(input_ids=tokens).logits.log_softmax(-1)
    return F.kl_div(small.flatten(0, 1), big.flatten(0, 1), log_target=True,
                    reduction="batchmean").item()


def test_training_lowers_the_all_small_loss(data):
    model = _converted(init="random")
    before = evaluate(model, data, 16, 4, 2, policies=("small", "big"))
    result = train_small(model, data, _cfg(steps=40, p_small=1.0, p_big=0.0, eval_every=0,
                                           lr=3e-3))
    assert set(result.val_loss) == {"big", "small", "random"}
    assert result.val_loss["small"] < before["small"] - 0.1, (before, result.val_loss)
    # The big path is frozen: its validation loss is what it was before training.
    assert result.val_loss["big"] == pytest.approx(before["big"], rel=1e-6)


def test_distillation_pulls_all_small_toward_all_big(data):
    tokens = data.val[:64].view(2, 32)
    kl = {}
    for distill in (0.0, 10.0):
        model = _converted(init="random")
        kl0 = _small_vs_big_kl(model, tokens)
        train_small(model, data, _cfg(steps=40, p_small=1.0, p_big=0.0, eval_every=0,
                                      lr=3e-3), distill=distill)
        kl[distill] = _small_vs_big_kl(model, tokens)
    # Cross-entropy alone fits the data, away from the random big model; the KL term pulls
    # the small paths back toward it.
    assert kl[10.0] < kl0 and kl[10.0] < 0.75 * kl[0.0], (kl0, kl)


def test_distill_changes_the_run(data):
    a, b = _converted(), _converted()
    train_small(a, data, _cfg(steps=3), distill=0.0)
    train_small(b, data, _cfg(steps=3), distill=2.0)
    wa, wb = small_modules(a)[0].gate_proj.weight, small_modules(b)[0].gate_proj.weight
    assert not torch.equal(wa, wb)


def test_same_seed_same_result(data):
    a, b = _converted(), _converted()
    train_small(a, data, _cfg(steps=3))
    train_small(b, data, _cfg(steps=3))
    for pa, pb in zip(small_modules(a).parameters(), small_modules(b).parameters()):
        assert torch.equal(pa, pb)


def test_resume_is_bit_identical(data, tmp_path):
    straight = _converted()
    train_small(straight, data, _cfg())
    out = str(tmp_path / "run")
    first = _converted()
    train_small(first, data, _cfg(steps=3, out_dir=out))
    resumed = _converted()  # a fresh conversion: the small weights come from the checkpoint
    result = train_small(resumed, data, _cfg(out_dir=out, resume=True))
    for pa, pb in zip(small_modules(straight).parameters(),
                      small_modules(resumed).parameters()):
        assert torch.equal(pa, pb)
    assert [h["step"] for h in result.history] == [3, 6]
    ckpt = latest_checkpoint(out)
    assert os.path.basename(ckpt) == "step_0000006"
    # The checkpoint's model folder is a converted model that loads as it was saved.
    loaded = hf.load_converted(os.path.join(ckpt, MODEL_DIR))
    tokens = hf_models.tokens()
    with torch.no_grad(), hf.routing(loaded, "small"), hf.routing(resumed, "small"):
        assert torch.equal(loaded(input_ids=tokens).logits, resumed(input_ids=tokens).logits)


def test_checkpoints_are_pruned(data, tmp_path):
    out = str(tmp_path / "run")
    train_small(_converted(), data, _cfg(steps=4, checkpoint_every=1, keep_checkpoints=2,
                                         out_dir=out))
    assert sorted(e for e in os.listdir(out)) == ["step_0000003", "step_0000004"]


def test_bad_input(data):
    with pytest.raises(TypeError, match="model"):
        train_small(hf_models.llama(), data, _cfg())
    with pytest.raises(ValueError, match="distill"):
        train_small(_converted(), data, _cfg(), distill=-1.0)
    with pytest.raises(ValueError, match="p_skip"):
        train_small(_converted(skip=False), data, _cfg(p_skip=0.2, p_small=0.4, p_big=0.4))
    big_vocab = TokenData(train=data.train, val=data.val, vocab_size=1000, name="x")
    with pytest.raises(ValueError, match="vocabulary"):
        train_small(_converted(), big_vocab, _cfg())
    with pytest.raises(TypeError, match="cfg"):
        train_small(_converted(), data, {"steps": 3})
    with pytest.raises(ValueError, match="fsdp"):
        train_small(_converted(), data, _cfg(fsdp=True))
    with pytest.raises(ValueError, match="trainable"):
        train_small(_converted(), data, _cfg(trainable="small"))
