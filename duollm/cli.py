"""The ``duollm`` command line: ``info``, ``train``, and the ``study`` and ``bench`` hooks.

``duollm <command> --help`` describes each command. ``python -m duollm`` is the same program,
and ``torchrun --nproc_per_node N -m duollm train ...`` trains data-parallel.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import platform
import sys
from typing import List, Optional

from duollm.usage import (EXIT_INTERRUPTED, EXIT_USAGE, UsageError, add_threads_arg,
                          apply_thread_rule, format_error)

# Subcommands owned by other modules: name -> (module, help). Each module provides
# ``add_cli(parser)`` (add its arguments) and ``run_cli(args) -> int``.
EXTERNAL = {
    "study": ("duollm.study", "run the Duo-LLM study: random-routing training, oracles, "
                              "trained routers, and a Markdown report with plots"),
    "bench": ("duollm.bench", "benchmark the routed FFN ops and the realized vs ideal speedup "
                              "of adaptive compute"),
}


# --------------------------------------------------------------------------- info


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def run_info(args: argparse.Namespace) -> int:
    import torch

    import duollm
    from duollm import ops

    print(f"duollm   {duollm.__version__}")
    print(f"python   {platform.python_version()} ({sys.executable})")
    print(f"torch    {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"triton   {_version('triton')}")
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(n))
        print(f"devices  {n} CUDA: {names}")
    else:
        print("devices  cpu only")
    print(f"cpu      {os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads")
    print("backends (current: " + ops.current_backend() + ")")
    for name, why in ops.backend_status().items():
        print(f"  {name:<7} {'available' if why is None else 'unavailable: ' + why}")
    return 0


# --------------------------------------------------------------------------- train

# (flag, TrainConfig field, type, help); defaults come from TrainConfig.
_TRAIN_FLAGS = [
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


def add_train_args(p: argparse.ArgumentParser) -> None:
    from duollm.config import DuoConfig
    from duollm.train import TrainConfig

    defaults = TrainConfig()
    p.add_argument("--preset", default="tiny", choices=DuoConfig.presets(),
                   help="model shape (default: %(default)s)")
    p.add_argument("--data", default="default", metavar="PATH|default|synthetic",
                   help="corpus: the embedded pydoc text (default), the synthetic corpus, or "
                        "a UTF-8 text file")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the corpus (its end) held out for validation "
                        "(default: %(default)s)")
    for flag, name, typ, text in _TRAIN_FLAGS:
        p.add_argument(flag, dest=name, type=typ, default=getattr(defaults, name),
                       help=f"{text} (default: %(default)s)")
    p.add_argument("--min-lr", dest="min_lr", type=float, default=None,
                   help="learning rate at the end of the cosine decay (default: lr / 10)")
    p.add_argument("--amp", dest="amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA, off for the CPU)")
    p.add_argument("--out", dest="out_dir", default=None, metavar="DIR",
                   help="directory for checkpoints (step_N subdirectories)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar and no per-validation lines")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun, shard weights, gradients and optimizer state across "
                        "the ranks with FSDP2 instead of replicating the model (DDP)")
    add_threads_arg(p)


def run_train(args: argparse.Namespace) -> int:
    from duollm import distributed
    from duollm.config import DuoConfig
    from duollm.data import load_data
    from duollm.train import TrainConfig, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    knobs = {k: v for k, v in vars(args).items() if k in fields}
    if knobs["min_lr"] is None:
        knobs["min_lr"] = knobs["lr"] / 10
    cfg = TrainConfig(**knobs)
    data = load_data(args.data, val_fraction=args.val_fraction)
    model_config = DuoConfig.from_name(args.preset, vocab_size=data.vocab_size)
    apply_thread_rule(args.threads, cfg.device, model_config.d_model)
    main_rank = os.environ.get("RANK", "0") == "0"
    if main_rank:
        print(f"training {args.preset} ({model_config.param_count() / 1e6:.2f}M params) on "
              f"{data!r}, world size {distributed.env_world_size()}", flush=True)
    result = train(model_config, data, cfg)
    if main_rank:
        print("\nvalidation loss (nats/token)")
        print(f"{'policy':<8} {'loss':>8}")
        for policy, loss in result.val_loss.items():
            print(f"{policy:<8} {loss:>8.4f}")
        if result.history:
            print(f"throughput {result.history[-1]['tokens_per_s']:.0f} tokens/s")
        if cfg.out_dir:
            print(f"checkpoints in {cfg.out_dir}")
    return 0


# --------------------------------------------------------------------------- parser


def _unavailable(sub, name: str, text: str, why: str) -> None:
    """Register ``name`` with a help line; running it explains why it cannot run."""
    def run(args: argparse.Namespace) -> int:
        print(f"duollm {name}: not available in this installation: {why}", file=sys.stderr)
        return 2

    p = sub.add_parser(name, help=f"{text} [unavailable]", description=f"{text}. "
                       f"Unavailable here: {why}.")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _add_external(sub, name: str, module: str, text: str) -> None:
    if importlib.util.find_spec(module) is None:
        _unavailable(sub, name, text, f"module {module} is missing")
        return
    mod = importlib.import_module(module)  # an existing module that fails to import is a bug
    if not (callable(getattr(mod, "add_cli", None)) and callable(getattr(mod, "run_cli",
                                                                          None))):
        _unavailable(sub, name, text, f"module {module} does not define add_cli(parser) and "
                                      f"run_cli(args)")
        return
    p = sub.add_parser(name, help=text, description=text,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mod.add_cli(p)
    p.set_defaults(func=mod.run_cli)


def build_parser() -> argparse.ArgumentParser:
    """The ``duollm`` argument parser with every subcommand."""
    from duollm import __version__

    parser = argparse.ArgumentParser(
        prog="duollm", description="Kernels and a research framework for Duo-LLM adaptive "
                                   "compute: every FFN layer holds a big and a small FFN, and "
                                   "each token picks one (or skips) at each layer.")
    parser.add_argument("--version", action="version", version=f"duollm {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show a traceback for every error, user mistakes included")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="versions, devices and which op backends can run here",
                       description="Print the duollm, python, torch and triton versions, the "
                                   "devices, and each op backend's availability (with the "
                                   "reason when one cannot run).")
    p.set_defaults(func=run_info)
    p = sub.add_parser("train", help="random-routing training (study stage 1)",
                       description="Train a DuoLLM with random routing: each token at each "
                                   "layer takes the big or small FFN (or skips) at random, so "
                                   "both become interchangeable. Prints the validation loss "
                                   "under the all-big, all-small and random policies. Under "
                                   "torchrun it trains data-parallel.")
    add_train_args(p)
    p.set_defaults(func=run_train)
    for name, (module, text) in EXTERNAL.items():
        _add_external(sub, name, module, text)
    return parser


def _command_name(args: argparse.Namespace) -> str:
    """``"train"``, ``"bench speedup"``, ...: how the user typed the command."""
    parts = [getattr(args, "command", None)]
    parts += [v for k, v in sorted(vars(args).items())
              if k.endswith("_command") and k != "command" and isinstance(v, str)]
    return " ".join(p for p in parts if p)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``duollm`` console script; returns the exit status.

    A ``UsageError`` (a user mistake) prints ``duollm <command>: error: <option>: <message>``
    to stderr and returns 2; Ctrl-C returns 130 with one line. Any other exception is a bug
    and propagates with its traceback. ``--debug`` lets every exception propagate.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        if args.debug:
            raise
        print(format_error(_command_name(args), e), file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if args.debug:
            raise
        # Commands that can lose work (train) catch Ctrl-C themselves and say how to resume.
        print(f"\nduollm {_command_name(args)}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
