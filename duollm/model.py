"""``DuoLLM``: a Llama-style decoder whose every FFN is a routed ``DuoFFN``.

RMSNorm, rotary position embeddings, causal attention through SDPA, a KV cache for
``generate``. Routing is an argument of ``forward``, never state of the model:

* a ``(n_layers, B, T)`` integer tensor — one route per token per layer;
* a ``(n_layers,)`` tensor or list — one route per layer for every token (a pattern);
* a router — any callable ``router(layer, hidden) -> routes`` (or ``(routes, gate)``) with
  ``hidden`` the ``(B, T, d_model)`` input of that layer's FFN and routes ``(B, T)``;
* a named policy — ``"big"``, ``"small"``, ``"skip"`` or ``"random"`` (drawn per token and
  layer from the config's ``p_skip, p_small, p_big``; pass ``generator=`` to seed it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import DuoConfig
from .modules import DuoFFN, RMSNorm
from . import ops
from .routes import (POLICIES, Routes, layer_routes, random_routes, resolve_routes,  # noqa: F401
                     use_saved_router)


def rope_tables(head_dim: int, max_len: int, theta: float) -> torch.Tensor:
    """(max_len, head_dim // 2, 2) cos/sin table, float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def rope_cos_sin(table: torch.Tensor):
    """(cos, sin), each (T, head_dim) float32, of a (T, hd/2, 2) table: the form
    ``apply_rope`` uses fastest. A forward computes it once for all its layers."""
    cos, sin = table[..., 0], table[..., 1]  # (T, hd/2)
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, table) -> torch.Tensor:
    """Rotate x (B, H, T, hd) by table (T, hd/2, 2), or by its ``rope_cos_sin`` pair, the
    rotate-half (Llama/HF) convention: ``x * cos + rotate_half(x) * sin``."""
    cos, sin = rope_cos_sin(table) if isinstance(table, torch.Tensor) else table
    half = x.shape[-1] // 2
    xf = x.float()  # one copy, not one per half (a no-op for float32)
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)  # rotate_half
    # x1*cos - x2*sin and x2*cos + x1*sin, the same roundings as the two-half form
    out = torch.addcmul(xf * cos, rotated, sin)
    return out.to(x.dtype)


@dataclass
class KVCache:
    """Keys and values of every layer for ``generate``: (n_layers, B, H, max_len, head_dim).

    ``pos`` counts the cached positions. A *static* cache (``static=True``) also keeps that
    count on the device (``pos_t``, (1,) int64) and its steps use only it: every shape is
    fixed (attention runs over all ``max_len`` slots, masked), so a decode step reads nothing
    back and can be captured in a CUDA graph (``DuoLLM.generate(cuda_graph=True)``).
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: int = 0
    static: bool = False
    pos_t: Optional[torch.Tensor] = None

    @classmethod
    def empty(cls, config: DuoConfig, batch: int, max_len: int, device, dtype,
              static: bool = False) -> "KVCache":
        shape = (config.n_layers, batch, config.n_heads, max_len, config.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype),
                   torch.zeros(shape, device=device, dtype=dtype), static=static,
                   pos_t=torch.zeros(1, dtype=torch.int64, device=device) if static else None)


class Attention(nn.Module):
    def __init__(self, config: DuoConfig):
        super().__init__()
        d = config.d_model
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def qkv(self, x: torch.Tensor, rope: torch.Tensor):
        """Queries, keys and values of x (*lead, T, d), rotary applied: (*lead, H, T, hd)."""
        lead, T = x.shape[:-2], x.shape[-2]
        q, k, v = (proj(x).view(*lead, T, self.n_heads, self.head_dim).transpose(-3, -2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        return apply_rope(q, rope), apply_rope(k, rope), v

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """The output projection of attention values o (*lead, H, T, hd) -> (*lead, T, d)."""
        o = o.transpose(-3, -2)  # (*lead, T, H, hd)
        return self.o_proj(o.reshape(*o.shape[:-2], self.n_heads * self.head_dim))

    def forward(self, x: torch.Tensor, rope: torch.Tensor, layer: int,
                cache: Optional[KVCache]) -> torch.Tensor:
        T = x.shape[1]
        q, k, v = self.qkv(x, rope)  # (B, H, T, hd)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif cache.static:  # fixed shapes, positions from the device (see KVCache)
            q_pos = cache.pos_t + torch.arange(T, device=x.device)  # (T,)
            cache.k[layer].index_copy_(2, q_pos, k)
            cache.v[layer].index_copy_(2, q_pos, v)
            k_pos = torch.arange(cache.k.shape[3], device=x.device)
            mask = k_pos[None, :] <= q_pos[:, None]  # (T, max_len)
            out = F.scaled_dot_product_attention(q, cache.k[layer], cache.v[layer],
                                                 attn_mask=mask)
        else:
            start = cache.pos
            cache.k[layer, :, :, start:start + T] = k
            cache.v[layer, :, :, start:start + T] = v
            k_all = cache.k[layer, :, :, :start + T]  # (B, H, start+T, hd)
            v_all = cache.v[layer, :, :, :start + T]
            if T == 1 or start == 0:  # one query sees every key; or plain causal
                out = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=T > 1)
            else:
                q_pos = torch.arange(start, start + T, device=x.device)
                k_pos = torch.arange(start + T, device=x.device)
                mask = k_pos[None, :] <= q_pos[:, None]  # (T, start+T)
                out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        return self.out(out)


class Block(nn.Module):
    def __init__(self, config: DuoConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = DuoFFN(config.d_model, config.d_big, config.d_small, skip=config.skip)

    def forward(self, h: torch.Tensor, rope: torch.Tensor, layer: int,
                cache: Optional[KVCache], plan, backend: Optional[str] = None,
                hidden: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """One decoder layer on h (B, T, d); ``plan`` a resolved routes tensor or a router.

        ``hidden``: a list the FFN's (B, T, d) input is appended to, when given.
        """
        h = h + self.attn(self.attn_norm(h), rope, layer, cache)
        x = self.ffn_norm(h)
        if hidden is not None:
            hidden.append(x)
        if isinstance(plan, list):  # one int route per layer (a policy or a pattern)
            r, gate = plan[layer], None
        else:
            r, gate = layer_routes(plan, layer, x)
            if not isinstance(plan, torch.Tensor):  # a router's output: say so if it is bad
                try:
                    return self.ffn(x, r, residual=h, gate=gate, backend=backend)
                except (TypeError, ValueError) as e:
                    raise _router_error(e, layer) from None
        return self.ffn(x, r, residual=h, gate=gate, backend=backend)


def _router_error(e: Exception, layer: int) -> Exception:
    """``e`` from DuoFFN's checks of a router's output, told as the router's mistake: the
    caller passed the router, not the layer's ``x`` (the FFN input, ``(B, T, d_model)``)."""
    text = str(e)
    if not text.startswith(("routes:", "gate:")) or type(e) not in (TypeError, ValueError):
        return e
    name, rest = text.split(":", 1)
    rest = rest.replace("x of shape", "its input of shape").replace("but x is on",
                                                                     "but its input is on")
    return type(e)(f"routes: the router's {name} at layer {layer}:{rest}")


class DuoLLM(nn.Module):
    """Decoder-only LM with a ``DuoFFN`` in every layer. See the module docstring for routes."""

    def __init__(self, config: DuoConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer(
            "rope", rope_tables(config.head_dim, config.max_seq_len, config.rope_theta),
            persistent=False)
        self.apply(self._init_weights)
        # This model's error flags (docs/ops.md): its layers' bad routes and its bad token ids
        # are recorded here, and generate raises only for those, never another model's.
        self.route_errors = ops.RouteErrors(
            f"DuoLLM at {id(self):#x} (n_layers={config.n_layers}, d_model={config.d_model})")
        for block in self.layers:
            block.ffn.route_errors = self.route_errors
        # GPT-2 style: shrink the projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ routing

    def resolve_routes(self, routes: Routes, B: int, T: int, device: torch.device,
                       generator: Optional[torch.Generator] = None):
        """Turn any accepted routes form into an (n_layers, B, T) tensor or a router."""
        c = self.config
        return resolve_routes(routes, c.n_layers, B, T, device, generator,
                              (c.p_skip, c.p_small, c.p_big))

    def random_routes(self, B: int, T: int, device: torch.device,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(n_layers, B, T) routes drawn from the config's ``p_skip, p_small, p_big``."""
        c = self.config
        return random_routes(c.n_layers, B, T, (c.p_skip, c.p_small, c.p_big), device,
                             generator)

    # ------------------------------------------------------------------ forward

    def forward(self, tokens: torch.Tensor, routes: Routes = "big", *,
                cache: Optional[KVCache] = None, generator: Optional[torch.Generator] = None,
                backend: Optional[str] = None, return_hidden: bool = False):
        """Logits (B, T, vocab_size) for tokens (B, T) under ``routes`` (see module docstring).

        With ``cache``, ``tokens`` continue the cached sequence and the cache advances.
        ``return_hidden=True`` also returns the list of each FFN's (B, T, d) input.
        """
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int32,
                                                                        torch.int64):
            raise TypeError("tokens: expected an int32/int64 tensor of shape (B, T)")
        if tokens.dim() != 2:
            raise ValueError(f"tokens: expected shape (B, T), got {tuple(tokens.shape)}")
        B, T = tokens.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"tokens: sequence of {start + T} exceeds max_seq_len "
                             f"{self.config.max_seq_len}")
        if cache is not None and (cache.k.shape[1] != B or start + T > cache.k.shape[3]):
            raise ValueError(f"cache: holds batch {cache.k.shape[1]} and {cache.k.shape[3]} "
                             f"positions, tokens need batch {B} and {start + T} positions")
        tokens = self._check_token_values(tokens)
        routes = use_saved_router(self, routes)  # "router": the router saved with the model
        plan = self._int_routes(routes)
        if plan is None:
            plan = self.resolve_routes(routes, B, T, tokens.device, generator)
        if cache is not None and cache.static:  # positions from the device: no host value
            rope = self.rope.index_select(0, cache.pos_t + torch.arange(T, device=tokens.device))
        else:
            rope = self.rope[start:start + T]
        rope = rope_cos_sin(rope)  # once for every layer
        h = self.embed(tokens)  # (B, T, d)
        hidden: Optional[List[torch.Tensor]] = [] if return_hidden else None
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, i, cache, plan, backend, hidden)
        if cache is not None:
            cache.pos += T
            if cache.static:
                cache.pos_t.add_(T)
        logits = self.lm_head(self.norm(h))
        return (logits, hidden) if return_hidden else logits

    def _check_token_values(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids in ``[0, vocab_size)``, checked as ``duollm.ops.check_mode`` says: read
        and raised at once on the CPU; on a GPU no read: a bad id is embedded as id 0 and
        the device's error flag is set (``duollm.ops.check_errors``)."""
        V = self.config.vocab_size
        if not tokens.numel() or tokens.device.type == "meta":
            return tokens
        if ops.host_reads(tokens.device):
            ops.host_range_check(tokens, 0, V, "tokens", "ids")
            return tokens
        if ops.check_mode() == "off":
            return tokens
        return ops.sanitize_values(tokens, 0, V, 0, ops.TOKEN_ERROR,
                                   getattr(self, "route_errors", None))

    def _int_routes(self, routes) -> Optional[List[int]]:
        """A policy name (but ``"random"``) or a list of ints as one int route per layer, so
        the layers run without a routes tensor; None for every other routes form."""
        L = self.config.n_layers
        if isinstance(routes, str) and routes in POLICIES:
            return [POLICIES[routes]] * L
        if isinstance(routes, (list, tuple)) and len(routes) == L and all(
                isinstance(r, int) and not isinstance(r, bool) for r in routes):
            for r in routes:
                if not 0 <= r < DuoFFN.num_paths:
                    raise ValueError(f"routes: values must lie in [0, {DuoFFN.num_paths}), "
                                     f"found {r}")
            return list(routes)
        return None

    def token_losses(self, tokens: torch.Tensor, routes: Routes = "big", **kw) -> torch.Tensor:
        """Next-token cross-entropy of each position, (B, T-1), predicting ``tokens[:, 1:]``."""
        logits = self(tokens[:, :-1], routes if not isinstance(routes, torch.Tensor)
                      or routes.dim() != 3 else routes[:, :, :-1], **kw)
        return F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none")

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, routes: Routes = "big", *,
                 temperature: float = 0.0, top_k: Optional[int] = None,
                 use_cache: bool = True, generator: Optional[torch.Generator] = None,
                 backend: Optional[str] = None, cuda_graph: bool = False) -> torch.Tensor:
        """Extend tokens (B, T) by ``max_new_tokens``; greedy when ``temperature == 0``.

        ``routes`` must be a policy, a per-layer pattern or a router (a full per-token tensor
        cannot cover tokens not yet generated).

        ``cuda_graph=True`` (CUDA tensors): the prompt runs eagerly into a static KV cache,
        then one decode step is captured in a CUDA graph and replayed for every new token
        (no host synchronisation, no Python per layer). Routes: ``"big"``, ``"small"``,
        ``"skip"``, a pattern, or a router that itself reads nothing back to the host (it runs
        inside the graph); ``"random"`` is refused (a graph would replay one draw).

        Route or token values found out of range on a GPU (see ``duollm.ops.check_mode``)
        raise here, once, after the last step.
        """
        if isinstance(routes, torch.Tensor) and routes.dim() == 3:
            raise ValueError("routes: generate takes a policy, a (n_layers,) pattern or a "
                             "router, not a per-token tensor")
        routes = use_saved_router(self, routes)  # looked up once, not per step
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            raise ValueError("tokens: expected an integer tensor of shape (B, T)")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected a non-negative int, got "
                             f"{max_new_tokens!r}")
        if tokens.shape[1] == 0 and max_new_tokens > 0:
            raise ValueError("tokens: generate needs a prompt of at least one token")
        if tokens.shape[1] + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"max_new_tokens: {tokens.shape[1]} + {max_new_tokens} exceeds "
                             f"max_seq_len {self.config.max_seq_len}")
        if cuda_graph:
            if tokens.device.type != "cuda":
                raise ValueError(f"cuda_graph: needs the model and tokens on a CUDA device, "
                                 f"tokens are on {tokens.device}")
            if not use_cache:
                raise ValueError("cuda_graph: needs use_cache=True (the graph replays a "
                                 "static KV cache)")
            if isinstance(routes, str) and routes == "random":
                raise ValueError("routes: 'random' cannot run in a CUDA graph (every replay "
                                 "would reuse one draw); use a policy, a pattern or a router")
        if use_cache:
            out = self._generate_cached(tokens, max_new_tokens, routes, temperature, top_k,
                                        generator, backend, static=cuda_graph,
                                        graph=cuda_graph)
        else:
            out = tokens
            for _ in range(max_new_tokens):
                logits = self(out, routes, generator=generator,
                              backend=backend)[:, -1].float()  # (B, V)
                out = torch.cat([out, self._sample(logits, temperature, top_k, generator)],
                                dim=1)
        # the one read of this model's error flag (another model's errors stay with it)
        self.check_errors(tokens.device)
        return out

    def check_errors(self, device=None) -> None:
        """Raise ``ValueError`` if this model saw a route or token id out of range on
        ``device`` (default: every device) since the last check without raising at once
        (the "device" check mode: a GPU, ``torch.compile``, a CUDA graph; docs/ops.md), and
        clear its flag. Other models' errors are theirs; ``duollm.ops.check_errors()``
        checks every model's. Reads one int per device (a host synchronisation)."""
        errors = getattr(self, "route_errors", None)  # None: unpickled from an older version
        if errors is not None:
            errors.check(device)

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float, top_k: Optional[int],
                generator: Optional[torch.Generator]) -> torch.Tensor:
        """Next token (B, 1) from logits (B, V): argmax at temperature 0, else sampled."""
        if temperature == 0:
            return logits.argmax(-1, keepdim=True)
        logits = logits / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(F.softmax(logits, -1), 1, generator=generator)

    def _generate_cached(self, tokens, max_new_tokens, routes, temperature, top_k, generator,
                         backend, static: bool = False, graph: bool = False) -> torch.Tensor:
        """generate with a KV cache: ``static`` fixes every shape (KVCache), ``graph``
        captures the decode step in a CUDA graph and replays it."""
        B, T = tokens.shape
        if max_new_tokens == 0:
            return tokens
        # Under autocast the keys and values come out in the autocast dtype: store that.
        dtype = self.embed.weight.dtype
        if torch.is_autocast_enabled(tokens.device.type):
            dtype = torch.get_autocast_dtype(tokens.device.type)
        cache = KVCache.empty(self.config, B, T + max_new_tokens, tokens.device, dtype,
                              static=static)
        logits = self(tokens, routes, cache=cache, generator=generator,
                      backend=backend)[:, -1].float()  # (B, V)
        pieces = [tokens, self._sample(logits, temperature, top_k, generator)]
        if max_new_tokens == 1:
            return torch.cat(pieces, dim=1)
        step_in = pieces[-1].clone()  # (B, 1): a static input the graph reads

        def step() -> torch.Tensor:
            return self(step_in, routes, cache=cache, generator=generator,
                        backend=backend)[:, -1].float()

        run = step
        if graph:
            run = self._capture_step(step, cache)
        for _ in range(max_new_tokens - 1):
            nxt = self._sample(run(), temperature, top_k, generator)
            pieces.append(nxt)
            step_in.copy_(nxt)
        return torch.cat(pieces, dim=1)

    @staticmethod
    def _capture_step(step, cache: KVCache):
        """Capture ``step`` (a decode step on a static cache) in a CUDA graph; returns a
        function that replays it and returns its (static) logits."""
        pos, pos_t = cache.pos, cache.pos_t.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: lazy allocations, kernel compilation
            step()
        torch.cuda.current_stream().wait_stream(side)
        cache.pos = pos
        cache.pos_t.copy_(pos_t)
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                logits = step()
        except RuntimeError as e:
            raise RuntimeError(f"cuda_graph: the decode step could not be captured (a router "
                               f"or backend that reads values back to the host cannot be): "
                               f"{e}") from e
        cache.pos = pos  # the graph advances pos_t itself; pos is Python bookkeeping

        def replay() -> torch.Tensor:
            g.replay()
            return logits

        return replay
