"""BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked Language-models (Ben Zaken et al.
2021, https://arxiv.org/abs/2106.10199).

Every weight matrix stays frozen; only the additive bias vectors train:

    y = x W^T + b        W frozen,  b: (d_out,) trainable;   LayerNorm: y = g * norm(x) + beta,  beta trainable

GPT-2 has biases in every linear layer and LayerNorm (tiny GPT-2: 11 d per block + d for ln_f). The Llama family
has none (bias-free linear layers, RMSNorm without beta), so BitFit has nothing to train there and refuses.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftlab.config import ConfigError
from peftlab.methods.base import PeftMethod, freeze_all
from peftlab.methods.bitfit.config import BitFitConfig
from peftlab.models.arch import FAMILIES, family, resolve_targets

# The canonical layers of each bias group (see arch.FAMILIES); a family may lack some (GPT-2 has no gate).
GROUP_LAYERS = {"attention": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}


class BitFitMethod(PeftMethod):
    """The selected bias parameters train; ``names`` are their model parameter names, in model order."""

    def __init__(self, model: nn.Module, config: BitFitConfig, names: list[str]) -> None:
        self.model = model
        self.config = config
        self.names = names

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Model names, e.g. ``transformer.h.0.attn.c_attn.bias`` (3 d,) and ``transformer.h.0.ln_1.bias`` (d,)."""
        params = dict(self.model.named_parameters())
        return {name: params[name] for name in self.names}

    def describe(self) -> dict[str, Any]:
        return {"biases": self.config.biases, "n_tensors": len(self.names)}


def _module_bias_ids(model: nn.Module) -> set[int]:
    """id() of every parameter that a module owns under the name ``bias`` (nn.Linear, Conv1D, LayerNorm, ...)."""
    return {id(bias) for module in model.modules()
            if (bias := dict(module.named_parameters(recurse=False)).get("bias")) is not None}


def bias_parameters(model: nn.Module, group: str) -> list[str]:
    """Names of the bias parameters in ``group`` (``all``, ``attention`` or ``mlp``), in model order.

    Raises:
        ConfigError: the model has no bias parameters at all, or ``group`` needs a GPT-2/Llama-family layout.
    """
    all_biases = _module_bias_ids(model)
    model_type = model.config.model_type
    if not all_biases:
        raise ConfigError(f"method=bitfit: this {model_type} model has no bias parameters (its linear layers and "
                          f"norms are bias-free), so BitFit has nothing to train; it needs a model with biases, "
                          f"e.g. GPT-2")
    if group == "all":
        wanted = all_biases
    else:
        fam = family(model)
        if fam is None:
            raise ConfigError(f"method.biases: {group!r} needs a GPT-2 or Llama-family layout to find the {group} "
                              f"layers of this {model_type} model; use biases=all")
        canonical = [c for c in GROUP_LAYERS[group] if c in FAMILIES[fam]]
        modules = {t.name: t.module for t in resolve_targets(model, canonical)}
        wanted = {id(m.bias) for m in modules.values() if m.bias is not None}
    order = {id(p): name for name, p in model.named_parameters()}  # model order, a shared tensor once
    return [name for pid, name in order.items() if pid in wanted]


def apply_bitfit(model: nn.Module, config: BitFitConfig) -> BitFitMethod:
    """Freeze ``model`` and unfreeze the selected biases.

    Args:
        model: a causal LM with bias parameters (GPT-2; Qwen2 has q/k/v biases).
        config: which bias group trains.

    Returns:
        The :class:`BitFitMethod`; the model's outputs are unchanged.

    Raises:
        ConfigError: the model has no biases (e.g. the Llama family), or none in the chosen group.
    """
    names = bias_parameters(model, config.biases)
    if not names:
        raise ConfigError(f"method.biases: the {config.biases} layers of this {model.config.model_type} model have "
                          f"no biases; choose one of all, attention, mlp that does")
    freeze_all(model)
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(True)
    return BitFitMethod(model, config, names)
