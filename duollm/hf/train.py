"""Stage 1 for a converted Hugging Face model: train only the small FFNs, the original frozen.

The paper's stage-1 ablation ("start from a pretrained bigger model, freeze it and only
finetune the small auxiliary modules"): every parameter the model had before
``duollm.hf.convert`` stays fixed; each step draws a route per token and layer from
``TrainConfig``'s ``(p_skip, p_small, p_big)`` and runs the model under ``routing``, so the
small modules learn to stand in for the big ones inside the real network. With ``distill > 0``
the loss adds ``distill * KL(all-big || routed)`` on the next-token distributions, the all-big
logits coming from the same (frozen) model without gradients.

The loop is ``duollm train``'s own (``duollm.train.run_loop``): AdamW with
``duollm.train.lr_at``'s warm-up and cosine, gradient clipping, bf16 autocast on CUDA,
periodic validation under fixed policies, atomic checkpoints and a bit-identical resume on
the CPU. All randomness of a step (batch offsets and route draws) comes from one CPU
generator seeded with ``cfg.seed`` whose state is checkpointed. Single process (no torchrun
sharding).

Checkpoint layout (``out_dir/step_N``, written into a temporary sibling then renamed)::

    model/      duollm.hf.save_converted(model, tokenizer=...): loads with
                duollm.hf.load_converted; the tokenizer's files when one was given
    train/      duollm.checkpoint of the small modules, optimizer, RNG states, history
    meta.json   written last: the step and the layout (a folder without it is incomplete)
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_into, remove_stale, save_checkpoint
from ..data import TokenData, sample_batch
from ..stack import random_routes
from ..train import TrainConfig, autocast_context, latest_checkpoint, policy_losses, run_loop
from .routing import HFDuoFFN, routing, spec_of

FORMAT = "duollm-hf-stage1"
MODEL_DIR, TRAIN_DIR, META = "model", "train", "meta.json"


@dataclass
class SmallTrainResult:
    """What ``train_small`` returns.

    Fields: ``model`` (the converted model, trained in place, on ``cfg.device``);
    ``history``: one dict per validation, ``{"step", "train_loss", "val": {policy: loss},
    "tokens_per_s", "lr"}`` as in ``duollm train`` (``train_loss`` includes the distillation
    term when ``distill > 0``); ``val_loss``: the final validation loss per policy
    (``"big"``, ``"small"``, ``"random"``), nats per token.
    """

    model: nn.Module
    history: List[Dict] = field(default_factory=list)
    val_loss: Dict[str, float] = field(default_factory=dict)


def small_modules(model: nn.Module) -> nn.ModuleList:
    """The ``.small`` SwiGLU of every converted MLP, in layer order (what stage 1 trains)."""
    ffns = sorted((m for m in model.modules() if isinstance(m, HFDuoFFN)),
                  key=lambda m: m.layer_idx)
    return nn.ModuleList(f.small for f in ffns)


def _logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits of a causal LM on (B, T) ids, without building a KV cache."""
    return model(input_ids=inputs, use_cache=False).logits


@torch.no_grad()
def evaluate(model: nn.Module, data: TokenData, seq_len: int, batch_size: int, n_batches: int,
             policies: Sequence[str] = ("big", "small", "random"), seed: int = 0,
             backend: Optional[str] = None, amp: Optional[bool] = None) -> Dict[str, float]:
    """Mean next-token cross-entropy of a converted model on ``data.val`` under each policy.

    The windows are ``duollm.data.eval_batches``' fixed ``(batch_size, seq_len + 1)`` windows;
    ``"random"`` draws from a generator seeded with ``seed`` afresh for every call, so values
    from different calls (and checkpoints) are comparable. Returns ``{policy: loss}`` (nats).
    """
    spec_of(model)  # TypeError naming model when it is not converted
    device = next(model.parameters()).device

    def logits_of(inputs: torch.Tensor, policy: str, gen: torch.Generator) -> torch.Tensor:
        with routing(model, policy, backend=backend, generator=gen), autocast_context(device, amp):
            return _logits(model, inputs)  # (B, T, V)

    return policy_losses(model, data, seq_len, batch_size, n_batches, policies, seed,
                         logits_of)


def _check(model: nn.Module, data: TokenData, cfg: TrainConfig, distill) -> None:
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg: expected a duollm.train.TrainConfig, got {type(cfg).__name__}")
    if not isinstance(data, TokenData):
        raise TypeError(f"data: expected a duollm.data.TokenData, got {type(data).__name__}")
    spec = spec_of(model)  # TypeError naming model when it is not converted
    if cfg.fsdp:
        raise ValueError("cfg.fsdp: train_small trains in one process (no FSDP sharding)")
    if cfg.trainable is not None:
        raise ValueError("cfg.trainable: train_small always trains exactly the small paths")
    if isinstance(distill, bool) or not isinstance(distill, (int, float)) \
            or not math.isfinite(distill) or distill < 0:
        raise ValueError(f"distill: expected a finite number >= 0, got {distill!r}")
    if cfg.p_skip > 0 and not spec.skip:
        raise ValueError(f"cfg.p_skip: {cfg.p_skip} draws SKIP but the model was converted "
                         f"with skip=False")
    vocab = model.get_output_embeddings().weight.shape[0]
    if data.vocab_size > vocab:
        raise ValueError(f"data: token ids up to {data.vocab_size - 1} do not fit the model's "
                         f"vocabulary of {vocab}")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and cfg.seq_len > max_pos:
        raise ValueError(f"cfg.seq_len: {cfg.seq_len} exceeds the model's "
                         f"max_position_embeddings {max_pos}")


def train_small(model: nn.Module, data: TokenData, cfg: TrainConfig,
                distill: float = 0.0, tokenizer=None) -> SmallTrainResult:
    """Stage 1 for a model converted by ``duollm.hf.convert``: train only its small FFNs.

    Args:
      model: a converted ``transformers`` causal LM; trained in place (moved to
        ``cfg.device``). Every parameter outside the ``.small`` modules is frozen for the run
        (its ``requires_grad`` is restored afterwards).
      data: token streams (``data.train`` windows of ``cfg.seq_len + 1`` ids); its ids must fit
        the model's vocabulary.
      cfg: ``duollm.train.TrainConfig``: steps, batch, lr schedule, the route mix
        ``p_skip``/``p_small``/``p_big``, validation, ``out_dir``/``checkpoint_every``/
        ``resume``, ``backend``, ``progress``.
      distill: weight of ``KL(all-big || routed)`` added to the next-token cross-entropy.
      tokenizer: the model's ``transformers`` tokenizer; every checkpoint's ``model/`` folder
        carries its files, so ``study --hf`` on it reads text as training did.
    Returns: a ``SmallTrainResult``.

    With ``cfg.resume`` training continues from the newest ``cfg.out_dir/step_N`` (small
    weights, optimizer, generator and RNG states, history), bit-identically on the CPU.
    """
    _check(model, data, cfg, distill)
    device = torch.device(cfg.device)
    model.to(device)
    smalls = small_modules(model)
    trainable = {id(p) for p in smalls.parameters()}
    frozen_flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    was_training = model.training
    try:
        return _train(model, smalls, data, cfg, float(distill), device, tokenizer)
    finally:
        for p, flag in frozen_flags.items():
            p.requires_grad_(flag)
        model.train(was_training)


def _train(model, smalls: nn.ModuleList, data: TokenData, cfg: TrainConfig, distill: float,
           device: torch.device, tokenizer=None) -> SmallTrainResult:
    spec = spec_of(model)
    params = list(smalls.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)  # batches and routes, CPU for determinism
    probs = (cfg.p_skip, cfg.p_small, cfg.p_big)
    step, history = 0, []
    ckpt = latest_checkpoint(cfg.out_dir) if cfg.resume else None
    if ckpt is not None:
        state = load_into(os.path.join(ckpt, TRAIN_DIR), smalls, optimizer, generator=gen,
                          restore_rng=True, device=device)
        step, history = state["step"], state["extra"].get("history", [])
    model.train()

    def forward() -> torch.Tensor:
        batch = sample_batch(data.train, cfg.batch_size, cfg.seq_len, gen).to(device)
        routes = random_routes(spec.n_layers, cfg.batch_size, cfg.seq_len, probs,
                               torch.device("cpu"), gen).to(device)  # (L, B, T)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with autocast_context(device, cfg.amp):
            if distill > 0:
                with torch.no_grad():
                    teacher = _logits(model, inputs)  # all-big: outside any routing
            with routing(model, routes, backend=cfg.backend):
                logits = _logits(model, inputs)  # (B, T, V)
        log_q = F.log_softmax(logits.float(), -1).flatten(0, 1)  # (B*T, V)
        loss = F.nll_loss(log_q, targets.flatten())
        if distill > 0:
            log_p = F.log_softmax(teacher.float(), -1).flatten(0, 1)
            loss = loss + distill * F.kl_div(log_q, log_p, log_target=True,
                                             reduction="batchmean")
        return loss

    def validate() -> Dict[str, float]:
        return evaluate(model, data, cfg.seq_len, cfg.batch_size, cfg.eval_batches,
                        seed=cfg.seed, backend=cfg.backend, amp=cfg.amp)

    def save(step: int, history: List[Dict]) -> None:
        save_stage1(cfg.out_dir, model, smalls, optimizer, step, gen, cfg, distill, history,
                    data.name, tokenizer=tokenizer)

    val_loss = run_loop(cfg, optimizer, params, forward, validate, save, step=step,
                        history=history, device=device, resumed_from=ckpt)
    return SmallTrainResult(model=model, history=history, val_loss=val_loss)


def save_stage1(out_dir: str, model: nn.Module, smalls: nn.ModuleList, optimizer, step: int,
                gen: torch.Generator, cfg: TrainConfig, distill: float, history: List[Dict],
                data_name: str, tokenizer=None) -> str:
    """Write ``out_dir/step_N`` atomically (layout in the module docstring); keep the newest
    ``cfg.keep_checkpoints``. Returns the checkpoint folder."""
    from .export import save_converted

    os.makedirs(out_dir, exist_ok=True)
    name = f"step_{step:07d}"
    final = os.path.join(out_dir, name)
    # One process writes a run's steps: a hidden step folder left here is a killed save's.
    for entry in os.listdir(out_dir):
        if entry.startswith(".step_"):
            remove_stale(out_dir, entry[1:].partition(".")[0], complete=True)
    tmp = os.path.join(out_dir, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)
    try:
        save_converted(model, os.path.join(tmp, MODEL_DIR), tokenizer=tokenizer)
        extra = {"train_config": dataclasses.asdict(cfg), "distill": distill,
                 "history": history, "data": data_name}
        save_checkpoint(os.path.join(tmp, TRAIN_DIR), smalls, optimizer, step=step,
                        extra=extra, generator=gen)
        with open(os.path.join(tmp, META), "w") as f:  # last: marks the folder complete
            json.dump({"format": FORMAT, "step": step, "model": MODEL_DIR,
                       "train": TRAIN_DIR}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(final):  # a re-run of the same step: rename cannot replace a folder
        shutil.rmtree(final)
    os.replace(tmp, final)
    kept = sorted(e for e in os.listdir(out_dir)
                  if e.startswith("step_") and os.path.isfile(os.path.join(out_dir, e, META)))
    for old in kept[:-cfg.keep_checkpoints]:
        shutil.rmtree(os.path.join(out_dir, old), ignore_errors=True)
    return final
