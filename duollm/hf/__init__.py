"""Duo layers inside Hugging Face models: convert, route, train the small paths, export.

``convert(model, d_small)`` gives every SwiGLU MLP of a Llama/Mistral/Qwen2/Qwen3 model a small
sibling in place; ``routing(model, routes)`` routes it (``model(...)`` and ``model.generate``);
``export`` writes the all-big or all-small sub-model of a ``DuoLLM`` or a converted model as a
plain checkpoint;
``save_converted`` / ``load_converted`` / ``load_pretrained`` move converted models through
folders. Importing this module registers the converted models' ``RoutedStack`` with
``duollm.stack.as_stack``, so the oracle, token difficulty and the routers accept them.
See ``docs/hf.md``.

Needs ``transformers`` (an optional dependency of duollm).
"""
import importlib.util

if importlib.util.find_spec("transformers") is None:
    raise ImportError("duollm.hf needs the transformers package: pip install transformers")

import transformers  # noqa: E402

# 5.x names used here (rope_parameters, dtype=, transformers.initialization) that 4.x lacks or,
# for LlamaConfig(rope_parameters=...), silently ignores: an export would get the wrong RoPE.
if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"duollm.hf needs transformers>=5, found {transformers.__version__}: "
                      f"pip install -U 'transformers>=5'")

from .convert import convert, decoder_layers  # noqa: E402
from .routing import HFDuoFFN, HFDuoSpec, active_routes, is_converted, routing, spec_of  # noqa: E402
from .export import export, load_converted, load_pretrained, save_converted  # noqa: E402
from .stack import HFStack  # noqa: E402
from .train import train_small  # noqa: E402

from ..stack import register_stack  # noqa: E402

register_stack(is_converted, HFStack)

__all__ = ["convert", "routing", "is_converted", "spec_of", "active_routes", "decoder_layers",
           "export", "save_converted", "load_converted", "load_pretrained",
           "HFDuoFFN", "HFDuoSpec", "HFStack", "train_small"]
