"""Moving models through folders: export a ``DuoLLM`` as a Llama checkpoint; save and load
converted HF models.

* ``export(duo_model, path, which)``: the all-big or all-small sub-model of a ``DuoLLM`` as a
  standard ``LlamaForCausalLM`` checkpoint (``config.json`` + ``model.safetensors``) that
  ``transformers`` loads with ``from_pretrained`` and that computes the ``DuoLLM``'s logits
  under that policy (same rotate-half RoPE and theta, RMSNorm eps, head_dim, tied embeddings).
* ``save_converted(model, path)`` / ``load_converted(path)``: a converted HF model, both paths,
  bit-exact: the HF ``config.json``, ``duollm.json`` (the ``HFDuoSpec`` and the model class) and
  the full state dict as ``model.safetensors``; plus ``router/`` when a router is attached to
  the model (``duollm.router_io``), attached again on load for ``routing(model, "router")``.
* ``load_pretrained(path, d_small)``: a converted save as is, or a plain local HF checkpoint
  loaded and converted; plus its tokenizer when the folder has one.

Every writer builds the folder under a temporary name beside ``path`` and renames it into
place, so a crash never leaves a half-written checkpoint at ``path``. Nothing is downloaded.
See ``docs/hf.md``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple, Union

import safetensors.torch
import torch
import transformers
from torch import nn
from transformers.initialization import no_init_weights

from ..router_io import load_attached, save_attached
from .convert import INITS, convert
from .routing import spec_of

SPEC_FILE = "duollm.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "duollm-hf-converted"
FORMAT_VERSION = 1
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_folder(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; on success rename it to ``path``.

    On an exception the temporary folder is removed and ``path`` is untouched. An existing
    non-empty ``path`` is replaced only with ``overwrite=True`` (FileExistsError otherwise).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"path: {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"path: {path} exists and is not empty; pass overwrite=True to "
                              f"replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint folder is not
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, old / "x")
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- export


def llama_config(duo_config, which: str, dtype: torch.dtype) -> "transformers.LlamaConfig":
    """The ``LlamaConfig`` of a ``DuoConfig``'s all-big (``which="big"``) or all-small model."""
    c = duo_config
    return transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model,
        intermediate_size=c.d_big if which == "big" else c.d_small,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(c.rope_theta)},
        tie_word_embeddings=c.tie_embeddings, attention_bias=False, mlp_bias=False,
        hidden_act="silu", bos_token_id=None, eos_token_id=None, pad_token_id=None,
        architectures=["LlamaForCausalLM"], dtype=dtype)


def llama_state_dict(duo_model, which: str) -> Dict[str, torch.Tensor]:
    """The ``LlamaForCausalLM`` state dict of a ``DuoLLM``'s ``which`` path (tied head left
    out, as transformers saves tied models)."""
    sd = {"model.embed_tokens.weight": duo_model.embed.weight,
          "model.norm.weight": duo_model.norm.weight}
    if not duo_model.config.tie_embeddings:
        sd["lm_head.weight"] = duo_model.lm_head.weight
    for i, layer in enumerate(duo_model.layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = layer.attn_norm.weight
        sd[p + "post_attention_layernorm.weight"] = layer.ffn_norm.weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{name}.weight"] = getattr(layer.attn, name).weight
        ffn = layer.ffn.big if which == "big" else layer.ffn.small
        for name in ("gate_proj", "up_proj", "down_proj"):
            sd[p + f"mlp.{name}.weight"] = getattr(ffn, name).weight
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def export(duo_model, path: PathLike, which: str = "big", *, overwrite: bool = False) -> Path:
    """Write the all-big or all-small sub-model of a ``DuoLLM`` as a Llama checkpoint.

    Args:
      duo_model: a ``duollm.DuoLLM``.
      path: the folder to create (config.json + model.safetensors).
      which: ``"big"`` (every FFN its big path) or ``"small"`` (every FFN its small path).
      overwrite: replace an existing non-empty folder.
    Returns: the folder's path. ``transformers.LlamaForCausalLM.from_pretrained(path)`` then
    gives the ``DuoLLM``'s logits under routes ``which``.
    """
    from ..model import DuoLLM

    if not isinstance(duo_model, DuoLLM):
        raise TypeError(f"duo_model: expected a duollm.DuoLLM, got {type(duo_model).__name__}")
    if which not in ("big", "small"):
        raise ValueError(f"which: expected 'big' or 'small', got {which!r}")
    dtype = duo_model.embed.weight.dtype
    config = llama_config(duo_model.config, which, dtype)
    state = llama_state_dict(duo_model, which)
    with atomic_folder(path, overwrite) as tmp:
        config.save_pretrained(tmp)
        safetensors.torch.save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
    return Path(path)


# --------------------------------------------------------------------------- converted models


def save_converted(model: nn.Module, path: PathLike, *, tokenizer=None,
                   overwrite: bool = False) -> Path:
    """Save a converted HF model (both paths, its conversion record) to the folder ``path``.

    Writes the HF ``config.json``, ``duollm.json`` and ``model.safetensors`` (the full state
    dict, tied weights stored once), and ``tokenizer``'s files when given.
    ``load_converted(path)`` gives back a bit-identical model. (HF's own ``save_pretrained``
    would write the MLP weights under their converted names, which ``from_pretrained`` of the
    unconverted class does not know; use this, or ``export`` for a ``DuoLLM``.)
    """
    spec = spec_of(model)
    config = getattr(model, "config", None)
    if not isinstance(config, transformers.PretrainedConfig):
        raise TypeError(f"model: expected a transformers model with a .config, got "
                        f"{type(model).__name__}")
    cls = type(model).__name__
    if getattr(transformers, cls, None) is not type(model):
        raise TypeError(f"model: {cls} is not a transformers model class; load_converted "
                        f"could not rebuild it")
    dtype = next(model.parameters()).dtype
    config = copy.deepcopy(config)
    config.architectures = [cls]
    config.dtype = dtype
    record = {"format": FORMAT, "version": FORMAT_VERSION, "model_class": cls,
              "dtype": str(dtype).removeprefix("torch."),
              "buffer_dtypes": _loose_buffer_dtypes(model), **spec.to_dict()}
    with atomic_folder(path, overwrite) as tmp:
        config.save_pretrained(tmp)
        (tmp / SPEC_FILE).write_text(json.dumps(record, indent=2) + "\n")
        safetensors.torch.save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"},
                                     force_contiguous=True)
        save_attached(model, str(tmp))  # its router (duollm.router_io), when one is attached
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)


def _loose_buffers(model: nn.Module) -> Iterator[Tuple[str, nn.Module, str]]:
    """(qualified name, owner module, attribute) of every non-persistent buffer."""
    for prefix, module in model.named_modules():
        for name in sorted(module._non_persistent_buffers_set):
            if module._buffers.get(name) is not None:
                yield (f"{prefix}.{name}" if prefix else name), module, name


def _loose_buffer_dtypes(model: nn.Module) -> Dict[str, str]:
    """``{name: dtype}`` of the floating non-persistent buffers (RoPE's ``inv_freq``).

    They are not in the state dict: the loader recomputes them from the config. Their dtype is
    recorded because it changes the logits: ``from_pretrained(dtype=bfloat16)`` keeps
    ``inv_freq`` in float32, a model cast with ``.to(bfloat16)`` holds it rounded to bf16."""
    return {name: str(module._buffers[attr].dtype).removeprefix("torch.")
            for name, module, attr in _loose_buffers(model)
            if module._buffers[attr].is_floating_point()}


def _read_record(path: Path) -> Dict:
    try:
        record = json.loads((path / SPEC_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"path: {path / SPEC_FILE} is unreadable: {e}") from None
    if record.get("format") != FORMAT or record.get("version") != FORMAT_VERSION:
        raise ValueError(f"path: {path / SPEC_FILE} is not a duollm converted-model record "
                         f"(format {record.get('format')!r} version {record.get('version')!r})")
    return record


def _check_folder(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"path: {path} is not a folder (nothing is downloaded; give a local "
                         f"checkpoint folder)")
    return path


def load_converted(path: PathLike, *, dtype: Optional[torch.dtype] = None,
                   device: Union[str, torch.device, None] = None) -> nn.Module:
    """Load a model saved by ``save_converted``: same class, config, paths and parameters.

    ``dtype``/``device``: cast/move after loading (default: as saved, on the CPU). Returned in
    eval mode, like ``from_pretrained``.
    """
    path = _check_folder(path)
    record = _read_record(path)
    cls = getattr(transformers, record["model_class"], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"path: {path / SPEC_FILE} names model class "
                         f"{record['model_class']!r}, not a transformers model")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    saved_dtype = getattr(torch, record["dtype"])
    # Built directly in the saved dtype, as from_pretrained builds (its buffers, RoPE's inv_freq,
    # stay float32); then each non-persistent buffer gets the dtype it had when saved.
    # Every parameter is overwritten by the strict load below, so HF's random init is skipped
    # (it took 3 s of a 67M-parameter model's 3.1 s build here: minutes for billions).
    with no_init_weights():
        model = cls._from_config(config, dtype=saved_dtype)
    model.tie_weights()  # skipped with the init; safetensors stored tied weights once
    buffer_dtypes = record.get("buffer_dtypes", {})
    for name, module, attr in _loose_buffers(model):
        if name in buffer_dtypes:
            module._buffers[attr] = module._buffers[attr].to(getattr(torch, buffer_dtypes[name]))
    convert(model, record["d_small"], init="empty", skip=record["skip"],
            probs=tuple(record["probs"]))
    spec_of(model).init = record["init"]
    missing, unexpected = safetensors.torch.load_model(model, str(path / WEIGHTS_FILE),
                                                       strict=True)
    if missing or unexpected:  # strict=True raises first; kept as a guard on its contract
        raise ValueError(f"path: weights do not match the model (missing {missing}, "
                         f"unexpected {unexpected})")
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    load_attached(str(path), model)  # its saved router, for routing(model, "router")
    return model.eval()


def _tokenizer(path: Path):
    if not any((path / f).exists() for f in _TOKENIZER_FILES):
        return None
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_pretrained(path: PathLike, d_small: Optional[int] = None, *, init: str = "prune",
                    calibration: Optional[torch.Tensor] = None,
                    dtype: Optional[torch.dtype] = None,
                    device: Union[str, torch.device, None] = None) -> Tuple[nn.Module, object]:
    """A converted model and its tokenizer (None when the folder has none) from a local folder.

    A folder written by ``save_converted`` loads as is (``d_small``, when given, must match);
    a plain HF checkpoint folder is loaded with ``AutoModelForCausalLM`` and converted with
    ``d_small`` (required), ``init`` and ``calibration`` (see ``convert``).
    """
    path = _check_folder(path)
    if (path / SPEC_FILE).exists():
        record = _read_record(path)
        if d_small is not None and d_small != record["d_small"]:
            raise ValueError(f"d_small: {path} holds a model converted with d_small="
                             f"{record['d_small']}, not {d_small}")
        model = load_converted(path, dtype=dtype, device=device)
    else:
        if d_small is None:
            raise ValueError(f"d_small: required to convert the plain HF checkpoint {path}")
        if isinstance(d_small, bool) or not isinstance(d_small, int) or d_small < 1:
            raise ValueError(f"d_small: expected a positive int, got {d_small!r}")
        if init not in INITS:
            raise ValueError(f"init: expected one of {list(INITS)}, got {init!r}")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True)
        if device is not None:
            model.to(device)
        convert(model, d_small, init=init, calibration=calibration)
        model.eval()
    return model, _tokenizer(path)
