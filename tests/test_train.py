"""Tests of duollm.train: schedule, optimizer groups, routing mix, learning, resume, DDP."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import duollm.train as train_mod
from duollm import DuoConfig, DuoLLM
from duollm.data import TokenData, load_data
from duollm.train import (TrainConfig, evaluate, latest_checkpoint, lr_at, make_optimizer,
                          train)



TINY = DuoConfig.from_name("tiny", n_layers=2)


@pytest.fixture(scope="module")
def data():
    return load_data("default")


def _cfg(**kw):
    base = dict(steps=6, batch_size=4, seq_len=32, warmup=2, eval_every=0, eval_batches=1,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-2, min_lr=1e-3)
    assert lr_at(0, cfg) == pytest.approx(1e-3)
    assert lr_at(9, cfg) == pytest.approx(1e-2)
    assert lr_at(10, cfg) == pytest.approx(1e-2)
    assert lr_at(55, cfg) == pytest.approx((1e-2 + 1e-3) / 2)
    assert lr_at(100, cfg) == pytest.approx(1e-3)
    lrs = [lr_at(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay after warm-up


def test_no_weight_decay_on_norms_and_embeddings():
    model = DuoLLM(TINY)
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in no_decay["params"]}
    assert id(model.embed.weight) in ids and id(model.norm.weight) in ids
    assert id(model.layers[0].ffn.big.up_proj.weight) in {id(p) for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("kw, name", [
    (dict(steps=0), "steps"), (dict(batch_size=-1), "batch_size"), (dict(lr=0.0), "lr"),
    (dict(p_big=0.9), "p_skip, p_small, p_big"), (dict(resume=True), "out_dir"),
    (dict(grad_clip=float("nan")), "grad_clip"), (dict(eval_every=1.5), "eval_every"),
    (dict(device="gpu0"), "device"),
])
def test_train_config_validation(kw, name):
    with pytest.raises(ValueError, match=name):
        TrainConfig(**kw)


def test_train_rejects_mismatches(data):
    with pytest.raises(ValueError, match="seq_len"):
        train(TINY, data, _cfg(seq_len=TINY.max_seq_len + 1))
    other = TokenData(data.train, data.val, 100, "x")
    with pytest.raises(ValueError, match="vocab_size"):
        train(TINY, other, _cfg())
    with pytest.raises(TypeError, match="cfg"):
        train(TINY, data, {"steps": 3})


def test_training_learns_and_reports(data):
    cfg = _cfg(steps=30, batch_size=8, seq_len=64, lr=1e-2, min_lr=1e-3, warmup=5,
               eval_every=10, eval_batches=2)
    res = train(TINY, data, cfg)
    assert [h["step"] for h in res.history] == [10, 20, 30]
    assert set(res.val_loss) == {"big", "small", "random"}
    assert res.val_loss == res.history[-1]["val"]
    assert all(math.isfinite(v) for v in res.val_loss.values())
    # Learning: well below the uniform-byte loss ln(256) = 5.55 and improving.
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert res.val_loss["big"] < 3.8
    assert res.history[-1]["tokens_per_s"] > 0
    assert res.model.config.p_big == 0.5 and res.model.training
    # The random policy is evaluated with a fixed seed: recomputing it gives the same value.
    again = evaluate(res.model, data, 64, 8, 2, policies=("random", "big"), seed=cfg.seed)
    assert again == {"random": res.val_loss["random"], "big": res.val_loss["big"]}
    other_seed = evaluate(res.model, data, 64, 8, 2, policies=("random",), seed=1)
    assert other_seed["random"] != res.val_loss["random"]


def test_route_probabilities_are_honoured(data):
    # p_big = 1: the small FFNs never see a token, so without weight decay they never move.
    torch.manual_seed(0)
    model = DuoLLM(TINY)
    before = _params(model)
    cfg = _cfg(steps=3, p_big=1.0, p_small=0.0, weight_decay=0.0)
    res = train(TINY, data, cfg, model=model)
    after = _params(res.model)
    assert res.model is model and model.config.p_big == 1.0
    for name in before:
        if ".ffn.small." in name:
            assert torch.equal(before[name], after[name]), name
        elif ".ffn.big." in name:
            assert not torch.equal(before[name], after[name]), name


def test_resume_is_bit_identical(data, tmp_path, monkeypatch):
    cfg = _cfg(steps=6, eval_every=3, p_skip=0.2, p_small=0.4, p_big=0.4)
    straight = train(TINY, data, cfg)

    out = str(tmp_path / "run")
    real_save = train_mod.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("killed right after the step-3 checkpoint")

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(TINY, data, _cfg(steps=6, eval_every=3, p_skip=0.2, p_small=0.4, p_big=0.4,
                               out_dir=out, checkpoint_every=3))
    monkeypatch.undo()
    assert latest_checkpoint(out).endswith("step_0000003")

    torch.manual_seed(1234)  # a different global RNG state must not matter
    resumed = train(TINY, data, _cfg(steps=6, eval_every=3, p_skip=0.2, p_small=0.4,
                                     p_big=0.4, out_dir=out, checkpoint_every=3,
                                     resume=True))
    a, b = _params(straight.model), _params(resumed.model)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed.val_loss == straight.val_loss
    assert [h["step"] for h in resumed.history] == [3, 6]  # history came with the checkpoint
    for h_res, h_straight in zip(resumed.history, straight.history):
        h_res, h_straight = dict(h_res), dict(h_straight)
        h_res.pop("tokens_per_s"), h_straight.pop("tokens_per_s")  # wall-clock dependent
        assert h_res == h_straight
    assert latest_checkpoint(out).endswith("step_0000006")


def test_checkpoints_are_pruned(data, tmp_path):
    out = tmp_path / "run"
    train(TINY, data, _cfg(steps=4, out_dir=str(out), checkpoint_every=1, keep_checkpoints=2))
    assert sorted(os.listdir(out)) == ["step_0000003", "step_0000004"]


_DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from duollm import DuoConfig
    from duollm.data import load_data
    from duollm.train import TrainConfig, train
    cfg = TrainConfig(**eval(sys.argv[2]))
    res = train(DuoConfig.from_name("tiny", n_layers=2), load_data("default"), cfg)
    torch.save({"state": res.model.state_dict(), "history": res.history},
               os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
""")


def test_data_parallel_matches_single_process(data, tmp_path):
    kw = dict(steps=3, batch_size=4, seq_len=32, warmup=1, eval_every=1, eval_batches=1,
              progress=False)
    script = tmp_path / "ddp_worker.py"
    script.write_text(_DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         "2", str(script), str(tmp_path), repr(kw)],
        env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # DDP all-reduces the gradients, so both ranks take exactly the same update.
    for name, t in ranks[0]["state"].items():
        assert torch.equal(t, ranks[1]["state"][name]), name
    single = train(TINY, data, TrainConfig(**kw))
    # Same global batches and routes; only the float32 summation order differs: the loss is
    # the mean of two half-batch means instead of one mean, and the gradient is the sum of two
    # half-batch GEMM reductions. Measured: losses differ by at most 1 ulp (4.8e-7 at ~5.5) and
    # weights by 1.6e-6 after 3 AdamW steps (Adam's normalisation turns a relative gradient
    # error of ~1e-7 into an absolute weight error of ~lr * 1e-4 at worst for coordinates
    # whose gradient is tiny). rel 1e-5 on losses (~20 ulp) and atol 1e-4 on weights (60x the
    # measured value) allow other CPUs and BLAS builds, yet a wrong slice, a missed
    # all-reduce or different route draws change losses by >= 1e-3 and weights by ~lr.
    for h_ddp, h_one in zip(ranks[0]["history"], single.history, strict=True):
        assert h_ddp["step"] == h_one["step"]
        assert h_ddp["train_loss"] == pytest.approx(h_one["train_loss"], rel=1e-5, abs=1e-5)
        for policy, loss in h_one["val"].items():
            assert h_ddp["val"][policy] == pytest.approx(loss, rel=1e-5, abs=1e-5)
    for name, t in single.model.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][name], t, rtol=0, atol=1e-4)


def test_divergence_is_reported(data):
    torch.manual_seed(0)
    model = DuoLLM(TINY)
    with torch.no_grad():
        model.layers[0].ffn.big.up_proj.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="diverged"):
        train(TINY, data, _cfg(steps=2), model=model)
