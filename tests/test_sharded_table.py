"""The oracle table kept per rank (``duollm.study.sharded_table``): its reductions give the
study's numbers exactly, two gloo ranks give one process's bit for bit while each keeps half
the table, and a walk killed with SIGKILL resumes from its saved chunks to the same result."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from duollm import DuoConfig, DuoLLM
from duollm.study import stages as St
from duollm.study.sharded_table import build_local_table, chunk_ranges
from multiproc import torchrun

B, T = 10, 13  # sequences and tokens: 10 is not a multiple of the chunk (3) nor of 4 ranks


def _model_and_tokens():
    torch.manual_seed(0)
    model = DuoLLM(DuoConfig.from_name("tiny", n_layers=3)).eval()
    tokens = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(1))
    return model, tokens


def _stats(table):
    """Every statistic the study reads, as the collective reductions give them."""
    L = table.L
    kc, sched = St.schedules(L, T - 1)
    per_pos = (table.patterns == 2).sum(1)[:, None] == torch.tensor(sched["decreasing"])[None]
    per_pos &= ((table.patterns == 0).sum(1) == 0)[:, None]
    out = {"seq_means": table.seq_means(),
           "small": table.token_losses(table.index([1] * L)),
           "per_position": table.oracle(per_pos)}
    for k in range(L + 1):
        out[f"k{k}"] = table.oracle(table.mask(k))
    out["skip"] = table.oracle(table.mask(1, small=False, skip=True))
    return out


def test_reductions_equal_the_whole_table():
    model, tokens = _model_and_tokens()
    local = build_local_table(model, tokens, chunk=3)
    whole = St.pattern_table(model, tokens)
    assert torch.equal(local.patterns, whole.patterns)
    assert local.rows == range(B) and local.losses.dtype == torch.float32
    got = _stats(local)
    assert torch.equal(got["seq_means"], whole.losses.mean(2))
    assert torch.equal(got["small"], whole.losses[whole.index([1] * 3)])
    for k in range(4):
        loss, idx = whole.oracle(whole.mask(k))
        assert torch.equal(got[f"k{k}"][0], loss) and torch.equal(got[f"k{k}"][1], idx)
    loss, idx = whole.oracle(whole.mask(1, small=False, skip=True))
    assert torch.equal(got["skip"][0], loss) and torch.equal(got["skip"][1], idx)
    # Figure 4a's per-sequence values: the oracle, all big, and a fixed pattern's
    curves, values = St.loss_curves(whole, whole, 5, 0, 50)
    for k in range(4):
        assert torch.equal(got[f"k{k}"][0].mean(1), values["oracle"][k])
    big = whole.index([2] * 3)
    assert torch.equal(got["seq_means"][big], St.seq_mean(whole.losses[big]))


def test_chunk_ranges():
    assert chunk_ranges(10, 3) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert chunk_ranges(0, 3) == []
    with pytest.raises(ValueError, match="chunk"):
        chunk_ranges(10, 0)


_RANKS_SCRIPT = """
    import os, sys, tracemalloc, torch
    sys.path.insert(0, sys.argv[2])
    from test_sharded_table import _model_and_tokens, _stats
    from duollm.study.sharded_table import build_local_table
    model, tokens = _model_and_tokens()
    tracemalloc.start()
    table = build_local_table(model, tokens, chunk=3)
    stats = _stats(table)
    _, peak = tracemalloc.get_traced_memory()
    from duollm.oracle import Exactly
    from duollm.study.parallel import sharded_selected_losses
    context_big = sharded_selected_losses(model, tokens, [Exactly(k) for k in range(4)],
                                          "token", base="big")
    torch.save({"stats": stats, "rows": list(table.rows), "table_bytes": table.table_bytes,
                "peak": peak, "context_big": context_big},
               os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
"""


def test_two_ranks_equal_one_process_and_each_keeps_its_share(tmp_path):
    torchrun(_RANKS_SCRIPT, tmp_path, str(tmp_path), os.path.dirname(__file__))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    model, tokens = _model_and_tokens()
    one = build_local_table(model, tokens, chunk=3)
    expected = _stats(one)
    for r in ranks:  # every rank holds every statistic, bit for bit one process's
        for name, value in expected.items():
            got = r["stats"][name]
            if isinstance(value, tuple):
                assert all(torch.equal(a, b) for a, b in zip(got, value)), name
            else:
                assert torch.equal(got, value), name
    # 4 chunks of 3, 3, 3, 1 sequences: rank 0 walks the first two, rank 1 the rest
    assert ranks[0]["rows"] == list(range(0, 6)) and ranks[1]["rows"] == list(range(6, 10))
    n, per_seq = one.patterns.shape[0], (T - 1) * 4
    assert ranks[0]["table_bytes"] == n * 6 * per_seq
    assert ranks[1]["table_bytes"] == n * 4 * per_seq
    assert one.table_bytes == n * B * per_seq
    # the context-big oracle (base="big"): each rank walks its share, the selections gathered
    from duollm.oracle import Exactly, pattern_losses

    tab = pattern_losses(model, tokens, "token", base="big")
    for r in ranks:
        for k, loss in enumerate(r["context_big"]):
            assert torch.equal(loss, tab.select(Exactly(k)).loss), k


_KILL_SCRIPT = """
    import os, signal, sys, torch
    sys.path.insert(0, sys.argv[2])
    from test_sharded_table import _model_and_tokens, _stats
    from duollm.study import sharded_table
    kill_at = int(sys.argv[3])
    walks = []
    real = sharded_table._walk
    def walk(*args):
        walks.append(1)
        if len(walks) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: as a killed job
        return real(*args)
    sharded_table._walk = walk
    model, tokens = _model_and_tokens()
    table = sharded_table.build_local_table(model, tokens, chunk=3,
                                            checkpoint_dir=os.path.join(sys.argv[1], "ck"))
    torch.save({"stats": _stats(table), "walks": len(walks)},
               os.path.join(sys.argv[1], "out.pt"))
"""


def test_sigkill_then_resume_gives_the_same_table(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(_KILL_SCRIPT))
    here = os.path.dirname(__file__)

    def run(kill_at):
        return subprocess.run([sys.executable, str(script), str(tmp_path), here, str(kill_at)],
                              capture_output=True, text=True, timeout=300)

    first = run(3)  # killed while walking the third of four chunks
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    saved = sorted(f for f in os.listdir(tmp_path / "ck") if f.endswith(".pt"))
    assert saved == ["rows_0000000_0000003.pt", "rows_0000003_0000006.pt"]
    second = run(0)  # resumes: walks only the two chunks not saved
    assert second.returncode == 0, second.stderr[-2000:]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out["walks"] == 2
    model, tokens = _model_and_tokens()
    expected = _stats(build_local_table(model, tokens, chunk=3))
    for name, value in expected.items():
        got = out["stats"][name]
        if isinstance(value, tuple):
            assert all(torch.equal(a, b) for a, b in zip(got, value)), name
        else:
            assert torch.equal(got, value), name
    # the saved chunks belong to these sequences: another job's tokens are refused
    from duollm.study.sharded_table import build_local_table as build

    with pytest.raises(ValueError, match="another job"):
        build(model, tokens.flip(0), chunk=3, checkpoint_dir=str(tmp_path / "ck"))
    other = DuoLLM(DuoConfig.from_name("tiny", n_layers=3)).eval()  # another init
    with pytest.raises(ValueError, match="another model"):
        build(other, tokens, chunk=3, checkpoint_dir=str(tmp_path / "ck"))


_ONCE_SCRIPT = """
    import os, sys, torch
    from duollm import distributed
    from duollm.study import stages
    from duollm.study.parallel import once_across_ranks
    info = distributed.join("cpu")
    calls = []
    @once_across_ranks
    def work(scale):
        calls.append(1)
        lin = torch.nn.Linear(3, 2)
        torch.nn.init.constant_(lin.weight, scale * (1 + info.rank))  # rank-dependent
        return {"module": lin, "rank": info.rank}
    out = work(2.0)
    torch.save({"calls": len(calls), "weight": out["module"].weight.detach(),
                "from_rank": out["rank"],
                "wrapped": all(hasattr(f, "__wrapped__")
                               for f in (stages.train_routers, stages.approx_gaps))},
               os.path.join(sys.argv[1], f"once{info.rank}.pt"))
"""


def test_work_done_once_across_ranks(tmp_path):
    """Router training and the beam/greedy comparison run on rank 0 alone under torchrun;
    the other ranks receive rank 0's result (here a module whose weights name the rank)."""
    torchrun(_ONCE_SCRIPT, tmp_path, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"once{r}.pt", weights_only=True) for r in (0, 1))
    assert (r0["calls"], r1["calls"]) == (1, 0)
    assert r0["from_rank"] == r1["from_rank"] == 0
    assert torch.equal(r1["weight"], torch.full((2, 3), 2.0)) and torch.equal(r0["weight"],
                                                                             r1["weight"])
    assert r0["wrapped"] and r1["wrapped"]


def _same(a, b, path="result"):
    """Dataclass/dict/list trees equal exactly (NaN equal to NaN)."""
    import dataclasses
    import math

    if dataclasses.is_dataclass(a):
        a, b = dataclasses.asdict(a), dataclasses.asdict(b)
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, path


def test_the_analyses_read_the_per_rank_table_as_the_whole_one(monkeypatch):
    """Every analysis of a holdout and the verdicts' tie-split usage give exactly the same
    results from ``ReducedPatternLosses`` (what ``pattern_table`` returns per rank) as from
    the whole ``PatternLosses``, on the same selection/evaluation split."""
    from duollm.study import stats as S
    from duollm.study import verdicts as V
    from duollm.study.sharded_table import ReducedPatternLosses

    model, tokens = _model_and_tokens()
    monkeypatch.setenv("DUOLLM_ORACLE_TABLE", "per-rank")
    reduced = St.pattern_table(model, tokens)
    assert isinstance(reduced, ReducedPatternLosses)
    monkeypatch.setenv("DUOLLM_ORACLE_TABLE", "whole")
    whole = St.pattern_table(model, tokens)
    assert isinstance(whole, St.PatternLosses)
    sel_i, ev_i = S.split_indices(B, 0)
    runs = []
    for tab in (reduced, whole):
        sel, ev = tab.subset(sel_i), tab.subset(ev_i)
        out = {"curves": St.loss_curves(sel, ev, 5, 0, 50),
               "capacity": St.capacity(ev, {}, [1, 2], 50, 0),
               "skip": St.skip_profiles(ev, None, 50, 0),
               "position": St.position_budget(ev, 50, 0),
               "difficulty": St.difficulty(ev, tokens[ev_i], 50, 0),
               "usage": V.oracle_usage(ev, ev.mask(1), 2),
               "small": ev.losses[ev.index([1] * 3)]}
        runs.append(out)
    _same(runs[0], runs[1])
    monkeypatch.setenv("DUOLLM_ORACLE_TABLE", "sideways")
    with pytest.raises(ValueError, match="DUOLLM_ORACLE_TABLE"):
        St.pattern_table(model, tokens)
    with pytest.raises(TypeError, match="per-rank table"):
        reduced.losses[0:2]
