"""``duollm study`` (run the study) and ``duollm study ablations`` (the stage-1 ablations of
``duollm.study.ablations``): arguments, validation before any work, and the summary print."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from typing import List, Optional

from ..usage import (UsageError, add_threads_arg, apply_thread_rule, check_device, check_int,
                     check_out_dir, options_of, show_progress)

ABLATIONS = "duollm.study.ablations"


# Presets beyond this many layers are GPU jobs for the study: the oracle table grows as 2^L
# patterns per sequence (2 x 4,096 at the paper's 12 layers against 3^6 = 729 at 6).
CPU_LAYERS = 8

EPILOG = """\
examples:
  duollm study --quick                      the whole pipeline in seconds (tiny preset)
  duollm study --out runs/demo              the demo (make demo): small preset, 6 layers;
                                            about 3 min on 2 quiet cores, 8 when shared
  duollm study --preset paper-12 --device cuda   the paper's depth (12 layers) on a GPU
  torchrun --nproc_per_node 2 -m duollm study ...   the oracle walks shared among processes
  duollm study ablations --quick            Figure 8's stage-1 ablations (see its --help)
Presets with more than 8 layers (paper-12, paper-1.4b) are GPU jobs: on the CPU they run,
with a warning, for about an hour. Method, criteria and measured costs: docs/study.md."""


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, but not "(default: None)" (those are described in words) nor
    "(default: False)" on flags."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in (
                action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, _Defaults):
    """``_Defaults`` with the description and epilog kept as written (line breaks)."""


DESCRIPTION = """\
Run the Duo-LLM study on a prose and a code holdout: random-routing training, the paper's
oracles, trained routers, token difficulty, and verdicts with 95% intervals. Writes
report.md, PNG plots and results.json under --out."""


def add_cli(parser: argparse.ArgumentParser) -> None:
    """Add the ``duollm study`` arguments (and the ``ablations`` subcommand) to ``parser``."""
    parser.formatter_class = _HelpFormatter
    parser.description, parser.epilog = DESCRIPTION, EPILOG
    add_study_args(parser)
    if importlib.util.find_spec(ABLATIONS) is not None:
        mod = importlib.import_module(ABLATIONS)
        sub = parser.add_subparsers(dest="study_command", metavar="SUBCOMMAND")
        p = sub.add_parser("ablations", help="stage-1 ablations (Figure 8): p_big sweep "
                                             "against dense models of equal FLOPs, and "
                                             "freeze-big-then-train-small",
                           description="Stage-1 ablations (the paper's Figure 8): Duo "
                                       "models at p_big 0, 0.25, 0.5, 0.75, 1 against dense "
                                       "models of equal FLOPs per token, and "
                                       "freeze-big-then-train-small against training both "
                                       "from scratch; report.md, ablations.png and "
                                       "results.json. Not part of make demo; under torchrun "
                                       "the runs are shared among the ranks. See "
                                       "docs/study.md.",
                           formatter_class=_Defaults)
        mod.add_args(p)
        p.set_defaults(study_run=mod.run)


def add_study_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None,
                        help="model preset: tiny (4 layers), wide (tiny with 16x-wide big "
                             "FFNs), small (6), paper-12 (the paper's 12 layers at small's "
                             "width, a GPU job) or paper-1.4b; default small (tiny with "
                             "--quick, wide with --full)")
    parser.add_argument("--data", default="default",
                        help="'default' (prose + code holdouts from this interpreter), "
                             "'synthetic' (known difficulty) or a UTF-8 text file")
    parser.add_argument("--steps", type=int, default=None,
                        help="random-routing training steps (default 300; 20 with --quick; "
                             "with --hf: small-FFN training steps, 0 skips training)")
    parser.add_argument("--device", default="auto",
                        help="torch device: cpu, cuda, cuda:N, or auto (cuda when a GPU is "
                             "visible)")
    parser.add_argument("--out", default=None,
                        help="output folder, new or empty unless --overwrite (default "
                             "runs/<name>, named after the model and data, replaced by each "
                             "run)")
    parser.add_argument("--overwrite", action="store_true",
                        help="let --out be a folder that already holds files (an earlier "
                             "study's report is replaced)")
    parser.add_argument("--budgets", default=None,
                        help="comma-separated big-layer counts k for the routers and the "
                             "capacity figure (default L/3, L/2, 2L/3)")
    parser.add_argument("--router-steps", type=int, default=None,
                        help="router training steps per budget (default 100)")
    parser.add_argument("--n-random", type=int, default=100,
                        help="random layer patterns per budget for the best-of-N baseline")
    parser.add_argument("--oracle-batch", type=int, default=None,
                        help="holdout sequences per holdout, half to select baselines and "
                             "half to evaluate them (default 40)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of training, routers, splits and bootstrap")
    parser.add_argument("--quick", action="store_true",
                        help="tiny preset, few steps: the whole study in well under a minute")
    parser.add_argument("--no-synthetic-check", action="store_true",
                        help="skip the difficulty check on the synthetic corpus")
    parser.add_argument("--hf", default=None, metavar="PATH",
                        help="study a converted Hugging Face checkpoint folder instead of "
                             "training a DuoLLM (a plain checkpoint folder needs --d-small)")
    parser.add_argument("--d-small", type=int, default=None, metavar="N",
                        help="with --hf and a plain (unconverted) checkpoint: convert it with "
                             "small FFNs of width N (pruned from the big ones)")
    parser.add_argument("--checkpoint", default=None, metavar="DIR",
                        help="study a saved DuoLLM checkpoint instead of training one: a step "
                             "folder, or a run folder (its newest complete step_N)")
    parser.add_argument("--null-control", action="store_true",
                        help="also measure every verdict on the null model (big FFN = small "
                             "FFN zero-padded, so big == small) over the same sequences; a "
                             "claim needing big != small holds only against it (roughly "
                             "doubles the run time)")
    parser.add_argument("--full", action="store_true",
                        help="the full study's sizes (make study): the wide preset, 1000 "
                             "training steps, 200 holdout sequences per holdout, a 2000-step "
                             "synthetic check")
    parser.add_argument("--seeds", type=int, default=1,
                        help="train this many models (seeds --seed, --seed+1, ...); the "
                             "verdicts' intervals cover seeds and sequences")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars or stage lines (bars appear only on a "
                             "terminal anyway)")
    parser.add_argument("--oracle-chunks", metavar="DIR", default=None,
                        help="keep every oracle walk's finished chunks in DIR; run the same "
                             "command again after a crash or kill and they are reused, not "
                             "walked again (one subfolder per holdout and model)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the oracle's projected time, memory per rank and disk "
                             "for this job (duollm.study.cost; WORLD_SIZE ranks under "
                             "torchrun) and exit without running it")
    add_threads_arg(parser)


def parse_budgets(text: Optional[str], n_layers: int) -> Optional[List[int]]:
    """``"1,3"`` -> [1, 3], each within 0..n_layers; None passes through."""
    if text is None:
        return None
    try:
        ks = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise UsageError("--budgets", f"expected comma-separated ints, got {text!r}") from None
    if not ks:
        raise UsageError("--budgets", "expected at least one big-layer count")
    bad = [k for k in ks if not 1 <= k <= n_layers - 1]
    if bad:
        raise UsageError("--budgets", f"{bad[0]} is not a big-layer count in 1..{n_layers - 1} "
                                      f"(the preset has {n_layers} layers)")
    return ks


def _hf_layers(args: argparse.Namespace) -> int:
    """Check ``--hf`` (and ``--d-small``, ``--preset`` beside it); the checkpoint's layer
    count, read from its ``config.json`` without loading the model. A ``train --hf`` run or
    step folder stands for its newest complete step's model: ``args.hf`` is set to it."""
    import json

    from ..runs import resolve_model_folder

    if args.preset is not None:
        raise UsageError("--preset", "not used with --hf (the checkpoint fixes the shape)")
    if not os.path.isdir(args.hf):
        raise UsageError("--hf", f"{args.hf} is not a folder (expected a converted or "
                                 f"plain Hugging Face checkpoint folder)")
    args.hf = resolve_model_folder(args.hf, "config.json", "model")
    config = None
    try:
        with open(os.path.join(args.hf, "config.json")) as f:
            config = json.load(f)
        n_layers = int(config["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        if (isinstance(config, dict) and "model_type" in config
                and args.d_small is not None):  # a real checkpoint of a decoder duollm.hf
            from ..hf_cli import check_convertible  # cannot convert (GPT-2...): say why

            check_convertible("--hf", args.hf, check_int("--d-small", args.d_small, low=1))
        raise UsageError("--hf", f"{args.hf} holds no readable config.json with "
                                 f"num_hidden_layers: not a Hugging Face checkpoint") from None
    converted = os.path.isfile(os.path.join(args.hf, "duollm.json"))
    if converted and args.d_small is not None:
        raise UsageError("--d-small", f"{args.hf} is already converted (its small FFNs are "
                                      f"fixed); drop --d-small")
    if not converted:
        if args.d_small is None:
            raise UsageError("--hf", f"{args.hf} is a plain checkpoint: give --d-small N to "
                                     f"convert it, or convert it first (duollm convert)")
        width = config.get("intermediate_size")
        check_int("--d-small", args.d_small, low=1,
                  high=int(width) - 1 if isinstance(width, int) else None)
        from ..hf_cli import check_convertible, require_transformers

        require_transformers("--hf")
        check_convertible("--hf", args.hf, args.d_small)  # GPT-2, a biased MLP, ...
    return n_layers


# What a folder holds when it is a model or a run, never a study's output: --overwrite
# replaces a study's files, not these.
CHECKPOINT_FILES = ("config.json", "meta.json", "duollm.json", "model.safetensors")


def check_study_out(args: argparse.Namespace) -> None:
    """``--out`` must be new or empty unless ``--overwrite``; never a checkpoint or run
    folder, nor inside the ``--hf`` checkpoint."""
    overwrite = getattr(args, "overwrite", False)
    if args.out is None:
        if overwrite:
            raise UsageError("--overwrite", "only applies with --out DIR (the default "
                                            "runs/<name> is replaced by each run)")
        return
    if args.hf is not None:
        from ..hf_cli import check_out_not_in

        check_out_not_in("--out", args.out, args.hf, "the checkpoint --hf reads")
    if not os.path.isdir(args.out):
        return
    names = os.listdir(args.out)
    held = [n for n in names if n in CHECKPOINT_FILES or n.startswith("step_")]
    if held:
        raise UsageError("--out", f"{args.out} holds a checkpoint or a run ({held[0]}); the "
                                  f"study writes its report elsewhere: pick a new folder")
    if names and not overwrite:
        raise UsageError("--out", f"{args.out} is not empty (an earlier report?); pick a new "
                                  f"folder, or add --overwrite to replace its study files")


def check_study_data(path: str, quick: bool) -> None:
    """UsageError naming ``--data`` when the text file is too short for the study's windows
    (its holdout's validation part, the last 10% of its bytes, must hold one window)."""
    from .holdouts import load_holdout
    from .stages import DEMO, QUICK

    from ..shards import is_shard_dir, read_meta

    sizes = QUICK if quick else DEMO
    need = max(sizes.seq_len, sizes.oracle_len) + 1
    if is_shard_dir(path):  # a token shard folder: its held-out shards, counted in meta.json
        held = read_meta(path)["tokens"]["val"]
        if held < need:
            raise UsageError("--data", f"{path}'s held-out shards hold {held} tokens, and a "
                                       f"{'--quick ' if quick else ''}window needs {need}; "
                                       f"prepare it with larger or more --val-shards")
        return
    try:
        held = load_holdout(os.path.basename(path), path=path).val.numel()
    except ValueError as e:  # too short to split at all
        raise UsageError("--data", f"{path} is too short for the study ({e}); give a text "
                                   f"of at least {need * 10} bytes") from None
    if held < need:
        raise UsageError("--data", f"{path} is too short for the study: its validation part "
                                   f"(the last 10%) holds {held} bytes, and a "
                                   f"{'--quick ' if quick else ''}window needs {need}; give "
                                   f"a text of at least {need * 10} bytes")


def _checkpoint_layers(args: argparse.Namespace) -> int:
    """Check ``--checkpoint`` (and the options it excludes); its layer count."""
    from ..checkpoint import read_meta
    from .pipeline import resolve_study_checkpoint

    for flag, value in (("--hf", args.hf), ("--preset", args.preset), ("--steps", args.steps),
                        ("--d-small", args.d_small)):
        if value is not None:
            raise UsageError(flag, "not used with --checkpoint (the checkpoint fixes the "
                                   "model; nothing is trained)")
    if args.seeds > 1:
        raise UsageError("--seeds", "with --checkpoint there is one model; drop --seeds")
    try:
        path = resolve_study_checkpoint(args.checkpoint)
        config = read_meta(path)["config"]
        n_layers = int(config["n_layers"])
        vocab = int(config["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError("--checkpoint", str(e).removeprefix("checkpoint: ")) from None
    if vocab < 256:
        raise UsageError("--checkpoint", f"{path} has a vocabulary of {vocab}; the study's "
                                         f"holdouts are byte ids (256)")
    return n_layers


def validate(args: argparse.Namespace):
    """Every check of the study's options, before any work. Returns (device, budgets,
    preset)."""
    from ..config import DuoConfig
    from .stages import default_preset

    device = check_device("--device", args.device)
    preset = args.preset or default_preset(args.quick, args.full)
    if args.preset is not None and args.preset not in DuoConfig.presets():
        raise UsageError("--preset", f"unknown preset {args.preset!r}; choose one of "
                                     f"{', '.join(DuoConfig.presets())}")
    if args.data not in ("default", "synthetic"):
        from ..data_cli import check_data_source

        check_data_source("--data", args.data)  # a text file or a token shard folder
    check_out_dir("--out", args.out)
    if args.oracle_chunks is not None and os.path.exists(args.oracle_chunks) and \
            not os.path.isdir(args.oracle_chunks):
        raise UsageError("--oracle-chunks", f"{args.oracle_chunks} is a file; name a folder "
                                            f"(created if missing)")
    if args.steps is not None:
        check_int("--steps", args.steps, low=0 if args.hf else 1)
    if args.router_steps is not None:
        check_int("--router-steps", args.router_steps, low=1)
    check_int("--n-random", args.n_random, low=1)
    if args.oracle_batch is not None:
        check_int("--oracle-batch", args.oracle_batch, low=4)
    check_int("--seed", args.seed, low=0)
    check_int("--seeds", args.seeds, low=1)
    if args.full and args.quick:
        raise UsageError("--full", "the full study's sizes and --quick exclude each other")
    if args.checkpoint is not None:
        n_layers = _checkpoint_layers(args)
    elif args.hf is not None:
        if args.seeds > 1:
            raise UsageError("--seeds", "with --hf there is one model; drop --seeds")
        n_layers = _hf_layers(args)
    else:
        if args.d_small is not None:
            raise UsageError("--d-small", "only used with --hf (a DuoLLM's widths come from "
                                          "--preset)")
        n_layers = DuoConfig.from_name(preset).n_layers
    budgets = parse_budgets(args.budgets, n_layers)
    check_study_out(args)
    if args.data not in ("default", "synthetic"):
        check_study_data(args.data, args.quick)
    if n_layers > CPU_LAYERS and device.type == "cpu":
        print(f"warning: {n_layers} layers: the oracle walks {2 * 2 ** n_layers:,} patterns "
              f"per holdout sequence, a GPU job (--device cuda); on the CPU expect about an "
              f"hour at the default sizes (docs/study.md)", file=sys.stderr)
    return device, budgets, preset


def refusals_as_usage(run):
    """``run`` with the ValueErrors that refuse the loaded checkpoint or text (``hf: ...``,
    ``data: ...``, raised before any training or file) reported as the options' mistakes."""
    def call(**kwargs):
        with options_of({"hf": "--hf", "data": "--data"}):
            return run(**kwargs)
    return call


def dry_run_text(args: argparse.Namespace, device, preset: str) -> str:
    """``--dry-run``: the projection of the oracle this command would run (after validate)."""
    from ..shards import is_shard_dir
    from .cost import describe, project, study_job

    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    holdouts = 1 if args.data not in ("default", "synthetic") and is_shard_dir(args.data) \
        else 2
    job, label = study_job(preset if args.hf is None else None, args.quick,
                           args.oracle_batch, hf=args.hf, d_small=args.d_small,
                           n_holdouts=holdouts, ranks=ranks, full=args.full)
    dev = "cuda" if device.type == "cuda" else "cpu"
    proj = project(job, dev)
    lines = [describe(job, proj, label)]
    if dev == "cpu":
        gpu = project(job, "cuda")
        lines.append(f"  on H200s  {gpu.seconds / 60:.2f} min (projection: {gpu.assumption})")
    # --seeds trains that many models and --null-control walks each one's null model too:
    # one table per model, each the job above
    tables = args.seeds * (2 if args.null_control else 1)
    if tables > 1:
        what = f"{args.seeds} seed(s)" + (" x (real + null model)" if args.null_control
                                          else "")
        lines.append(f"  tables     {tables} ({what}): {tables * proj.seconds / 60:.1f} min of "
                     f"oracle walks in all on this device")
    lines.append("Not included: stage-1 training, router training and the bootstrap (see "
                 "docs/study.md). Nothing was run.")
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    """Run ``duollm study`` (or its subcommand) from parsed arguments; 0 on success."""
    run_sub = getattr(args, "study_run", None)
    if run_sub is not None:
        return int(run_sub(args) or 0)
    from ..config import DuoConfig
    from .pipeline import run_study

    device, budgets, preset = validate(args)
    if getattr(args, "dry_run", False):
        if int(os.environ.get("RANK", "0")) == 0:
            print(dry_run_text(args, device, preset))
        return 0
    d_model = DuoConfig.from_name(preset).d_model if args.hf is None else None
    apply_thread_rule(args.threads, device, d_model)
    res = refusals_as_usage(run_study)(
                    preset=preset, data=args.data, steps=args.steps, device=str(device),
                    out=args.out, budgets=budgets, router_steps=args.router_steps,
                    n_random=args.n_random, oracle_batch=args.oracle_batch, seed=args.seed,
                    quick=args.quick, progress=show_progress(not args.no_progress),
                    stage_lines=not args.no_progress,  # into a pipe too; bars only on a tty
                    synthetic_check=not args.no_synthetic_check, hf=args.hf,
                    hf_d_small=args.d_small, null_control=args.null_control,
                    seeds=args.seeds, checkpoint=args.checkpoint, full=args.full,
                    oracle_chunks=args.oracle_chunks)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 alone reports
        return 0
    from .report import summary_text

    print(summary_text(res))
    out = args.out or os.path.join("runs", res.name)
    print(f"\nreport: {os.path.join(out, 'report.md')}")
    return 0
