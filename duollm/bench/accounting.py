"""Shapes, route mixes, exact route draws and the FLOP accounting of docs/routes-and-budgets.md.

``ideal = FLOPs(dense big on all N) / FLOPs(router + n_big * big + n_small * small)`` with the
router a linear ``d -> 3`` on every token; ``realised = time(dense) / time(routed)`` measured in
the same process; ``efficiency = realised / ideal``.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Dict, List, Sequence, Tuple

import torch

from ..config import router_flops, swiglu_flops
from ..reference import BIG, SKIP, SMALL

NUM_PATHS = 3


@dataclass(frozen=True)
class Shape:
    """A routed layer's shape: model width and the two FFN widths."""

    name: str
    d_model: int
    d_big: int
    d_small: int


# The paper's layer and smaller ones with the paper's ratios (d_big = 4 d, d_small = d / 4).
SHAPES: Dict[str, Shape] = {
    "paper": Shape("paper", 2560, 10240, 640),
    "medium": Shape("medium", 1024, 4096, 256),
    "small": Shape("small", 512, 2048, 128),
    "tiny": Shape("tiny", 128, 512, 32),
}


@dataclass(frozen=True)
class Mix:
    """Route fractions (p_big, p_small, p_skip), summing to 1."""

    name: str
    p_big: float
    p_small: float
    p_skip: float


MIXES: Dict[str, Mix] = {
    "big": Mix("big", 1.0, 0.0, 0.0),
    "small": Mix("small", 0.0, 1.0, 0.0),
    "half": Mix("half", 0.5, 0.5, 0.0),
    "1/12": Mix("1/12", 1 / 12, 11 / 12, 0.0),  # one big layer in twelve, the paper's regime
    "quarter-skip": Mix("quarter-skip", 0.25, 0.5, 0.25),
    "skip": Mix("skip", 0.0, 0.0, 1.0),
}


def parse_shape(spec: str) -> Shape:
    """A preset name (``paper``, ``small``, ...) or ``D:DBIG:DSMALL``."""
    if spec in SHAPES:
        return SHAPES[spec]
    try:
        d, big, small = (int(v) for v in spec.split(":"))
    except ValueError:
        raise ValueError(f"shape: expected one of {sorted(SHAPES)} or D:DBIG:DSMALL, got "
                         f"{spec!r}") from None
    if min(d, big, small) < 1:
        raise ValueError(f"shape: widths must be positive, got {spec!r}")
    return Shape(spec, d, big, small)


def parse_mix(spec: str) -> Mix:
    """A preset name (``big``, ``1/12``, ...) or ``PBIG:PSMALL:PSKIP`` (fractions like 1/12 ok)."""
    if spec in MIXES:
        return MIXES[spec]
    try:
        probs = [float(Fraction(v)) for v in spec.split(":")]
    except (ValueError, ZeroDivisionError):
        probs = []
    if len(probs) != 3 or min(probs) < 0 or abs(sum(probs) - 1) > 1e-6:
        raise ValueError(f"mix: expected one of {sorted(MIXES)} or PBIG:PSMALL:PSKIP summing "
                         f"to 1, got {spec!r}")
    return Mix(spec, *probs)


def exact_counts(mix: Mix, n_tokens: int) -> Tuple[int, int, int]:
    """(n_big, n_small, n_skip): ``round(p * N)`` each, fixed up to sum to N.

    Largest remainder: floor every share, then hand the leftover tokens to the largest
    fractional parts (ties to the bigger path), so a zero fraction always gets zero tokens.
    """
    probs = (mix.p_big, mix.p_small, mix.p_skip)
    raw = [p * n_tokens for p in probs]
    counts = [int(r) for r in raw]
    by_remainder = sorted(range(3), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in by_remainder[:n_tokens - sum(counts)]:
        counts[i] += 1
    return counts[0], counts[1], counts[2]


def draw_routes(mix: Mix, n_tokens: int, generator: torch.Generator,
                device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """(N,) int64 routes with exactly ``exact_counts(mix, N)`` tokens per path, shuffled."""
    n_big, n_small, n_skip = exact_counts(mix, n_tokens)
    routes = torch.cat([torch.full((n_big,), BIG), torch.full((n_small,), SMALL),
                        torch.full((n_skip,), SKIP)]).to(torch.int64)
    return routes[torch.randperm(n_tokens, generator=generator)].to(device)


def dense_flops(shape: Shape, n_tokens: int) -> int:
    """Forward FLOPs of the big SwiGLU FFN on all N tokens."""
    return n_tokens * swiglu_flops(shape.d_model, shape.d_big)


def routed_flops(shape: Shape, n_big: int, n_small: int, n_tokens: int,
                 router: bool = True) -> int:
    """Forward FLOPs of the routed layer: router on all N, big and small on their tokens."""
    flops = n_big * swiglu_flops(shape.d_model, shape.d_big)
    flops += n_small * swiglu_flops(shape.d_model, shape.d_small)
    if router:
        flops += n_tokens * router_flops(shape.d_model, NUM_PATHS)
    return flops


def ideal_speedup(shape: Shape, n_big: int, n_small: int, n_tokens: int) -> float:
    """FLOPs(dense) / FLOPs(routed) (docs/routes-and-budgets.md); inf when both are zero-cost."""
    routed = routed_flops(shape, n_big, n_small, n_tokens)
    if routed == 0:
        return float("nan") if n_tokens == 0 else float("inf")
    return dense_flops(shape, n_tokens) / routed


def parse_list(text: str, parse, what: str) -> List:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"{what}: expected a comma-separated list, got {text!r}")
    return [parse(t) for t in items]


def parse_tokens(text: str) -> List[int]:
    def one(t: str) -> int:
        try:
            v = int(t.lower().replace("k", "")) * (1024 if t.lower().endswith("k") else 1)
        except ValueError:
            raise ValueError(f"tokens: expected counts such as 64 or 16k, got {t!r}") from None
        if v < 1:
            raise ValueError(f"tokens: expected positive counts, got {t!r}")
        return v
    return parse_list(text, one, "tokens")


def mix_label(mix: Mix) -> str:
    return f"{mix.name} ({mix.p_big:.3g}/{mix.p_small:.3g}/{mix.p_skip:.3g})"


def weights_for(shape: Shape, device, dtype, generator: torch.Generator,
                std: float = 0.02) -> Sequence:
    """Random per-path weights ``(None, small, big)`` in ``duo_ffn`` layout (never zeros).

    ``generator`` may live on ``device`` (fast on a GPU) or on the CPU.
    """
    def w(*size):
        t = torch.randn(*size, generator=generator, device=generator.device)
        return t.mul_(std).to(device=device, dtype=dtype)
    d = shape.d_model
    small = (w(shape.d_small, d), w(shape.d_small, d), w(d, shape.d_small))
    big = (w(shape.d_big, d), w(shape.d_big, d), w(d, shape.d_big))
    params = [None, None, None]
    params[SMALL], params[BIG] = small, big
    return tuple(params)
