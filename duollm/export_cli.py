"""``duollm export PATH --which big|small --out DIR``: a plain ``transformers`` checkpoint of
the all-big or all-small model in a DuoLLM or converted Hugging Face checkpoint.

``PATH`` is any of: a ``duollm train`` run folder (its newest complete ``step_N``) or step
folder (a ``DuoLLM``: written as a ``LlamaForCausalLM``); a ``duollm convert`` folder or a
``duollm train --hf`` run or step folder (a converted model: written as its own class, all-big
being the original model and all-small the same model with ``intermediate_size = d_small``).
``duollm.hf.export`` does the writing; ``from_pretrained(DIR)`` then computes the model's
logits under that policy.

Like ``duollm.hf_cli`` this module sits beside ``duollm.hf``: building the ``duollm`` parser
imports it, and ``transformers`` (optional, slow to import) is imported only when the command
runs. Every check below happens before any model is loaded or any file written.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass

from duollm.usage import UsageError, check_out_dir

WHICH = ("big", "small")
_STEP = re.compile(r"^step_(\d+)$")
_META, _SPEC, _CONFIG = "meta.json", "duollm.json", "config.json"
_STAGE1 = "duollm-hf-stage1"  # duollm.hf.train.FORMAT: a train --hf step folder


@dataclass
class Source:
    """What ``PATH`` holds: ``kind`` ``"duo"`` (a DuoLLM checkpoint folder) or ``"converted"``
    (a ``save_converted`` folder); ``folder``: the folder to load; ``path``: as given."""

    kind: str
    folder: str
    path: str


def add_cli(p: argparse.ArgumentParser) -> None:
    """Arguments of ``duollm export``."""
    p.description = ("Write the all-big or all-small model of a DuoLLM checkpoint (a duollm "
                     "train run or step folder) or of a converted Hugging Face model (a duollm "
                     "convert folder, a duollm train --hf run or step folder) as a plain "
                     "transformers checkpoint: config.json + model.safetensors that "
                     "from_pretrained loads (a DuoLLM as a LlamaForCausalLM, a converted model "
                     "as its own class; all-big is then the original model, all-small has "
                     "intermediate_size = d_small). Its logits equal the model's under that "
                     "policy.")
    p.add_argument("path", metavar="PATH", help="a run, step or converted checkpoint folder")
    # validated in _check (one 'error: --which: ...' line, as every other option)
    p.add_argument("--which", default="big", metavar="{big,small}",
                   help="every FFN on its big path (the original model of a converted one) "
                        "or on its small path")
    p.add_argument("--out", dest="out_dir", required=True, metavar="DIR",
                   default=argparse.SUPPRESS, help="folder for the checkpoint (new or empty)")


def _newest_step(run: str):
    steps = [(int(m.group(1)), e) for e in os.listdir(run)
             if (m := _STEP.match(e)) and os.path.isfile(os.path.join(run, e, _META))]
    return os.path.join(run, max(steps)[1]) if steps else None


def find_source(option: str, path) -> Source:
    """What to export from ``path`` (see the module docstring); UsageError naming ``option``."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise UsageError(option, f"expected a checkpoint folder, got {path!r}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError(option, f"no such folder: {path}")
    if not os.path.isdir(path):
        raise UsageError(option, f"{path} is a file; expected a checkpoint folder")
    folder = path
    if not any(os.path.isfile(os.path.join(path, f)) for f in (_META, _SPEC, _CONFIG)):
        folder = _newest_step(path)  # a run folder: its newest complete step
        if folder is None:
            raise UsageError(option, f"{path} is not a DuoLLM or converted checkpoint: it has "
                                     f"no {_META}, {_SPEC} or complete step_N folder")
    if os.path.isfile(os.path.join(folder, _SPEC)):
        return Source("converted", folder, path)
    if os.path.isfile(os.path.join(folder, _META)):
        try:
            with open(os.path.join(folder, _META)) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise UsageError(option, f"cannot read {os.path.join(folder, _META)}: {e}") from None
        if not isinstance(meta, dict):
            raise UsageError(option, f"{os.path.join(folder, _META)} is not a JSON object")
        if meta.get("format") == _STAGE1:
            inner = os.path.join(folder, str(meta.get("model", "model")))
            if not os.path.isfile(os.path.join(inner, _SPEC)):
                raise UsageError(option, f"{folder} is a train --hf step without its model "
                                         f"({inner} has no {_SPEC})")
            return Source("converted", inner, path)
        if not isinstance(meta.get("config"), dict):
            raise UsageError(option, f"{folder} holds no DuoConfig (a checkpoint of a plain "
                                     f"module); only a DuoLLM's checkpoint can be exported")
        return Source("duo", folder, path)
    # config.json alone: a Hugging Face checkpoint that duollm never converted
    from duollm.hf_cli import require_transformers

    require_transformers(option)
    from duollm.hf.export import converted_weight_names

    if converted_weight_names(folder):
        raise UsageError(option, f"{folder} holds a converted model's weights but no {_SPEC}, "
                                 f"the record needed to load it; put it back first")
    raise UsageError(option, f"{folder} is a plain Hugging Face checkpoint: it already is the "
                             f"original model (duollm convert gives it small FFNs)")


def _check(args: argparse.Namespace) -> Source:
    if args.which not in WHICH:
        raise UsageError("--which", f"expected big or small, got {args.which!r}")
    source = find_source("PATH", args.path)
    out = args.out_dir
    check_out_dir("--out", out)
    if os.path.isdir(out) and os.listdir(out):
        raise UsageError("--out", f"{out} is not empty; pick a new folder")
    full = os.path.realpath(out)
    for read in (os.path.realpath(source.path), os.path.realpath(source.folder)):
        if full == read or full.startswith(read + os.sep):
            raise UsageError("--out", f"{out} is inside the checkpoint PATH reads ({read})")
    from duollm.hf_cli import require_transformers

    require_transformers("PATH")
    return source


def run_cli(args: argparse.Namespace) -> int:
    """``duollm export``: load, write the plain checkpoint, say what was written."""
    source = _check(args)
    from duollm import hf

    try:
        if source.kind == "duo":
            from duollm.checkpoint import load_checkpoint

            model, _ = load_checkpoint(source.folder)
            tokenizer = None
        else:
            model, tokenizer = hf.load_pretrained(source.folder)
    except (ValueError, FileNotFoundError) as e:  # a damaged or edited checkpoint
        raise UsageError("PATH", str(e)) from None
    path = hf.export(model, args.out_dir, args.which, tokenizer=tokenizer)
    with open(os.path.join(path, _CONFIG)) as f:
        config = json.load(f)
    what = f"{config['architectures'][0]}, {config['num_hidden_layers']} layers, FFN width " \
           f"{config['intermediate_size']}"
    print(f"exported the all-{args.which} model of {source.folder} ({what}) to {path}; "
          f"transformers' from_pretrained loads it")
    return 0
