"""Apply LoHa to a model: resolve the targets, wrap each in :class:`LohaLinear`, train only the four factors.

Trainable count = sum over targets of 2 r (d_out_slice + d_in).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftlab.methods.base import LayerwiseMergeable
from peftlab.methods.loha.config import LohaConfig
from peftlab.methods.loha.layer import FACTORS, LohaLinear
from peftlab.methods.wrapped_linear import apply_wrapped, branch_parameters, describe_layers
from peftlab.models.arch import TargetModule


class LohaMethod(LayerwiseMergeable):
    """LoHa applied to one model; ``layers`` maps module path -> its :class:`LohaLinear`."""

    merge_label = "LoHa"
    config: LohaConfig
    layers: dict[str, LohaLinear]

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """``<module>.hada_w1_a`` ... ``hada_w2_b`` (PEFT's keys and shapes), ``.<slice>`` appended for a slice."""
        return branch_parameters(self.layers, FACTORS)

    def describe(self) -> dict[str, Any]:
        return {"r": self.config.r, "scaling": self.config.scaling, **describe_layers(self.layers)}


def apply_loha(model: nn.Module, config: LohaConfig) -> LohaMethod:
    """Freeze ``model`` and wrap every target layer in a :class:`LohaLinear` (in place); the model's outputs then
    equal the base model's (W2b = 0). Errors as :func:`~peftlab.methods.wrapped_linear.apply_wrapped`."""

    def make(name: str, target: TargetModule, slices: dict[str, tuple[int, int]]) -> LohaLinear:
        return LohaLinear(target.module, slices, target.in_features, target.fan_in_fan_out, config.r, config.scaling)

    return apply_wrapped(LohaMethod, LohaLinear, model, config, lambda targets: make)
