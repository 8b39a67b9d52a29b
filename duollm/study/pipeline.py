"""``run_study``: the stages of ``duollm.study.stages`` chained, on every holdout, into a
``StudyResult`` written as ``results.json`` and ``report.md`` with PNG plots."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Dict, List, Optional, Sequence

import torch

from ..reference import BIG
from . import stages as St
from . import stats as S
from .holdouts import (CODE, PROSE, Holdout, check_shard_holdout, load_holdout, shard_holdout,
                       synthetic_holdout, training_data, windows)
from .results import HoldoutResult, StudyResult


def _holdouts(data, sizes: St.StudySizes, seed: int) -> List[Holdout]:
    from ..shards import is_shard_dir

    if data not in (None, "default", "synthetic") and is_shard_dir(data):
        return [shard_holdout(str(data))]  # its tokenizer's ids, memory-mapped
    if data in (None, "default"):
        return [load_holdout(PROSE), load_holdout(CODE)]
    if data == "synthetic":
        return [synthetic_holdout(sizes.n_tokens_synth, seed), load_holdout(CODE)]
    return [load_holdout(os.path.basename(str(data)), path=str(data)), load_holdout(CODE)]


def model_shape(model) -> Dict:
    """``n_layers, d_model, d_big, d_small, max_seq_len`` of a DuoLLM or a converted HF
    model (read through ``duollm.stack.as_stack``)."""
    from ..stack import as_stack

    st = as_stack(model)
    cfg = getattr(model, "config", None)
    max_len = getattr(cfg, "max_seq_len", None) or getattr(cfg, "max_position_embeddings",
                                                           None) or 2048
    return {"n_layers": st.n_layers, "d_model": st.d_model, "d_big": st.d_big,
            "d_small": st.d_small, "vocab_size": st.vocab_size, "max_seq_len": int(max_len)}


def analyse_holdout(model, h: Holdout, routers: List[St.TrainedRouter], sizes: St.StudySizes,
                    budgets: List[int], n_random: int, n_sequences: int, seed: int,
                    device, progress: bool, log=print,
                    collect: Optional[list] = None,
                    chunks: Optional[str] = None) -> HoldoutResult:
    """Every oracle, baseline, router and difficulty result on one holdout. ``collect``: a
    list that receives the holdout's ``duollm.study.verdicts.VerdictInputs``; ``chunks``: a
    folder where the oracle walk keeps its finished chunks (``stages.pattern_table``)."""
    shape = model_shape(model)
    L = shape["n_layers"]
    T = min(sizes.oracle_len, shape["max_seq_len"] - 1) + 1
    toks = windows(h.val, n_sequences, T)
    kinds = None if h.val_kind is None else windows(h.val_kind, n_sequences, T)
    sel_i, ev_i = S.split_indices(n_sequences, seed)
    nb = sizes.n_boot
    log(f"[{h.name}] oracle table over {n_sequences}x{T - 1} positions")
    tab = St.pattern_table(model, toks.to(device), progress,
                           checkpoint_dir=_chunk_dir(chunks, h.name), log=log)
    sel, ev = tab.subset(sel_i), tab.subset(ev_i)
    big_v = St.seq_mean(ev.losses[ev.index([BIG] * L)])
    small_v = St.seq_mean(ev.losses[ev.index([1] * L)])
    curves, values = St.loss_curves(sel, ev, n_random, seed, nb)
    log(f"[{h.name}] context-big token oracle (base='big') on the evaluation split")
    curves.append(St.context_big_curve(model, toks[ev_i].to(device), L, nb, seed))

    log(f"[{h.name}] routers")
    r_results, r_vals, r_routes = [], {}, {}
    for tr in routers:
        res, per_seq, routes = St.evaluate_router(model, tr, toks[sel_i].to(device),
                                                  toks[ev_i].to(device), nb, seed)
        r_results.append(res)
        r_vals[tr.name], r_routes[tr.name] = per_seq, routes
    per_k: List = [r_vals.get(f"k{k}") if k in budgets else None for k in range(L + 1)]
    curves.append(St.make_curve("router", "trained router (LM + budget loss, threshold chosen "
                                          "on selection split)", per_k, big_v, nb, seed))

    hk = max(1, L // 2)
    o, rnd = values["oracle"][hk], values["random"][hk]
    crit = f"best-of-{n_random} random minus oracle loss at k={hk} (> 0: the oracle is better)"
    oracle_vs_random = S.verdict("the oracle beats the best of N random patterns", crit,
                                 S.paired_difference(rnd, o, n_boot=nb, seed=seed), +1)
    one = S.verdict("the oracle with one big layer beats all big",
                    "all-big loss minus the oracle's with exactly 1 big layer (> 0)",
                    S.paired_difference(big_v, values["oracle"][1], n_boot=nb, seed=seed), +1)
    rk = min(budgets, key=lambda k: abs(k - hk))
    r = r_vals[f"k{rk}"]
    o_rk, rnd_rk = values["oracle"][rk], values["random"][rk]
    router_vs = {"router_minus_oracle": S.paired_difference(r, o_rk, n_boot=nb, seed=seed),
                 "router_minus_random": S.paired_difference(r, rnd_rk, n_boot=nb, seed=seed)}

    def nearer(rr, oo, nn):
        return abs(float(rr.mean() - oo.mean())) - abs(float(rr.mean() - nn.mean()))

    near = S.verdict("the router is nearer the best random pattern than the oracle",
                     f"abs(router - oracle) - abs(router - best random) at k={rk} (> 0)",
                     S.bootstrap(nearer, r, o_rk, rnd_rk, n_boot=nb, seed=seed), +1)

    cap = St.capacity(ev, {k: r_routes[f"k{k}"] for k in budgets if f"k{k}" in r_routes},
                      budgets, nb, seed)
    skip_name = next((t.name for t in routers if t.name.startswith("skip")), None)
    skip = St.skip_profiles(ev, r_routes.get(skip_name), nb, seed)
    posb = St.position_budget(ev, nb, seed)
    am = ev.routes(ev.oracle(ev.mask(hk, at_most=True))[1])  # (B, T-1, L)
    log(f"[{h.name}] beam and greedy against the exhaustive oracle at k={hk}")
    gaps = St.approx_gaps(model, toks[ev_i].to(device), hk, ev.oracle(ev.mask(hk))[0], nb,
                          seed)
    log(f"[{h.name}] token difficulty")
    diff = St.difficulty(ev, toks[ev_i], nb, seed,
                         kinds=None if kinds is None else kinds[ev_i])
    rmap = {name: rt[0].t().tolist() for name, rt in r_routes.items()}
    if collect is not None:
        collect.append(_verdict_inputs(h, sel, ev, n_random, seed, budgets, shape, r_vals,
                                       r_routes))
    return HoldoutResult(
        name=h.name, source=h.source, n_sequences=n_sequences, seq_len=T,
        n_selection=int(sel_i.numel()), n_evaluation=int(ev_i.numel()),
        all_big=S.bootstrap_mean(big_v, n_boot=nb, seed=seed),
        all_small=S.bootstrap_mean(small_v, n_boot=nb, seed=seed), curves=curves,
        headline_k=hk, oracle_vs_random=oracle_vs_random, router_vs=router_vs,
        router_near_random=near, one_big_beats_all_big=one, routers=r_results, capacity=cap,
        skip=skip, position_budget=posb,
        oracle_big_by_position=(am == BIG).double().mean((0, 2)).tolist(), difficulty=diff,
        routing_map=rmap, approx_gaps=gaps)


def _verdict_inputs(h: Holdout, sel, ev, n_random: int, seed: int, budgets, shape, r_vals,
                    r_routes):
    from .verdicts import VerdictInputs

    return VerdictInputs(h.name, sel, ev, n_random, seed, list(budgets),
                         (shape["d_small"], shape["d_big"]), dict(r_vals), dict(r_routes))


def verdict_inputs(model, h: Holdout, routers: List[St.TrainedRouter], sizes: St.StudySizes,
                   budgets: List[int], n_random: int, n_sequences: int, seed: int, device,
                   progress: bool, log=print, chunks: Optional[str] = None):
    """What the verdicts read on one holdout, without the rest of ``analyse_holdout``: the
    pattern table split as ``analyse_holdout`` splits it and the routers on the evaluation
    sequences (for the null model and for the seeds after the first)."""
    shape = model_shape(model)
    T = min(sizes.oracle_len, shape["max_seq_len"] - 1) + 1
    toks = windows(h.val, n_sequences, T)
    sel_i, ev_i = S.split_indices(n_sequences, seed)
    log(f"[{h.name}] oracle table over {n_sequences}x{T - 1} positions (verdict inputs)")
    tab = St.pattern_table(model, toks.to(device), progress,
                           checkpoint_dir=_chunk_dir(chunks, h.name), log=log)
    r_vals, r_routes = {}, {}
    for tr in routers:
        _, r_vals[tr.name], r_routes[tr.name] = St.evaluate_router(
            model, tr, toks[sel_i].to(device), toks[ev_i].to(device), sizes.n_boot, seed)
    return _verdict_inputs(h, tab.subset(sel_i), tab.subset(ev_i), n_random, seed, budgets,
                           shape, r_vals, r_routes)


def resolve_study_checkpoint(path: str) -> str:
    """``--checkpoint``: a step folder (holds ``meta.json``) as it is, or a run folder's
    newest complete ``step_N``. ValueError when it is neither."""
    from ..train import latest_checkpoint

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint: expected a folder path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint: {path} is not a folder")
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    step = latest_checkpoint(path)
    if step is None:
        raise ValueError(f"checkpoint: {path} is neither a checkpoint (no meta.json) nor a run "
                         f"folder with a complete step_N checkpoint")
    return step


def _chunk_dir(chunks: Optional[str], holdout: str) -> Optional[str]:
    return None if chunks is None else os.path.join(chunks, holdout)


def run_study(preset: Optional[str] = None, data="default", steps: Optional[int] = None,
              device: str = "cpu", out: Optional[str] = None,
              budgets: Optional[Sequence[int]] = None, router_steps: Optional[int] = None,
              n_random: int = 100, oracle_batch: Optional[int] = None, seed: int = 0,
              quick: bool = False, progress: bool = True, model=None,
              synthetic_check: bool = True, hf: Optional[str] = None,
              stage_lines: Optional[bool] = None,
              hf_d_small: Optional[int] = None, null_control: bool = False,
              seeds: int = 1, checkpoint: Optional[str] = None,
              full: bool = False, oracle_chunks: Optional[str] = None) -> StudyResult:
    """Run every stage on both holdouts and write ``report.md``, PNG plots, ``results.json``
    and ``verdicts.json`` under ``out``; returns the ``StudyResult``.

    Args:
      preset: model preset (default "small", "tiny" with ``quick``).
      data: "default" (prose + code holdouts), "synthetic" (known difficulty + code) or a
        UTF-8 text file (that file + code). The model trains on the holdouts' training parts.
      steps: random-routing training steps (ignored when ``model`` is given).
      budgets: big-layer counts for routers and the capacity figure (default L/3, L/2, 2L/3).
      oracle_batch: holdout sequences per holdout (half select, half evaluate).
      model: an already trained ``DuoLLM`` to study instead of training one.
      hf: a converted Hugging Face checkpoint folder (``duollm.hf.load_pretrained``);
        with ``steps`` > 0 its small FFNs are trained first (``duollm.hf.train_small``).
      hf_d_small: with ``hf`` a plain (unconverted) checkpoint: the small FFNs' width.
      oracle_chunks: a folder where every oracle walk keeps its finished chunks, one
        subfolder per holdout and model; a study killed midway and run again with the same
        folder (and so the same model: ``checkpoint``, or the same seed and sizes) reuses
        them instead of walking them again.
      stage_lines: print one line per stage (default: as ``progress``). ``duollm study``
        prints them unless ``--no-progress``, into a pipe too, where no bar is drawn.
      null_control: also measure every verdict on the null model (``duollm.study.null``:
        big == small exactly; its routers trained the same way) over the same sequences.
      seeds: models trained with seeds ``seed, seed + 1, ...``; the verdicts' intervals are
        hierarchical bootstraps over seeds and sequences (the figures show the first seed).
      checkpoint: a ``DuoLLM`` checkpoint to study instead of training one: a step folder, or
        a run folder (its newest complete ``step_N``).
      full: the full study's sizes (``stages.FULL``, ``make study``) instead of the demo's.
    """
    from .. import distributed
    from .report import write_report

    # Under torchrun every rank runs the pipeline: training is data-parallel (duollm.train),
    # the exhaustive oracle walks share the holdout sequences among the ranks (stages use
    # duollm.study.parallel), and rank 0 alone logs and writes. Joining here, before
    # training, keeps one process group for the whole run (train() would otherwise leave
    # its own, and gloo does not reliably re-join).
    dist_info = (distributed.join("cuda" if torch.device(device).type == "cuda" else "cpu")
                 if distributed.env_world_size() > 1 else distributed.DistInfo())
    if dist_info.enabled and torch.device(device).type == "cuda":
        device = dist_info.device  # each rank on its own GPU (LOCAL_RANK)
    progress = progress and dist_info.is_main
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    if quick and full:
        raise ValueError("full: the full study's sizes and quick's exclude each other")
    sizes = St.QUICK if quick else (St.FULL if full else St.DEMO)
    preset = preset or St.default_preset(quick, full)
    steps = sizes.steps if steps is None else steps
    router_steps = sizes.router_steps if router_steps is None else router_steps
    n_seq = sizes.n_sequences if oracle_batch is None else oracle_batch
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise ValueError(f"seeds: expected an int >= 1, got {seeds!r}")
    given = [n for n, v in (("model", model), ("hf", hf), ("checkpoint", checkpoint))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"{given[1]}: give one of model, hf, checkpoint, not {given}")
    if given and seeds > 1:
        raise ValueError(f"seeds: {seeds} seeds train {seeds} models; with {given[0]} there "
                         f"is one model")
    ckpt_step = None
    if checkpoint is not None:
        from ..checkpoint import load_checkpoint

        ckpt_dir = resolve_study_checkpoint(checkpoint)
        model, state = load_checkpoint(ckpt_dir)
        if model.config.vocab_size < 256:
            raise ValueError(f"checkpoint: {ckpt_dir} has a vocabulary of "
                             f"{model.config.vocab_size}; the holdouts are byte ids (256)")
        ckpt_step, checkpoint = state["step"], ckpt_dir
    torch.manual_seed(seed)
    timings: Dict[str, float] = {}

    stage_lines = progress if stage_lines is None else bool(stage_lines) and dist_info.is_main

    def log(msg: str) -> None:
        if stage_lines:
            print(f"[study {time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    holdouts = _holdouts(data, sizes, seed)
    tdata = training_data(holdouts)
    name = (os.path.basename(str(out).rstrip("/")) if out
            else default_name(preset, data, quick, hf))
    out_dir = str(out) if out else os.path.join("runs", name)
    # The folder is made when there is something to write (write_report makes it): a model
    # refused on loading leaves nothing behind.

    t0 = time.perf_counter()
    source, train_val = "duollm", {}
    if model is None and hf is not None:
        model, tok = _load_hf_model(hf, log, hf_d_small)
        for h in holdouts:  # a shard folder's ids must be the model's tokenizer's
            check_shard_holdout(h, tok, model_shape(model)["vocab_size"])
        if tok is not None:
            holdouts = [retokenize(h, tok) for h in holdouts]
            need = max(sizes.seq_len, sizes.oracle_len) + 1
            for h in holdouts:
                if h.val.numel() < need:
                    raise ValueError(f"data: the {h.name} holdout's validation part holds "
                                     f"{h.val.numel()} tokens of the checkpoint's tokenizer, "
                                     f"fewer than a window of {need}; give a longer text")
            tdata = training_data(holdouts)
        model, train_val = _train_hf(model, tdata, sizes, steps, seed, device, progress, log)
        source = hf
        if steps > 0 and dist_info.is_main:  # the trained small FFNs are the run's product
            from ..hf import save_converted

            save_converted(model, os.path.join(out_dir, HF_MODEL_DIR), tokenizer=tok,
                           overwrite=True)
            log(f"trained model saved in {os.path.join(out_dir, HF_MODEL_DIR)} (loads with "
                f"duollm.hf.load_converted)")
    elif checkpoint is not None:
        if model.config.vocab_size != tdata.vocab_size:  # ids of another tokenizer: garbage
            raise ValueError(f"data: {checkpoint} was trained on a vocabulary of "
                             f"{model.config.vocab_size} ids, {tdata.name} has "
                             f"{tdata.vocab_size}; study it on the data it was trained on "
                             f"(--data its shard folder)")
        log(f"studying the checkpoint {checkpoint} (step {ckpt_step})")
        source, steps = f"checkpoint:{checkpoint}", int(ckpt_step)
    elif model is None:
        log(f"stage 1: random-routing training, preset {preset}, {steps} steps on "
            f"{tdata.name} (skip/small/big {St.TRAIN_PROBS})")
        trained = St.train_model(preset, tdata, sizes, steps, seed, device, progress)
        model, train_val = trained.model, trained.val_loss
        if dist_info.is_main:  # the trained model is the run's product: study it again with
            # --checkpoint, generate with it, bench frontier --checkpoint it
            save_study_model(model, out_dir, steps, seed, preset)
            log(f"trained model saved in {os.path.join(out_dir, HF_MODEL_DIR)} (SHA256SUMS "
                f"beside it; loads with duollm.load_checkpoint)")
    model = model.to(device).eval()
    shape = model_shape(model)
    L = shape["n_layers"]
    timings["train_s"] = time.perf_counter() - t0
    budgets = sorted(set(budgets or St.capacity_budgets(L)))
    bad = [k for k in budgets if not 1 <= k <= L - 1]
    if bad:
        raise ValueError(f"budgets: {bad[0]} is not a big-layer count in 1..{L - 1}")

    t0 = time.perf_counter()
    seq_len = min(sizes.oracle_len, shape["max_seq_len"] - 1)
    routers = St.train_routers(model, tdata, sizes, seq_len, router_steps, seed, budgets,
                               progress, log)
    timings["routers_s"] = time.perf_counter() - t0

    results, collected = [], []
    for h in holdouts:
        t0 = time.perf_counter()
        results.append(analyse_holdout(model, h, routers, sizes, budgets, n_random, n_seq,
                                       seed, device, progress, log, collect=collected,
                                       chunks=oracle_chunks))
        timings[f"{h.name}_s"] = time.perf_counter() - t0
    real_in = {inp.holdout: [inp] for inp in collected}
    null_in = None
    run = dict(sizes=sizes, budgets=budgets, n_random=n_random, n_sequences=n_seq,
               device=device, progress=progress, log=log, chunks=oracle_chunks)
    if null_control:
        t0 = time.perf_counter()
        null_in = {h.name: [] for h in holdouts}
        _add_null(model, tdata, holdouts, seq_len, router_steps, seed, null_in, run)
        timings["null_s"] = time.perf_counter() - t0
    if seeds > 1:
        t0 = time.perf_counter()
        for s_i in range(seed + 1, seed + seeds):
            log(f"seed {s_i}: random-routing training, preset {preset}, {steps} steps")
            m = St.train_model(preset, tdata, sizes, steps, s_i, device,
                               progress).model.to(device).eval()
            rs = St.train_routers(m, tdata, sizes, seq_len, router_steps, s_i, budgets,
                                  progress, log)
            for h in holdouts:
                real_in[h.name].append(verdict_inputs(m, h, rs, seed=s_i, **run))
            if null_control:
                _add_null(m, tdata, holdouts, seq_len, router_steps, s_i, null_in, run)
        timings["seeds_s"] = time.perf_counter() - t0
    synth = None
    if synthetic_check:
        t0 = time.perf_counter()
        log("synthetic check: the difficulty criterion on a corpus of known difficulty")
        synth = St.synthetic_check(sizes, seed, device, progress)
        timings["synthetic_s"] = time.perf_counter() - t0
    from . import verdicts as V

    t0 = time.perf_counter()
    log(f"verdicts: the family, each claim that needs big != small also against "
        f"{V.RELABEL_P} relabelled copies of every pattern table")
    records = V.judge_family(real_in, null_in, n_boot=sizes.n_boot, seed=seed,
                             extra=[V.synthetic_record(synth)] if synth is not None else [])
    timings["verdicts_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    # CPU seconds of this process: on a machine shared with other jobs, the wall time above
    # stretches while this stays what a quiet machine would take (one thread on the CPU).
    timings["total_cpu_s"] = time.process_time() - cpu_start
    res = StudyResult(
        name=name, preset=preset if source == "duollm" else (
            "checkpoint" if source.startswith("checkpoint:") else "hf"),
        config=(model.config.to_dict() if source == "duollm"
                else {**shape, "model_class": type(model).__name__}),
        data=tdata.name, source=source, steps=steps, train_probs=list(St.TRAIN_PROBS),
        train_val_loss=dict(train_val), seed=seed, device=str(device), n_random=n_random,
        holdouts=results, synthetic=synth, timings=timings,
        verdicts=[V.record_dict(r) for r in records], null_control=bool(null_control),
        seeds=list(range(seed, seed + seeds)))
    if dist_info.is_main:
        write_report(res, out_dir)
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(dataclasses.asdict(res), f, indent=1, default=_json_default)
        with open(os.path.join(out_dir, "verdicts.json"), "w") as f:
            json.dump(res.verdicts, f, indent=1, default=_json_default)
    distributed.barrier(dist_info)  # the report exists once any rank returns
    log(f"done in {timings['total_s']:.0f}s; report in {out_dir}/report.md")
    return res


def _add_null(model, tdata, holdouts, seq_len: int, router_steps: int, seed: int,
              null_in: Dict[str, list], run: Dict) -> None:
    """The null control of one seed's model: its null model (big == small,
    ``duollm.study.null``), routers trained on it as on the real one, and the verdict inputs
    of every holdout over the same sequences."""
    from .null import null_model

    run["log"]("null control: the same pipeline on the null model (big FFN = small FFN "
               "zero-padded)")
    nm = null_model(model).eval()
    rs = St.train_routers(nm, tdata, run["sizes"], seq_len, router_steps, seed,
                          run["budgets"], run["progress"], run["log"])
    for h in holdouts:
        null_in[h.name].append(verdict_inputs(nm, h, rs, seed=seed, **run))


HF_MODEL_DIR = "model"  # out/model: a study run's trained model (seed --seed)


def save_study_model(model, out_dir: str, steps: int, seed: int, preset: str) -> str:
    """Save the study's stage-1 model (weights, config, no optimizer) as a checkpoint folder
    ``out_dir/model`` with a ``SHA256SUMS`` that ``load_checkpoint`` verifies. Returns it."""
    from ..checkpoint import save_checkpoint, write_sha256sums

    path = os.path.join(out_dir, HF_MODEL_DIR)
    save_checkpoint(path, model, step=steps,
                    extra={"made_by": "duollm study", "preset": preset, "seed": seed,
                           "train_probs": list(St.TRAIN_PROBS)})
    write_sha256sums(path)
    return path


def default_name(preset: str, data, quick: bool, hf: Optional[str] = None) -> str:
    """The folder name under ``runs/`` when no ``out`` is given: the model (the preset, or
    ``hf-`` and the checkpoint's folder name), the data and ``-quick``."""
    kind = data if data in (None, "default", "synthetic") else "data"
    model = preset
    if hf is not None:
        parts = [p for p in os.path.abspath(os.fspath(hf)).split(os.sep) if p]
        if len(parts) >= 3 and parts[-1] == HF_MODEL_DIR and parts[-2].startswith("step_"):
            parts = parts[:-1]  # a train --hf step's model: name the run and the step
            model = f"hf-{parts[-2]}-{parts[-1]}"
        else:
            model = f"hf-{parts[-1] if parts else 'model'}"
    return f"{model}-{kind or 'default'}" + ("-quick" if quick else "")


def _json_default(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _load_hf_model(path: str, log, d_small: Optional[int] = None):
    from .. import hf as H

    log(f"loading the Hugging Face checkpoint {path}")
    model, tok = H.load_pretrained(path, d_small=d_small)
    if tok is None:
        from ..stack import as_stack

        vocab = as_stack(model).vocab_size
        if vocab < 256:
            raise ValueError(f"hf: {path} holds no tokenizer and its vocabulary ({vocab}) is "
                             f"too small for byte ids; save the tokenizer with the model")
    # Said whether or not progress lines are on: which ids the study reads decides its numbers.
    if os.environ.get("RANK", "0") == "0":
        from ..shards import announce_tokenizer

        announce_tokenizer("the study reads the holdouts", tok, path)
    return model, tok


def retokenize(h: Holdout, tokenizer) -> Holdout:
    """A byte-id holdout re-encoded with an HF tokenizer (the same text, the model's ids).
    A token shard holdout is already in its tokenizer's ids (``check_shard_holdout``)."""
    if h.tokenizer != "bytes" or not isinstance(h.train, torch.Tensor):
        return h

    def enc(ids: torch.Tensor) -> torch.Tensor:
        text = bytes(ids.tolist()).decode("utf-8", errors="replace")
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"],
                            dtype=torch.int64)

    return Holdout(h.name, h.source, enc(h.train), enc(h.val), None)


def _train_hf(model, tdata, sizes: St.StudySizes, steps: int, seed: int, device,
              progress: bool, log):
    """Stage 1 for a converted HF model: train its small FFNs when ``steps`` > 0."""
    from .. import hf as H

    if steps <= 0:  # nothing trained: the report still gives the loaded model's losses
        from ..hf.train import evaluate

        model.to(device)
        log("validation loss of the loaded model (no training: --steps 0)")
        return model, evaluate(model, tdata, sizes.seq_len, sizes.batch_size, 2, seed=seed)
    from ..train import TrainConfig

    cfg = TrainConfig(steps=steps, batch_size=sizes.batch_size, seq_len=sizes.seq_len,
                      lr=sizes.lr, min_lr=sizes.lr / 10, seed=seed, device=str(device),
                      progress=progress, eval_every=steps, eval_batches=2)
    log(f"stage 1: training the small FFNs, {steps} steps")
    out = H.train_small(model, tdata, cfg)
    return out.model, dict(out.val_loss)
