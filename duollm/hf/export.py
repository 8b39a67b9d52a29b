"""Moving models through folders: export a ``DuoLLM`` or a converted HF model as a plain
checkpoint; save and load converted HF models.

* ``export(model, path, which)``: the all-big or all-small sub-model as a standard
  ``transformers`` checkpoint (``config.json`` + ``model.safetensors``) that ``from_pretrained``
  loads and that computes the model's logits under that policy: a ``DuoLLM`` as a
  ``LlamaForCausalLM`` (same rotate-half RoPE and theta, RMSNorm eps, head_dim, tied
  embeddings), a converted model as its own class (all-big: the original model; all-small:
  ``intermediate_size = d_small``).
* ``save_converted(model, path)`` / ``load_converted(path)``: a converted HF model, both paths,
  bit-exact: the HF ``config.json``, ``duollm.json`` (the ``HFDuoSpec`` and the model class) and
  the full state dict as ``model.safetensors``, the big paths under the original weight names
  (plain ``from_pretrained`` loads the original model) and the small ones under
  ``...mlp.small.*``; plus ``router/`` when a router is attached to
  the model (``duollm.router_io``), attached again on load for ``routing(model, "router")``.
* ``load_pretrained(path, d_small)``: a converted save as is, or a plain local HF checkpoint
  loaded and converted; plus its tokenizer when the folder has one.

Every writer builds the folder under a temporary name beside ``path`` and renames it into
place, so a crash never leaves a half-written checkpoint at ``path``; what a killed writer
left beside it goes with the next write to ``path``. Nothing is downloaded.
See ``docs/hf.md``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import safetensors.torch
import torch
import transformers
from torch import nn
from transformers.initialization import no_init_weights

from ..checkpoint import remove_stale, unique_tensors
from ..router_io import load_attached, save_attached
from ..runs import resolve_model_folder
from .convert import INITS, convert
from .routing import HFDuoFFN, is_converted, spec_of

SPEC_FILE = "duollm.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "duollm-hf-converted"
# 2: the big paths under the original names (plain from_pretrained loads the original model),
# the small ones under ...mlp.small.*; 1 (still read): everything under the converted names.
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")
# The weights only a converted model has (an HFDuoFFN's paths): how a converted folder whose
# duollm.json is lost is still recognised.
_CONVERTED_WEIGHT = re.compile(r"(?:^|\.)(big|small)\.(gate_proj|up_proj|down_proj)\.weight$")
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
    # what writers of this same path killed mid-write left (their own cleanup never ran)
    remove_stale(str(path.parent), path.name, complete=path.is_dir())
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
    remove_stale(str(path.parent), path.name, complete=True)


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


def export(duo_model, path: PathLike, which: str = "big", *, overwrite: bool = False,
           tokenizer=None) -> Path:
    """Write the all-big or all-small sub-model of a ``DuoLLM`` or of a converted HF model as a
    plain ``transformers`` checkpoint.

    Args:
      duo_model: a ``duollm.DuoLLM`` (written as a ``LlamaForCausalLM``) or a model converted by
        ``duollm.hf.convert`` (written as its own class: all-big is the original model, all-small
        the same model with ``intermediate_size = d_small``).
      path: the folder to create (config.json + model.safetensors).
      which: ``"big"`` (every FFN its big path) or ``"small"`` (every FFN its small path).
      overwrite: replace an existing non-empty folder.
      tokenizer: a tokenizer whose files are saved with the model (optional).
    Returns: the folder's path. ``from_pretrained(path)`` of that class then gives the model's
    logits under routes ``which`` (bit-exactly for a converted model in float32).
    """
    from ..model import DuoLLM

    if which not in ("big", "small"):
        raise ValueError(f"which: expected 'big' or 'small', got {which!r}")
    if is_converted(duo_model):
        config, state = _plain_checkpoint(duo_model, which)
    elif isinstance(duo_model, DuoLLM):
        dtype = duo_model.embed.weight.dtype
        config = llama_config(duo_model.config, which, dtype)
        state = llama_state_dict(duo_model, which)
    else:
        raise TypeError(f"duo_model: expected a duollm.DuoLLM or a model converted by "
                        f"duollm.hf.convert, got {type(duo_model).__name__}")
    with atomic_folder(path, overwrite) as tmp:
        config.save_pretrained(tmp)
        safetensors.torch.save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)


def _plain_checkpoint(model: nn.Module, which: str):
    """(config, tensors) of the plain ``type(model)`` whose every MLP is ``model``'s ``which``
    path, checked against the class built (on the meta device) from that config."""
    spec = spec_of(model)
    cls = _model_class(model)
    config = copy.deepcopy(model.config)
    config.architectures = [cls.__name__]
    config.dtype = next(model.parameters()).dtype
    if which == "small":
        if not isinstance(getattr(config, "intermediate_size", None), int):
            raise ValueError(f"duo_model: {type(config).__name__} has no integer "
                             f"intermediate_size to set to d_small={spec.d_small}")
        config.intermediate_size = spec.d_small
    tensors, tied = unique_tensors(_file_items(model, which))
    with torch.device("meta"), no_init_weights():
        plain = cls._from_config(config, dtype=config.dtype)
    want = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    got.update({k: got[v] for k, v in tied.items()})
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:4]
        raise ValueError(f"duo_model: its all-{which} weights do not fit a plain {cls.__name__} "
                         f"of its config (first differences: {diff})")
    return config, tensors


def _file_names(model: nn.Module, which: Optional[str]) -> Dict[str, Optional[str]]:
    """``{state-dict name: name in the file, or None (left out)}`` of a converted model.

    ``which=None``: ``save_converted``'s layout, each MLP's big path under the original names
    (``...mlp.big.gate_proj.weight`` -> ``...mlp.gate_proj.weight``), the small path kept under
    ``...mlp.small.*``; ``"big"``/``"small"``: a plain export, that path under the original
    names and the other left out."""
    names = {k: k for k in model.state_dict()}
    for prefix, mlp in model.named_modules():
        if not isinstance(mlp, HFDuoFFN):
            continue
        for key in mlp.state_dict():  # "big.gate_proj.weight", "small.up_proj.weight"
            path, _, rest = key.partition(".")
            full = f"{prefix}.{key}" if prefix else key
            plain = f"{prefix}.{rest}" if prefix else rest
            if which is None:
                names[full] = plain if path == "big" else full
            else:
                names[full] = plain if path == which else None
    return names


def _file_items(model: nn.Module, which: Optional[str]) -> Iterator[Tuple[str, torch.Tensor]]:
    names = _file_names(model, which)
    for key, tensor in model.state_dict().items():
        if names[key] is not None:
            yield names[key], tensor


# --------------------------------------------------------------------------- converted models


def save_converted(model: nn.Module, path: PathLike, *, tokenizer=None,
                   overwrite: bool = False) -> Path:
    """Save a converted HF model (both paths, its conversion record) to the folder ``path``.

    Writes the HF ``config.json``, ``duollm.json`` and ``model.safetensors`` (the full state
    dict, tied weights stored once), and ``tokenizer``'s files when given.
    ``load_converted(path)`` gives back a bit-identical model. The big paths are stored under
    the original weight names and the small ones under ``...mlp.small.*``, so plain
    ``from_pretrained`` of the model's class loads the original (unconverted) model exactly,
    listing the small weights as unexpected. (HF's own ``save_pretrained`` would write the MLP
    weights under their converted names, which ``from_pretrained`` does not know.)
    """
    spec = spec_of(model)
    cls = _model_class(model).__name__
    dtype = next(model.parameters()).dtype
    config = copy.deepcopy(model.config)
    config.architectures = [cls]
    config.dtype = dtype
    record = {"format": FORMAT, "version": FORMAT_VERSION, "model_class": cls,
              "dtype": str(dtype).removeprefix("torch."),
              "buffer_dtypes": _loose_buffer_dtypes(model), **spec.to_dict()}
    with atomic_folder(path, overwrite) as tmp:
        config.save_pretrained(tmp)
        (tmp / SPEC_FILE).write_text(json.dumps(record, indent=2) + "\n")
        tensors, _ = unique_tensors(_file_items(model, None))  # tied weights stored once
        safetensors.torch.save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        save_attached(model, str(tmp))  # its router (duollm.router_io), when one is attached
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)


def _model_class(model: nn.Module) -> type:
    """``type(model)`` when it is a ``transformers`` model class with a config (a loader can
    rebuild it by name); TypeError otherwise."""
    if not isinstance(getattr(model, "config", None), transformers.PretrainedConfig):
        raise TypeError(f"model: expected a transformers model with a .config, got "
                        f"{type(model).__name__}")
    cls = type(model).__name__
    if getattr(transformers, cls, None) is not type(model):
        raise TypeError(f"model: {cls} is not a transformers model class; a loader could "
                        f"not rebuild it")
    return type(model)


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
    """``duollm.json`` of ``path``, every field checked (ValueError naming the file and field:
    a damaged or edited record must not fail later with an AttributeError or load wrong)."""
    file = path / SPEC_FILE
    try:
        record = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"path: {file} is unreadable: {e}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or \
            record.get("version") not in _READABLE_VERSIONS:
        got = (record.get("format"), record.get("version")) if isinstance(record, dict) else \
            (type(record).__name__, None)
        raise ValueError(f"path: {file} is not a duollm converted-model record "
                         f"(format {got[0]!r} version {got[1]!r})")

    def bad(field, want):
        raise ValueError(f"path: {file}: {field} must be {want}, got {record.get(field)!r}")

    cls = record.get("model_class")
    if not (isinstance(cls, str) and isinstance(getattr(transformers, cls, None), type)
            and issubclass(getattr(transformers, cls), transformers.PreTrainedModel)):
        bad("model_class", "the name of a transformers model class")
    if record.get("dtype") not in _FLOAT_DTYPES:
        bad("dtype", f"one of {list(_FLOAT_DTYPES)}")
    buffers = record.get("buffer_dtypes", {})
    if not (isinstance(buffers, dict) and all(isinstance(k, str) and v in _FLOAT_DTYPES
                                              for k, v in buffers.items())):
        bad("buffer_dtypes", f"an object of buffer names to one of {list(_FLOAT_DTYPES)}")
    for field in ("d_small", "n_layers", "d_model", "d_big"):
        value = record.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            bad(field, "a positive integer")
    if not isinstance(record.get("skip"), bool):
        bad("skip", "true or false")
    probs = record.get("probs")
    if not (isinstance(probs, list) and len(probs) == 3 and all(
            isinstance(p, (int, float)) and not isinstance(p, bool) for p in probs)):
        bad("probs", "a list of three numbers")
    if record.get("init") not in INITS:
        bad("init", f"one of {list(INITS)}")
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

    ``path``: the saved folder, or a ``duollm train --hf`` run or step folder (its newest
    complete step's ``model``, ``duollm.runs``). ``dtype``/``device``: cast/move after loading
    (default: as saved, on the CPU). Returned in eval mode, like ``from_pretrained``.
    """
    path = _check_folder(resolve_model_folder(path, SPEC_FILE, "model"))
    record = _read_record(path)
    cls = getattr(transformers, record["model_class"])
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if not isinstance(config, cls.config_class):  # an edited record: fail here, not deep in HF
        raise ValueError(f"path: {path / SPEC_FILE}: model_class must be a model class of its "
                         f"config.json's {type(config).__name__}, got {record['model_class']!r}")
    saved_dtype = getattr(torch, record["dtype"])
    # Built directly in the saved dtype, as from_pretrained builds (its buffers, RoPE's inv_freq,
    # stay float32); then each non-persistent buffer gets the dtype it had when saved.
    # Every parameter is overwritten by the strict load below, so HF's random init is skipped
    # (it took 3 s of a 67M-parameter model's 3.1 s build here: minutes for billions).
    with no_init_weights():
        model = cls._from_config(config, dtype=saved_dtype)
    model.tie_weights()  # skipped with the init; safetensors stored tied weights once
    buffer_dtypes = dict(record.get("buffer_dtypes", {}))
    for name, module, attr in _loose_buffers(model):
        if name in buffer_dtypes:
            module._buffers[attr] = module._buffers[attr].to(
                getattr(torch, buffer_dtypes.pop(name)))
    if buffer_dtypes:
        raise ValueError(f"path: {path / SPEC_FILE}: buffer_dtypes names buffers that a "
                         f"{cls.__name__} of this config.json lacks: {sorted(buffer_dtypes)}")
    try:
        convert(model, record["d_small"], init="empty", skip=record["skip"],
                probs=tuple(record["probs"]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"path: {path / SPEC_FILE} (with its config.json): {e}") from None
    spec = spec_of(model)
    spec.init = record["init"]
    for field in ("n_layers", "d_model", "d_big"):
        if getattr(spec, field) != record[field]:
            raise ValueError(f"path: {path / SPEC_FILE} records {field}={record[field]}, but "
                             f"its config.json builds {getattr(spec, field)}")
    # version 1 stored every weight under its converted name
    _load_weights(model, path / WEIGHTS_FILE,
                  _file_names(model, None) if record["version"] >= 2 else None)
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    load_attached(str(path), model)  # its saved router, for routing(model, "router")
    return model.eval()


def _load_weights(model: nn.Module, file: Path, names: Optional[Dict[str, Optional[str]]]):
    """Copy the weights of ``file`` into ``model``, stored under ``names`` (state-dict name ->
    name in the file; None: the same names). Every weight must be there with its exact shape
    and dtype (no silent cast), bar tied ones stored once."""
    stored = safetensors.torch.load_file(str(file))
    own = model.state_dict()
    to_model = {v: k for k, v in (names or {k: k for k in own}).items() if v is not None}
    unexpected = sorted(set(stored) - set(to_model))
    if unexpected:
        raise ValueError(f"path: {file} holds weights the model lacks: {unexpected[:3]}")
    state = {to_model[k]: v for k, v in stored.items()}
    for key, tensor in state.items():
        if tensor.shape != own[key].shape or tensor.dtype != own[key].dtype:
            raise ValueError(f"path: {file}: {key} is {tensor.dtype} {tuple(tensor.shape)}, the "
                             f"model's is {own[key].dtype} {tuple(own[key].shape)}")
    loaded = {own[k].data_ptr() for k in state}
    missing = sorted(k for k in own if k not in state and own[k].data_ptr() not in loaded)
    if missing:  # a weight neither stored nor tied to a stored one
        raise ValueError(f"path: {file} lacks weights of the model: {missing[:3]}")
    model.load_state_dict(state, strict=False)


def converted_weight_names(path: PathLike) -> List[str]:
    """Weight names in the folder ``path`` that only a converted model has (its
    ``...mlp.small.*`` paths, or ``...mlp.big.*`` in the old layout); read from the
    safetensors headers, nothing loaded. Empty for a plain checkpoint."""
    names: List[str] = []
    for file in sorted(Path(path).glob("*.safetensors")):
        try:
            with safetensors.safe_open(str(file), "pt") as f:
                names += list(f.keys())
        except (OSError, safetensors.SafetensorError):
            continue  # unreadable: the loader will say so
    for file in sorted(Path(path).glob("*.safetensors.index.json")):
        try:
            names += list(json.loads(file.read_text()).get("weight_map", {}))
        except (OSError, ValueError, AttributeError):
            continue
    return sorted({n for n in names if _CONVERTED_WEIGHT.search(n)})


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
    ``d_small`` (required), ``init`` and ``calibration`` (see ``convert``). A ``duollm train
    --hf`` run or step folder loads its newest complete step's model (``duollm.runs``).
    """
    path = _check_folder(resolve_model_folder(path, "config.json", "model"))
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
        converted = converted_weight_names(path)
        if converted:  # loading it as plain would drop (or, old layout, re-draw) the paths
            old_layout = any(_CONVERTED_WEIGHT.search(n).group(1) == "big" for n in converted)
            raise ValueError(f"path: {path} holds a duollm-converted model (weights such as "
                             f"{converted[0]!r}) but no {SPEC_FILE}, the record needed to "
                             f"load it; put back the {SPEC_FILE} that save_converted wrote "
                             f"with it" + ("" if old_layout else ", or load the original "
                                           "model alone with transformers' from_pretrained"))
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True)
        if device is not None:
            model.to(device)
        convert(model, d_small, init=init, calibration=calibration)
        model.eval()
    return model, _tokenizer(path)
