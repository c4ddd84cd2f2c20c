"""Apply OFT to a model: resolve the targets, wrap each in :class:`OftLinear`, train only the rotations' Q.

Trainable count = sum over targets of n b(b-1)/2 = d_in (b - 1) / 2 (with ``block_share``: b(b-1)/2), b the layer's
block size after PEFT's divisor rule (:func:`.blocks.block_layout`).
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from peftlab.methods.base import LayerwiseMergeable
from peftlab.methods.oft.blocks import block_layout
from peftlab.methods.oft.config import OftConfig
from peftlab.methods.oft.layer import OftLinear
from peftlab.methods.wrapped_linear import describe_layers, freeze_and_resolve, wrap_targets
from peftlab.models.arch import TargetModule


class OftMethod(LayerwiseMergeable):
    """OFT applied to one model; ``layers`` maps module path -> its :class:`OftLinear`."""

    merge_label = "OFT"
    config: OftConfig
    layers: dict[str, OftLinear]

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """``<module>.oft_R.weight`` (n, b(b-1)/2): PEFT's key and shape; ``<module>.oft_R.<slice>`` for a slice."""
        return {f"{name}.oft_R.{key}": layer.oft_R[key] for name, layer in self.layers.items() for key in layer.slices}

    def describe(self) -> dict[str, Any]:
        """The block sizes used (several when the divisor rule changed some), sharing, COFT and the layers."""
        return {"block_sizes": sorted({layer.block_size for layer in self.layers.values()}),
                "block_share": self.config.block_share, "coft": self.config.coft,
                "cayley_neumann_terms": self.config.num_cayley_neumann_terms if self.config.use_cayley_neumann
                else None, **describe_layers(self.layers)}


def apply_oft(model: nn.Module, config: OftConfig) -> OftMethod:
    """Freeze ``model`` and wrap every target layer in an :class:`OftLinear` (in place).

    Returns:
        The :class:`OftMethod`; the model's outputs equal the base model's (Q = 0, so R = I).

    Raises:
        ConfigError: ``method.target_modules`` matches nothing (the message lists the valid names).
        ValueError: OFT is already applied to ``model``.
    """
    targets = freeze_and_resolve(model, config.target_modules, OftLinear, "OFT")
    key = "method.r" if config.r else "method.oft_block_size"
    asked = config.r or config.oft_block_size

    def make(name: str, target: TargetModule, slices: dict[str, tuple[int, int]]) -> OftLinear:
        n, b = block_layout(target.in_features, config.r, config.oft_block_size)
        if (n if config.r else b) != asked:
            warnings.warn(f"{key}={asked} does not divide {name}'s {target.in_features} inputs; it uses "
                          f"{n} blocks of {b} (the nearest divisor, as PEFT does)", stacklevel=2)
        return OftLinear(target.module, slices, target.fan_in_fan_out, n, b, config.block_share, config.coft,
                         config.eps, config.num_cayley_neumann_terms if config.use_cayley_neumann else None,
                         config.module_dropout)

    layers, tied = wrap_targets(model, targets, make)
    return OftMethod(model, config, layers, tied)
