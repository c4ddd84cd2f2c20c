"""Apply LoHa to a model: resolve the targets, wrap each in :class:`LohaLinear`, train only the four factors.

Trainable count = sum over targets of 2 r (d_out_slice + d_in).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftlab.methods.base import LayerwiseMergeable
from peftlab.methods.loha.config import LohaConfig
from peftlab.methods.loha.layer import FACTORS, WHOLE, LohaLinear
from peftlab.methods.wrapped_linear import describe_layers, freeze_and_resolve, wrap_targets
from peftlab.models.arch import TargetModule


class LohaMethod(LayerwiseMergeable):
    """LoHa applied to one model; ``layers`` maps module path -> its :class:`LohaLinear`."""

    merge_label = "LoHa"
    config: LohaConfig
    layers: dict[str, LohaLinear]

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """``<module>.hada_w1_a`` ... ``hada_w2_b`` (PEFT's keys and shapes), ``.<slice>`` appended for a slice."""
        params: dict[str, nn.Parameter] = {}
        for name, layer in self.layers.items():
            for key in layer.slices:
                for factor in FACTORS:
                    params[f"{name}.{factor}" + ("" if key == WHOLE else f".{key}")] = getattr(layer, factor)[key]
        return params

    def describe(self) -> dict[str, Any]:
        return {"r": self.config.r, "scaling": self.config.scaling, **describe_layers(self.layers)}


def apply_loha(model: nn.Module, config: LohaConfig) -> LohaMethod:
    """Freeze ``model`` and wrap every target layer in a :class:`LohaLinear` (in place).

    Returns:
        The :class:`LohaMethod`; the model's outputs equal the base model's (W2b = 0).

    Raises:
        ConfigError: ``method.target_modules`` matches nothing (the message lists the valid names).
        ValueError: LoHa is already applied to ``model``.
    """
    targets = freeze_and_resolve(model, config.target_modules, LohaLinear, "LoHa")

    def make(name: str, target: TargetModule, slices: dict[str, tuple[int, int]]) -> LohaLinear:
        return LohaLinear(target.module, slices, target.in_features, target.fan_in_fan_out, config.r, config.scaling)

    layers, tied = wrap_targets(model, targets, make)
    return LohaMethod(model, config, layers, tied)
