"""Routers that ship with the model: save a trained router beside a checkpoint, load it back.

A router is stored in a ``router/`` folder inside a ``DuoLLM`` checkpoint directory
(``duollm.checkpoint``) or a converted Hugging Face folder (``duollm.hf.save_converted``):

    router/router.safetensors   its tensors, bit-exact (every layer's weight and bias, prices)
    router/router.json          kind, paths, hard-routing mode, threshold, calibration, shape

``save_checkpoint`` / ``save_converted`` write the router attached to the model
(``duollm.routes.attach_router``); ``load_checkpoint`` / ``load_converted`` attach the saved one,
so ``model.generate(..., routes="router")`` and ``duollm.hf.routing(model, "router")`` use it.
``write_router(folder, router, model)`` adds or replaces the router of an existing folder
atomically (what ``duollm train-router`` does).

Kinds: ``"linear"``, ``duollm.routers.LinearRouter`` (what ``train_router`` and
``train_supervised_router`` return, in ``"argmax"`` or ``"threshold"`` mode, with big or compute
prices). A router of any other class is refused with a TypeError naming it.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from typing import Callable, Dict, Optional

import torch
from safetensors.torch import load_file, save_file

from .config import router_flops
from .routers import LinearRouter
from .routes import attach_router, attached_router

ROUTER_DIR = "router"
ROUTER_WEIGHTS, ROUTER_META = "router.safetensors", "router.json"
FORMAT = "duollm-router"
FORMAT_VERSION = 1
KINDS = {"linear": LinearRouter}


def _kind_of(router) -> str:
    for name, cls in KINDS.items():
        if type(router) is cls:
            return name
    raise TypeError(f"router: cannot save a {type(router).__name__}; saved routers are "
                    f"{', '.join(c.__name__ for c in KINDS.values())}")


def _number(v) -> Optional[float]:
    return None if v is None else float(v)


def router_record(router: LinearRouter) -> Dict:
    """The JSON record of ``router``: everything but its tensors."""
    kind = _kind_of(router)
    if not math.isfinite(float(router.threshold)):
        raise ValueError(f"router: threshold {router.threshold!r} is not finite")
    return {"format": FORMAT, "version": FORMAT_VERSION, "kind": kind,
            "n_layers": router.n_layers, "d_model": router.proj[0].in_features,
            "paths": list(router.paths), "mode": router.mode,
            "threshold": float(router.threshold),
            "dtype": str(router.proj[0].weight.dtype).removeprefix("torch."),
            "target_big": _number(getattr(router, "target_big", None)),
            "target_compute": _number(getattr(router, "target_compute", None)),
            "calibration": getattr(router, "calibration", None)}


def router_tensors(router: LinearRouter) -> Dict[str, torch.Tensor]:
    """``{name: tensor}`` of ``router`` as stored (CPU, contiguous): weights, biases, prices."""
    out = {k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()}
    out["prices"] = router.prices.detach().cpu().contiguous()
    return out


def save_router(router: LinearRouter, folder: str) -> str:
    """Write ``router`` into ``folder/router/`` (``folder`` must exist); returns that path.

    Plain writes: the callers write into a folder that is renamed into place afterwards
    (checkpoint and converted-folder saves) or use ``write_router`` (atomic)."""
    record = router_record(router)
    if record["calibration"] is not None:
        try:
            json.dumps(record["calibration"])
        except TypeError as e:
            raise TypeError(f"router: its calibration record is not JSON-serialisable ({e})"
                            ) from None
    path = os.path.join(folder, ROUTER_DIR)
    os.makedirs(path, exist_ok=True)
    save_file(router_tensors(router), os.path.join(path, ROUTER_WEIGHTS),
              metadata={"format": "pt"})
    with open(os.path.join(path, ROUTER_META), "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
    return path


def has_router(folder: str) -> bool:
    """Whether ``folder`` holds a saved router."""
    return os.path.isfile(os.path.join(folder, ROUTER_DIR, ROUTER_META))


def read_record(folder: str) -> Dict:
    """The ``router.json`` record of the router saved in ``folder``."""
    path = os.path.join(folder, ROUTER_DIR, ROUTER_META)
    try:
        with open(path) as f:
            record = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"path: no router saved in {folder!r} (no {ROUTER_DIR}/"
                                f"{ROUTER_META})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"path: {path} is unreadable: {e}") from None
    if record.get("format") != FORMAT or record.get("version") != FORMAT_VERSION:
        raise ValueError(f"path: {path} is not a duollm router record (format "
                         f"{record.get('format')!r} version {record.get('version')!r})")
    if record.get("kind") not in KINDS:
        raise ValueError(f"path: {path} holds a router of kind {record.get('kind')!r}; this "
                         f"duollm reads {sorted(KINDS)}")
    return record


def load_router(folder: str, model, device=None) -> LinearRouter:
    """The router saved in ``folder``, rebuilt for ``model`` (a ``DuoLLM``, a converted HF
    model or a stack: its layer count, width and skip path must match the record).

    Bit-exact: every tensor comes back as saved, threshold and mode as recorded."""
    from .stack import as_stack

    record = read_record(folder)
    stack = as_stack(model)
    if (record["n_layers"], record["d_model"]) != (stack.n_layers, stack.d_model):
        raise ValueError(f"path: the router in {folder!r} routes {record['n_layers']} layers of "
                         f"width {record['d_model']}, the model has {stack.n_layers} of width "
                         f"{stack.d_model}")
    router = KINDS[record["kind"]](stack, tuple(record["paths"]), mode=record["mode"])
    tensors = load_file(os.path.join(folder, ROUTER_DIR, ROUTER_WEIGHTS))
    prices = tensors.pop("prices")
    router = router.to(getattr(torch, record["dtype"]))
    router.load_state_dict(tensors, strict=True)
    router.prices = prices
    router.threshold = float(record["threshold"])
    router.target_big = record.get("target_big")
    router.target_compute = record.get("target_compute")
    router.calibration = record.get("calibration")
    if device is None:
        device = stack.device
    return router.to(device).eval()


def save_attached(model, folder: str) -> Optional[str]:
    """Hook of the checkpoint writers: save ``model``'s attached router into ``folder``."""
    router = attached_router(model)
    if router is None:
        return None
    return save_router(router, folder)


def load_attached(folder: str, model) -> Optional[LinearRouter]:
    """Hook of the checkpoint loaders: attach the router saved in ``folder`` to ``model``
    (detaching any other); returns it, or None when the folder holds none."""
    if not has_router(folder):
        attach_router(model, None)
        return None
    router = load_router(folder, model)
    attach_router(model, router)
    return router


def write_router(folder: str, router: LinearRouter, model=None) -> str:
    """Add ``router`` to the existing checkpoint or converted ``folder``, replacing any router
    saved there, atomically (written beside, then renamed into place); with ``model`` it is
    also attached to it. Returns the router's folder."""
    if not os.path.isdir(folder):
        raise ValueError(f"path: {folder!r} is not a folder")
    router_record(router)  # refuse an unsaveable router before touching the folder
    tmp = os.path.join(folder, f".{ROUTER_DIR}.tmp-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)
    try:
        written = save_router(router, tmp)
        final = os.path.join(folder, ROUTER_DIR)
        old = None
        if os.path.exists(final):
            old = os.path.join(folder, f".{ROUTER_DIR}.old-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
        os.replace(written, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if model is not None:
        attach_router(model, router)
    return final


def router_overhead_flops(router: Callable, d_model: int) -> int:
    """Forward FLOPs per token per layer of a saved-kind router (a linear ``d -> P``)."""
    if isinstance(router, LinearRouter):
        return router_flops(d_model, len(router.paths))
    raise TypeError(f"router: no FLOP count for a {type(router).__name__}")


__all__ = ["ROUTER_DIR", "KINDS", "save_router", "load_router", "has_router", "read_record",
           "router_record", "router_tensors", "save_attached", "load_attached",
           "write_router", "router_overhead_flops", "attach_router", "attached_router"]
