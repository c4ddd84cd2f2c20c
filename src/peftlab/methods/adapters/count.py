"""Bottleneck adapters' trainable count from the model config: n_adapters * (2 d b + b + d)
(down: W (b, d) + bias b, up: W (d, b) + bias d), n_adapters = L x adapted sub-layers per block."""

from __future__ import annotations

from peftlab.methods.adapters.config import AdapterConfig
from peftlab.models.shape import ModelShape


def count_adapters(shape: ModelShape, config: AdapterConfig) -> int:
    """Parameters :func:`peftlab.methods.adapters.apply_adapters` trains on a model of this shape.

    Raises:
        ConfigError: ``reduction_factor`` leaves no bottleneck for this width (as ``apply`` would).
    """
    d, b = shape.hidden_size, config.bottleneck(shape.hidden_size)
    return shape.num_layers * len(config.sublayers) * (2 * d * b + b + d)


def adapter_note(shape: ModelShape, config: AdapterConfig) -> str:
    """The bottleneck as a reduction factor d / b (the other way to set it)."""
    b = config.bottleneck(shape.hidden_size)
    return f"bottleneck {b} = d / {shape.hidden_size / b:.3g}, {shape.num_layers * len(config.sublayers)} adapters"
