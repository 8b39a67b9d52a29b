"""``DuoConfig``: the model's shape, its named presets, and parameter and FLOP accounting."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Tuple


def swiglu_flops(d_model: int, width: int) -> int:
    """Forward FLOPs of one token through a SwiGLU FFN of ``width``: three (d x width) GEMMs."""
    return 2 * 3 * d_model * width


def router_flops(d_model: int, num_paths: int) -> int:
    """Forward FLOPs of one token through a linear router to ``num_paths`` logits."""
    return 2 * d_model * num_paths


@dataclass
class DuoConfig:
    """Shape of a ``DuoLLM``. Derived fields are filled in ``__post_init__``.

    ``p_skip, p_small, p_big`` are the route probabilities of the ``"random"`` policy
    (random-routing training draws from them); they must sum to 1.
    """

    n_layers: int = 4
    d_model: int = 64
    n_heads: int = 4
    vocab_size: int = 256
    d_big: int = 256
    d_small: int = 16
    max_seq_len: int = 128
    skip: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    p_skip: float = 0.0
    p_small: float = 0.5
    p_big: float = 0.5
    head_dim: int = field(init=False)

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "vocab_size", "d_big", "d_small",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name}: expected a positive number, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads "
                             f"({self.n_heads})")
        self.head_dim = self.d_model // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        probs = (self.p_skip, self.p_small, self.p_big)
        if min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-6:
            raise ValueError(f"p_skip, p_small, p_big must be non-negative and sum to 1, "
                             f"got {probs}")
        if self.p_skip > 0 and not self.skip:
            raise ValueError("p_skip > 0 needs skip=True")

    # ------------------------------------------------------------------ presets

    @classmethod
    def from_name(cls, name: str, **overrides) -> "DuoConfig":
        """A preset by name (``DuoConfig.presets()`` lists them), with field overrides."""
        if name not in _PRESETS:
            raise ValueError(f"config name: unknown preset {name!r}; expected one of "
                             f"{sorted(_PRESETS)}")
        return dataclasses.replace(_PRESETS[name], **overrides)

    @staticmethod
    def presets() -> Tuple[str, ...]:
        return tuple(_PRESETS)

    def to_dict(self) -> Dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls, d: Dict) -> "DuoConfig":
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"config: unknown fields {sorted(unknown)}")
        return cls(**d)

    # ------------------------------------------------------------------ accounting

    def param_count(self) -> int:
        """Parameters of ``DuoLLM(self)``, big and small FFNs and embeddings included."""
        d = self.d_model
        attn = 4 * d * d
        ffn = 3 * d * self.d_big + 3 * d * self.d_small
        norms = 2 * d
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * (attn + ffn + norms) + embed + d

    def active_params_per_token(self, p_big: float, p_small: float) -> float:
        """Expected parameters a token touches under route fractions ``p_big, p_small``."""
        d = self.d_model
        ffn = p_big * 3 * d * self.d_big + p_small * 3 * d * self.d_small
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * (4 * d * d + ffn + 2 * d) + embed + d

    def ffn_flops_per_token(self, p_big: float, p_small: float) -> float:
        """Expected forward FFN FLOPs of one token in one layer under the route fractions."""
        return (p_big * swiglu_flops(self.d_model, self.d_big)
                + p_small * swiglu_flops(self.d_model, self.d_small))

    def flops_per_token(self, p_big: float = 1.0, p_small: float = 0.0,
                        seq_len: int | None = None) -> float:
        """Expected forward FLOPs per token of the whole model (attention at ``seq_len``)."""
        d = self.d_model
        T = self.max_seq_len if seq_len is None else seq_len
        attn_proj = 2 * 4 * d * d
        attn_scores = 2 * 2 * T * d  # QK^T and AV of one query against T keys
        # Causal: a query sees T/2 keys on average, hence half of attn_scores.
        per_layer = attn_proj + attn_scores / 2 + self.ffn_flops_per_token(p_big, p_small)
        return self.n_layers * per_layer + 2 * d * self.vocab_size


_PRESETS: Dict[str, DuoConfig] = {
    # CPU, seconds: unit tests and the quick demo.
    "tiny": DuoConfig(n_layers=4, d_model=64, n_heads=4, vocab_size=256, d_big=256,
                      d_small=16, max_seq_len=128),
    # CPU, the full study (`make study`): the tiny preset's depth and width with a big FFN 16x
    # d_model wide, so that all small and all big differ by more than 0.15 nats after 1,000
    # CPU training steps (docs/study.md) while the 3^4 oracle table stays cheap.
    "wide": DuoConfig(n_layers=4, d_model=64, n_heads=4, vocab_size=256, d_big=1024,
                      d_small=16, max_seq_len=128),
    # CPU, minutes: the study in miniature.
    "small": DuoConfig(n_layers=6, d_model=192, n_heads=6, vocab_size=256, d_big=768,
                       d_small=48, max_seq_len=256),
    # The paper's depth (12 layers) at the small preset's width: the study's oracle, routers
    # and figures at the paper's depth in GPU minutes (2 x 4,096 oracle patterns per sequence).
    "paper-12": DuoConfig(n_layers=12, d_model=192, n_heads=6, vocab_size=256, d_big=768,
                          d_small=48, max_seq_len=256),
    # The paper's shape (Alizadeh-Vahid et al. 2024): 1.40B parameters with tied embeddings.
    "paper-1.4b": DuoConfig(n_layers=12, d_model=2560, n_heads=20, vocab_size=32000,
                            d_big=10240, d_small=640, max_seq_len=2048),
}
