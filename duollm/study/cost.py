"""A cost model of the study's oracle walk: FLOPs, time, memory per rank and disk, for the
job a ``duollm study`` command asks for (``duollm study --dry-run``) or the paper's.

The walk (``duollm.oracle.pattern_losses``, ``base="pattern"``) shares prefixes: a tree whose
depth-l nodes each run one layer over the B x T tokens, and whose leaves (one per pattern)
run the LM head. With p paths per layer (2 for big/small or big/skip, 3 for the full 3^L
walk), one walk over one token costs

    layers: sum_{l=1..L} p^l = (p^(L+1) - p) / (p - 1) layer evaluations, each
            attention (8 d^2 + 2 T d, causal) plus the FFN of the node's path
            (big 6 d d_big, small 6 d d_small, skip 0; the average over the paths)
    leaves: p^L LM heads of 2 d V each

so the cost per position per pattern is about p/(p-1) layer evaluations plus one LM head:
independent of L. The study runs one 3^L walk while 3^L <= 3^10, else a big/small and a
big/skip 2^L walk (2 * 2^L - 1 patterns; the paper's 4,096 are the big/small half).

Time is FLOPs over (ranks x peak x utilisation); the utilisation of the walk on a GPU is an
ASSUMPTION (no GPU was measured here: see docs/study.md). On the CPU the time uses the
seconds per position per pattern measured with ``benchmarks/oracle_memory.py``.

Memory per rank (``duollm.study.sharded_table``): the rank's share of the float32 table,
``n * ceil(B / R) * (T-1) * 4`` bytes, plus the gathered statistics (``8 n B`` for the
per-sequence pattern means, ``16 B (T-1)`` per oracle mask kept), the weights, and the walk's
working set (two branch batches of ``max_elems`` floats and the hidden state of each depth
for one chunk of sequences). Disk: the chunk checkpoints hold the whole table once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

# The oracle's branch batch bound (duollm.oracle.pattern_losses' max_elems default).
MAX_ELEMS = 1 << 24
# Oracle masks the study keeps at once (per-k oracles are reduced one by one; a few are held).
MASKS_HELD = 4
# H200 SXM: dense bf16 tensor-core peak, FLOP/s (NVIDIA's datasheet: 989 TFLOP/s without
# sparsity, the same as H100 SXM), and 141 GB of HBM3e.
H200_PEAK_FLOPS = 989e12
H200_MEMORY_BYTES = 141e9
# ASSUMED share of that peak the walk sustains: branch batches are large GEMMs, but the LM head
# log-softmax, gathers and prefix bookkeeping are not. A projection parameter, not a measurement.
GPU_UTILISATION = 0.35
# Measured on this repository's 2-core CPU machine (benchmarks/oracle_memory.py, tiny preset,
# 4 layers, 64 x 128 positions, one process): 4.1e-5 CPU seconds per position per pattern at
# the cost model's 158,584 FLOPs per position per pattern, i.e. 3.9 GFLOP/s sustained. CPU
# times scale that rate by FLOPs: an upper bound for wider models, whose GEMMs run faster.
# See docs/study.md for the runs (1 and 2 ranks, three sizes); a loaded machine measures slower.
CPU_S_PER_POSITION_PATTERN = 4.1e-5
CPU_FLOPS = 158_584 / CPU_S_PER_POSITION_PATTERN


@dataclass(frozen=True)
class OracleJob:
    """The shape of one oracle job: the model, the holdout sequences, the ranks."""

    n_layers: int
    d_model: int
    d_big: int
    d_small: int
    vocab_size: int
    n_params: int
    n_sequences: int      # per holdout
    seq_len: int          # tokens per sequence (T; T-1 scored positions)
    n_holdouts: int = 2
    ranks: int = 1
    chunk: int = 8        # sequences per saved chunk (duollm.study.sharded_table)
    walks: str = "study"  # "study": as duollm study walks; "paper": big/small 2^L only

    def __post_init__(self):
        for name in ("n_layers", "d_model", "d_big", "d_small", "vocab_size", "n_params",
                     "n_sequences", "seq_len", "n_holdouts", "ranks", "chunk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len: expected at least 2 tokens, got {self.seq_len}")
        if self.walks not in ("study", "paper"):
            raise ValueError(f"walks: expected 'study' or 'paper', got {self.walks!r}")


@dataclass(frozen=True)
class Projection:
    """What ``project`` gives: patterns, positions and FLOPs (all holdouts), time on the
    device, peak memory per rank, disk, and the assumptions behind the time."""

    patterns: int
    positions: int
    flops: float
    flops_per_position_pattern: float
    seconds: float
    device: str
    table_bytes_per_rank: int
    memory_bytes_per_rank: int
    disk_bytes: int
    assumption: str


def walks_of(job: OracleJob):
    """[(paths per layer p, FFN FLOPs per token of each path)] of the walks the job runs."""
    from .sharded_table import FULL_SKIP_LIMIT

    d, L = job.d_model, job.n_layers
    big, small = 6 * d * job.d_big, 6 * d * job.d_small
    if job.walks == "paper":
        return [(2, (big, small))]
    if 3 ** L <= FULL_SKIP_LIMIT:
        return [(3, (big, small, 0))]
    return [(2, (big, small)), (2, (big, 0))]


def n_patterns(job: OracleJob) -> int:
    """Distinct patterns in the table (the two 2^L walks share all big)."""
    ws = walks_of(job)
    return sum(p ** job.n_layers for p, _ in ws) - (len(ws) - 1)


def walk_flops_per_token(job: OracleJob) -> float:
    """Forward FLOPs of every walk over one token position (prefix sharing counted)."""
    d, L, T = job.d_model, job.n_layers, job.seq_len
    attn = 8 * d * d + 2 * T * d  # projections, and causal scores + values at T/2 keys
    total = 0.0
    for p, ffns in walks_of(job):
        nodes = (p ** (L + 1) - p) / (p - 1)
        total += nodes * (attn + sum(ffns) / len(ffns)) + p ** L * 2 * d * job.vocab_size
    return total


def project(job: OracleJob, device: str = "cuda", utilisation: float = GPU_UTILISATION,
            peak_flops: float = H200_PEAK_FLOPS, cpu_flops: float = CPU_FLOPS) -> Projection:
    """The projected cost of ``job`` on ``job.ranks`` H200s (``device="cuda"``) or CPU
    processes (``"cpu"``: the FLOP rate measured for the tiny preset's walk)."""
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device: expected 'cuda' or 'cpu', got {device!r}")
    n = n_patterns(job)
    positions = job.n_holdouts * job.n_sequences * (job.seq_len - 1)
    flops = walk_flops_per_token(job) * job.n_holdouts * job.n_sequences * job.seq_len
    if device == "cuda":
        seconds = flops / (job.ranks * peak_flops * utilisation)
        assumption = (f"{job.ranks} x H200 at {utilisation:.0%} of the {peak_flops / 1e12:.0f} "
                      f"TFLOP/s bf16 dense peak (an assumption, not a measurement)")
    else:
        seconds = flops / (job.ranks * cpu_flops)
        assumption = (f"{job.ranks} CPU process(es) at the {cpu_flops / 1e9:.1f} GFLOP/s "
                      f"measured for the tiny preset's walk on one core")
    per_rank_seqs = math.ceil(job.n_sequences / job.ranks)
    table = n * per_rank_seqs * (job.seq_len - 1) * 4  # one holdout at a time
    stats = 8 * n * job.n_sequences + 16 * job.n_sequences * (job.seq_len - 1) * MASKS_HELD
    weights = 2 * job.n_params if device == "cuda" else 4 * job.n_params
    working = (2 * MAX_ELEMS * 4
               + job.n_layers * job.chunk * job.seq_len * max(job.d_model, job.d_big) * 4)
    disk = job.n_holdouts * n * job.n_sequences * (job.seq_len - 1) * 4
    return Projection(n, positions, flops, flops / (n * positions), seconds,
                      "H200" if device == "cuda" else "CPU", table,
                      table + stats + weights + working, disk, assumption)


def job_of_config(config, n_sequences: int, seq_len: int, n_holdouts: int = 2,
                  ranks: int = 1, walks: str = "study") -> OracleJob:
    """An ``OracleJob`` for a ``DuoConfig``."""
    return OracleJob(config.n_layers, config.d_model, config.d_big, config.d_small,
                     config.vocab_size, config.param_count(), n_sequences, seq_len,
                     n_holdouts, ranks, walks=walks)


def _size(b: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= scale:
            return f"{b / scale:.1f} {unit}"
    return f"{b:.0f} B"


def _time(s: float) -> str:
    if s >= 86400:
        return f"{s / 86400:.1f} days"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def describe(job: OracleJob, proj: Projection, label: Optional[str] = None) -> str:
    """The projection as the lines ``duollm study --dry-run`` prints."""
    lines = [f"{label or 'oracle job'}: {job.n_layers} layers (d_model {job.d_model}, "
             f"{job.n_params / 1e6:,.1f}M parameters), {job.n_holdouts} holdout(s) x "
             f"{job.n_sequences} sequences x {job.seq_len - 1} scored positions, "
             f"{proj.patterns:,} patterns, {job.ranks} rank(s)",
             f"  FLOPs      {proj.flops:.3g} ({proj.flops_per_position_pattern:,.0f} per "
             f"position per pattern)",
             f"  time       {_time(proj.seconds)} (projection: {proj.assumption})",
             f"  memory     {_size(proj.memory_bytes_per_rank)} per rank (its table share "
             f"{_size(proj.table_bytes_per_rank)}, plus statistics, weights and the walk's "
             f"working set)",
             f"  disk       {_size(proj.disk_bytes)} of oracle chunk checkpoints (float32 "
             f"table, all holdouts)"]
    if proj.device == "H200" and proj.memory_bytes_per_rank > H200_MEMORY_BYTES:
        lines.append(f"  warning    more than an H200's {_size(H200_MEMORY_BYTES)} per "
                     f"rank: use more ranks")
    return "\n".join(lines)


def study_job(preset: Optional[str], quick: bool, oracle_batch: Optional[int],
              hf: Optional[str] = None, d_small: Optional[int] = None,
              n_holdouts: int = 2, ranks: int = 1, full: bool = False) -> tuple:
    """(OracleJob, label) of what ``duollm study`` with these options would run: the model
    from ``preset`` or the ``hf`` folder's config.json (no weights read), the holdout windows
    from ``--quick``/``--full``/``--oracle-batch``."""
    import json
    import os

    from ..config import DuoConfig
    from .stages import DEMO, FULL, QUICK, default_preset

    sizes = QUICK if quick else (FULL if full else DEMO)
    n_seq = sizes.n_sequences if oracle_batch is None else oracle_batch
    if hf is None:
        preset = preset or default_preset(quick, full)
        c = DuoConfig.from_name(preset)
        T = min(sizes.oracle_len, c.max_seq_len - 1) + 1
        return job_of_config(c, n_seq, T, n_holdouts, ranks), f"study of {preset}"
    with open(os.path.join(hf, "config.json")) as f:
        cfg = json.load(f)
    spec = {}
    if os.path.isfile(os.path.join(hf, "duollm.json")):
        with open(os.path.join(hf, "duollm.json")) as f:
            spec = json.load(f)
    d, L, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    d_big = cfg["intermediate_size"]
    d_small = int(spec.get("d_small") or d_small or max(1, d_big // 4))
    n_params = L * (4 * d * d + 3 * d * (d_big + d_small)) + 2 * V * d
    max_len = cfg.get("max_position_embeddings") or 2048
    T = min(sizes.oracle_len, max_len - 1) + 1
    return (OracleJob(L, d, d_big, d_small, V, n_params, n_seq, T, n_holdouts, ranks),
            f"study of {os.path.basename(os.path.normpath(hf))}")
