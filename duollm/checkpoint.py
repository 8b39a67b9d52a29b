"""Checkpoints: a directory that round-trips a ``DuoLLM`` bit-exactly, and resumes training.

Layout of a checkpoint directory::

    model.safetensors   weights; a tensor tied to another (lm_head = embed) is stored once
    meta.json           format version, DuoConfig, step, tied-weight aliases, ``extra``
    state.pt            optimizer state and RNG states (torch.save, loaded weights_only)
    router/             the model's attached router, when it has one (``duollm.router_io``;
                        ``load_checkpoint`` attaches it back for ``routes="router"``)

Saving is atomic: everything is written into a temporary sibling directory, flushed to disk,
then renamed into place. An interrupted save leaves the previous checkpoint untouched (and at
worst a ``.tmp`` sibling that the next save removes). Replacing an existing directory takes
two renames (old aside, new in); if a crash falls between them, ``load_checkpoint`` finds the
set-aside copy, so some complete checkpoint is always loadable.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from typing import Dict, Iterable, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from .config import DuoConfig
from .router_io import load_attached, save_attached

FORMAT_VERSION = 1
WEIGHTS, META, STATE = "model.safetensors", "meta.json", "state.pt"
_TMP_TAG, _OLD_TAG = ".tmp-", ".old-"


# --------------------------------------------------------------------------- RNG state


def rng_state(generator: Optional[torch.Generator] = None) -> Dict:
    """Everything random the training loop touches: torch (CPU, CUDA), python, a generator."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: Dict, generator: Optional[torch.Generator] = None) -> None:
    """Restore what ``rng_state`` captured (CUDA states only where CUDA is present)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None:
        if "generator" not in state:
            raise ValueError("state: the checkpoint holds no generator state to restore")
        generator.set_state(state["generator"])


# --------------------------------------------------------------------------- saving


def _unique_tensors(model: torch.nn.Module):
    """(tensors, aliases): the state dict with each shared storage kept once."""
    return unique_tensors(model.state_dict().items())


def unique_tensors(named: Iterable[Tuple[str, torch.Tensor]]):
    """(tensors, aliases) of ``(name, tensor)`` pairs: each shared storage kept once.

    safetensors refuses tensors that share memory, and tied weights do; ``aliases`` maps each
    dropped name to the (first) kept name it shares storage with.
    """
    tensors, aliases, seen = {}, {}, {}
    for name, t in named:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               tuple(t.stride()), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous()
    return tensors, aliases


def _fsync_dir(path: str) -> None:
    # The rename is durable only once the directory entry itself reaches the disk.
    if os.name == "posix":
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _write_checkpoint(tmp: str, model, optimizer, step, extra, generator) -> None:
    """Write every file of a checkpoint into the (new, empty) directory ``tmp``."""
    tensors, aliases = _unique_tensors(model)
    save_file(tensors, os.path.join(tmp, WEIGHTS))
    save_attached(model, tmp)  # the model's router (duollm.router_io), when one is attached
    state = {"optimizer": optimizer.state_dict() if optimizer is not None else None,
             "rng": rng_state(generator)}
    torch.save(state, os.path.join(tmp, STATE))
    config = model.config.to_dict() if isinstance(getattr(model, "config", None),
                                                  DuoConfig) else None
    meta = {"format_version": FORMAT_VERSION, "config": config, "step": step,
            "aliases": aliases, "extra": extra or {}}
    # meta.json is written last: a directory without it was never completed.
    with open(os.path.join(tmp, META), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    for name in (WEIGHTS, STATE, META):
        _fsync_file(os.path.join(tmp, name))


def save_checkpoint(path: str, model: torch.nn.Module,
                    optimizer: Optional[torch.optim.Optimizer] = None,
                    step: Optional[int] = None, extra: Optional[Dict] = None,
                    generator: Optional[torch.Generator] = None) -> str:
    """Save ``model`` (and optionally optimizer, step, RNG) to the directory ``path``, atomically.

    Args:
      path: checkpoint directory; replaced if it exists.
      model: a ``DuoLLM`` (its ``config`` is stored) or any module (weights only).
      optimizer: its ``state_dict()`` is stored for resuming.
      step: the training step the checkpoint was taken after.
      extra: JSON-serialisable dict stored as is (e.g. a ``TrainConfig`` and history).
      generator: a ``torch.Generator`` whose state is stored with the global RNG states.
    Returns: ``path``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if extra is not None:
        try:
            json.dumps(extra)
        except TypeError as e:
            raise TypeError(f"extra: must be JSON-serialisable ({e})") from None
    path = os.path.abspath(os.fspath(path))
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    _remove_stale(parent, base)
    tmp = os.path.join(parent, f".{base}{_TMP_TAG}{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)
    try:
        _write_checkpoint(tmp, model, optimizer, step, extra, generator)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        # rename(2) cannot replace a non-empty directory: move the old one aside first.
        old = os.path.join(parent, f".{base}{_OLD_TAG}{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
        os.replace(tmp, path)
    else:
        os.replace(tmp, path)
    _fsync_dir(parent)
    _remove_stale(parent, base)  # the set-aside copy, and any left by an earlier crash
    return path


def _remove_stale(parent: str, base: str) -> None:
    """Delete leftovers of interrupted saves of ``base`` (never the checkpoint itself)."""
    remove_stale(parent, base, complete=os.path.isfile(os.path.join(parent, base, META)))


def remove_stale(parent: str, base: str, *, complete: bool) -> None:
    """Delete what writers of ``parent/base`` killed mid-save left beside it.

    Every atomic writer of this package (``save_checkpoint``, ``duollm.hf``'s folders, stage-1
    step folders) builds ``.{base}.tmp-XXXXXXXX`` and, replacing an old folder, first moves that
    one to ``.{base}.old-XXXXXXXX``. A SIGKILL skips their own cleanup, so the next write to
    the same target calls this: ``.tmp-`` leftovers always go; ``.old-`` ones only when
    ``complete`` (``base`` itself is whole), as before then they may hold its only copy.
    """
    pattern = re.compile(rf"^\.{re.escape(base)}\.(tmp|old)-[a-z0-9_]{{8}}$")
    for entry in os.listdir(parent):
        match = pattern.match(entry)
        if match and (match.group(1) == "tmp" or complete):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


# --------------------------------------------------------------------------- loading


def resolve_checkpoint(path: str) -> str:
    """The complete checkpoint directory for ``path``, recovering a save cut between renames."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(os.path.join(path, META)):
        return path
    parent, base = os.path.split(path)
    if os.path.isdir(parent):
        olds = sorted((e for e in os.listdir(parent) if e.startswith(f".{base}{_OLD_TAG}")
                       and os.path.isfile(os.path.join(parent, e, META))),
                      key=lambda e: os.path.getmtime(os.path.join(parent, e)))
        if olds and not os.path.exists(path):
            return os.path.join(parent, olds[-1])
    if os.path.isdir(path):
        raise ValueError(f"path: {path!r} is not a complete checkpoint (no {META})")
    raise FileNotFoundError(f"path: no checkpoint at {path!r}")


def read_meta(path: str) -> Dict:
    """The ``meta.json`` of the checkpoint at ``path`` (config, step, aliases, extra)."""
    with open(os.path.join(resolve_checkpoint(path), META)) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"path: checkpoint format {meta.get('format_version')!r}, this "
                         f"duollm reads format {FORMAT_VERSION}")
    return meta


def load_into(path: str, model: torch.nn.Module,
              optimizer: Optional[torch.optim.Optimizer] = None,
              generator: Optional[torch.Generator] = None, restore_rng: bool = False,
              device="cpu") -> Dict:
    """Load the checkpoint at ``path`` into an existing ``model`` (and optimizer, RNG).

    The weights are copied into the model's own tensors (ties stay tied). With ``optimizer``
    its state is restored; with ``restore_rng`` the global RNG states and ``generator`` too.
    Returns the state dict ``{"step", "config", "extra", "optimizer", "rng"}``.
    """
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    if meta["config"] is not None and isinstance(getattr(model, "config", None), DuoConfig):
        saved = DuoConfig.from_dict(meta["config"])
        if saved != model.config:
            raise ValueError(f"model: its config {model.config} differs from the checkpoint's "
                             f"{saved}")
    tensors = load_file(os.path.join(ckpt, WEIGHTS), device=str(device))
    aliases = meta.get("aliases")
    if not isinstance(aliases, dict):
        raise ValueError(f"path: {ckpt}/{META}: 'aliases' must be an object, got "
                         f"{type(aliases).__name__}")
    for name, target in aliases.items():
        # An alias only names a tied weight stored once; it must never stand in for a stored
        # tensor (a tampered meta.json would silently load another weight in its place).
        if name in tensors or not isinstance(target, str) or target not in tensors:
            why = "is stored in the weights file itself" if name in tensors else \
                f"points to {target!r}, which is not in the weights file"
            raise ValueError(f"path: {ckpt}/{META}: alias {name!r} {why}; the file is damaged "
                             f"or was edited")
        tensors[name] = tensors[target]
    model.load_state_dict(tensors, strict=True)
    state = torch.load(os.path.join(ckpt, STATE), map_location=device, weights_only=True)
    if optimizer is not None:
        if state["optimizer"] is None:
            raise ValueError(f"optimizer: the checkpoint at {ckpt!r} holds no optimizer state")
        optimizer.load_state_dict(state["optimizer"])
    if restore_rng:
        rng = dict(state["rng"])
        rng["torch"] = rng["torch"].cpu()  # RNG states must be CPU ByteTensors
        if "generator" in rng:
            rng["generator"] = rng["generator"].cpu()
        set_rng_state(rng, generator)
    return {"step": meta["step"], "config": meta["config"], "extra": meta["extra"],
            "optimizer": state["optimizer"], "rng": state["rng"]}


SHA256SUMS = "SHA256SUMS"


def write_sha256sums(path: str) -> str:
    """Write ``path/SHA256SUMS`` (``sha256sum`` format, so ``sha256sum -c`` reads it too) over
    every file of the checkpoint folder ``path`` (a shipped checkpoint: ``load_checkpoint``
    then refuses a folder whose files no longer match). Returns the file's path."""
    from .shards import sha256_file

    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, META)):
        raise ValueError(f"path: {path} is not a checkpoint folder (no {META})")
    names = sorted(n for n in os.listdir(path)
                   if n != SHA256SUMS and os.path.isfile(os.path.join(path, n)))
    out = os.path.join(path, SHA256SUMS)
    with open(out, "w") as f:
        f.writelines(f"{sha256_file(os.path.join(path, n))}  {n}\n" for n in names)
    return out


def verify_sha256sums(path: str) -> bool:
    """Check the checkpoint folder ``path`` against its ``SHA256SUMS``, when it has one.
    Returns True when checked, False when there is no such file. Raises ValueError naming
    the first file that is missing or whose digest differs, or a malformed line."""
    from .shards import sha256_file

    sums = os.path.join(os.fspath(path), SHA256SUMS)
    if not os.path.isfile(sums):
        return False
    with open(sums) as f:
        lines = [ln.rstrip("\n") for ln in f if ln.strip()]
    for ln in lines:
        digest, sep, name = ln.partition("  ")
        if not sep or len(digest) != 64 or os.sep in name or name in ("", ".", ".."):
            raise ValueError(f"checkpoint: {sums}: malformed line {ln!r}")
        file = os.path.join(os.fspath(path), name)
        if not os.path.isfile(file):
            raise ValueError(f"checkpoint: {file} is listed in {SHA256SUMS} but missing")
        if sha256_file(file) != digest.lower():
            raise ValueError(f"checkpoint: {file} does not match its SHA-256 in {sums} (a "
                             f"corrupted or replaced file)")
    return True


def load_checkpoint(path: str, device="cpu") -> Tuple[torch.nn.Module, Dict]:
    """Build the ``DuoLLM`` stored at ``path`` on ``device`` and load its weights.

    ``path``: a checkpoint (``step_N``) folder, or the run folder of ``duollm train --out``:
    its newest complete step (``duollm.runs``). A folder holding ``SHA256SUMS``
    (``write_sha256sums``) is verified against it first.
    Returns: ``(model, state)`` with ``state`` as from ``load_into`` (``config`` a DuoConfig).
    """
    from .model import DuoLLM
    from .runs import resolve_model_folder

    path = resolve_model_folder(path, META)
    verify_sha256sums(path)
    meta = read_meta(path)
    if meta["config"] is None:
        raise ValueError(f"path: the checkpoint at {path!r} holds no DuoConfig; use "
                         f"load_into with a model of the right shape")
    config = DuoConfig.from_dict(meta["config"])
    model = DuoLLM(config).to(device)
    state = load_into(path, model, device=device)
    state["config"] = config
    load_attached(resolve_checkpoint(path), model)  # its saved router, for routes="router"
    return model, state
