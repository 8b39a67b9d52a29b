"""``duollm train-router``: train a router on a saved model at a budget and save it with the model.

The model is a ``DuoLLM`` checkpoint (``--checkpoint DIR``: a ``step_N`` folder, or a
``duollm train --out`` run folder, whose newest step is used) or a converted Hugging Face folder
(``--hf DIR``, written by ``duollm convert`` / ``duollm.hf.save_converted``). The router
(``duollm.routers.train_router``: the model frozen, soft routing, a penalty holding the budget)
is calibrated on held-out text so that its realised big share (``--budget-kind big``) or FFN
compute share (``--budget-kind compute``) meets ``--budget``, then written into the model's
folder (``router/``, atomically; ``duollm.router_io``). ``duollm generate --routes router`` and
``routes="router"`` then use it.

The model-folder options and checks here (``add_model_args``, ``check_model_source``,
``load_model_source``) are shared by ``duollm generate`` and ``duollm bench frontier``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Optional

from duollm.usage import (UsageError, add_threads_arg, apply_thread_rule, check_device,
                          check_float, check_int)


# --------------------------------------------------------------------------- model folders


@dataclasses.dataclass
class ModelSource:
    """A model folder checked without loading weights: ``kind`` ``"checkpoint"`` (DuoLLM) or
    ``"hf"`` (converted), its ``folder``, ``n_layers``, ``d_model``, ``vocab_size``,
    ``max_positions`` (or None), ``has_router``, ``option`` (the flag that named it)."""

    kind: str
    folder: str
    n_layers: int
    d_model: int
    vocab_size: int
    max_positions: Optional[int]
    has_router: bool
    option: str
    skip: bool = True  # whether route SKIP exists
    hf_checkpoint: object = None  # duollm.hf_cli.Checkpoint for --hf


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """``--checkpoint DIR`` | ``--hf DIR`` (one of them; ``required`` or optional)."""
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="a DuoLLM checkpoint (step_N folder) or a `duollm train --out` run "
                        "folder (its newest step)")
    g.add_argument("--hf", default=None, metavar="DIR",
                   help="a converted Hugging Face folder (duollm convert / "
                        "duollm.hf.save_converted)")


def check_model_source(args: argparse.Namespace) -> ModelSource:
    """Check the ``--checkpoint`` / ``--hf`` folder (UsageError naming the flag); no loading."""
    from duollm import router_io

    if args.checkpoint is not None:
        from duollm.checkpoint import META
        from duollm.train import latest_checkpoint

        folder = args.checkpoint
        if not os.path.isdir(folder):
            raise UsageError("--checkpoint", f"no such folder: {folder}")
        if not os.path.isfile(os.path.join(folder, META)):
            step = latest_checkpoint(folder)
            if step is None:
                raise UsageError("--checkpoint", f"{folder} is neither a DuoLLM checkpoint "
                                                 f"(no {META}) nor a run folder with step_N "
                                                 f"checkpoints")
            folder = step
        try:
            with open(os.path.join(folder, META)) as f:
                config = json.load(f).get("config")
        except (OSError, ValueError) as e:
            raise UsageError("--checkpoint", f"cannot read {folder}/{META}: {e}") from None
        if not isinstance(config, dict):
            raise UsageError("--checkpoint", f"{folder} holds no DuoConfig (weights only)")
        return ModelSource("checkpoint", folder, int(config["n_layers"]),
                           int(config["d_model"]), int(config["vocab_size"]),
                           int(config["max_seq_len"]), router_io.has_router(folder),
                           "--checkpoint", bool(config.get("skip", True)))
    from duollm.hf_cli import check_checkpoint, require_transformers

    require_transformers("--hf")
    ckpt = check_checkpoint("--hf", args.hf)
    if not ckpt.converted:
        raise UsageError("--hf", f"{args.hf} is not a converted folder (no duollm.json); "
                                 f"convert it first: duollm convert {args.hf} --d-small N "
                                 f"--out DIR")
    try:
        with open(os.path.join(args.hf, "duollm.json")) as f:
            record = json.load(f)
        n_layers, d_model = int(record["n_layers"]), int(record["d_model"])
        skip = bool(record.get("skip", True))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError("--hf", f"cannot read {args.hf}/duollm.json: {e}") from None
    return ModelSource("hf", args.hf, n_layers, d_model, ckpt.vocab_size or 0,
                       ckpt.max_positions, router_io.has_router(args.hf), "--hf", skip, ckpt)


def load_model_source(src: ModelSource, device):
    """(model in eval mode on ``device``, tokenizer or None) of a checked source; its saved
    router, if any, is attached."""
    if src.kind == "checkpoint":
        from duollm.checkpoint import load_checkpoint

        model, _ = load_checkpoint(src.folder, device=device)
        return model.eval(), None
    from duollm import hf
    from duollm.hf_cli import load_tokenizer

    model = hf.load_converted(src.folder, device=device)
    return model, load_tokenizer("--hf", src.hf_checkpoint)


def check_backend(option: str, backend: Optional[str], device) -> Optional[str]:
    """``--backend``: None, ``auto`` or a backend that can run on ``device``."""
    from duollm import ops

    if backend is None or backend == "auto":
        return backend
    status = ops.backend_status(device)
    if backend not in status:
        raise UsageError(option, f"unknown backend {backend!r}; expected auto or one of "
                                 f"{', '.join(sorted(status))}")
    if status[backend] is not None:
        raise UsageError(option, f"{backend} cannot run on {device}: {status[backend]}")
    return backend


# --------------------------------------------------------------------------- train-router

PATHS = {"small,big": (1, 2), "skip,small,big": (0, 1, 2)}


def add_cli(p: argparse.ArgumentParser) -> None:
    p.description = ("Train a linear router on a saved model (frozen) at a budget, calibrate "
                     "it on held-out text, and save it in the model's folder (router/), so "
                     "that `duollm generate --routes router` and routes='router' use it.")
    add_model_args(p)
    p.add_argument("--budget", type=float, required=True,
                   help="the target: share of token-layers routed big (--budget-kind big) or "
                        "FFN FLOPs as a share of all-big (--budget-kind compute), in (0, 1)")
    p.add_argument("--budget-kind", default="big", choices=("big", "compute"),
                   help="what --budget measures")
    p.add_argument("--paths", default="small,big", choices=sorted(PATHS),
                   help="the routes the router picks among (skip needs a model with a skip "
                        "path)")
    p.add_argument("--steps", type=int, default=200, help="router training steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--data", default="default", metavar="PATH|default",
                   help="text to train and calibrate on: the embedded corpus, a UTF-8 file or "
                        "a token shard folder (the model's tokenizer, or bytes)")
    p.add_argument("--calibration-tokens", type=int, default=4096,
                   help="held-out tokens the threshold is calibrated on")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if "
                                                  "visible)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    add_threads_arg(p)


def run_cli(args: argparse.Namespace) -> int:
    import torch

    from duollm import router_io
    from duollm.routers import calibrate, train_router

    # Every option is checked before the model or the data are read.
    budget = check_float("--budget", args.budget, low=0.0, high=1.0, low_open=True,
                         high_open=True)
    for flag in ("--steps", "--batch-size", "--seq-len", "--calibration-tokens"):
        check_int(flag, getattr(args, flag[2:].replace("-", "_")), low=1)
    check_float("--lr", args.lr, low=0.0, low_open=True)
    device = check_device("--device", args.device)
    src = check_model_source(args)
    if src.max_positions is not None and args.seq_len + 1 > src.max_positions:
        raise UsageError("--seq-len", f"the model holds {src.max_positions} positions; "
                                      f"expected at most {src.max_positions - 1}")
    if args.data != "default" and not os.path.exists(args.data):
        raise UsageError("--data", f"no such file or folder: {args.data}")
    apply_thread_rule(args.threads, device, src.d_model)
    model, tokenizer = load_model_source(src, device)
    paths = PATHS[args.paths]
    from duollm.stack import as_stack

    if 0 in paths and not as_stack(model).skip:
        raise UsageError("--paths", f"{src.folder} has no skip path; use small,big")
    data = _data(args, src, tokenizer)
    T = args.seq_len + 1
    n_cal = max(1, min(args.calibration_tokens, data.val.numel()) // T)
    if data.val.numel() < T or data.train.numel() < T:
        raise UsageError("--seq-len", f"{args.seq_len} needs windows of {T} tokens, the data "
                                      f"holds {data.train.numel()} / {data.val.numel()} "
                                      f"(train / held out)")
    cal = data.val[:n_cal * T].view(n_cal, T).to(device)
    on_compute = args.budget_kind == "compute"
    t0 = time.perf_counter()
    router, history = train_router(
        model, data, target_big=budget, steps=args.steps, batch_size=args.batch_size,
        seq_len=args.seq_len, lr=args.lr, paths=paths, seed=args.seed,
        progress=args.progress and sys.stderr.isatty(),
        target_compute=budget if on_compute else None)
    kw = {"target_compute": budget} if on_compute else {"target_big": budget}
    with torch.no_grad():
        realised = calibrate(model, router, cal, **kw)
    router.calibration = {"budget_kind": args.budget_kind, "budget": budget,
                          "realised": realised, "tokens": int(cal.numel()),
                          "data": getattr(data, "name", str(args.data)),
                          "steps": args.steps, "seed": args.seed}
    path = router_io.write_router(src.folder, router, model)
    print(f"trained a {'/'.join(('skip', 'small', 'big')[p] for p in paths)} router for "
          f"{src.n_layers} layers in {time.perf_counter() - t0:.1f} s (final LM loss "
          f"{history[-1]['lm_loss']:.4f})")
    print(f"calibrated on {cal.numel()} held-out tokens: {args.budget_kind} share "
          f"{realised:.4f} (target {budget:g}), threshold {router.threshold:.4f}")
    print(f"saved to {path}")
    return 0


def _data(args, src: ModelSource, tokenizer):
    if src.kind == "hf":
        from duollm.hf_cli import token_data

        return token_data(args.data, tokenizer, src.vocab_size, 0.1, "--hf")
    from duollm.data import load_data

    try:
        data = load_data(args.data, val_fraction=0.1)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError("--data", str(e).split(": ", 1)[-1]) from None
    if data.vocab_size > src.vocab_size:
        raise UsageError("--data", f"its ids need a vocabulary of {data.vocab_size}, the model "
                                   f"has {src.vocab_size}")
    return data
