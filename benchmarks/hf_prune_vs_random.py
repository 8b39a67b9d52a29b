"""What pruned small paths buy: loss at all-small on held-out text, prune vs random init.

A small Llama (built from a config, nothing downloaded) is first trained as an ordinary dense
model on the embedded corpus (bytes), so that its FFNs hold something worth pruning. It is then
converted three ways -- ``init="random"``, ``init="prune"`` with the weight-only score, and
``init="prune"`` with activation-aware calibration on training text -- and each is scored on
the held-out split at all-big and all-small, before and after a short stage 1
(``duollm.hf.train_small``, small paths only, all-small routing).

    python benchmarks/hf_prune_vs_random.py [--steps 300] [--stage1-steps 60] [--out DIR]

Writes ``hf-prune-vs-random-<stamp>.json`` (environment + rows) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from duollm import hf
from duollm.bench.results import committed_results_dir, environment, stamp
from duollm.data import load_data, sample_batch
from duollm.hf.train import evaluate, train_small
from duollm.train import TrainConfig, lr_at


@dataclass
class PruneRow:
    """Held-out loss (nats/token) of one conversion, before and after stage 1."""

    init: str
    calibration_tokens: int
    big: float
    small: float
    small_after_stage1: float
    stage1_steps: int


def pretrain(model, data, steps: int, batch: int, seq: int, seed: int) -> float:
    """Ordinary dense training of the HF model (AdamW, warm-up + cosine); returns last loss."""
    cfg = TrainConfig(steps=steps, lr=3e-3, min_lr=3e-4, warmup=max(1, steps // 20))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                            weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.zeros(())
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x = sample_batch(data.train, batch, seq, gen)  # (B, T + 1)
        logits = model(input_ids=x[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    return loss.item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300, help="dense pre-training steps")
    p.add_argument("--stage1-steps", type=int, default=60, help="train_small steps")
    p.add_argument("--d-small", type=int, default=32)
    p.add_argument("--calibration-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="default: benchmarks/results/<device>/")
    args = p.parse_args(argv)
    import transformers

    torch.set_num_threads(args.threads)
    t0 = time.time()
    data = load_data()  # the embedded pydoc corpus as bytes; its end is held out
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    seq, batch = 128, 16
    last = pretrain(base, data, args.steps, batch, seq, seed=0)
    print(f"pre-trained {args.steps} steps, last training loss {last:.3f} "
          f"({time.time() - t0:.0f} s)", flush=True)
    calib = data.train[:args.calibration_tokens // seq * seq].view(-1, seq)
    rows = []
    stage1 = TrainConfig(steps=args.stage1_steps, batch_size=batch, seq_len=seq, lr=3e-3,
                         warmup=5, p_small=1.0, p_big=0.0, eval_every=0, eval_batches=8,
                         progress=False)
    for init, calibration in (("random", None), ("prune", None), ("prune", calib)):
        model = hf.convert(copy.deepcopy(base), args.d_small, init=init,
                           calibration=calibration)
        before = evaluate(model, data, seq, batch, 8, policies=("big", "small"))
        after = train_small(model, data, stage1).val_loss if args.stage1_steps else {}
        rows.append(PruneRow(init=init, calibration_tokens=0 if calibration is None
                             else calibration.numel(), big=before["big"],
                             small=before["small"],
                             small_after_stage1=after.get("small", float("nan")),
                             stage1_steps=args.stage1_steps))
        print(rows[-1], flush=True)
    out = args.out or committed_results_dir(torch.device("cpu"))
    os.makedirs(out, exist_ok=True)
    env = environment(torch.device("cpu"), torch.float32, kind="hf-prune-vs-random",
                      model_config=config.to_dict(), d_small=args.d_small,
                      pretrain_steps=args.steps, seq_len=seq, batch=batch,
                      seconds=round(time.time() - t0, 1))
    path = os.path.join(out, f"hf-prune-vs-random-{stamp()}.json")
    with open(path, "w") as f:
        json.dump({"env": env, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1,
                  default=str)
    print("\n| init | calibration tokens | all-big | all-small | all-small after "
          f"{args.stage1_steps} stage-1 steps |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.init} | {r.calibration_tokens} | {r.big:.3f} | {r.small:.3f} | "
              f"{r.small_after_stage1:.3f} |")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
