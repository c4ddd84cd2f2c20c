"""BitFit's trainable count from the model config: the bias vectors of the chosen group (all: every module's
``bias``, LayerNorm betas included; attention: the q/k/v/o layers'; mlp: the gate/up/down layers')."""

from __future__ import annotations

from peftlab.config import ConfigError
from peftlab.methods.bitfit.config import BitFitConfig
from peftlab.methods.bitfit.method import GROUP_LAYERS
from peftlab.models.arch import FAMILIES
from peftlab.models.shape import ModelShape, resolve_target_shapes


def count_bitfit(shape: ModelShape, config: BitFitConfig) -> int:
    """Parameters :func:`peftlab.methods.bitfit.apply_bitfit` trains on a model of this shape.

    Raises:
        ConfigError: the model has no biases (the Llama family), or none in the chosen group (as ``apply`` would).
    """
    params = dict(shape.params)
    biases = shape.bias_names()
    if not biases:
        raise ConfigError(f"method=bitfit: this {shape.model_type} model has no bias parameters (its linear layers "
                          f"and norms are bias-free), so BitFit has nothing to train; it needs a model with biases, "
                          f"e.g. GPT-2")
    if config.biases == "all":
        chosen = biases
    else:
        canonical = [c for c in GROUP_LAYERS[config.biases] if c in FAMILIES[shape.family]]
        modules = {t.name for t in resolve_target_shapes(shape, canonical)}  # a fused c_attn once
        chosen = [f"{name}.bias" for name in modules if f"{name}.bias" in params]
    if not chosen:
        raise ConfigError(f"method.biases: the {config.biases} layers of this {shape.model_type} model have no "
                          f"biases; choose one of all, attention, mlp that does")
    return sum(params[name][0] for name in chosen)
