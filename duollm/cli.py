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
from typing import TYPE_CHECKING, List, Optional

from duollm.usage import (EXIT_INTERRUPTED, EXIT_USAGE, HelpFormatter, UsageError,
                          add_threads_arg, apply_thread_rule, check_device, check_float,
                          check_int, check_out_dir, format_error)

from duollm.train_cli import (  # noqa: F401  (re-exported: duollm.cli's names)
    TRAIN_FLAGS, TRAIN_OPTION, check_resumable, describe_data, print_train_result,
    report_interrupt, resume_command, settle_resume, train_config)

if TYPE_CHECKING:  # torch-heavy modules: imported by the commands that need them
    from duollm.config import DuoConfig
    from duollm.data import TokenData
    from duollm.train import TrainConfig

# Subcommands owned by other modules: name -> (module, help). Each module provides
# ``add_cli(parser)`` (add its arguments) and ``run_cli(args) -> int``.
EXTERNAL = {
    "study": ("duollm.study", "run the Duo-LLM study: random-routing training, oracles, "
                              "trained routers, and a Markdown report with plots"),
    "bench": ("duollm.bench", "benchmark the routed FFN ops and the realized vs ideal speedup "
                              "of adaptive compute"),
    # Beside duollm.hf, not in it: building the parser must not import transformers.
    "convert": ("duollm.hf_cli", "give every SwiGLU MLP of a local Hugging Face checkpoint a "
                                 "small sibling and a skip path, and save the converted model"),
    "export": ("duollm.export_cli", "write the all-big or all-small model of a DuoLLM or "
                                    "converted checkpoint as a plain transformers checkpoint"),
    "generate": ("duollm.generate_cli", "generate text from a DuoLLM checkpoint or a converted "
                                        "folder under a routing, with tokens/s, the realised "
                                        "mix and FFN FLOPs per token"),
    "train-router": ("duollm.router_cli", "train a router on a saved model at a budget and "
                                          "save it with the model (routes 'router')"),
    "data": ("duollm.data_cli", "token shards: tokenize text files once into memory-mapped "
                                "uint16/uint32 shards (prepare) and check them (verify)"),
}


# --------------------------------------------------------------------------- info


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def cuda_extension_status() -> str:
    """One plain sentence: is the CUDA backend's extension ``duollm._C`` built, and if not, why.

    pip hides setup.py's own message unless run with ``-v``, so ``duollm info`` says it."""
    import shutil

    import torch

    if importlib.util.find_spec("duollm._C") is not None:
        return "built (duollm._C)"
    if torch.version.cuda is None:
        why = (f"this torch ({torch.__version__}) has no CUDA, so the install skipped it; the "
               f"torch and triton backends still work")
    elif shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        why = ("nvcc is not on PATH (nor CUDA_HOME set), so the install skipped it; install "
               "the CUDA toolkit and reinstall with `pip install --no-build-isolation -e .`")
    else:
        why = ("skipped (DUOLLM_SKIP_CUDA_BUILD=1) or its build failed; reinstall with "
               "`pip install -v --no-build-isolation -e .` to see the build's messages")
    return f"NOT built (duollm._C, the CUDA backend): {why}"


def hf_status() -> str:
    """One line: the transformers version, and whether ``duollm.hf`` imports (why not, in
    one line, if not)."""
    version = _version("transformers")
    if version == "not installed":
        return ("transformers not installed: duollm.hf (convert, train --hf, study --hf, "
                "bench hf) needs it: pip install transformers (or pip install duollm[hf])")
    try:
        importlib.import_module("duollm.hf")
    except Exception as e:  # any failure is what to report here, not to crash on
        text = " ".join(str(e).split()) or "no message"
        return (f"transformers {version}; duollm.hf does NOT import: "
                f"{type(e).__name__}: {text[:300]}")
    return f"transformers {version}; duollm.hf imports"


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
    print(f"cuda ext {cuda_extension_status()}")
    print(f"hf       {hf_status()}")
    print("backends (current: " + ops.current_backend() + ")")
    for name, why in ops.backend_status().items():
        print(f"  {name:<7} {'available' if why is None else 'unavailable: ' + why}")
    return 0


# --------------------------------------------------------------------------- train

def add_train_args(p: argparse.ArgumentParser) -> None:
    from duollm.config import DuoConfig
    from duollm.train import TrainConfig

    defaults = TrainConfig()
    p.add_argument("--preset", default="tiny", choices=DuoConfig.presets(),
                   help="model shape (default: %(default)s)")
    p.add_argument("--data", default="default", metavar="PATH|default|synthetic",
                   help="corpus: the embedded pydoc text (default), the synthetic corpus, "
                        "a token shard folder (duollm data prepare; its split and "
                        "vocabulary), or a UTF-8 text file (bytes, split by --val-fraction)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the corpus (its end) held out for validation "
                        "(default: %(default)s)")
    for flag, name, typ, text in TRAIN_FLAGS:
        p.add_argument(flag, dest=name, type=typ, default=getattr(defaults, name),
                       help=f"{text} (default: %(default)s)")
    p.add_argument("--min-lr", dest="min_lr", type=float, default=None,
                   help="learning rate at the end of the cosine decay (default: lr / 10)")
    p.add_argument("--amp", dest="amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA, off for the CPU)")
    p.add_argument("--out", dest="out_dir", default=None, metavar="DIR",
                   help="directory for checkpoints (step_N subdirectories)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out (an error if there is "
                        "none)")
    p.add_argument("--resume-if-present", action="store_true",
                   help="continue from the latest checkpoint in --out if there is one, else "
                        "start afresh")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar and no per-validation lines")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun, shard weights, gradients and optimizer state across "
                        "the ranks with FSDP2 instead of replicating the model (DDP)")
    add_threads_arg(p)
    from duollm.hf_cli import add_train_hf_args  # --hf, --d-small, --init, --distill

    add_train_hf_args(p)


@dataclasses.dataclass
class TrainPlan:
    """What ``duollm train`` will do, settled by ``plan_train`` before any work."""

    cfg: "TrainConfig"
    data: "TokenData"
    model_config: "DuoConfig"
    checkpoint: Optional[str]  # the checkpoint it resumes from, or None


def plan_train(args: argparse.Namespace) -> TrainPlan:
    """Validate every ``train`` option and load the data; raise ``UsageError`` for a mistake.

    Nothing is written and nothing trains here: every check that can fail does so before
    the first step, so a mistake never costs a finished training run.
    """
    from duollm import ops
    from duollm.config import DuoConfig
    from duollm.data_cli import check_data_source, cli_token_data

    # 1. Option values: TrainConfig's own checks, reported under the flags' names.
    check_float("--val-fraction", args.val_fraction, low=0.0, high=1.0, low_open=True,
                high_open=True)
    if args.threads is not None:
        check_int("--threads", args.threads, low=0)
    device = check_device("--device", args.device)
    cfg = train_config(args, device)
    if cfg.backend is not None and cfg.backend != "auto":
        status = ops.backend_status(device)
        if cfg.backend not in status:
            raise UsageError("--backend", f"unknown backend {cfg.backend!r}; expected auto or "
                                          f"one of {', '.join(sorted(status))}")
        if status[cfg.backend] is not None:
            raise UsageError("--backend", f"{cfg.backend} cannot run on {device}: "
                                          f"{status[cfg.backend]}")
    # 2. Files: the output folder and the corpus, before anything is read or written.
    check_out_dir("--out", cfg.out_dir)
    check_data_source("--data", args.data)  # a text file or a shard folder (duollm data)
    cfg, checkpoint = settle_resume(args, cfg)
    # 3. The corpus and the model shape against the sequence length and the checkpoint. A
    # text file is streamed into a temporary shard folder, a shard folder memory-mapped;
    # the model's vocabulary is the data's tokenizer's.
    data = cli_token_data("--data", args.data, args.val_fraction)
    model_config = DuoConfig.from_name(args.preset, vocab_size=data.vocab_size)
    if cfg.seq_len > model_config.max_seq_len:
        raise UsageError("--seq-len", f"expected at most {model_config.max_seq_len} (the "
                                      f"{args.preset} preset's max_seq_len), got {cfg.seq_len}")
    for split, tokens in (("training", data.train), ("validation", data.val)):
        if tokens.numel() < cfg.seq_len + 1:
            raise UsageError("--seq-len", f"{cfg.seq_len} needs windows of {cfg.seq_len + 1} "
                                          f"tokens, but the {split} split of {data.name} holds "
                                          f"{tokens.numel()}; lower --seq-len or change "
                                          f"--val-fraction")
    if cfg.resume:
        check_resumable(checkpoint, model_config, cfg)
    return TrainPlan(cfg=cfg, data=data, model_config=model_config,
                     checkpoint=checkpoint if cfg.resume else None)


def run_train(args: argparse.Namespace) -> int:
    from duollm import distributed
    from duollm.train import train

    if getattr(args, "hf", None) is not None:  # stage 1 of a converted Hugging Face model
        from duollm.hf_cli import run_train_hf

        return run_train_hf(args)
    from duollm.hf_cli import check_hf_only

    check_hf_only(args)  # --d-small/--init/--distill without --hf would be ignored
    plan = plan_train(args)
    cfg, data, model_config = plan.cfg, plan.data, plan.model_config
    apply_thread_rule(args.threads, cfg.device, model_config.d_model)
    main_rank = os.environ.get("RANK", "0") == "0"
    if main_rank:
        print(f"training {args.preset} ({model_config.param_count() / 1e6:.2f}M params) on "
              f"{describe_data(data)}, world size {distributed.env_world_size()}", flush=True)
    try:
        result = train(model_config, data, cfg)
    except KeyboardInterrupt:
        # Checkpoints are written atomically, so the newest one on disk is whole.
        if args.debug:
            raise
        if main_rank:
            report_interrupt(args, cfg)
        return EXIT_INTERRUPTED
    except FloatingPointError as e:  # the run diverged: an outcome to report, not a bug
        if args.debug:
            raise
        if main_rank:
            from duollm.train import latest_checkpoint

            checkpoint = latest_checkpoint(cfg.out_dir) if cfg.out_dir else None
            text = str(e).replace("lower lr", "lower --lr").replace("amp=False", "--no-amp")
            print(f"duollm train: {text}" + (f"\nlast checkpoint: {checkpoint}" if checkpoint
                                          else ""), file=sys.stderr, flush=True)
        return 1
    if main_rank:
        print_train_result(result, cfg.out_dir)
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
    p = sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)
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
                       description="Print the duollm, python, torch, triton and "
                                   "transformers versions, whether duollm.hf imports (and "
                                   "why not), the devices, and each op backend's "
                                   "availability (with the reason when one cannot run).")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # as typed: the resume hint repeats it
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
