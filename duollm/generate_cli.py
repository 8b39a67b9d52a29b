"""``duollm generate``: text from a saved model under a routing, and what that routing cost.

    duollm generate {--checkpoint DIR | --hf DIR} --prompt TEXT
                    [--routes big|small|skip|random|router|PATTERN] [--max-new-tokens N]
                    [--temperature T] [--seed S] [--device D] [--backend B] [--cuda-graph]

The prompt and the continuation go to stdout (the model's tokenizer when the folder ships one,
else UTF-8 bytes). On a terminal the tokens are written as they are generated; piped, the text
is written once, plain. Then, on stderr: generated tokens/s (prompt included in the time), the
realised mix (share of big / small / skip per layer over every token position the FFNs ran
on: the prompt's and each decode step's), and the FFN FLOPs per token of that mix (the
router's own FLOPs included) against all-big.

``PATTERN`` is one route per layer, comma-separated: ``2,1,1,2`` or ``big,small,small,big``.
``router`` is the router saved with the model (``duollm train-router``).
"""
from __future__ import annotations

import argparse
import codecs
import sys
import time
from typing import List, Optional

from duollm.router_cli import (add_model_args, check_backend, check_model_source,
                               load_model_source)
from duollm.usage import (UsageError, add_threads_arg, apply_thread_rule, check_device,
                          check_float, check_int)

NAMES = {"skip": 0, "small": 1, "big": 2}
POLICY_ROUTES = ("big", "small", "skip", "random", "router")


def add_cli(p: argparse.ArgumentParser) -> None:
    p.description = ("Generate text from a DuoLLM checkpoint or a converted Hugging Face "
                     "folder under a routing; print tokens/s, the realised mix per layer and "
                     "the FFN FLOPs per token against all-big (on stderr).")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--routes", default="big", metavar="big|small|skip|random|router|PATTERN",
                   help="a policy, the saved router, or one route per layer (2,1,1,2 or "
                        "big,small,small,big)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy; above 0: sampled at this temperature")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and random routes")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if "
                                                  "visible)")
    p.add_argument("--backend", default=None,
                   help="duollm.ops backend of the routed FFNs (default: the default dispatch)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="DuoLLM on CUDA: replay each decode step from a CUDA graph (no "
                        "streaming: the text comes at the end)")
    add_threads_arg(p)


def parse_routes(spec: str, n_layers: int, skip: bool):
    """``--routes``: a name of ``POLICY_ROUTES`` or a list of ``n_layers`` routes."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError("--routes", "expected big, small, skip, random, router or a pattern")
    spec = spec.strip()
    if spec in POLICY_ROUTES:
        if spec == "skip" and not skip:
            raise UsageError("--routes", "the model has no skip path")
        return spec
    items = [v.strip().lower() for v in spec.split(",")]
    routes: List[int] = []
    for v in items:
        if v in NAMES:
            routes.append(NAMES[v])
        elif v in ("0", "1", "2"):
            routes.append(int(v))
        else:
            raise UsageError("--routes", f"expected big, small, skip, random, router or a "
                                         f"comma-separated pattern of 0/1/2 or "
                                         f"skip/small/big, got {spec!r}")
    if len(routes) != n_layers:
        raise UsageError("--routes", f"a pattern needs one route per layer: the model has "
                                     f"{n_layers} layers, the pattern {len(routes)}")
    if 0 in routes and not skip:
        raise UsageError("--routes", "the pattern skips a layer but the model has no skip "
                                     "path")
    return routes


class CountingRouter:
    """Wraps a routes callable and counts, per layer, the tokens it sends down each path
    (on the routes' device: no host synchronisation per call)."""

    def __init__(self, inner, n_layers: int, device):
        import torch

        self.inner = inner
        self.counts = torch.zeros(n_layers, 3, dtype=torch.int64, device=device)
        self._paths = torch.arange(3, device=device)

    def __call__(self, layer: int, hidden):
        r = self.inner(layer, hidden)
        routes = r[0] if isinstance(r, tuple) else r
        self.counts[layer] += (routes.reshape(-1, 1) == self._paths).sum(0)
        return r


def _check(args: argparse.Namespace):
    if not isinstance(args.prompt, str) or not args.prompt:
        raise UsageError("--prompt", "expected a non-empty text")
    check_int("--max-new-tokens", args.max_new_tokens, low=1)
    check_float("--temperature", args.temperature, low=0.0)
    device = check_device("--device", args.device)
    src = check_model_source(args)
    routes = parse_routes(args.routes, src.n_layers, src.skip)
    if routes == "router" and not src.has_router:
        raise UsageError("--routes", f"router: {src.folder} holds no saved router; train one "
                                     f"with duollm train-router {src.option} {src.folder} "
                                     f"--budget F")
    backend = check_backend("--backend", args.backend, device)
    if args.cuda_graph:
        if src.kind != "checkpoint":
            raise UsageError("--cuda-graph", "only for a DuoLLM --checkpoint (a Hugging Face "
                                             "model's generate has no graph path here)")
        if device.type != "cuda":
            raise UsageError("--cuda-graph", f"needs a CUDA device, got {device}")
        if routes == "random":
            raise UsageError("--cuda-graph", "random routes cannot replay from a graph (every "
                                             "replay would reuse one draw)")
    return device, src, routes, backend


def _encode(args, src, tokenizer, device):
    import torch

    if tokenizer is not None:
        ids = tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise UsageError("--prompt", "the tokenizer gives no tokens for it")
    else:
        ids = list(args.prompt.encode("utf-8"))
        if src.vocab_size < 256:
            raise UsageError("--prompt", f"the model ships no tokenizer and its vocabulary of "
                                         f"{src.vocab_size} cannot hold the 256 byte ids")
    if src.max_positions is not None and len(ids) + args.max_new_tokens > src.max_positions:
        raise UsageError("--max-new-tokens", f"the prompt's {len(ids)} tokens + "
                                             f"{args.max_new_tokens} exceed the model's "
                                             f"{src.max_positions} positions")
    return torch.tensor([ids], dtype=torch.int64, device=device)


class _Writer:
    """Writes the text: each piece at once on a terminal, all at the end when piped."""

    def __init__(self, tokenizer, prompt_ids: List[int], stream, live: bool):
        self.tokenizer, self.stream, self.live = tokenizer, stream, live
        self.ids: List[int] = []
        self.prompt_ids = prompt_ids
        self.shown = ""
        self.bytes = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pieces: List[str] = []

    def _text(self, ids: List[int], final: bool = False) -> str:
        if self.tokenizer is None:
            return self.bytes.decode(bytes(i % 256 for i in ids), final=final)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        new, self.shown = full[len(self.shown):], full
        return new

    def start(self, prompt: str) -> None:
        self._emit(prompt)

    def add(self, ids: List[int]) -> None:
        self.ids += ids
        self._emit(self._text(ids))

    def end(self) -> None:
        if self.tokenizer is None:
            self._emit(self.bytes.decode(b"", final=True))
        self._emit("\n")
        if not self.live:
            self.stream.write("".join(self.pieces))
        self.stream.flush()

    def _emit(self, text: str) -> None:
        if not text:
            return
        if self.live:
            self.stream.write(text)
            self.stream.flush()
        else:
            self.pieces.append(text)


def _sample(logits, temperature: float, generator):
    import torch

    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    probs = torch.softmax(logits.float() / temperature, -1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)


def _generate_duo(model, prompt, n_new, plan, args, backend, writer, generator):
    """Greedy/sampled decode with a KV cache, writing each token as it comes."""
    import torch

    from duollm.model import KVCache

    if args.cuda_graph:
        out = model.generate(prompt, n_new, routes=plan, temperature=args.temperature,
                             generator=generator, backend=backend, cuda_graph=True)
        writer.add(out[0, prompt.shape[1]:].tolist())
        return out.shape[1] - prompt.shape[1]
    B, T = prompt.shape
    cache = KVCache.empty(model.config, B, T + n_new, prompt.device, model.embed.weight.dtype)
    with torch.inference_mode():
        logits = model(prompt, plan, cache=cache, backend=backend, generator=generator)[:, -1]
        for i in range(n_new):
            nxt = _sample(logits, args.temperature, generator)  # (1, 1)
            writer.add(nxt[0].tolist())
            if i + 1 < n_new:
                logits = model(nxt, plan, cache=cache, backend=backend,
                               generator=generator)[:, -1]
    return n_new


def _generate_hf(model, prompt, n_new, plan, args, backend, writer, generator):
    import torch
    from transformers.generation.streamers import BaseStreamer

    from duollm import hf

    class Streamer(BaseStreamer):
        def __init__(self):
            self.first = True
            self.n = 0

        def put(self, value):
            if self.first:  # generate hands the prompt over first
                self.first = False
                return
            ids = value.reshape(-1).tolist()
            self.n += len(ids)
            writer.add(ids)

        def end(self):
            pass

    streamer = Streamer()
    kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, streamer=streamer,
              pad_token_id=0, do_sample=args.temperature > 0)
    if args.temperature > 0:
        kw.update(temperature=args.temperature)
        torch.manual_seed(args.seed)
    with torch.inference_mode(), hf.routing(model, plan, backend=backend,
                                            generator=generator):
        model.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
    return streamer.n


def mix_and_flops(model, counts, router_paths: Optional[int]):
    """(shares (L, 3) float64 of skip/small/big per layer, realised FFN FLOPs per token,
    all-big FFN FLOPs per token) from per-layer route ``counts`` (L, 3); ``router_paths``:
    the router's number of logits (its FLOPs are counted on every token and layer), or None."""
    import torch

    from duollm.config import router_flops
    from duollm.oracle.budgets import route_flops
    from duollm.stack import as_stack

    counts = counts.to(torch.float64).cpu()
    shares = counts / counts.sum(1, keepdim=True).clamp_min(1)
    per_route = route_flops(model)  # (3,) per token per layer
    L = counts.shape[0]
    realised = float((shares @ per_route).sum())
    if router_paths is not None:
        realised += L * router_flops(as_stack(model).d_model, router_paths)
    return shares, realised, float(L * per_route[2])


def run_cli(args: argparse.Namespace) -> int:
    import torch

    from duollm.routes import attached_router, random_routes
    from duollm.stack import as_stack

    device, src, routes, backend = _check(args)
    apply_thread_rule(args.threads, device, src.d_model)
    model, tokenizer = load_model_source(src, device)
    prompt = _encode(args, src, tokenizer, device)
    stack = as_stack(model)
    L = stack.n_layers
    generator = torch.Generator(device=device).manual_seed(args.seed)
    counter = None
    router_paths = None
    if routes == "router":
        router = attached_router(model)
        counter = CountingRouter(router, L, device)
        router_paths = len(getattr(router, "paths", (0, 1, 2)))
        plan = counter
    elif routes == "random":
        probs = stack.probs

        def draw(layer, hidden):
            return random_routes(1, *hidden.shape[:-1], probs, hidden.device, generator)[0]

        counter = CountingRouter(draw, L, device)
        plan = counter
    else:
        plan = routes
    live = sys.stdout.isatty() and not args.cuda_graph
    writer = _Writer(tokenizer, prompt[0].tolist(), sys.stdout, live)
    writer.start(args.prompt)
    t0 = time.perf_counter()
    run = _generate_duo if src.kind == "checkpoint" else _generate_hf
    n = run(model, prompt, args.max_new_tokens, plan, args, backend, writer, generator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    writer.end()
    positions = prompt.shape[1] + max(n - 1, 0)  # the last token is never fed back
    if counter is not None:
        counts = counter.counts
    else:
        pattern = [NAMES[routes]] * L if isinstance(routes, str) else routes
        counts = torch.zeros(L, 3, dtype=torch.int64)
        for i, r in enumerate(pattern):
            counts[i, r] = positions
    shares, realised, big = mix_and_flops(model, counts, router_paths)
    err = sys.stderr
    print(f"{n} tokens in {elapsed:.3f} s: {n / elapsed:.1f} tokens/s (prompt of "
          f"{prompt.shape[1]} tokens included; routes {args.routes}, {device}, backend "
          f"{backend or 'default'}{', CUDA graph' if args.cuda_graph else ''})", file=err)
    print(f"realised mix over {int(counts[0].sum())} token positions per layer "
          f"(share big / small / skip):", file=err)
    for i in range(L):
        print(f"  layer {i:>2}: big {shares[i, 2]:.3f}  small {shares[i, 1]:.3f}  "
              f"skip {shares[i, 0]:.3f}", file=err)
    print(f"FFN FLOPs per token: {realised / 1e6:.3f} M realised"
          f"{' (router included)' if router_paths else ''} vs {big / 1e6:.3f} M all-big: "
          f"{realised / big:.1%} of all-big, ideal speedup {big / realised:.2f}x"
          if realised > 0 else f"FFN FLOPs per token: 0 (every layer skipped) vs "
                               f"{big / 1e6:.3f} M all-big", file=err)
    return 0
