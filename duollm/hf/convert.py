"""``convert``: give every SwiGLU MLP of a Hugging Face decoder a small sibling, in place.

Supported: decoders whose layers live at ``model.model.layers`` (a ``...ForCausalLM``) or
``model.layers`` (a base model) and whose every layer's ``mlp`` is a bias-free SwiGLU
(``down_proj(silu(gate_proj(x)) * up_proj(x))`` with three plain ``nn.Linear``): Llama (MHA and
GQA), Mistral, Qwen2, Qwen3 and others built the same way. Detection is by structure, never by
class name; anything else is refused with an error naming the layer and the reason *before*
anything is modified (every layer is checked and every new module built first, then swapped).
See ``docs/hf.md``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation

from ..modules import SwiGLU
from ..reference import SKIP
from .routing import SPEC_ATTR, HFDuoFFN, HFDuoSpec, is_converted, wrap_swiglu

INITS = ("prune", "random")
_SILU_NAMES = ("silu", "swish")
_Projections = Tuple[nn.Linear, nn.Linear, nn.Linear]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of an HF model: ``model.model.layers`` or ``model.layers``."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None) if isinstance(inner, nn.Module) else None
    if layers is None:
        layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TypeError(f"model: {type(model).__name__} has no decoder layers at "
                        f"model.model.layers or model.layers; duollm.hf converts Llama-style "
                        f"decoders (Llama, Mistral, Qwen2, Qwen3)")
    return layers


def _swiglu_projections(i: int, layer: nn.Module, hidden_act) -> _Projections:
    """Layer i's (gate_proj, up_proj, down_proj) when its MLP is a bias-free SwiGLU."""
    where = f"model layer {i}"
    mlp = getattr(layer, "mlp", None)
    if not isinstance(mlp, nn.Module):
        raise TypeError(f"{where}: has no .mlp module ({type(layer).__name__})")
    kind = type(mlp).__name__
    if hasattr(mlp, "gate_up_proj"):
        raise ValueError(f"{where}: mlp ({kind}) has a fused gate_up projection; duollm.hf "
                         f"needs separate gate_proj and up_proj")
    missing = [n for n in ("gate_proj", "up_proj", "down_proj") if not hasattr(mlp, n)]
    if missing:
        what = " (a mixture-of-experts block)" if hasattr(mlp, "experts") else ""
        raise TypeError(f"{where}: mlp ({kind}){what} has no {', '.join(missing)}; duollm.hf "
                        f"converts SwiGLU MLPs with gate_proj, up_proj and down_proj")
    projs = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    for name, p in zip(("gate_proj", "up_proj", "down_proj"), projs):
        if type(p) is not nn.Linear:  # a subclass (quantized, LoRA) computes something else
            raise TypeError(f"{where}: mlp.{name} is a {type(p).__name__}, expected a plain "
                            f"torch.nn.Linear")
        if p.bias is not None:
            raise ValueError(f"{where}: mlp.{name} has a bias; duollm.hf converts bias-free "
                             f"SwiGLU MLPs only")
        if not p.weight.dtype.is_floating_point:
            raise TypeError(f"{where}: mlp.{name}.weight has dtype {p.weight.dtype}, expected "
                            f"a floating dtype")
    act = getattr(mlp, "act_fn", None)
    if not isinstance(act, (nn.SiLU, SiLUActivation)):
        raise ValueError(f"{where}: mlp activation is {type(act).__name__}, not SiLU "
                         f"(GELU/GeGLU MLPs are not supported)")
    if isinstance(hidden_act, str) and hidden_act not in _SILU_NAMES:
        raise ValueError(f"{where}: config.hidden_act is {hidden_act!r}, not SiLU")
    gate, up, down = projs
    d, width = gate.in_features, gate.out_features
    if (up.in_features, up.out_features) != (d, width) or \
            (down.in_features, down.out_features) != (width, d):
        raise ValueError(f"{where}: inconsistent SwiGLU shapes: gate_proj {d}->{width}, up_proj "
                         f"{up.in_features}->{up.out_features}, down_proj "
                         f"{down.in_features}->{down.out_features}")
    ws = [p.weight for p in projs]
    if len({(w.dtype, w.device) for w in ws}) != 1:
        raise ValueError(f"{where}: gate_proj, up_proj and down_proj differ in dtype or device")
    known = {f"{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
    extra = sorted(n for n, _ in mlp.named_parameters() if n not in known)
    if extra:
        raise ValueError(f"{where}: mlp ({kind}) has a parameter beyond the SwiGLU projections "
                         f"({', '.join(extra)}); its output would not be the SwiGLU formula")
    return gate, up, down


# --------------------------------------------------------------------------- importance


def weight_importance(gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> torch.Tensor:
    """(width,) float32 score of each channel from weights alone:
    ``||W_gate[j]|| * ||W_up[j]|| * ||W_down[:, j]||`` (a bound on the channel's output size)."""
    return (gate.weight.float().norm(dim=1) * up.weight.float().norm(dim=1)
            * down.weight.float().norm(dim=0))


@torch.no_grad()
def activation_importance(model: nn.Module, projections: Sequence[_Projections],
                          layers: nn.ModuleList, calibration: torch.Tensor) -> List[torch.Tensor]:
    """Per layer, (width,) float32 ``mean_tokens |silu(x W_gate[j]^T) * (x W_up[j]^T)|
    * ||W_down[:, j]||``: the mean size of channel j's contribution to the MLP output, x the
    MLP inputs of one all-big forward of ``calibration`` (B, T)."""
    sums = [torch.zeros(g.out_features, dtype=torch.float32, device=g.weight.device)
            for g, _, _ in projections]
    counts = [0] * len(projections)

    def hook(i):
        g, u, _ = projections[i]

        def pre(module, args, kwargs):
            x = args[0] if args else kwargs["x"]
            x_ND = x.reshape(-1, x.shape[-1])  # (N, d)
            a = F.silu(F.linear(x_ND, g.weight)) * F.linear(x_ND, u.weight)  # (N, width)
            sums[i] += a.float().abs().sum(0)
            counts[i] += x_ND.shape[0]
        return pre

    handles = [layer.mlp.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    try:
        model(calibration)
    finally:
        for h in handles:
            h.remove()
    return [s / max(c, 1) * d.weight.float().norm(dim=0)
            for s, c, (_, _, d) in zip(sums, counts, projections)]


def _check_calibration(model: nn.Module, calibration, device) -> torch.Tensor:
    if not isinstance(calibration, torch.Tensor) or calibration.dtype not in (torch.int32,
                                                                              torch.int64):
        got = calibration.dtype if isinstance(calibration, torch.Tensor) else \
            type(calibration).__name__
        raise TypeError(f"calibration: expected an int32/int64 tensor of token ids (B, T), got "
                        f"{got}")
    if calibration.dim() == 1:
        calibration = calibration[None]
    if calibration.dim() != 2 or calibration.numel() == 0:
        raise ValueError(f"calibration: expected a non-empty (B, T) tensor of token ids, got "
                         f"shape {tuple(calibration.shape)}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and (int(calibration.min()) < 0 or int(calibration.max()) >= vocab):
        raise ValueError(f"calibration: token ids must lie in [0, {vocab})")
    return calibration.to(device)


# --------------------------------------------------------------------------- convert


def _check_probs(probs, skip: bool) -> Tuple[float, float, float]:
    try:
        probs = tuple(float(p) for p in probs)
    except TypeError:
        raise TypeError(f"probs: expected (p_skip, p_small, p_big), got {probs!r}") from None
    if len(probs) != 3 or min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-6:
        raise ValueError(f"probs: expected three non-negative numbers summing to 1, got {probs}")
    if probs[SKIP] > 0 and not skip:
        raise ValueError("probs: p_skip > 0 needs skip=True")
    return probs


def _new_small(gate: nn.Linear, up: nn.Linear, down: nn.Linear, d_small: int, init: str,
               score: Optional[torch.Tensor], std: float) -> SwiGLU:
    w = gate.weight
    with torch.device(w.device):
        small = SwiGLU(gate.in_features, d_small).to(w.dtype)
    with torch.no_grad():
        if init == "prune":
            keep = torch.topk(score, d_small).indices.sort().values  # original channel order
            small.gate_proj.weight.copy_(gate.weight[keep])
            small.up_proj.weight.copy_(up.weight[keep])
            small.down_proj.weight.copy_(down.weight[:, keep])
        elif init == "random":
            for p in small.weights:
                nn.init.normal_(p, std=std)
        # init == "empty" (loading a save): the weights are overwritten at once
    return small


def convert(model: nn.Module, d_small: int, *, init: str = "prune",
            calibration: Optional[torch.Tensor] = None, skip: bool = True,
            probs: Sequence[float] = (0.0, 0.5, 0.5)) -> nn.Module:
    """Make every SwiGLU MLP of the HF decoder ``model`` a routed Duo FFN, in place.

    Each layer's ``mlp`` becomes an ``HFDuoFFN`` whose ``.big`` holds the original
    ``gate_proj/up_proj/down_proj`` modules (the same Parameters: no copy) and whose ``.small``
    is a new ``SwiGLU(d_model, d_small)`` in the original dtype and device. Outside
    ``duollm.hf.routing`` the model computes exactly what it did before.

    Args:
      model: a Llama/Mistral/Qwen2/Qwen3-style ``...ForCausalLM`` or base model.
      d_small: width of the small paths, ``1 <= d_small <`` every layer's intermediate size.
      init: ``"prune"``: the small path keeps the ``d_small`` intermediate channels of the big
        one with the highest importance (rows of ``gate_proj``/``up_proj`` and columns of
        ``down_proj``, copied in their original order). Importance of channel j, with
        ``calibration`` tokens: ``mean over tokens |silu(x W_gate[j]^T) * (x W_up[j]^T)| *
        ||W_down[:, j]||`` with x the MLP inputs of one all-big forward; without:
        ``||W_gate[j]|| * ||W_up[j]|| * ||W_down[:, j]||``. ``"random"``: normal init with the
        config's ``initializer_range`` (0.02 if none).
      calibration: (B, T) or (T,) int token ids for the activation-aware prune score.
      skip: whether route SKIP is allowed.
      probs: ``(p_skip, p_small, p_big)`` of the ``"random"`` routing policy.
    Returns: ``model`` itself.
    Raises: TypeError/ValueError naming the layer and the reason for a model it cannot
      convert (biased MLP, non-SiLU activation, fused gate_up, MoE block, no layers), with
      the model left untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if is_converted(model):
        raise ValueError("model: already converted by duollm.hf.convert")
    if init not in INITS and init != "empty":
        raise ValueError(f"init: expected one of {list(INITS)}, got {init!r}")
    if not isinstance(skip, bool):
        raise TypeError(f"skip: expected a bool, got {type(skip).__name__}")
    probs = _check_probs(probs, skip)
    layers = decoder_layers(model)
    config = getattr(model, "config", None)
    hidden_act = getattr(config, "hidden_act", None)
    for i, layer in enumerate(layers):
        if isinstance(getattr(layer, "mlp", None), HFDuoFFN):
            raise ValueError(f"model layer {i}: already a converted HFDuoFFN")
    projections = [_swiglu_projections(i, layer, hidden_act) for i, layer in enumerate(layers)]
    d_model = projections[0][0].in_features
    if any(g.in_features != d_model for g, _, _ in projections):
        raise ValueError("model: layers disagree on the MLP input width")
    d_big = min(g.out_features for g, _, _ in projections)
    if isinstance(d_small, bool) or not isinstance(d_small, int) or not 1 <= d_small < d_big:
        raise ValueError(f"d_small: expected an int in [1, {d_big}) (below the MLP width), got "
                         f"{d_small!r}")
    if calibration is not None and init != "prune":
        raise ValueError(f"calibration: only used by init='prune', not init={init!r}")

    # Everything that can fail happens before the first swap.
    scores: List[Optional[torch.Tensor]] = [None] * len(layers)
    if init == "prune":
        if calibration is not None:
            calibration = _check_calibration(model, calibration, projections[0][0].weight.device)
            scores = activation_importance(model, projections, layers, calibration)
        else:
            scores = [weight_importance(*p) for p in projections]
    std = getattr(config, "initializer_range", None)
    std = float(std) if isinstance(std, (int, float)) and std > 0 else 0.02
    smalls = [_new_small(*p, d_small, init, s, std) for p, s in zip(projections, scores)]
    widths = {g.out_features for g, _, _ in projections}
    spec = HFDuoSpec(d_small=d_small, skip=skip, probs=probs, init=init, n_layers=len(layers),
                     d_model=d_model, d_big=max(widths))
    new = [HFDuoFFN(wrap_swiglu(*p), s, skip, i, spec)
           for i, (p, s) in enumerate(zip(projections, smalls))]
    for layer, mlp in zip(layers, new):
        layer.mlp = mlp
    setattr(model, SPEC_ATTR, spec)
    return model


def small_params(d_model: int, d_small: int, n_layers: int) -> int:
    """Parameters ``convert`` adds: three (d_model x d_small) matrices per layer."""
    return 3 * d_model * d_small * n_layers

