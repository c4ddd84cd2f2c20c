"""Apply LoKr to a model: resolve the targets, wrap each in :class:`LokrLinear`, train only the Kronecker factors.

Trainable count = sum over targets of :meth:`KronShape.count` (each factor in full, or r (rows + columns) factored).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftlab.methods.base import LayerwiseMergeable
from peftlab.methods.lokr.config import LokrConfig
from peftlab.methods.lokr.factors import kron_shape
from peftlab.methods.lokr.layer import FACTORS, LokrLinear
from peftlab.methods.wrapped_linear import apply_wrapped, branch_parameters, describe_layers
from peftlab.models.arch import TargetModule


class LokrMethod(LayerwiseMergeable):
    """LoKr applied to one model; ``layers`` maps module path -> its :class:`LokrLinear`."""

    merge_label = "LoKr"
    config: LokrConfig
    layers: dict[str, LokrLinear]

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """``<module>.lokr_w1`` (or ``lokr_w1_a`` / ``_b``) and ``lokr_w2`` (or ``lokr_w2_a`` / ``_b``): PEFT's keys
        and shapes; ``.<slice>`` appended for a slice."""
        return branch_parameters(self.layers, FACTORS)

    def describe(self) -> dict[str, Any]:
        return {"r": self.config.r, "scaling": self.config.scaling, **describe_layers(self.layers)}


def apply_lokr(model: nn.Module, config: LokrConfig) -> LokrMethod:
    """Freeze ``model`` and wrap every target layer in a :class:`LokrLinear` (in place), each branch factored by
    :func:`~peftlab.methods.lokr.factors.kron_shape`; the model's outputs then equal the base model's (W1 = 0).
    Errors as :func:`~peftlab.methods.wrapped_linear.apply_wrapped`."""

    def make(name: str, target: TargetModule, slices: dict[str, tuple[int, int]]) -> LokrLinear:
        shapes = {key: kron_shape(stop - start, target.in_features, config.r, config.decompose_factor,
                                  config.decompose_both) for key, (start, stop) in slices.items()}
        return LokrLinear(target.module, slices, shapes, target.fan_in_fan_out, config.r, config.scaling)

    return apply_wrapped(LokrMethod, LokrLinear, model, config, lambda targets: make)
