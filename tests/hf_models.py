"""Small random Hugging Face models built from configs, shared by every HF test.

Nothing is downloaded: each builder makes a config of a few layers and a tiny width and
instantiates ``transformers``' own modeling code with a seeded random init, in float32 on
the CPU unless told otherwise. ``FAMILIES`` names the SwiGLU decoders ``duollm.hf.convert``
supports; ``UNSUPPORTED`` names models it must refuse, with a word of the expected reason.
"""
from __future__ import annotations

from typing import Callable, Dict

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the HF tests need transformers "
                                   "(pip install transformers)")

VOCAB = 97  # odd on purpose
D_MODEL = 32
D_FF = 88  # not a power of two
N_LAYERS = 3
# A larger init than HF's 0.02, so that the FFNs move the logits enough for the prune vs random
# comparison (and every routing test) to see a difference.
INIT_RANGE = 0.1


def _common(**kw) -> Dict:
    c = dict(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=D_FF,
             num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=4,
             max_position_embeddings=128, initializer_range=INIT_RANGE,
             tie_word_embeddings=False, attn_implementation="sdpa",
             # No end-of-sequence token: greedy generate then always runs to max_new_tokens.
             bos_token_id=None, eos_token_id=None, pad_token_id=None)
    c.update(kw)
    return c


def _build(config_cls: str, model_cls: str, seed: int, dtype: torch.dtype, **kw):
    config = getattr(transformers, config_cls)(**_common(**kw))
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    return model.to(dtype).eval()


def llama(seed: int = 0, dtype: torch.dtype = torch.float32, **kw):
    """Llama with multi-head attention (as many key/value heads as query heads)."""
    return _build("LlamaConfig", "LlamaForCausalLM", seed, dtype, **kw)


def llama_gqa(seed: int = 0, dtype: torch.dtype = torch.float32, **kw):
    """Llama with grouped-query attention (2 key/value heads for 4 query heads), tied head."""
    kw = {"num_key_value_heads": 2, "tie_word_embeddings": True, **kw}
    return _build("LlamaConfig", "LlamaForCausalLM", seed, dtype, **kw)


def mistral(seed: int = 0, dtype: torch.dtype = torch.float32, **kw):
    """Mistral, GQA, with a sliding window shorter than the test sequences."""
    kw = {"num_key_value_heads": 2, "sliding_window": 8, **kw}
    return _build("MistralConfig", "MistralForCausalLM", seed, dtype, **kw)


def qwen2(seed: int = 0, dtype: torch.dtype = torch.float32, **kw):
    """Qwen2: biased q/k/v projections (the MLP stays bias-free)."""
    kw = {"num_key_value_heads": 2, **kw}
    return _build("Qwen2Config", "Qwen2ForCausalLM", seed, dtype, **kw)


def qwen3(seed: int = 0, dtype: torch.dtype = torch.float32, **kw):
    """Qwen3: RMS-normed queries and keys, an explicit head_dim unequal to d_model / heads."""
    kw = {"num_key_value_heads": 2, "head_dim": 16, **kw}
    return _build("Qwen3Config", "Qwen3ForCausalLM", seed, dtype, **kw)


FAMILIES: Dict[str, Callable] = {
    "llama": llama, "llama_gqa": llama_gqa, "mistral": mistral, "qwen2": qwen2, "qwen3": qwen3,
}


# --------------------------------------------------------------------------- unsupported


def llama_mlp_bias(seed: int = 0):
    return llama(seed, mlp_bias=True)


def llama_gelu(seed: int = 0):
    """A Llama whose MLP is gated but GELU-activated (GeGLU), as in Gemma."""
    return llama(seed, hidden_act="gelu")


def gemma(seed: int = 0):
    config = transformers.GemmaConfig(**_common(head_dim=8))
    torch.manual_seed(seed)
    return transformers.GemmaForCausalLM(config).eval()


def phi3(seed: int = 0):
    """Phi-3: one fused gate_up projection."""
    config = transformers.Phi3Config(**_common())
    torch.manual_seed(seed)
    return transformers.Phi3ForCausalLM(config).eval()


def mixtral(seed: int = 0):
    """Mixtral: a sparse MoE block where the MLP would be."""
    config = transformers.MixtralConfig(**_common(num_local_experts=4, num_experts_per_tok=2))
    torch.manual_seed(seed)
    return transformers.MixtralForCausalLM(config).eval()


def qwen2_moe(seed: int = 0):
    """Qwen2-MoE with every second layer sparse: layer 0 is a plain SwiGLU, layer 1 is not, so
    a converter that swaps as it validates would leave layer 0 converted."""
    config = transformers.Qwen2MoeConfig(**_common(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, decoder_sparse_step=2))
    torch.manual_seed(seed)
    return transformers.Qwen2MoeForCausalLM(config).eval()


def gpt2(seed: int = 0):
    """GPT-2: no ``model.layers`` at all (its blocks live at ``transformer.h``)."""
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=D_MODEL, n_layer=2, n_head=4,
                                     n_positions=64, bos_token_id=None,
                                     eos_token_id=None)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


class _CustomMLP(torch.nn.Module):
    """Right names and shapes, but an extra parameter the SwiGLU formula would ignore."""

    def __init__(self, mlp):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.scale * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def llama_custom_last_layer(seed: int = 0):
    """A Llama whose LAST layer carries a custom MLP: earlier layers are convertible, so a
    converter that swaps as it validates would leave the model half-converted."""
    model = llama(seed)
    model.model.layers[-1].mlp = _CustomMLP(model.model.layers[-1].mlp)
    return model


UNSUPPORTED: Dict[str, tuple] = {
    "mlp_bias": (llama_mlp_bias, "bias"),
    "geglu": (llama_gelu, "SiLU"),
    "gemma": (gemma, "SiLU"),
    "fused_gate_up": (phi3, "gate_up"),
    "moe": (mixtral, "gate_proj"),
    "moe_every_second_layer": (qwen2_moe, "layer 1"),
    "no_layers": (gpt2, "layers"),
    "custom_mlp": (llama_custom_last_layer, "parameter"),
}


def tokens(B: int = 2, T: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T), generator=g)
