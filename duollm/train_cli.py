"""What ``duollm train`` and ``duollm train --hf`` share: the training flags, the
``TrainConfig`` built from them, ``--resume`` handling, the Ctrl-C report and the closing lines.

Both ``duollm.cli`` (``train``) and ``duollm.hf_cli`` (``train --hf``) import it; it imports
neither, so the two command-line modules never import each other. ``duollm.cli`` re-exports
every name here.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from typing import TYPE_CHECKING, List, Optional, Tuple

from duollm.usage import UsageError, options_of

if TYPE_CHECKING:
    from duollm.train import TrainConfig

# (flag, TrainConfig field, type, help); defaults come from TrainConfig.
TRAIN_FLAGS = [
    ("--steps", "steps", int, "optimizer steps"),
    ("--batch-size", "batch_size", int, "global batch in sequences (split across ranks)"),
    ("--seq-len", "seq_len", int, "tokens per training sequence"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--warmup", "warmup", int, "linear warm-up steps"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay of the matrices"),
    ("--grad-clip", "grad_clip", float, "gradient-norm clip (0: off)"),
    ("--p-big", "p_big", float, "probability a token takes the big FFN at a layer"),
    ("--p-small", "p_small", float, "probability a token takes the small FFN at a layer"),
    ("--p-skip", "p_skip", float, "probability a token skips the FFN at a layer"),
    ("--eval-every", "eval_every", int, "validate every N steps (0: only at the end)"),
    ("--eval-batches", "eval_batches", int, "validation batches per policy"),
    ("--seed", "seed", int, "seed of the initial weights, batches and routes"),
    ("--device", "device", str, "cpu, cuda or cuda:N"),
    ("--checkpoint-every", "checkpoint_every", int,
     "save a checkpoint every N steps into --out (0: only the final one)"),
    ("--backend", "backend", str, "op backend: torch, triton, cuda or auto"),
]



# TrainConfig field -> the flag that sets it, so its own checks name the user's option.
TRAIN_OPTION = {name: flag for flag, name, _, _ in TRAIN_FLAGS}
TRAIN_OPTION.update(min_lr="--min-lr", out_dir="--out", resume="--resume", amp="--amp",
                     progress="--no-progress")



def train_config(args: argparse.Namespace, device) -> "TrainConfig":
    """The ``TrainConfig`` of ``train``'s options (``duollm train`` and ``train --hf`` alike).

    ``--min-lr`` defaults to a tenth of ``--lr``; ``--resume``, ``--resume-if-present`` and
    ``--checkpoint-every`` without ``--out`` and every value ``TrainConfig`` rejects raise
    ``UsageError`` under the flag's name.
    """
    from duollm.train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    knobs = {k: v for k, v in vars(args).items() if k in fields}
    knobs["device"] = str(device)
    if knobs["min_lr"] is None and isinstance(knobs["lr"], (int, float)):
        knobs["min_lr"] = knobs["lr"] / 10
    if not args.out_dir:
        for flag, asked in (("--resume", args.resume),
                            ("--resume-if-present", args.resume_if_present),
                            ("--checkpoint-every", isinstance(args.checkpoint_every, int)
                             and args.checkpoint_every > 0)):
            if asked:
                raise UsageError(flag, "needs --out DIR, the folder that holds the "
                                       "checkpoints")
    with options_of(TRAIN_OPTION):
        return TrainConfig(**knobs)


def settle_resume(args: argparse.Namespace, cfg) -> Tuple["TrainConfig", Optional[str]]:
    """``--resume``/``--resume-if-present`` against ``cfg.out_dir``'s checkpoints.

    Returns ``(cfg, checkpoint)``: ``cfg`` with ``resume`` settled, and the newest
    ``step_N`` folder in ``cfg.out_dir`` (None when there is none). UsageError for
    ``--resume`` with nothing to resume, or a folder of another run without ``--resume``.
    """
    from duollm.train import latest_checkpoint

    checkpoint = latest_checkpoint(cfg.out_dir) if cfg.out_dir else None
    if args.resume and checkpoint is None:
        raise UsageError("--resume", f"no checkpoint (step_N folder) in {cfg.out_dir}; drop "
                                     f"--resume to start afresh, or use --resume-if-present")
    if args.resume_if_present:
        cfg = dataclasses.replace(cfg, resume=checkpoint is not None)
    if checkpoint is not None and not cfg.resume:
        raise UsageError("--out", f"{cfg.out_dir} already holds checkpoints of a run (latest: "
                                  f"{os.path.basename(checkpoint)}); add --resume to continue "
                                  f"it, or pick another folder")
    if checkpoint is not None and cfg.resume:
        step = checkpoint_step(checkpoint)
        if step is not None and step > cfg.steps:
            # Resuming would train nothing and report the loaded model as if --steps ran.
            raise UsageError("--steps", f"{checkpoint} is at step {step}, past --steps "
                                        f"{cfg.steps}: resuming would train nothing; give "
                                        f"--steps above {step} to continue that run")
    return cfg, checkpoint


def checkpoint_step(checkpoint: str) -> Optional[int]:
    """The step recorded in a ``step_N`` folder's ``meta.json`` (``duollm train`` and
    ``train --hf`` alike), or None when it cannot be read."""
    import json

    try:
        with open(os.path.join(checkpoint, "meta.json")) as f:
            step = json.load(f).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def describe_data(data) -> str:
    """A ``TokenData`` in words for a command's output (not its repr)."""
    return (f"{data.name} ({data.train.numel():,} training and {data.val.numel():,} "
            f"validation tokens, vocabulary {data.vocab_size:,})")


def print_train_result(result, out_dir: Optional[str], note: str = "") -> None:
    """The end of a ``train`` run: final validation loss per policy, the last throughput and
    where the checkpoints are (``note`` follows the folder, e.g. how to load them)."""
    print("\nvalidation loss (nats/token)")
    print(f"{'policy':<8} {'loss':>8}")
    for policy, loss in result.val_loss.items():
        print(f"{policy:<8} {loss:>8.4f}")
    if result.history:
        print(f"throughput {result.history[-1]['tokens_per_s']:.0f} tokens/s")
    if out_dir:
        print(f"checkpoints in {out_dir}{note}")


def check_resumable(checkpoint: str, model_config, cfg) -> None:
    """The checkpoint must hold the model these options build (else loading fails later)."""
    from duollm.checkpoint import read_meta
    from duollm.train import training_config

    saved = read_meta(checkpoint).get("config")
    if saved is None:
        return
    wanted = training_config(model_config, cfg).to_dict()
    differ = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if differ:
        shown = ", ".join(f"{k} {saved.get(k)} there, {wanted.get(k)} here"
                          for k in differ[:3]) + (", ..." if len(differ) > 3 else "")
        raise UsageError("--resume", f"{checkpoint} holds a different model ({shown});\n"
                                     f"  use that run's --preset, --data and --p-* options")


def resume_command(argv: List[str]) -> str:
    """The command line that continues an interrupted ``train`` run: the same with --resume."""
    argv = [a for a in argv if a != "--resume-if-present"]
    if "--resume" not in argv:
        argv.append("--resume")
    return "duollm " + shlex.join(argv)


def report_interrupt(args: argparse.Namespace, cfg, command: str = "train") -> None:
    """The Ctrl-C report of ``duollm <command>`` (``train``, ``train --hf``) on stderr: the
    newest checkpoint in ``cfg.out_dir`` and the exact command that resumes from it."""
    from duollm.train import latest_checkpoint

    checkpoint = latest_checkpoint(cfg.out_dir) if cfg.out_dir else None
    lines = ["", f"duollm {command}: interrupted (Ctrl-C); the step in progress was abandoned"]
    if checkpoint is not None:
        step = checkpoint_step(checkpoint)
        lines.append(f"last checkpoint: {checkpoint} (step {step} of {cfg.steps})")
        lines.append(f"resume with: {resume_command(args.argv)}")
    elif cfg.out_dir:
        lines.append(f"no checkpoint was saved in {cfg.out_dir} yet (--checkpoint-every N "
                     f"saves one every N steps); nothing to resume")
    else:
        lines.append("no checkpoint was saved (no --out); nothing to resume")
    print("\n".join(lines), file=sys.stderr, flush=True)
