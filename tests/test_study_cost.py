"""The oracle's cost model (``duollm.study.cost``) and ``duollm study --dry-run``: the
closed-form FLOPs equal a node-by-node count of the prefix tree, the pattern count and the
per-rank table equal what the walk really builds, and the dry run prints without running."""
import itertools

import pytest
import torch

from duollm import DuoConfig, DuoLLM
from duollm.cli import main
from duollm.study import cost as C
from duollm.study.sharded_table import build_local_table


def _brute_flops_per_token(job):
    """Every node of every walk's prefix tree counted one by one."""
    d, T = job.d_model, job.seq_len
    attn = 8 * d * d + 2 * T * d
    total = 0
    for p, ffns in C.walks_of(job):
        for depth in range(1, job.n_layers + 1):
            for prefix in itertools.product(range(p), repeat=depth):
                total += attn + ffns[prefix[-1]]
        total += p ** job.n_layers * 2 * d * job.vocab_size
    return total


@pytest.mark.parametrize("layers", [2, 3, 11])
def test_flops_equal_a_count_of_the_tree(layers):
    job = C.job_of_config(DuoConfig.from_name("tiny", n_layers=layers), 8, 17)
    if layers == 11:  # beyond 3^10: two 2^L walks
        assert [p for p, _ in C.walks_of(job)] == [2, 2]
    assert C.walk_flops_per_token(job) == pytest.approx(_brute_flops_per_token(job),
                                                        rel=1e-12)


def test_pattern_counts():
    paper = DuoConfig.from_name("paper-1.4b")
    assert C.n_patterns(C.job_of_config(paper, 1024, 1025, walks="paper")) == 4096
    assert C.n_patterns(C.job_of_config(paper, 1024, 1025)) == 2 * 4096 - 1
    assert C.n_patterns(C.job_of_config(DuoConfig.from_name("tiny"), 8, 9)) == 81


def test_projection_matches_the_table_the_walk_builds():
    config = DuoConfig.from_name("tiny", n_layers=3)
    torch.manual_seed(0)
    model = DuoLLM(config).eval()
    tokens = torch.randint(0, 256, (7, 11), generator=torch.Generator().manual_seed(0))
    table = build_local_table(model, tokens, chunk=2)
    job = C.job_of_config(config, 7, 11, n_holdouts=1)
    proj = C.project(job, "cpu")
    assert proj.patterns == table.patterns.shape[0] == 27
    assert proj.table_bytes_per_rank == table.table_bytes
    assert proj.disk_bytes == table.table_bytes  # the chunk files hold the table once
    four = C.project(C.job_of_config(config, 7, 11, n_holdouts=1, ranks=4), "cuda")
    one = C.project(C.job_of_config(config, 7, 11, n_holdouts=1, ranks=1), "cuda")
    assert four.seconds == pytest.approx(one.seconds / 4)
    assert four.table_bytes_per_rank == 27 * 2 * 10 * 4  # ceil(7 / 4) sequences each
    with pytest.raises(ValueError, match="ranks"):
        C.OracleJob(3, 64, 256, 16, 256, 1000, 7, 11, ranks=0)


def test_dry_run_prints_and_runs_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "never"
    assert main(["study", "--quick", "--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "81 patterns, 1 rank(s)" in text and "per rank" in text and "disk" in text
    assert "projection" in text and not out.exists()
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["study", "--quick", "--dry-run", "--oracle-batch", "8"]) == 0
    assert "4 rank(s)" in capsys.readouterr().out
    monkeypatch.delenv("WORLD_SIZE")
    assert main(["study", "--quick", "--dry-run", "--oracle-batch", "2"]) == 2  # validated
    assert "--oracle-batch" in capsys.readouterr().err


def test_dry_run_counts_full_sizes_seeds_and_the_null_model(capsys):
    """--full projects the full study's holdout sequences, and --seeds/--null-control multiply
    the tables walked (the first version projected the demo's 40 sequences and one table)."""
    from duollm.study.stages import FULL

    assert main(["study", "--full", "--preset", "tiny", "--dry-run"]) == 0
    one = capsys.readouterr().out
    assert f"x {FULL.n_sequences} sequences" in one and "tables" not in one
    assert main(["study", "--full", "--preset", "tiny", "--seeds", "3", "--null-control",
                 "--dry-run"]) == 0
    six = capsys.readouterr().out
    assert "tables     6 (3 seed(s) x (real + null model))" in six
    minutes = float(six.split("tables")[1].split(":")[1].split("min")[0])
    per_table = C.project(C.study_job("tiny", False, None, full=True)[0], "cpu").seconds
    assert minutes == pytest.approx(6 * per_table / 60, abs=0.06)


def test_full_defaults_to_the_wide_preset_and_an_explicit_preset_wins(capsys):
    from duollm import DuoConfig
    from duollm.study.stages import default_preset

    assert (default_preset(), default_preset(quick=True), default_preset(full=True)) == (
        "small", "tiny", "wide")
    wide = DuoConfig.from_name("wide")
    assert (wide.n_layers, wide.d_model, wide.d_big, wide.d_small) == (4, 64, 1024, 16)
    assert main(["study", "--full", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("study of wide: 4 layers")
    assert main(["study", "--full", "--preset", "tiny", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("study of tiny: 4 layers")
