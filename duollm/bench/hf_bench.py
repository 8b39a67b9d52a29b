"""``duollm bench hf``: a converted Hugging Face model against the original, in one process.

Models are built from configs (nothing is downloaded): a random ``transformers`` decoder
(``--family``), a deep copy of it converted by ``duollm.hf.convert`` (pruned small paths), and
the *ideal*: an unconverted model of the same family whose MLPs are ``d_small`` wide (what an
all-small model could cost at best). Phases:

* ``prefill`` -- one forward over ``(batch, seq_len)`` tokens without a cache, tokens/s;
* ``decode``  -- ``model.generate`` greedy, ``new_tokens`` after a ``prompt``-token prompt,
  generated tokens/s (prefill of the prompt included, as a user sees it).

Candidates (``impl``), timed round-robin on the CPU (``duollm.bench.timing``) so that load
from other processes falls on all alike: ``original``, ``ideal``, ``converted`` (outside any
``routing`` block: all-big), and inside ``routing``: ``big``, ``small`` and ``1/12`` (a linear
threshold router per layer whose thresholds, fitted on that phase's inputs, send about 1/12 of
the tokens big, the rest small; the realised fraction is recorded as ``big_fraction``). The
routed candidates use the default dispatch, or run once per ``--backends`` name (tagged
``big[triton]``, ...).
``vs_original`` is the original's time over this candidate's; for ``small``, ``vs_ideal`` is
the ideal's time over this one's (the share of the ideal all-small speedup realised).

With ``PATH`` (a local checkpoint: plain, a ``duollm convert`` folder, or a ``train --hf``
run or step folder) the models are the user's own: ``original`` is the plain checkpoint (for a
converted folder: its all-big export, ``duollm.hf.export``), ``converted`` its converted save
(or the original converted here with ``--d-small``, pruned by weights) and ``ideal`` the
converted model's all-small export (its class with ``intermediate_size = d_small``).

Besides the CSV/JSON a PNG plot shows every candidate's tokens/s per phase (``--no-plots``:
none).

Target (docs/speed.md): ``converted`` and ``big`` at least 0.95x the original.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from ..reference import BIG, SMALL
from ..usage import UsageError
from .common import (add_device_args, check_number_args, resolve_backends, resolve_device,
                     resolve_dtype, resolve_out_dir, setup_run)
from .results import environment, stamp, write_results
from .timing import Stats, time_cuda, time_interleaved

PHASES = ("prefill", "decode")
FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
            "mistral": ("MistralConfig", "MistralForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
BIG_SHARE = 1 / 12


@dataclass
class HFBenchRow:
    """One measured candidate of ``duollm bench hf`` (a row of the CSV/JSON)."""

    phase: str            # prefill | decode
    impl: str             # original | ideal | converted | big | small | 1/12
    backend: str          # the routed FFNs' duollm.ops backend: "default" dispatch, a name, or
    #                       "-" (plain models, and converted outside routing)
    family: str
    n_layers: int
    d_model: int
    d_big: int
    d_small: int
    batch: int
    tokens: int           # prefill: seq_len; decode: new tokens per sequence
    median_ms: float = float("nan")
    q1_ms: float = float("nan")
    q3_ms: float = float("nan")
    min_ms: float = float("nan")  # the least-disturbed call: telling on a shared machine
    repeats: int = 0
    tokens_per_s: float = float("nan")
    vs_original: float = float("nan")      # original's median time / this one's
    vs_original_min: float = float("nan")  # the same ratio of the fastest calls
    vs_ideal: float = float("nan")
    big_fraction: float = float("nan")
    error: str = ""


def add_args(p: argparse.ArgumentParser) -> None:
    p.description = ("A converted Hugging Face model against the original: prefill tokens/s "
                     "and greedy decode tokens/s at all-big, all-small and 1/12 big, beside "
                     "the original and the ideal (an unconverted model with d_small-wide "
                     "MLPs). Without PATH the models are random (--family, sizes); with "
                     "PATH they are your checkpoint. Writes CSV/JSON and a PNG plot.")
    p.add_argument("path", nargs="?", default=None, metavar="PATH",
                   help="benchmark this local checkpoint instead of a random model: a plain "
                        "HF checkpoint (converted here with --d-small, pruned), a duollm "
                        "convert folder, or a train --hf run or step folder (its newest "
                        "complete step)")
    add_device_args(p)
    p.add_argument("--family", default=None, choices=sorted(FAMILIES),
                   help="transformers model family of the random model (default: llama)")
    p.add_argument("--n-layers", type=int, default=None, help="decoder layers (default: 4)")
    p.add_argument("--d-model", type=int, default=None,
                   help="hidden size (default: 512 on the CPU, 2048 on a GPU)")
    p.add_argument("--d-big", type=int, default=None,
                   help="MLP width of the original (default: 4 x d-model)")
    p.add_argument("--d-small", type=int, default=None,
                   help="small path width (default: d-big / 16, the paper's ratio)")
    p.add_argument("--vocab", type=int, default=None,
                   help="vocabulary of the random model (default: 4096)")
    p.add_argument("--batch", type=int, default=None,
                   help="prefill sequences (default: 2); decode uses 1")
    p.add_argument("--seq-len", type=int, default=None,
                   help="prefill tokens per sequence (default: 256 CPU, 2048 GPU)")
    p.add_argument("--prompt", type=int, default=16, help="decode: prompt tokens")
    p.add_argument("--new-tokens", type=int, default=32, help="decode: generated tokens")
    p.add_argument("--phases", default="prefill,decode", help="prefill, decode or both")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 15)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timing per candidate and phase (default: 4)")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: a tiny model")


def build_model(family: str, n_layers: int, d_model: int, d_ff: int, vocab: int,
                seed: int, dtype: torch.dtype, device: torch.device):
    """A random ``transformers`` causal LM of ``family`` from a config (eval mode)."""
    import transformers

    config_cls, model_cls = FAMILIES[family]
    heads = max(1, d_model // 64)
    kw = dict(vocab_size=vocab, hidden_size=d_model, intermediate_size=d_ff,
              num_hidden_layers=n_layers, num_attention_heads=heads,
              num_key_value_heads=max(1, heads // 2), max_position_embeddings=4096,
              tie_word_embeddings=False, attn_implementation="sdpa",
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if family == "qwen3":
        kw["head_dim"] = d_model // heads
    config = getattr(transformers, config_cls)(**kw)
    torch.manual_seed(seed)
    with torch.device(device):
        model = getattr(transformers, model_cls)(config)
    return model.to(dtype).eval()


class ThresholdRouter:
    """Per layer ``BIG`` where ``hidden @ w_l > t_l``, else ``SMALL``: a linear router.

    ``fit(run)`` calls ``run()`` (forwards through the model under this router) with every
    token routed small while it records each layer's scores, then sets ``t_l`` to their
    ``1 - share`` quantile, so that about ``share`` of such tokens go big. Calls count the
    tokens routed big (on the device: no host sync per call); ``fraction()`` reads the count.
    """

    def __init__(self, n_layers: int, d_model: int, share: float, seed: int,
                 device: torch.device, dtype: torch.dtype):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(n_layers, d_model, generator=g).to(device=device, dtype=dtype)
        self.t = torch.zeros(n_layers, device=device, dtype=torch.float32)
        self.share = share
        self._seen: Optional[List[List[torch.Tensor]]] = None  # scores per layer while fitting
        self.reset()

    def reset(self) -> None:
        self.n_big = torch.zeros((), dtype=torch.int64, device=self.t.device)
        self.n = 0

    def fit(self, run: Callable[[], object]) -> "ThresholdRouter":
        self._seen = [[] for _ in range(self.t.numel())]
        try:
            run()
            for layer, scores in enumerate(self._seen):
                if scores:
                    self.t[layer] = torch.quantile(torch.cat(scores), 1 - self.share)
        finally:
            self._seen = None
        self.reset()
        return self

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        score = (hidden @ self.w[layer]).float()  # (B, T)
        if self._seen is not None:
            self._seen[layer].append(score.flatten())
            return torch.full_like(score, SMALL, dtype=torch.int64)
        routes = torch.where(score > self.t[layer], BIG, SMALL)
        self.n_big += (routes == BIG).sum()
        self.n += routes.numel()
        return routes

    def fraction(self) -> float:
        return int(self.n_big) / self.n if self.n else float("nan")


# Options that shape the random model: a checkpoint (PATH) fixes them.
RANDOM_MODEL_OPTIONS = (("family", "--family"), ("n_layers", "--n-layers"),
                        ("d_model", "--d-model"), ("d_big", "--d-big"), ("vocab", "--vocab"))


@dataclass
class Source:
    """What ``duollm bench hf PATH`` measures, settled before anything is loaded."""

    path: str                # the folder read (a run folder resolved to its newest step)
    config: dict             # its config.json
    converted: bool          # a duollm convert / train --hf folder
    d_small: int


def check_source(args: argparse.Namespace) -> Optional[Source]:
    """Check ``PATH`` and the options beside it (UsageError); None without PATH."""
    if args.path is None:
        return None
    from ..hf_cli import (SPEC_FILE, check_checkpoint, check_convertible, check_d_small,
                          require_transformers)
    from ..runs import resolve_model_folder

    for dest, flag in RANDOM_MODEL_OPTIONS:
        if getattr(args, dest) is not None:
            raise UsageError(flag, "shapes the random model; with PATH the checkpoint fixes "
                                   "it: drop it")
    ckpt = check_checkpoint("PATH", resolve_model_folder(args.path, "config.json", "model"))
    require_transformers("PATH")
    if ckpt.converted:
        import json

        with open(os.path.join(ckpt.path, SPEC_FILE)) as f:
            d_small = json.load(f).get("d_small")
        if args.d_small is not None and args.d_small != d_small:
            raise UsageError("--d-small", f"{ckpt.path} is converted with d_small {d_small}; "
                                          f"drop --d-small or give {d_small}")
    else:
        if ckpt.d_big is None:
            check_convertible("PATH", ckpt.path, args.d_small or 1)  # GPT-2...: say why
            raise UsageError("PATH", f"{ckpt.path}'s config.json gives no intermediate_size")
        d_small = check_d_small("--d-small", args.d_small or max(1, ckpt.d_big // 16), ckpt)
        check_convertible("PATH", ckpt.path, d_small)
    return Source(path=ckpt.path, config=ckpt.config, converted=ckpt.converted,
                  d_small=d_small)


def load_source(src: Source, dtype: torch.dtype, device: torch.device):
    """``(original, ideal, converted)`` for a checkpoint, each a model ``transformers``
    loads: a plain checkpoint is the original and is converted here (pruned by weights); a
    converted folder loads with ``load_converted`` and its original is its all-big export
    (``duollm.hf.export``: exact for every record version). The ideal is the converted
    model's all-small export: the same class with ``intermediate_size = d_small``."""
    import tempfile

    import transformers

    from .. import hf

    def plain(path):
        return transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True).to(device).eval()

    with tempfile.TemporaryDirectory(prefix="duollm-bench-hf-") as tmp:
        if src.converted:
            converted = hf.load_converted(src.path, dtype=dtype, device=device)
            hf.export(converted, os.path.join(tmp, "big"), "big")
            original = plain(os.path.join(tmp, "big"))
        else:
            original = plain(src.path)
            converted = hf.convert(copy.deepcopy(original), src.d_small, init="prune")
        hf.export(converted, os.path.join(tmp, "small"), "small")
        ideal = plain(os.path.join(tmp, "small"))
    return original, ideal, converted.eval()


def _check(args: argparse.Namespace) -> None:
    check_number_args(args, ints=("--n-layers", "--d-model", "--d-big", "--d-small", "--vocab",
                                  "--batch", "--seq-len", "--prompt", "--new-tokens",
                                  "--repeats"), positive=("--budget",))
    phases = [v.strip() for v in args.phases.split(",") if v.strip()]
    if not phases or any(p not in PHASES for p in phases):
        raise UsageError("--phases", f"expected some of {', '.join(PHASES)}, got "
                                     f"{args.phases!r}")
    args.phase_list = phases


def run(args: argparse.Namespace) -> int:
    """Measure and write ``hf-<dtype>-<stamp>.csv/.json``; print one line per candidate."""
    # Every option is checked before anything is built, measured or written.
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    _check(args)
    src = check_source(args)  # PATH: the user's checkpoint instead of a random model
    gpu = device.type == "cuda"
    if src is None:
        family, vocab = args.family or "llama", args.vocab or 4096
        n_layers = args.n_layers or (2 if args.quick else 4)
        d_model = args.d_model or (64 if args.quick else 2048 if gpu else 512)
        if d_model % max(1, d_model // 64):
            raise UsageError("--d-model", "expected a multiple of 64 (heads of 64)")
        d_big = args.d_big or 4 * d_model
        d_small = args.d_small or max(1, d_big // 16)
        if d_small >= d_big:
            raise UsageError("--d-small", f"expected a width below --d-big {d_big}, got "
                                          f"{d_small}")
    else:
        c = src.config
        family, vocab = str(c.get("model_type", "?")), int(c["vocab_size"])
        n_layers, d_model = int(c["num_hidden_layers"]), int(c["hidden_size"])
        d_big, d_small = int(c["intermediate_size"]), src.d_small
    B = args.batch or 2
    T = args.seq_len or (32 if args.quick else 2048 if gpu else 256)
    new_tokens = 4 if args.quick else args.new_tokens
    max_pos = src.config.get("max_position_embeddings") if src is not None else None
    if isinstance(max_pos, int):
        if T > max_pos:
            raise UsageError("--seq-len", f"expected at most {max_pos} (the checkpoint's "
                                          f"max_position_embeddings), got {T}")
        if args.prompt + new_tokens > max_pos:
            raise UsageError("--prompt", f"--prompt {args.prompt} + {new_tokens} new tokens "
                                         f"exceed the checkpoint's {max_pos} positions")
    # Without --backends the routed candidates use the default dispatch (backend=None), as a
    # user's routing(model, ...) does: all-big then runs the original MLP expression.
    if args.backends is None:
        backends: List[Optional[str]] = [None]
    else:
        status = resolve_backends(args.backends, device)
        backends = [b for b, why in status.items() if why is None]
    out_dir = resolve_out_dir(args, device)
    from ..hf_cli import require_transformers

    require_transformers("bench hf")
    settings = setup_run(args, device, d_model=d_model)
    repeats = args.repeats or (3 if args.quick else 15)
    budget = args.budget or (0.3 if args.quick else 4.0)

    from .. import hf

    if src is None:
        original = build_model(family, n_layers, d_model, d_big, vocab, args.seed, dtype,
                               device)
        ideal = build_model(family, n_layers, d_model, d_small, vocab, args.seed + 1, dtype,
                            device)
        converted = hf.convert(copy.deepcopy(original), d_small, init="prune")
    else:
        original, ideal, converted = load_source(src, dtype, device)
    gen = torch.Generator().manual_seed(args.seed)
    prefill_sets = [torch.randint(0, vocab, (B, T), generator=gen).to(device)
                    for _ in range(2)]
    prompts = [torch.randint(0, vocab, (1, args.prompt), generator=gen).to(device)
               for _ in range(2)]

    def prefill(model, routes=None, backend=None) -> Callable[[int], object]:
        def call(i):
            with torch.inference_mode():
                if routes is None:
                    return model(input_ids=prefill_sets[i % 2], use_cache=False).logits
                with hf.routing(model, routes, backend=backend):
                    return model(input_ids=prefill_sets[i % 2], use_cache=False).logits
        return call

    def decode(model, routes=None, backend=None) -> Callable[[int], object]:
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0)

        def call(i):
            with torch.inference_mode():
                if routes is None:
                    return model.generate(prompts[i % 2], **kw)
                with hf.routing(model, routes, backend=backend):
                    return model.generate(prompts[i % 2], **kw)
        return call

    env = environment(device, dtype, kind="hf", family=family, n_layers=n_layers,
                      d_model=d_model, d_big=d_big, d_small=d_small, vocab=vocab,
                      checkpoint=None if src is None else src.path,
                      batch=B, seq_len=T, prompt=args.prompt, new_tokens=new_tokens,
                      backends=backends, **settings)
    rows: List[HFBenchRow] = []
    for phase in args.phase_list:
        make = prefill if phase == "prefill" else decode
        # Thresholds fitted on this phase's own inputs (both sets), so ~1/12 of its tokens go
        # big: decode steps see other hidden states than a prefill does.
        router = ThresholdRouter(n_layers, d_model, BIG_SHARE, args.seed, device, dtype)
        fit_calls = [make(converted, router), make(converted, router)]
        router.fit(lambda: [call(i) for i, call in enumerate(fit_calls)])
        fns: Dict[str, Callable[[int], object]] = {
            "original": make(original), "ideal": make(ideal), "converted": make(converted)}
        for b in backends:
            tag = "" if b is None else f"[{b}]"
            fns["big" + tag] = make(converted, "big", b)
            fns["small" + tag] = make(converted, "small", b)
            fns["1/12" + tag] = make(converted, router, b)
        errors: Dict[str, str] = {}
        for k in list(fns):
            try:
                fns[k](0)
            except Exception as e:  # recorded in the row: one failing candidate keeps the rest
                errors[k] = f"{type(e).__name__}: {e}"
                del fns[k]
        router.reset()
        if gpu:
            times = {k: time_cuda(f, repeats=repeats, budget_s=budget) for k, f in fns.items()}
        else:
            times = time_interleaved(fns, device, repeats=repeats, warmup=1,
                                     budget_s=budget * len(fns))
        stats = {k: Stats.of(t) for k, t in times.items()}
        n_tokens = B * T if phase == "prefill" else new_tokens
        for k in list(stats) + list(errors):
            impl, _, b = k.partition("[")
            b = b.rstrip("]") or ("default" if impl in ("big", "small", "1/12") else "-")
            row = HFBenchRow(phase=phase, impl=impl, backend=b, family=family,
                             n_layers=n_layers, d_model=d_model, d_big=d_big, d_small=d_small,
                             batch=B if phase == "prefill" else 1,
                             tokens=T if phase == "prefill" else new_tokens,
                             error=errors.get(k, ""))
            if k in stats:
                s = stats[k]
                row.median_ms, row.q1_ms, row.q3_ms = s.median_ms, s.q1_ms, s.q3_ms
                row.min_ms = s.min_ms
                row.repeats = s.repeats
                row.tokens_per_s = n_tokens / (s.median_ms / 1e3)
                if "original" in stats:
                    row.vs_original = stats["original"].median_ms / s.median_ms
                    row.vs_original_min = stats["original"].min_ms / s.min_ms
                if impl == "small" and "ideal" in stats:
                    row.vs_ideal = stats["ideal"].median_ms / s.median_ms
                if impl == "1/12":
                    row.big_fraction = router.fraction()
            rows.append(row)
            print(f"{phase:>7} {k:>12} " + (
                f"{row.median_ms:9.2f} ms  {row.tokens_per_s:9.0f} tok/s  "
                f"{row.vs_original:5.2f}x original" if k in stats else f"failed: {row.error}"),
                flush=True)
        gc.collect()
    prefix = f"hf-{str(dtype).replace('torch.', '')}-{stamp()}"
    raw = [dataclasses.asdict(r) for r in rows]
    json_path, csv_path = write_results(out_dir, prefix, env, raw)
    written = [csv_path, json_path]
    if args.plots:
        from .plots import hf_plot

        written += hf_plot(raw, env, out_dir, prefix)
    print(f"wrote {', '.join(written[:-1])} and {written[-1]}")
    return 0


def rows_of(raw: List[Dict]) -> List[HFBenchRow]:
    """Typed rows back from a result file's ``rows`` (as written by ``run``)."""
    names = {f.name for f in dataclasses.fields(HFBenchRow)}
    return [HFBenchRow(**{k: (float("nan") if v is None else v) for k, v in r.items()
                          if k in names}) for r in raw]
