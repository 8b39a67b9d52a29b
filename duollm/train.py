"""Random-routing training, stage 1 of the Duo-LLM study.

Each step draws, for every token at every layer, a route from ``(p_skip, p_small, p_big)`` so
the big and small FFNs learn to stand in for each other. AdamW with a linear warm-up and a
cosine decay, gradient clipping, bf16 autocast on CUDA, periodic validation under fixed
policies, atomic checkpoints and a bit-identical resume on the CPU.

All randomness of a step (the batch offsets and the route draws) comes from one CPU
``torch.Generator`` seeded with ``TrainConfig.seed``, whose state travels in checkpoints. Under
``torchrun`` every rank draws the same global batch and the same global routes and trains on
its own contiguous slice of both, so N ranks compute exactly the single-process step.
The ranks either replicate the model (DDP, the default) or shard it (FSDP2, ``fsdp=True``:
each rank holds 1/N of the weights, gradients and optimizer state, which is what lets
``paper-1.4b`` train on GPUs whose memory would not hold a replica plus AdamW's state).
Checkpoints are full state dicts either way (gathered to rank 0), so one format resumes
under DDP, FSDP or a single process.

``trainable`` (a regular expression over parameter names) trains only the matching parameters
and freezes the rest: the "freeze big, then train small" stage of the Duo-LLM ablations and
the stage-1 training of a converted Hugging Face model both use it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import distributed
from .checkpoint import load_into, save_checkpoint
from .config import DuoConfig
from .data import TokenData, eval_batches, sample_batch
from .model import DuoLLM

_CKPT_RE = re.compile(r"^step_(\d+)$")


@dataclass
class TrainConfig:
    """Knobs of ``train``. ``eval_every=0`` validates only at the end; ``checkpoint_every=0``
    saves only the final checkpoint (when ``out_dir`` is set)."""

    steps: int = 200
    batch_size: int = 16       # global batch (split across ranks under torchrun)
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0     # 0 disables clipping
    p_big: float = 0.5
    p_small: float = 0.5
    p_skip: float = 0.0
    eval_every: int = 50
    eval_batches: int = 8
    seed: int = 0
    device: str = "cpu"
    amp: Optional[bool] = None  # None: bf16 autocast on CUDA only
    out_dir: Optional[str] = None
    checkpoint_every: int = 0
    resume: bool = False
    backend: Optional[str] = None
    progress: bool = True
    keep_checkpoints: int = 2  # the newest checkpoints kept in out_dir
    fsdp: bool = False         # shard with FSDP2 under torchrun (a no-op in one process)
    trainable: Optional[str] = None  # regex over parameter names; None: train all
    data_parallel: bool = True  # False: train alone even under torchrun (runs sharded by rank)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_batches", "keep_checkpoints"):
            _check_int(name, getattr(self, name), low=1)
        for name in ("warmup", "eval_every", "checkpoint_every", "seed"):
            _check_int(name, getattr(self, name), low=0)
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
        if self.lr <= 0 or self.min_lr > self.lr:
            raise ValueError(f"lr, min_lr: expected 0 <= min_lr <= lr and lr > 0, got "
                             f"lr={self.lr}, min_lr={self.min_lr}")
        probs = (self.p_skip, self.p_small, self.p_big)
        if min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-6:
            raise ValueError(f"p_skip, p_small, p_big: expected non-negative probabilities "
                             f"summing to 1, got {probs}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device: expected a torch device such as 'cpu' or 'cuda:0', "
                             f"got {self.device!r}") from None
        for name in ("fsdp", "data_parallel"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if self.trainable is not None:
            if not isinstance(self.trainable, str) or not self.trainable:
                raise ValueError(f"trainable: expected a non-empty regular expression, got "
                                 f"{self.trainable!r}")
            try:
                re.compile(self.trainable)
            except re.error as e:
                raise ValueError(f"trainable: not a regular expression ({e}): "
                                 f"{self.trainable!r}") from None
        if (self.checkpoint_every or self.resume) and not self.out_dir:
            raise ValueError("out_dir: checkpoint_every and resume need an out_dir")


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")


@dataclass
class TrainResult:
    """``history``: one dict per validation, ``{"step", "train_loss", "val": {policy: loss},
    "tokens_per_s", "lr"}``, where ``train_loss`` is the mean training loss (random routing,
    global batch) over the steps since the previous validation. ``val_loss``: the final
    validation loss per policy (``"big"``, ``"small"``, ``"random"``), nats per token."""

    model: DuoLLM
    history: List[Dict] = field(default_factory=list)
    val_loss: Dict[str, float] = field(default_factory=dict)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of (0-based) ``step``: linear warm-up to ``lr``, cosine to ``min_lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def freeze(model: torch.nn.Module, trainable: Optional[str]) -> List[str]:
    """Train only the parameters whose names match the regex ``trainable``; freeze the rest.

    Sets ``requires_grad`` on every parameter of ``model`` (all True when ``trainable`` is
    None). ``re.search`` semantics, e.g. ``r"[.]ffn[.]small[.]"`` keeps every small FFN.
    Returns: the names of the trainable parameters. Raises ValueError if none match.
    """
    names = []
    pattern = None if trainable is None else re.compile(trainable)
    for name, p in model.named_parameters():
        p.requires_grad_(pattern is None or bool(pattern.search(name)))
        if p.requires_grad:
            names.append(name)
    if not names:
        raise ValueError(f"trainable: {trainable!r} matches no parameter name of the model "
                         f"(e.g. {next(iter(dict(model.named_parameters())), None)!r})")
    return names


def make_optimizer(model: DuoLLM, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the parameters that require gradients; weight decay only on the matrices
    of attention and FFNs (not norms, embeddings)."""
    embed = {id(model.embed.weight), id(model.lm_head.weight)}
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied tensor once
        if not p.requires_grad:
            continue  # frozen: no optimizer state, no weight decay
        (decay if p.dim() >= 2 and id(p) not in embed else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def autocast_context(device: torch.device, amp: Optional[bool]):
    enabled = device.type == "cuda" if amp is None else bool(amp)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def evaluate(model: DuoLLM, data: TokenData, seq_len: int, batch_size: int, n_batches: int,
             policies: Sequence[str] = ("big", "small", "random"), seed: int = 0,
             backend: Optional[str] = None, amp: Optional[bool] = None) -> Dict[str, float]:
    """Mean next-token cross-entropy on ``data.val`` under each routing policy.

    Uses the fixed windows of ``eval_batches`` (each ``(batch_size, seq_len + 1)``); the
    ``"random"`` policy draws its routes from a generator seeded with ``seed`` afresh for
    every call, so values from different calls (and checkpoints) are comparable.
    Returns: ``{policy: loss}`` in nats per token.
    """
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    device = next(model.parameters()).device

    def logits_of(inputs: torch.Tensor, policy: str, gen: torch.Generator) -> torch.Tensor:
        routes = policy
        if policy == "random":
            routes = model.random_routes(inputs.shape[0], seq_len, device, gen)
        with autocast_context(device, amp):
            return model(inputs, routes, backend=backend)  # (B, T, V)

    return policy_losses(model, data, seq_len, batch_size, n_batches, policies, seed,
                         logits_of)


def policy_losses(model: torch.nn.Module, data: TokenData, seq_len: int, batch_size: int,
                  n_batches: int, policies: Sequence[str], seed: int,
                  logits_of: Callable[[torch.Tensor, str, torch.Generator], torch.Tensor]
                  ) -> Dict[str, float]:
    """The validation loop shared by ``evaluate`` and ``duollm.hf.train.evaluate``.

    For each policy, a generator seeded with ``seed`` afresh, then over ``eval_batches``'
    fixed ``(batch_size, seq_len + 1)`` windows of ``data.val``: ``logits_of(inputs, policy,
    gen)`` gives the (B, T, V) logits of the (B, T) inputs under that policy (drawing any
    random routes from ``gen``). ``model`` is in eval mode meanwhile (its mode restored).
    Returns: ``{policy: mean next-token cross-entropy}`` in nats per token.
    """
    device = next(model.parameters()).device
    batches = eval_batches(data.val, batch_size, seq_len, n_batches)
    was_training = model.training
    model.eval()
    out = {}
    try:
        for policy in policies:
            gen = torch.Generator().manual_seed(seed)
            total = 0.0
            for batch in batches:
                batch = batch.to(device)  # (B, T + 1)
                logits = logits_of(batch[:, :-1], policy, gen)  # (B, T, V)
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
                total += loss.item()
            out[policy] = total / len(batches)
    finally:
        model.train(was_training)
    return out


def latest_checkpoint(out_dir: str) -> Optional[str]:
    """The ``out_dir/step_N`` checkpoint with the largest N, or None."""
    if not out_dir or not os.path.isdir(out_dir):
        return None
    steps = [(int(m.group(1)), e) for e in os.listdir(out_dir)
             if (m := _CKPT_RE.match(e)) and os.path.isfile(os.path.join(out_dir, e,
                                                                          "meta.json"))]
    return os.path.join(out_dir, max(steps)[1]) if steps else None


def _save(out_dir: str, model, optimizer, step: int, gen, cfg, history, data_name) -> None:
    extra = {"train_config": dataclasses.asdict(cfg), "history": history, "data": data_name}
    save_checkpoint(os.path.join(out_dir, f"step_{step:07d}"), model, optimizer, step=step,
                    extra=extra, generator=gen)
    old = sorted(int(m.group(1)) for e in os.listdir(out_dir) if (m := _CKPT_RE.match(e)))
    for s in old[:-cfg.keep_checkpoints]:
        shutil.rmtree(os.path.join(out_dir, f"step_{s:07d}"), ignore_errors=True)


def run_loop(cfg: TrainConfig, optimizer: torch.optim.Optimizer, params: List[torch.Tensor],
             forward: Callable[[], torch.Tensor], validate: Callable[[], Dict[str, float]],
             save: Callable[[int, List[Dict]], None], *, step: int, history: List[Dict],
             device: torch.device, resumed_from: Optional[str] = None, is_main: bool = True,
             reduce: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss
             ) -> Dict[str, float]:
    """The stage-1 training loop shared by ``train`` and ``duollm.hf.train_small``.

    Runs steps ``step .. cfg.steps - 1``: each sets ``lr_at``'s learning rate, calls
    ``forward()`` (draws a batch and routes from the caller's generator, returns the scalar
    loss), then zero-grads, backpropagates, clips ``params`` to ``cfg.grad_clip`` and steps
    ``optimizer``. Every ``cfg.eval_every`` steps and at the last one it appends
    ``{"step", "train_loss", "val", "tokens_per_s", "lr"}`` to ``history`` (in place;
    ``train_loss`` is ``reduce`` of the mean loss since the previous validation, ``val`` is
    ``validate()``); every ``cfg.checkpoint_every`` steps and at the last one, when
    ``cfg.out_dir`` is set, it calls ``save(step, history)``, whose time does not count in
    tokens per second. ``is_main`` False (a non-zero rank) prints nothing and shows no bar.
    Returns: the final validation loss per policy (validated afresh when nothing trained).
    """
    log = tqdm.write if cfg.progress and is_main else (lambda *_: None)
    if resumed_from is not None and is_main:  # said even with progress off: it changes the run
        print(f"resumed from {resumed_from} at step {step}", flush=True)
    bar = tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not (cfg.progress and is_main and sys.stderr.isatty()))
    tokens_per_step = cfg.batch_size * cfg.seq_len
    loss_sum, loss_n = torch.zeros((), device=device), 0
    # Throughput counts training only: the clock restarts after each validation and the time
    # spent saving checkpoints is subtracted. (.item() below syncs CUDA before reading it.)
    t_mark, t_pause = time.perf_counter(), 0.0

    def tokens_per_s() -> float:
        return tokens_per_step * loss_n / max(time.perf_counter() - t_mark - t_pause, 1e-9)

    while step < cfg.steps:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = forward()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        step += 1
        loss_sum += loss.detach()
        loss_n += 1
        if not bar.disable and (step % 10 == 0 or step == cfg.steps):
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_per_s():.0f}")
        bar.update(1)
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            train_loss = reduce(loss_sum / loss_n).item()
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"training diverged: mean loss {train_loss} before "
                                         f"step {step}; lower lr (now {cfg.lr}) or use "
                                         f"amp=False")
            speed = tokens_per_s()
            val = validate()
            history.append({"step": step, "train_loss": train_loss, "val": val,
                            "tokens_per_s": speed, "lr": lr})
            log(f"step {step:>6}  train {train_loss:.4f}  " + "  ".join(
                f"val/{k} {v:.4f}" for k, v in val.items()))
            loss_sum, loss_n = torch.zeros((), device=device), 0
            t_mark, t_pause = time.perf_counter(), 0.0
        if cfg.out_dir and ((cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                            or step == cfg.steps):
            t_save = time.perf_counter()
            save(step, history)
            t_pause += time.perf_counter() - t_save
    bar.close()
    if history and history[-1]["step"] == step:
        return dict(history[-1]["val"])
    return validate()  # resumed at (or past) the last step: nothing trained, validate the load


def training_config(model_config: DuoConfig, cfg: TrainConfig) -> DuoConfig:
    # The model's "random" policy means the mix it was trained with.
    return dataclasses.replace(model_config, p_skip=cfg.p_skip, p_small=cfg.p_small,
                               p_big=cfg.p_big)


def train(model_config: DuoConfig, data: TokenData, cfg: TrainConfig,
          model: Optional[DuoLLM] = None) -> TrainResult:
    """Train a ``DuoLLM`` with random routing on ``data.train``; validate on ``data.val``.

    Args:
      model_config: the model's shape; its route probabilities are replaced by ``cfg``'s.
      data: token streams; ``data.vocab_size`` must equal ``model_config.vocab_size``.
      cfg: the training knobs.
      model: train this model instead of a fresh one (its config must match the shape).
    Returns: a ``TrainResult`` with the trained model (unwrapped, on ``cfg.device``).

    With ``cfg.resume`` training continues from the newest ``cfg.out_dir/step_N``
    checkpoint (weights, optimizer, generator and RNG states, history), bit-identically on the
    CPU when ``cfg`` is unchanged; a larger ``steps`` stretches the remaining cosine schedule.
    Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is joined here (unless the
    caller already did) and left at the end; rank 0 alone prints and writes checkpoints.
    With ``cfg.fsdp`` the ranks shard the model with FSDP2 instead of replicating it; the
    returned model is then a plain, whole ``DuoLLM`` on every rank (gathered at the end), and
    a ``model`` passed in has been sharded in place: use the returned one. Each rank builds
    the whole model before sharding it (identical initial weights everywhere, as in one
    process), so a rank's device must hold one full copy of the weights for a moment.
    ``cfg.data_parallel=False`` trains in this process alone even under ``torchrun``.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg: expected a TrainConfig, got {type(cfg).__name__}")
    if data.vocab_size != model_config.vocab_size:
        raise ValueError(f"data: vocab_size {data.vocab_size} differs from the model's "
                         f"{model_config.vocab_size}")
    if cfg.seq_len > model_config.max_seq_len:
        raise ValueError(f"seq_len: {cfg.seq_len} exceeds the model's max_seq_len "
                         f"{model_config.max_seq_len}")
    config = training_config(model_config, cfg)
    info = distributed.init(cfg.device) if cfg.data_parallel else \
        distributed.DistInfo(device=cfg.device)
    try:
        return _train(config, data, cfg, model, info)
    finally:
        distributed.shutdown(info)


def _train(config: DuoConfig, data: TokenData, cfg: TrainConfig, model: Optional[DuoLLM],
           info: distributed.DistInfo) -> TrainResult:
    device = torch.device(info.device)
    rows = distributed.rank_slice(info, cfg.batch_size)
    if model is None:
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every run
        model = DuoLLM(config)
    elif training_config(model.config, cfg) != config:  # equal up to the route mix
        raise ValueError(f"model: its config {model.config} differs from model_config")
    model.config = config
    model.to(device).train()
    freeze(model, cfg.trainable)
    sharded = cfg.fsdp and info.enabled
    gen = torch.Generator().manual_seed(cfg.seed)  # batches and routes, CPU for determinism
    step, history = 0, []
    ckpt = latest_checkpoint(cfg.out_dir) if cfg.resume else None
    if sharded:
        # Checkpoints hold full weights: load them into the whole model on every rank, then
        # shard; the optimizer (which needs the sharded parameters) is restored afterwards.
        if ckpt is not None:
            state = load_into(ckpt, model, generator=gen, restore_rng=True, device=device)
            step, history = state["step"], state["extra"].get("history", [])
        distributed.fsdp_shard(model, info)
        optimizer = make_optimizer(model, cfg)
        if ckpt is not None:
            if state["optimizer"] is None:
                raise ValueError(f"resume: the checkpoint at {ckpt!r} holds no optimizer "
                                 f"state")
            distributed.fsdp_load_optimizer(model, optimizer, _state_by_name(
                state["optimizer"], _optimizer_names(model, optimizer)))
        ddp = model  # FSDP2 shards in place: the model itself runs the collectives
    else:
        optimizer = make_optimizer(model, cfg)
        if ckpt is not None:
            state = load_into(ckpt, model, optimizer, generator=gen, restore_rng=True,
                              device=device)
            step, history = state["step"], state["extra"].get("history", [])
        # Paths that get no tokens leave their weights without gradients under some backends.
        unused = min(cfg.p_small, cfg.p_big) == 0
        ddp = distributed.wrap(model, info, find_unused_parameters=unused)
    params = list(model.parameters())  # after sharding: the parameters the optimizer holds

    def forward() -> torch.Tensor:
        # Every rank draws the global batch and routes, then keeps its rows: the same draws
        # (and generator state) as a single process.
        batch = sample_batch(data.train, cfg.batch_size, cfg.seq_len, gen)  # (B, T+1)
        routes = model.random_routes(cfg.batch_size, cfg.seq_len, torch.device("cpu"),
                                     gen)  # (L, B, T)
        batch, routes = batch[rows].to(device), routes[:, rows].to(device)
        with autocast_context(device, cfg.amp):
            logits = ddp(batch[:, :-1], routes, backend=cfg.backend)  # (b, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())

    def validate() -> Dict[str, float]:
        return evaluate(model, data, cfg.seq_len, cfg.batch_size, cfg.eval_batches,
                        seed=cfg.seed, backend=cfg.backend, amp=cfg.amp)

    def save(step: int, history: List[Dict]) -> None:
        if sharded:
            _save_sharded(cfg.out_dir, model, optimizer, step, gen, cfg, history, data.name,
                          info)
        elif info.is_main:
            _save(cfg.out_dir, model, optimizer, step, gen, cfg, history, data.name)
        distributed.barrier(info)

    val_loss = run_loop(cfg, optimizer, params, forward, validate, save, step=step,
                        history=history, device=device, resumed_from=ckpt,
                        is_main=info.is_main,
                        reduce=lambda loss: distributed.mean_across(info, loss))
    if sharded:
        model = _unsharded(model, cfg, device)
    return TrainResult(model=model, history=history, val_loss=val_loss)


# --------------------------------------------------------------------------- FSDP2 helpers
# A checkpoint's optimizer state is the plain ``optimizer.state_dict()`` (parameters by
# index in ``make_optimizer``'s order); torch.distributed.checkpoint speaks of parameters by
# name. These two convert, so FSDP, DDP and single-process runs share one checkpoint format.


def _optimizer_names(model: torch.nn.Module, optimizer) -> List[str]:
    """The parameter name of each optimizer index."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _state_by_name(state: Dict, names: List[str]) -> Dict:
    return {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [dict(g, params=[names[i] for i in g["params"]])
                             for g in state["param_groups"]]}


def _state_by_index(state: Dict, names: List[str]) -> Dict:
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: s for n, s in state["state"].items()},
            "param_groups": [dict(g, params=[index[n] for n in g["params"]])
                             for g in state["param_groups"]]}


class _StateOnly:
    """Stands in for an optimizer where ``save_checkpoint`` only asks for its state dict."""

    def __init__(self, state: Dict):
        self._state = state

    def state_dict(self) -> Dict:
        return self._state


def _plain_copy(model: torch.nn.Module, state: Dict, device) -> DuoLLM:
    # fork_rng: building the copy draws initial weights, and must not move the global RNG
    # state that checkpoints record (resume would then differ from an unsharded run).
    with torch.random.fork_rng(devices=[]):
        plain = DuoLLM(model.config)
    plain.load_state_dict(state)
    return plain.to(device)


def _save_sharded(out_dir, model, optimizer, step, gen, cfg, history, data_name,
                  info: distributed.DistInfo) -> None:
    """Gather the full model and optimizer state to rank 0 (a collective) and save it there."""
    msd, osd = distributed.fsdp_full_state(model, optimizer, rank0_only=True)
    if info.is_main:
        plain = _plain_copy(model, msd, "cpu")
        state = _state_by_index(osd, _optimizer_names(model, optimizer))
        _save(out_dir, plain, _StateOnly(state), step, gen, cfg, history, data_name)


def _unsharded(model: torch.nn.Module, cfg: TrainConfig, device) -> DuoLLM:
    """A plain ``DuoLLM`` with the full trained weights, on every rank (a collective)."""
    msd, _ = distributed.fsdp_full_state(model, rank0_only=False)
    plain = _plain_copy(model, {k: v.to(device) for k, v in msd.items()}, device)
    freeze(plain, cfg.trainable)
    return plain.train()
