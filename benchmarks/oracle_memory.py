"""Per-rank memory and cost of the study's oracle table, on the CPU (gloo).

Run under torchrun with R ranks (1, 2, 4, ...)::

    torchrun --standalone --nproc_per_node R benchmarks/oracle_memory.py \\
        --layers 6 --seqs 32 --seq-len 129 --mode local --out runs/oracle_memory/local-R.json

``--mode local``: ``duollm.study.sharded_table.build_local_table`` (each rank keeps its
share) plus every reduction the study reads; ``--mode gather``:
``duollm.study.parallel.sharded_pattern_losses`` (every rank receives the whole table), for
comparison. Each rank reports its resident-set growth over the walk (peak RSS from
``getrusage`` minus the RSS before it, after a warm-up walk), its table bytes, and the walk's
seconds; rank 0 writes them with the cost per position per pattern (seconds x ranks /
(positions x patterns): CPU-seconds, so 1 and R ranks compare directly) to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--seqs", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=129)
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--mode", choices=("local", "gather"), default="local")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    from duollm import DuoConfig, DuoLLM, distributed
    from duollm.study.parallel import sharded_pattern_losses
    from duollm.study.sharded_table import build_local_table

    torch.manual_seed(0)
    model = DuoLLM(DuoConfig.from_name("tiny", n_layers=args.layers)).eval()
    tokens = torch.randint(0, 256, (args.seqs, args.seq_len),
                           generator=torch.Generator().manual_seed(1))
    info = distributed.join("cpu")
    with torch.no_grad():
        build_local_table(model, tokens[:1, :8], chunk=1)  # warm-up: allocator, kernels
    distributed.barrier(info)
    before = rss_bytes()
    t0 = time.perf_counter()
    with torch.no_grad():
        if args.mode == "local":
            table = build_local_table(model, tokens, chunk=args.chunk)
            n = table.patterns.shape[0]
            table_bytes = table.table_bytes
            table.seq_means()
            for k in range(args.layers + 1):
                table.oracle(table.mask(k))
            table.token_losses(table.index([1] * args.layers))
        else:
            tab = sharded_pattern_losses(model, tokens, "token", base="pattern", skip=True)
            n = tab.patterns.shape[0]
            table_bytes = tab.losses.numel() * tab.losses.element_size()
    seconds = time.perf_counter() - t0
    row = {"rank": info.rank, "growth_bytes": peak_rss_bytes() - before,
           "table_bytes": table_bytes, "seconds": seconds, "rss_before": before}
    rows = distributed.gather_objects(info, row)
    if info.is_main:
        world = max(1, info.world_size)
        positions = args.seqs * (args.seq_len - 1)
        out = {"mode": args.mode, "ranks": world, "layers": args.layers, "patterns": n,
               "sequences": args.seqs, "seq_len": args.seq_len, "positions": positions,
               "full_table_bytes": n * positions * 4, "per_rank": rows,
               "seconds": max(r["seconds"] for r in rows),
               "cpu_s_per_position_pattern": max(r["seconds"] for r in rows) * world
               / (positions * n)}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        print(json.dumps({k: v for k, v in out.items() if k != "per_rank"}))
        for r in rows:
            print(f"  rank {r['rank']}: growth {r['growth_bytes'] / 2**20:.1f} MiB, table "
                  f"{r['table_bytes'] / 2**20:.1f} MiB, {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
