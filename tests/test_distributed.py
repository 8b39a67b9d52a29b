"""Tests of the multi-process paths: FSDP2 training, and the oracle sharded across ranks.

Each test launches ``torchrun --nproc_per_node 2`` on the CPU (gloo) and compares with one
process. The tiny preset at two layers keeps a launch to ~15 s on a quiet 2-core machine.
"""
import os
import shutil

import pytest
import torch

from duollm import DuoConfig
from duollm.checkpoint import load_checkpoint
from duollm.data import load_data
from duollm.train import TrainConfig, latest_checkpoint, train
from multiproc import torchrun

TINY = DuoConfig.from_name("tiny", n_layers=2)


_TRAIN_SCRIPT = """
    import os, sys, torch
    from duollm import DuoConfig
    from duollm.data import load_data
    from duollm.train import TrainConfig, train
    cfg = TrainConfig(**eval(sys.argv[2]))
    res = train(DuoConfig.from_name("tiny", n_layers=2), load_data("default"), cfg)
    torch.save({"state": res.model.state_dict(), "history": res.history,
                "type": type(res.model).__name__},
               os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
"""

_KW = dict(steps=4, batch_size=4, seq_len=32, warmup=1, eval_every=2, eval_batches=1,
           progress=False, p_skip=0.2, p_small=0.4, p_big=0.4)


def _assert_matches(history, state, single):
    # Same global batches and routes as one process; only the float32 summation order
    # differs (two half-batch losses and gradients, reduce-scattered, instead of one batch).
    # Measured for this run (4 steps, skip/small/big mix): training losses differ by 4.8e-7
    # (1 ulp at ~5) and weights by at most 7.0e-7; Adam's normalisation can turn a 1e-7
    # relative gradient difference into ~lr * 1e-4 on a coordinate whose gradient is tiny.
    # rel 1e-5 on losses (~20 ulp) and atol 1e-4 on weights (>100x the measured value) leave
    # room for other CPUs and BLAS builds, while a wrong slice, a missed reduction or a
    # different route draw moves losses by >= 1e-3 and weights by ~lr = 3e-3.
    for h_run, h_one in zip(history, single.history, strict=True):
        assert h_run["step"] == h_one["step"]
        assert h_run["train_loss"] == pytest.approx(h_one["train_loss"], rel=1e-5, abs=1e-5)
        for policy, loss in h_one["val"].items():
            assert h_run["val"][policy] == pytest.approx(loss, rel=1e-5, abs=1e-5)
    for name, t in single.model.state_dict().items():
        torch.testing.assert_close(state[name], t, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """Two FSDP ranks, 4 steps, a checkpoint every 2 steps; and the same run in one process."""
    tmp = tmp_path_factory.mktemp("fsdp")
    kw = dict(_KW, fsdp=True, out_dir=str(tmp / "ckpt"), checkpoint_every=2,
              keep_checkpoints=2)
    torchrun(_TRAIN_SCRIPT, tmp, str(tmp), repr(kw))
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    single = train(TINY, load_data("default"), TrainConfig(**_KW))
    return tmp, kw, ranks, single


def test_fsdp_matches_single_process(fsdp_run):
    _, _, ranks, single = fsdp_run
    assert ranks[0]["type"] == "DuoLLM"  # handed back whole, not as DTensor shards
    for name, t in ranks[0]["state"].items():  # every rank gets the same full model
        assert torch.equal(t, ranks[1]["state"][name]), name
    _assert_matches(ranks[0]["history"], ranks[0]["state"], single)


def test_fsdp_checkpoints_are_full_and_resume_anywhere(fsdp_run, tmp_path):
    tmp, kw, ranks, single = fsdp_run
    final = latest_checkpoint(kw["out_dir"])
    assert final.endswith("step_0000004")
    model, state = load_checkpoint(final)  # an ordinary, whole-model checkpoint
    for name, t in model.state_dict().items():
        assert torch.equal(t, ranks[0]["state"][name]), name
    assert state["extra"]["train_config"]["fsdp"] is True
    # The FSDP step-2 checkpoint resumes in one process (no sharding): optimizer state and
    # generator came through the format conversion, so the run ends where one process ends.
    out = tmp_path / "resume"
    out.mkdir()
    shutil.copytree(os.path.join(kw["out_dir"], "step_0000002"), out / "step_0000002")
    resumed = train(TINY, load_data("default"),
                    TrainConfig(**_KW, out_dir=str(out), resume=True))
    _assert_matches(resumed.history, resumed.model.state_dict(), single)


def test_fsdp_resumes_under_torchrun(fsdp_run, tmp_path):
    tmp, kw, ranks, _ = fsdp_run
    out = tmp_path / "ckpt"
    out.mkdir()
    shutil.copytree(os.path.join(kw["out_dir"], "step_0000002"), out / "step_0000002")
    torchrun(_TRAIN_SCRIPT, tmp_path, str(tmp_path),
             repr(dict(kw, out_dir=str(out), resume=True)))
    again = torch.load(tmp_path / "rank0.pt", weights_only=True)
    # Same ranks, same shards, same reduction order: a sharded resume is bit-identical.
    for name, t in ranks[0]["state"].items():
        assert torch.equal(again["state"][name], t), name
    assert [h["train_loss"] for h in again["history"]] == \
        [h["train_loss"] for h in ranks[0]["history"]]


def test_fsdp_is_a_no_op_in_one_process():
    data = load_data("default")
    kw = dict(_KW, steps=2, eval_every=0)
    a = train(TINY, data, TrainConfig(**kw, fsdp=True))
    b = train(TINY, data, TrainConfig(**kw))
    for name, t in a.model.state_dict().items():
        assert torch.equal(t, b.model.state_dict()[name]), name


# --------------------------------------------------------------------------- sharded oracle

_ORACLE_SCRIPT = """
    import os, sys, torch
    from duollm import DuoConfig, DuoLLM
    from duollm.study.parallel import sharded_pattern_losses, sharded_search
    torch.manual_seed(0)
    model = DuoLLM(DuoConfig.from_name("tiny", n_layers=3)).eval()  # the same on every rank
    tokens = torch.load(os.path.join(sys.argv[1], "tokens.pt"))
    out = {}
    for name, kw in eval(sys.argv[2]).items():
        r = sharded_search(model, tokens, **kw)
        out[name] = {"routes": r.routes, "loss": r.loss, "n": r.patterns_evaluated,
                     "label": r.label}
    table = sharded_pattern_losses(model, tokens, "token", base="pattern")
    out["table"] = {"losses": table.losses, "patterns": table.patterns,
                    "select2": table.select(2).loss}
    torch.save(out, os.path.join(sys.argv[1], f"oracle{os.environ['RANK']}.pt"))
"""

# B = 5 splits 3 + 2: uneven shares, each rank's GEMMs see a different batch than one process's.
_SEARCHES = {
    "sequence": dict(budget=1, granularity="sequence"),
    "paper_token": dict(budget=2, granularity="token", base="pattern"),
    "context_token_skip": dict(budget=None, granularity="token", base="small", skip=True),
    "beam_sequence": dict(budget=2, granularity="sequence", method="beam", beam_width=2),
    "greedy_context": dict(budget=1, granularity="token", base="big", method="greedy"),
}


def test_sharded_oracle_equals_one_process(tmp_path):
    from duollm import DuoLLM
    from duollm.oracle import pattern_losses, search

    data = load_data("default")
    tokens = torch.stack([data.val[i * 40:i * 40 + 17] for i in range(5)])  # (5, 17)
    torch.save(tokens, tmp_path / "tokens.pt")
    torchrun(_ORACLE_SCRIPT, tmp_path, str(tmp_path), repr(_SEARCHES))
    ranks = [torch.load(tmp_path / f"oracle{r}.pt", weights_only=True) for r in (0, 1)]
    torch.manual_seed(0)
    model = DuoLLM(DuoConfig.from_name("tiny", n_layers=3)).eval()
    for name, kw in _SEARCHES.items():
        one = search(model, tokens, **kw)
        for got in (ranks[0][name], ranks[1][name]):  # every rank gets the whole result
            assert torch.equal(got["routes"], one.routes), name  # exact, in batch order
            assert torch.equal(got["loss"], one.loss), name
            assert got["n"] == one.patterns_evaluated and got["label"] == one.label, name
    table = pattern_losses(model, tokens, "token", base="pattern")
    assert torch.equal(ranks[0]["table"]["patterns"], table.patterns)
    assert torch.equal(ranks[0]["table"]["losses"], table.losses)
    assert torch.equal(ranks[0]["table"]["select2"], table.select(2).loss)


def test_sharded_search_refuses_the_batch_wide_beam():
    from duollm import DuoLLM
    from duollm.study.parallel import sharded_search

    model = DuoLLM(TINY)
    with pytest.raises(ValueError, match="method"):
        sharded_search(model, torch.zeros(2, 9, dtype=torch.int64), 1, "token",
                       method="beam", base="pattern")


def test_sharded_search_in_one_process_is_search():
    from duollm import DuoLLM
    from duollm.oracle import search
    from duollm.stack import as_stack
    from duollm.study.parallel import sharded_pattern_losses, sharded_search

    torch.manual_seed(0)
    model = DuoLLM(TINY).eval()
    tokens = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(0))
    one = search(model, tokens, 1, "token", base="pattern")
    for m in (model, as_stack(model)):  # a module or a RoutedStack
        got = sharded_search(m, tokens, 1, "token", base="pattern")
        assert torch.equal(got.routes, one.routes) and torch.equal(got.loss, one.loss)
    table = sharded_pattern_losses(model, tokens, "sequence")
    assert torch.equal(table.select(1).loss, search(model, tokens, 1).loss)


# --------------------------------------------------------------------------- the study

_STUDY_SCRIPT = """
    import json, os, sys
    import duollm.study.parallel as P
    from duollm.cli import main
    walked = []
    inner = P.pattern_losses
    def counting(model, tokens, *a, **kw):  # the sequences this rank's walks were given
        walked.append(int(tokens.shape[0]))
        return inner(model, tokens, *a, **kw)
    P.pattern_losses = counting
    import duollm.study.sharded_table as SH  # the pattern tables: each rank its chunks
    inner_walk = SH._walk
    def counting_walk(model, tokens, full):
        walked.append(int(tokens.shape[0]))
        return inner_walk(model, tokens, full)
    SH._walk = counting_walk
    rc = main(["study", "--quick", "--out", sys.argv[1], "--no-progress", "--n-random", "5",
               "--no-synthetic-check", "--threads", "1"])
    with open(os.path.join(sys.argv[2], f"walked{os.environ['RANK']}.json"), "w") as f:
        json.dump({"rc": rc, "walked": walked,
                   "report": os.path.exists(os.path.join(sys.argv[1], "report.md"))}, f)
"""


@pytest.mark.slow  # among the suite's slowest (30-75 s); make test stays short
def test_study_under_torchrun_shards_its_oracle_and_matches_one_process(tmp_path):
    """`torchrun -m duollm study`: each rank walks its share of the holdout sequences, the
    report is rank 0's and its oracle numbers are one process's. Training is data-parallel
    (float summation order differs from one process by ~1e-7 in the weights, see
    _assert_matches), so the losses are compared at 1e-4; a share walked in the wrong order
    or a rank's table lost moves the selection/evaluation split's numbers by far more."""
    import json

    from duollm.cli import main

    out = tmp_path / "two"
    torchrun(_STUDY_SCRIPT, tmp_path, str(out), str(tmp_path))
    ranks = [json.loads((tmp_path / f"walked{r}.json").read_text()) for r in (0, 1)]
    assert [r["rc"] for r in ranks] == [0, 0]
    one = tmp_path / "one"
    assert main(["study", "--quick", "--out", str(one), "--no-progress", "--n-random", "5",
                 "--no-synthetic-check", "--threads", "1"]) == 0
    got = json.loads((out / "results.json").read_text())
    want = json.loads((one / "results.json").read_text())
    # Each walk (2 holdouts x (pattern table + context-big table)) got half the sequences.
    n_seq = want["holdouts"][0]["n_sequences"]
    n_walks = len(ranks[0]["walked"])
    assert n_walks == len(ranks[1]["walked"]) >= 4
    for w0, w1 in zip(ranks[0]["walked"], ranks[1]["walked"]):
        assert w0 + w1 in (n_seq, n_seq // 2) and abs(w0 - w1) <= 1  # all, or the eval half
    for hg, hw in zip(got["holdouts"], want["holdouts"], strict=True):
        for cg, cw in zip(hg["curves"], hw["curves"], strict=True):
            if cg["name"] == "router":
                continue  # routers train on rank 0 against a data-parallel trained model
            for pg, pw in zip(cg["points"], cw["points"], strict=True):
                assert pg["estimate"] == pytest.approx(pw["estimate"], abs=1e-4), cg["name"]
        assert hg["skip"]["big_or_skip_loss"]["estimate"] == pytest.approx(
            hw["skip"]["big_or_skip_loss"]["estimate"], abs=1e-4)
