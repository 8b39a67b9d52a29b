"""``duollm bench decode --levels llama``: DuoLLM against ``transformers``' dense Llama.

The speed contract (docs/speed.md) says a routed model is never slower than the dense model it
replaces where it computes the same thing. Here, in one process, timed round-robin (so load from
other processes falls on every candidate alike):

* ``decode``: greedy generation of ``new`` tokens after a ``prompt``-token prompt, batch 1.
  DuoLLM at all-big (``routes="big"``) against a dense ``LlamaForCausalLM`` of width d_big, and
  DuoLLM at all-small against a dense Llama of width d_small. The Llama runs both through
  ``generate`` and through a plain greedy loop over its KV cache; the faster of the two is the
  reference (``vs_llama`` = its time over DuoLLM's: > 1 means DuoLLM is faster).
* ``prefill``: logits of a ``prefill``-token prompt, no cache, same pairs.
* ``layer``: one routed ``DuoFFN`` call on N = 1 token (a routes tensor, and an int route)
  against the plain ``F.linear`` SwiGLU of the same width, at the model's shape and at d 32.

The Llama copies have the DuoLLM's shape (layers, width, heads, vocabulary, tied embeddings,
RMSNorm eps, RoPE theta) and random weights: speed does not depend on the values.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from ..config import DuoConfig
from ..model import DuoLLM
from ..modules import DuoFFN
from ..reference import BIG, SMALL
from .timing import Stats, time_interleaved


def llama_of(config: DuoConfig, width: int, dtype: torch.dtype, device: torch.device):
    """A dense ``LlamaForCausalLM`` with DuoLLM ``config``'s shape and FFN width ``width``."""
    from transformers import LlamaConfig, LlamaForCausalLM  # optional dependency of duollm

    cfg = LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.d_model,
                      intermediate_size=width, num_hidden_layers=config.n_layers,
                      num_attention_heads=config.n_heads, num_key_value_heads=config.n_heads,
                      max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
                      rope_theta=config.rope_theta, tie_word_embeddings=config.tie_embeddings,
                      attention_bias=False, mlp_bias=False, pad_token_id=0, bos_token_id=None,
                      eos_token_id=None)
    cfg._attn_implementation = "sdpa"  # the attention DuoLLM uses
    model = LlamaForCausalLM(cfg)
    return model.to(device=device, dtype=dtype).eval()


def _llama_loop(model, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy decoding with the Llama's own KV cache, no ``generate`` machinery."""
    from transformers import DynamicCache

    from duollm.hf_compat import cache_keyword

    cache = {cache_keyword(model.forward): DynamicCache()}  # its name differs across 5.x
    out = model(input_ids=prompt, **cache, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    pieces = [prompt, nxt]
    for _ in range(new - 1):
        out = model(input_ids=nxt, **cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        pieces.append(nxt)
    return torch.cat(pieces, dim=1)


def _llama_generate(model, prompt: torch.Tensor, new: int) -> torch.Tensor:
    return model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          pad_token_id=0)


def _row(stats: Dict[str, Stats], base: Dict, name: str, ref_names, per_call_tokens: int,
         log) -> Dict:
    s = stats[name]
    ref = min((stats[r] for r in ref_names), key=lambda st: st.median_ms)
    row = dict(base, impl=name, **s.as_dict(),
               tokens_per_s=per_call_tokens / (s.median_ms / 1e3),
               vs_llama=ref.median_ms / s.median_ms)
    log(f"{base['level']:>13} {base['mix']:>5} {name:>16} {s.median_ms:9.3f} ms  "
        f"{row['tokens_per_s']:10.1f} tok/s  vs llama {row['vs_llama']:.3f}x")
    return row


def model_pairs(config: DuoConfig, device: torch.device, dtype: torch.dtype, prompt_len: int,
                new: int, prefill_len: int, repeats: int, budget: float, seed: int = 0,
                backend: str = "torch", log=print) -> List[Dict]:
    """Decode and prefill rows: DuoLLM at all-big / all-small against dense Llamas."""
    torch.manual_seed(seed)
    duo = DuoLLM(config).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len), generator=g).to(device)
    long = torch.randint(0, config.vocab_size, (1, prefill_len), generator=g).to(device)
    rows: List[Dict] = []
    for mix, width in (("big", config.d_big), ("small", config.d_small)):
        llama = llama_of(config, width, dtype, device)
        with torch.inference_mode():
            # Same greedy tokens? Different weights, so no; each must emit exactly `new`.
            assert duo.generate(prompt, new, mix, backend=backend).shape[1] == prompt_len + new
            assert _llama_generate(llama, prompt, new).shape[1] == prompt_len + new
            fns: Dict[str, Callable[[int], object]] = {
                "duollm": lambda i: duo.generate(prompt, new, mix, backend=backend),
                "llama_generate": lambda i: _llama_generate(llama, prompt, new),
                "llama_loop": lambda i: _llama_loop(llama, prompt, new),
            }
            t = time_interleaved(fns, device, repeats=repeats, budget_s=budget * len(fns))
            stats = {n: Stats.of(v) for n, v in t.items()}
            base = dict(level="llama-decode", mode="eager", mix=mix, width=width,
                        prompt=prompt_len, new=new)
            for name in fns:
                rows.append(_row(stats, base, name, ("llama_generate", "llama_loop"), new, log))
            fns = {"duollm": lambda i: duo(long, mix, backend=backend),
                   "llama": lambda i: llama(input_ids=long, use_cache=False).logits}
            t = time_interleaved(fns, device, repeats=repeats, budget_s=budget * len(fns))
            stats = {n: Stats.of(v) for n, v in t.items()}
            base = dict(level="llama-prefill", mode="eager", mix=mix, width=width,
                        prompt=prefill_len)
            for name in fns:
                rows.append(_row(stats, base, name, ("llama",), prefill_len, log))
    return rows


def layer_pairs(shapes, device: torch.device, dtype: torch.dtype, repeats: int, budget: float,
                seed: int = 0, backend: str = "torch", log=print) -> List[Dict]:
    """One DuoFFN call on one token (routes tensor; int route) against the plain SwiGLU.

    ``shapes``: ``(d_model, d_big, d_small)`` triples."""
    rows: List[Dict] = []
    for d, d_big, d_small in shapes:
        torch.manual_seed(seed)
        ffn = DuoFFN(d, d_big, d_small).to(device=device, dtype=dtype).eval()
        x = torch.randn(1, d, device=device, dtype=dtype)
        for mix, route in (("big", BIG), ("small", SMALL)):
            routes = torch.full((1,), route, device=device)
            wg, wu, wd = (ffn.big if route == BIG else ffn.small).weights
            fns = {
                "plain_swiglu": lambda i: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu),
                                                   wd),
                "duoffn_tensor": lambda i: ffn(x, routes, backend=backend),
                "duoffn_int": lambda i: ffn(x, route, backend=backend),
            }
            with torch.inference_mode():
                t = time_interleaved(fns, device, repeats=repeats, warmup=20,
                                     budget_s=budget * len(fns))
            stats = {n: Stats.of(v) for n, v in t.items()}
            base = dict(level="llama-layer", mode="eager", mix=mix, d_model=d,
                        width=wg.shape[0], n_tokens=1)
            for name in fns:
                s = stats[name]
                row = dict(base, impl=name, **s.as_dict(),
                           vs_plain=stats["plain_swiglu"].median_ms / s.median_ms)
                rows.append(row)
                log(f"  llama-layer {mix:>5} d={d:<4} {name:>16} {s.median_ms * 1e3:9.1f} us  "
                    f"vs plain {row['vs_plain']:.3f}x")
    return rows
