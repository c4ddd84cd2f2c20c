"""Apply LoKr to a model: resolve the targets, wrap each in :class:`LokrLinear`, train only the Kronecker factors.

Trainable count = sum over targets of :meth:`KronShape.count` (each factor in full, or r (rows + columns) factored).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftlab.methods.base import LayerwiseMergeable
from peftlab.methods.lokr.config import LokrConfig
from peftlab.methods.lokr.factors import kron_shape
from peftlab.methods.lokr.layer import FACTORS, WHOLE, LokrLinear
from peftlab.methods.wrapped_linear import describe_layers, freeze_and_resolve, wrap_targets
from peftlab.models.arch import TargetModule


class LokrMethod(LayerwiseMergeable):
    """LoKr applied to one model; ``layers`` maps module path -> its :class:`LokrLinear`."""

    merge_label = "LoKr"
    config: LokrConfig
    layers: dict[str, LokrLinear]

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """``<module>.lokr_w1`` (or ``lokr_w1_a`` / ``_b``) and ``lokr_w2`` (or ``lokr_w2_a`` / ``_b``): PEFT's keys
        and shapes; ``.<slice>`` appended for a slice."""
        params: dict[str, nn.Parameter] = {}
        for name, layer in self.layers.items():
            for key in layer.slices:
                for factor in FACTORS:
                    if key in getattr(layer, factor):
                        params[f"{name}.{factor}" + ("" if key == WHOLE else f".{key}")] = getattr(layer, factor)[key]
        return params

    def describe(self) -> dict[str, Any]:
        return {"r": self.config.r, "scaling": self.config.scaling, **describe_layers(self.layers)}


def apply_lokr(model: nn.Module, config: LokrConfig) -> LokrMethod:
    """Freeze ``model`` and wrap every target layer in a :class:`LokrLinear` (in place).

    Returns:
        The :class:`LokrMethod`; the model's outputs equal the base model's (W1 = 0).

    Raises:
        ConfigError: ``method.target_modules`` matches nothing (the message lists the valid names).
        ValueError: LoKr is already applied to ``model``.
    """
    targets = freeze_and_resolve(model, config.target_modules, LokrLinear, "LoKr")

    def make(name: str, target: TargetModule, slices: dict[str, tuple[int, int]]) -> LokrLinear:
        shapes = {key: kron_shape(stop - start, target.in_features, config.r, config.decompose_factor,
                                  config.decompose_both) for key, (start, stop) in slices.items()}
        return LokrLinear(target.module, slices, shapes, target.fan_in_fan_out, config.r, config.scaling)

    layers, tied = wrap_targets(model, targets, make)
    return LokrMethod(model, config, layers, tied)
