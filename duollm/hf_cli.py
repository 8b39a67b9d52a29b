"""The command line of the Hugging Face drop-in: ``duollm convert`` and ``duollm train --hf``.

This module sits beside ``duollm.hf``, not inside it, on purpose: ``duollm`` builds its parser
(every ``--help``, every command) by importing the command modules, and ``duollm.hf`` imports
``transformers``, which is optional and slow to import. Here ``duollm.hf`` is imported only when
a command runs; without ``transformers`` the commands say what to install (exit 2).

Every option is validated before any model is loaded or file written (``duollm.usage``). See
``docs/hf.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
from typing import Optional

from duollm.usage import (UsageError, add_threads_arg, apply_thread_rule, check_device,
                          check_int, check_out_dir)

DTYPES = ("float32", "bfloat16", "float16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
SPEC_FILE = "duollm.json"  # duollm.hf.export.SPEC_FILE: marks a save_converted folder
# Calibration windows for the activation-aware prune score: long enough to see real context,
# short enough that one all-big forward over them is cheap.
CALIBRATION_SEQ = 256
DEFAULT_CALIBRATION_TOKENS = 2048


# --------------------------------------------------------------------------- shared checks


def require_transformers(option: str) -> None:
    """UsageError naming ``option`` when ``transformers`` (needed by ``duollm.hf``) is absent."""
    if importlib.util.find_spec("transformers") is None:
        raise UsageError(option, "needs the transformers package: pip install transformers "
                                 "(or pip install duollm[hf])")


@dataclasses.dataclass
class Checkpoint:
    """What ``check_checkpoint`` learned about a local checkpoint folder without loading it.

    Fields: ``path``; ``config`` (its config.json); ``converted`` (a ``save_converted``
    folder: its small paths are already there); ``has_tokenizer``; ``d_big`` (the MLP width
    from the config, None if it does not say); ``vocab_size``; ``max_positions`` (or None).
    """

    path: str
    config: dict
    converted: bool
    has_tokenizer: bool
    d_big: Optional[int]
    vocab_size: Optional[int]
    max_positions: Optional[int]


def check_checkpoint(option: str, path) -> Checkpoint:
    """Check that ``path`` is a local Hugging Face checkpoint folder (config.json + weights)."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise UsageError(option, f"expected a checkpoint folder, got {path!r}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError(option, f"no such folder: {path} (a local checkpoint folder with "
                                 f"config.json; nothing is downloaded)")
    if not os.path.isdir(path):
        raise UsageError(option, f"{path} is a file; expected a checkpoint folder with "
                                 f"config.json and the weights")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise UsageError(option, f"{path} is not a Hugging Face checkpoint: it has no "
                                 f"config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(option, f"cannot read {config_path}: {e}") from None
    if not isinstance(config, dict):
        raise UsageError(option, f"{config_path} does not hold a JSON object")
    names = os.listdir(path)
    if not any(n.endswith((".safetensors", ".bin")) or n.endswith(".safetensors.index.json")
               for n in names):
        raise UsageError(option, f"{path} holds no weights (*.safetensors or *.bin)")

    def int_field(*keys):
        for key in keys:
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    converted = SPEC_FILE in names
    return Checkpoint(path=path, config=config, converted=converted,
                      has_tokenizer=any(n in names for n in TOKENIZER_FILES),
                      d_big=int_field("intermediate_size"),
                      vocab_size=int_field("vocab_size"),
                      max_positions=int_field("max_position_embeddings"))


def check_d_small(option: str, d_small, ckpt: Checkpoint) -> int:
    d_small = check_int(option, d_small, low=1)
    if ckpt.d_big is not None and d_small >= ckpt.d_big:
        raise UsageError(option, f"expected a width below the MLP width {ckpt.d_big} of "
                                 f"{ckpt.path}, got {d_small}")
    return d_small


def check_convertible(option: str, path: str, d_small: int) -> None:
    """UsageError naming ``option`` when ``duollm.hf.convert`` would refuse the plain checkpoint
    at ``path`` (GPT-2, a biased or fused MLP, a non-SiLU activation, MoE, ...).

    The model is built from its ``config.json`` on the meta device (no weights are read, no
    memory is used) and converted there, so the refusal comes before any work or file.
    """
    import torch
    import transformers

    from duollm import hf
    from duollm.hf.export import converted_weight_names

    converted = converted_weight_names(path)  # weight names only: nothing is loaded
    if converted:  # converting it again would replace its small paths
        raise UsageError(option, f"{path} holds a converted model's weights ({converted[0]}) "
                                 f"but no {SPEC_FILE}, the record needed to load it; put it "
                                 f"back")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        with torch.device("meta"):
            skeleton = transformers.AutoModelForCausalLM.from_config(config)
        hf.convert(skeleton, d_small, init="empty")
    except (TypeError, ValueError, KeyError, OSError) as e:
        text = " ".join(str(e).split())
        raise UsageError(option, f"{path} cannot be converted: {text}") from None


def check_out_not_in(option: str, out: str, source: str, what: str) -> None:
    """UsageError when the output folder ``out`` is ``source`` or inside it: a writer would
    put its files into the folder it reads (``what`` says which)."""
    out_path, src = os.path.realpath(out), os.path.realpath(source)
    if out_path == src or out_path.startswith(src.rstrip(os.sep) + os.sep):
        raise UsageError(option, f"{out} is {'' if out_path == src else 'inside '}{what} "
                                 f"({source}); pick a folder outside it")


def _json_file(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# config.json fields a train --hf checkpoint must share with the model it resumes with
RESUME_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "vocab_size")


def check_hf_resumable(checkpoint: str, ckpt: Checkpoint, d_small: Optional[int]) -> None:
    """UsageError naming ``--resume`` when the ``train --hf`` checkpoint (``step_N``) holds
    another model than ``--hf`` (with ``--d-small``) builds: loading it would fail on a raw
    size mismatch after the model is loaded."""
    model_dir = os.path.join(checkpoint, "model")  # duollm.hf.train.MODEL_DIR
    saved_spec = _json_file(os.path.join(model_dir, SPEC_FILE))
    saved_config = _json_file(os.path.join(model_dir, "config.json"))
    if not saved_spec or not saved_config:
        raise UsageError("--resume", f"{checkpoint} is not a train --hf checkpoint (no "
                                     f"model/{SPEC_FILE} and config.json); pick another --out")
    wanted = d_small if d_small is not None else _json_file(
        os.path.join(ckpt.path, SPEC_FILE)).get("d_small")
    differ = []
    if saved_spec.get("d_small") != wanted:
        differ.append(f"d_small {saved_spec.get('d_small')} there, {wanted} here")
    differ += [f"{k} {saved_config.get(k)} there, {ckpt.config.get(k)} here"
               for k in RESUME_FIELDS if saved_config.get(k) != ckpt.config.get(k)]
    if differ:
        raise UsageError("--resume", f"{checkpoint} holds a different model "
                                     f"({', '.join(differ[:3])});\n  use that run's --hf and "
                                     f"--d-small, or another --out")


def load_tokenizer(option: str, ckpt: Checkpoint):
    """The checkpoint's own tokenizer, or None when it ships none (bytes are used then)."""
    if not ckpt.has_tokenizer:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ckpt.path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UsageError(option, f"cannot load the tokenizer in {ckpt.path}: {e}") from None


def token_data(source: str, tokenizer, vocab_size: int, val_fraction: float, option: str):
    """A ``duollm.data.TokenData`` of ``source`` in the model's own token ids.

    ``source``: ``"default"`` (the embedded corpus), a token shard folder (``duollm data
    prepare``; it must have been made with the model's tokenizer) or a UTF-8 text file
    (streamed into a temporary shard folder, ``duollm.shards.file_token_data``). With
    ``tokenizer`` (a ``transformers`` tokenizer) the text is tokenized by it; without, it is
    bytes, which need a vocabulary of at least 256.
    """
    import torch

    from duollm import shards
    from duollm.data import ByteTokenizer, TokenData, default_corpus_text, split_tokens
    from duollm.data_cli import cli_token_data

    if source != "default" and shards.is_shard_dir(source):
        shard_set = shards.open_shards(source)
        try:
            shards.check_shards_for_model(shard_set, tokenizer, vocab_size)
        except ValueError as e:
            raise UsageError("--data", str(e).removeprefix("shards: ")) from None
        return cli_token_data("--data", source, val_fraction)
    if tokenizer is None:
        if vocab_size < ByteTokenizer.vocab_size:
            raise UsageError(option, f"the checkpoint ships no tokenizer and its vocabulary "
                                     f"of {vocab_size} cannot hold the 256 byte ids")
        return cli_token_data("--data", source, val_fraction)
    if source != "default":
        tok = shards.ShardTokenizer("hf", tokenizer_name(tokenizer), vocab_size, hf=tokenizer)
        try:
            return shards.file_token_data(source, val_fraction, tok)
        except ValueError as e:
            field, _, text = str(e).partition(": ")
            if field == "tokenizer":
                raise UsageError(option, f"the tokenizer produces ids outside the model's "
                                         f"vocabulary of {vocab_size}: {text}") from None
            raise UsageError("--data", text if field == "source" else str(e)) from None
    text, name = default_corpus_text(), "pydoc-topics"
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    tokens = torch.tensor(ids, dtype=torch.int64)
    if tokens.numel() and int(tokens.max()) >= vocab_size:
        raise UsageError(option, f"the tokenizer produces id {int(tokens.max())}, outside the "
                                 f"model's vocabulary of {vocab_size}")
    try:
        train, val = split_tokens(tokens, val_fraction)
    except ValueError as e:
        raise UsageError("--data", str(e)) from None
    return TokenData(train=train, val=val, vocab_size=vocab_size,
                     name=f"{name} ({tokenizer_name(tokenizer)} tokens)")


def tokenizer_name(tokenizer) -> str:
    """A tokenizer in words (``duollm.shards.describe_tokenizer``)."""
    from duollm.shards import describe_tokenizer

    return describe_tokenizer(tokenizer)


def calibration_tokens(n: int, tokenizer, vocab_size: int, max_positions: Optional[int]):
    """(B, T) token ids of the embedded corpus's start (about ``n`` tokens), or None for 0."""
    if n == 0:
        return None
    data = token_data("default", tokenizer, vocab_size, 0.1, "--calibration-tokens")
    T = min(CALIBRATION_SEQ, n, max_positions or CALIBRATION_SEQ)
    B = max(1, n // T)
    if data.train.numel() < B * T:
        raise UsageError("--calibration-tokens", f"the embedded corpus holds "
                                                 f"{data.train.numel()} tokens; ask for fewer")
    return data.train[:B * T].view(B, T)


def _dtype(name: Optional[str]):
    import torch

    return None if name is None else getattr(torch, name)


# --------------------------------------------------------------------------- convert


def add_cli(p: argparse.ArgumentParser) -> None:
    """Arguments of ``duollm convert``."""
    p.description = ("Convert a local Hugging Face checkpoint (Llama, Mistral, Qwen2, Qwen3): "
                     "every SwiGLU MLP gets a small sibling of width --d-small (pruned from the "
                     "big one, or random) and a skip path. The converted model is saved to "
                     "--out and loads with duollm.hf.load_converted (or duollm train --hf / "
                     "duollm study --hf). Nothing is downloaded.")
    p.add_argument("path", metavar="PATH", help="a local HF checkpoint folder (config.json + "
                                                "weights)")
    # required options and those whose default is described in words: SUPPRESS keeps the help
    # formatter from appending "(default: None)"
    p.add_argument("--d-small", dest="d_small", type=int, required=True, metavar="N",
                   default=argparse.SUPPRESS,
                   help="width of the small FFNs (below the checkpoint's intermediate_size)")
    p.add_argument("--init", choices=("prune", "random"), default="prune",
                   help="small path: the big one's most important channels, or random")
    # SUPPRESS: no attribute unless given (the help formatter would print "default: None");
    # the default depends on --init and is settled in _check_convert.
    p.add_argument("--calibration-tokens", dest="calibration_tokens", type=int,
                   default=argparse.SUPPRESS, metavar="N",
                   help="tokens of the embedded corpus for the activation-aware prune score "
                        f"(0: weights only; default {DEFAULT_CALIBRATION_TOKENS} with --init "
                        f"prune, 0 with --init random)")
    p.add_argument("--dtype", choices=DTYPES, default=argparse.SUPPRESS,
                   help="load (and save) in this dtype (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--out", dest="out_dir", required=True, metavar="DIR",
                   default=argparse.SUPPRESS,
                   help="folder for the converted model (new or empty)")
    add_threads_arg(p)


def _check_convert(args: argparse.Namespace):
    ckpt = check_checkpoint("PATH", args.path)
    if ckpt.converted:
        raise UsageError("PATH", f"{ckpt.path} is already a converted duollm model")
    d_small = check_d_small("--d-small", args.d_small, ckpt)
    n_calib = getattr(args, "calibration_tokens", None)
    if n_calib is None:  # the default depends on --init: only pruning reads calibration text
        n_calib = DEFAULT_CALIBRATION_TOKENS if args.init == "prune" else 0
    n_calib = check_int("--calibration-tokens", n_calib, low=0)
    if n_calib and args.init != "prune":
        raise UsageError("--calibration-tokens", f"only --init prune uses calibration tokens; "
                                                 f"pass 0 with --init {args.init}")
    device = check_device("--device", args.device, allow_auto=False)
    check_out_dir("--out", args.out_dir)
    if os.path.isdir(args.out_dir) and os.listdir(args.out_dir):
        raise UsageError("--out", f"{args.out_dir} is not empty; pick a new folder")
    if os.path.abspath(args.out_dir) == os.path.abspath(ckpt.path):
        raise UsageError("--out", "must differ from PATH")
    require_transformers("PATH")
    check_convertible("PATH", ckpt.path, d_small)
    return ckpt, d_small, n_calib, device


def run_cli(args: argparse.Namespace) -> int:
    """``duollm convert``: load, convert, save; print what was done."""
    ckpt, d_small, n_calib, device = _check_convert(args)
    apply_thread_rule(args.threads, device, None)
    from transformers import AutoModelForCausalLM

    from duollm import hf

    tokenizer = load_tokenizer("PATH", ckpt)
    calibration = None
    if args.init == "prune" and n_calib:
        calibration = calibration_tokens(n_calib, tokenizer, ckpt.vocab_size or 0,
                                         ckpt.max_positions)
    model = AutoModelForCausalLM.from_pretrained(ckpt.path,
                                                 dtype=_dtype(getattr(args, "dtype", None)),
                                                 local_files_only=True)
    model = model.to(device).eval()
    n_before = sum(p.numel() for p in model.parameters())
    if calibration is not None:
        calibration = calibration.to(device)
    try:
        hf.convert(model, d_small, init=args.init, calibration=calibration)
    except (TypeError, ValueError) as e:  # a model it cannot convert: say why, no traceback
        raise UsageError("PATH", str(e)) from None
    n_after = sum(p.numel() for p in model.parameters())
    hf.save_converted(model, args.out_dir, tokenizer=tokenizer)
    if args.init == "random":
        how = "random"
    elif calibration is None:
        how = "pruned by weights"
    else:
        how = f"pruned on {calibration.numel()} calibration tokens"
    print(f"converted {len(hf.decoder_layers(model))} layers of {ckpt.path}: small FFNs of "
          f"width {d_small}, {how}; {n_before / 1e6:.2f}M -> {n_after / 1e6:.2f}M parameters")
    print(f"saved to {args.out_dir}")
    return 0


# --------------------------------------------------------------------------- train --hf


def add_train_hf_args(p: argparse.ArgumentParser) -> None:
    """The ``--hf`` options of ``duollm train`` (added to its parser by ``duollm.cli``)."""
    g = p.add_argument_group("stage 1 for a Hugging Face model (--hf)")
    g.add_argument("--hf", default=None, metavar="PATH",
                   help="train the small FFNs of this local HF checkpoint (a plain one, "
                        "converted with --d-small, or a duollm convert folder); its original "
                        "weights stay frozen; --preset is ignored")
    g.add_argument("--d-small", dest="d_small", type=int, default=None, metavar="N",
                   help="with --hf on a plain checkpoint: the small FFN width")
    # None defaults: check_hf_only refuses these without --hf (they would be ignored)
    g.add_argument("--init", dest="init", choices=("prune", "random"), default=None,
                   help="with --hf on a plain checkpoint: how the small FFNs start "
                        "(default: prune)")
    g.add_argument("--distill", type=float, default=None, metavar="W",
                   help="with --hf: weight of KL(all-big || routed) added to the loss "
                        "(default: 0)")


HF_ONLY_OPTIONS = (("d_small", "--d-small"), ("init", "--init"), ("distill", "--distill"))


def check_hf_only(args: argparse.Namespace) -> None:
    """UsageError for a ``train`` option of ``--hf`` given without ``--hf``: ``duollm train``
    of a preset would otherwise ignore it silently."""
    if getattr(args, "hf", None) is not None:
        return
    for dest, option in HF_ONLY_OPTIONS:
        if getattr(args, dest, None) is not None:
            raise UsageError(option, "only applies with --hf PATH (stage 1 of a Hugging Face "
                                     "checkpoint); duollm train of a preset would ignore it")


@dataclasses.dataclass
class HFTrainPlan:
    """What ``duollm train --hf`` will do, settled before any work."""

    cfg: object          # duollm.train.TrainConfig
    ckpt: Checkpoint
    d_small: Optional[int]
    init: str                  # how a plain checkpoint's small FFNs start
    distill: float
    checkpoint: Optional[str]  # the step_N folder it resumes from


def plan_train_hf(args: argparse.Namespace) -> HFTrainPlan:
    """Validate every ``train --hf`` option (UsageError for a mistake); load nothing big."""
    from duollm.train_cli import settle_resume, train_config
    from duollm.usage import check_float

    from duollm.runs import resolve_model_folder

    # A train --hf run (or step) folder stands for its newest complete step's model.
    ckpt = check_checkpoint("--hf", resolve_model_folder(args.hf, "config.json", "model"))
    if ckpt.converted:
        if args.d_small is not None:
            raise UsageError("--d-small", f"{ckpt.path} is already converted (its small FFNs "
                                          f"exist); drop --d-small")
        if args.init is not None:
            raise UsageError("--init", f"{ckpt.path} is already converted (its small FFNs "
                                       f"exist); drop --init")
        d_small = None
    else:
        if args.d_small is None:
            raise UsageError("--d-small", f"{ckpt.path} is a plain checkpoint: give the small "
                                          f"FFN width to convert it with")
        d_small = check_d_small("--d-small", args.d_small, ckpt)
    distill = check_float("--distill", 0.0 if args.distill is None else args.distill,
                          low=0.0)
    if getattr(args, "fsdp", False):
        raise UsageError("--fsdp", "not supported with --hf (stage 1 of a converted model "
                                   "trains in one process)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--hf", "trains in one process; run it without torchrun")
    check_float("--val-fraction", args.val_fraction, low=0.0, high=1.0, low_open=True,
                high_open=True)
    cfg = train_config(args, check_device("--device", args.device))  # --fsdp refused above
    if not cfg.out_dir:
        raise UsageError("--out", "train --hf keeps the trained small FFNs only in --out DIR "
                                  "(step_N/model); without it the run would be lost: give "
                                  "--out DIR")
    check_out_dir("--out", cfg.out_dir)
    check_out_not_in("--out", cfg.out_dir, ckpt.path, "the checkpoint --hf reads")
    if args.data not in ("default",):
        if args.data == "synthetic":
            raise UsageError("--data", "the synthetic corpus is byte-level; with --hf use the "
                                       "embedded corpus (default) or a text file")
        from duollm.data_cli import check_data_source

        check_data_source("--data", args.data)  # a text file or a shard folder
    cfg, checkpoint = settle_resume(args, cfg)
    if ckpt.max_positions is not None and cfg.seq_len > ckpt.max_positions:
        raise UsageError("--seq-len", f"expected at most {ckpt.max_positions} (the "
                                      f"checkpoint's max_position_embeddings), got "
                                      f"{cfg.seq_len}")
    if cfg.resume:
        check_hf_resumable(checkpoint, ckpt, d_small)
    require_transformers("--hf")
    if d_small is not None:
        check_convertible("--hf", ckpt.path, d_small)
    return HFTrainPlan(cfg=cfg, ckpt=ckpt, d_small=d_small, init=args.init or "prune",
                       distill=distill, checkpoint=checkpoint if cfg.resume else None)


def run_train_hf(args: argparse.Namespace) -> int:
    """``duollm train --hf PATH``: stage 1 of a converted model; prints the validation loss."""
    plan = plan_train_hf(args)
    cfg = plan.cfg
    from duollm import hf
    from duollm.train import latest_checkpoint
    from duollm.train_cli import describe_data, print_train_result, report_interrupt
    from duollm.usage import EXIT_INTERRUPTED

    tokenizer = load_tokenizer("--hf", plan.ckpt)
    vocab = plan.ckpt.vocab_size or 0
    data = token_data(args.data, tokenizer, vocab, args.val_fraction, "--hf")
    for split, tokens in (("training", data.train), ("validation", data.val)):
        if tokens.numel() < cfg.seq_len + 1:
            raise UsageError("--seq-len", f"{cfg.seq_len} needs windows of {cfg.seq_len + 1} "
                                          f"tokens, but the {split} split holds "
                                          f"{tokens.numel()}")
    # Said once the data is known to fit: a refused command prints its error alone.
    from duollm.shards import announce_tokenizer

    announce_tokenizer("train --hf reads the text", tokenizer, plan.ckpt.path)
    calibration = None
    if plan.d_small is not None and plan.init == "prune":
        calibration = calibration_tokens(DEFAULT_CALIBRATION_TOKENS, tokenizer, vocab,
                                         plan.ckpt.max_positions)
    model, _ = hf.load_pretrained(plan.ckpt.path, plan.d_small, init=plan.init,
                                  calibration=calibration, device=cfg.device)
    spec = hf.spec_of(model)
    apply_thread_rule(args.threads, cfg.device, spec.d_model)
    print(f"stage 1 on {plan.ckpt.path}: {spec.n_layers} layers, small FFNs of width "
          f"{spec.d_small} (big {spec.d_big}), on {describe_data(data)}, distill "
          f"{plan.distill}", flush=True)
    try:
        result = hf.train_small(model, data, cfg, distill=plan.distill, tokenizer=tokenizer)
    except KeyboardInterrupt:
        # Checkpoints are renamed into place whole, so the newest one on disk loads.
        if getattr(args, "debug", False):
            raise
        report_interrupt(args, cfg, "train --hf")
        return EXIT_INTERRUPTED
    except FloatingPointError as e:  # the run diverged: an outcome to report, not a bug
        if getattr(args, "debug", False):
            raise
        text = str(e).replace("lower lr", "lower --lr").replace("amp=False", "--no-amp")
        last = latest_checkpoint(cfg.out_dir)
        print(f"duollm train --hf: {text}" + (f"\nlast checkpoint: {last}" if last else ""),
              file=sys.stderr, flush=True)
        return 1
    print_train_result(result, cfg.out_dir,
                       " (step_N/model loads with duollm.hf.load_converted)")
    return 0
