"""``duollm bench``: what adaptive compute really buys (docs/routes-and-budgets.md).

Subcommands (``duollm bench <cmd> --help``):

* ``speedup`` — the routed layer's realised vs ideal speedup over the dense big FFN, per
  backend, baseline, shape, token count and route mix (``duollm.bench.speedup``).
* ``decode``  — decode latency (1, 16, 64 tokens) of the routed layer and of a whole model
  step with a KV cache, eager and in a CUDA graph, against the dense layer/model.
* ``model``   — DuoLLM forward and training-step throughput per mix; oracle patterns/s.
* ``report``  — a Markdown table from any set of result files or folders.
* ``frontier`` — held-out loss against measured prefill/decode tokens/s for every routing of a
  saved (or ``--quick``-trained) model, with the Pareto front (``duollm.bench.frontier``).

Every measuring command writes ``<kind>-<dtype>-<stamp>.csv/.json`` and PNG plots under
``--out`` (default ``runs/bench/<device-slug>/``; ``--commit-results`` writes into the
repository's committed ``benchmarks/results/<device-slug>/``). ``python -m duollm.bench ...`` is the
same program without the rest of the CLI.
"""
from __future__ import annotations

import argparse

__all__ = ["add_cli", "run_cli"]

_COMMANDS = {
    "speedup": ("duollm.bench.speedup", "realised vs ideal speedup of the routed layer"),
    "decode": ("duollm.bench.decode", "decode latency: routed layer and model step, eager "
                                      "and CUDA graph"),
    "model": ("duollm.bench.model_bench", "model forward/training throughput per mix, oracle "
                                          "patterns/s"),
    "report": ("duollm.bench.report", "Markdown tables from result files or folders"),
    "hf": ("duollm.bench.hf_bench", "a converted Hugging Face model vs the original: prefill "
                                    "and greedy decode at all-big, all-small and 1/12 big"),
    "frontier": ("duollm.bench.frontier", "held-out loss vs measured prefill/decode tokens/s "
                                          "for dense models, fixed patterns, random routing, "
                                          "trained routers and the oracle bound"),
}


def add_cli(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` subcommands to ``parser`` (the ``duollm bench`` parser)."""
    import importlib

    sub = parser.add_subparsers(dest="bench_command", metavar="{" + ",".join(_COMMANDS) + "}")
    sub.required = True
    for name, (module, text) in _COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        importlib.import_module(module).add_args(p)


def _check_common(args: argparse.Namespace) -> None:
    """The options every measuring command shares, checked before it starts."""
    from ..usage import UsageError, check_int, check_out_dir
    from .common import resolve_device
    from .results import committed_results_dir

    if getattr(args, "threads", None) is not None:
        check_int("--threads", args.threads, low=0)
    if getattr(args, "commit_results", False):
        if args.out:
            raise UsageError("--commit-results", "give either --out DIR or --commit-results")
        # Checked here, resolved by each command's resolve_out_dir (args stay as given, so
        # that check does not mistake the committed folder for an --out).
        quick_cpu = getattr(args, "quick", False) and args.device is None
        check_out_dir("--commit-results", committed_results_dir(
            resolve_device("cpu" if quick_cpu else args.device)))
    if getattr(args, "out", None) is not None and args.bench_command != "report":
        check_out_dir("--out", args.out)


def run_cli(args: argparse.Namespace) -> int:
    """Run the parsed ``duollm bench`` command; returns the exit status.

    A mistake in the options raises ``duollm.usage.UsageError`` (exit 2, no traceback, via
    ``duollm.cli.main``); a ``ValueError`` whose message starts with ``--flag:`` is one too.
    Any other exception is a bug and keeps its traceback.
    """
    import importlib
    import re

    from ..usage import UsageError

    module = importlib.import_module(_COMMANDS[args.bench_command][0])
    _check_common(args)
    try:
        return int(module.run(args) or 0)
    except ValueError as e:
        match = re.match(r"^(--[a-z][\w-]*): (.*)$", str(e), re.DOTALL)
        if match is not None:
            raise UsageError(match.group(1), match.group(2)) from e
        # The list parsers of duollm.bench.accounting name what they parse ("shape: ...").
        # (parse_list says the plural it was given: "mixes: expected a comma-separated list")
        match = re.match(r"^(shapes?|mix(?:es)?|tokens): (.*)$", str(e), re.DOTALL)
        word = match and match.group(1)
        option = match and next((o for o in (word, word + "s", word + "es", word[:-1])
                                 if hasattr(args, o)), None)
        if option is None:
            raise
        raise UsageError("--" + option, match.group(2)) from e
