"""Apply bottleneck adapters to a model: wrap each chosen sub-layer in :class:`AdaptedSublayer`, train only the
adapters.

Trainable count = n_adapters * (2 d b + b + d) (down: d b + b, up: b d + d); n_adapters = blocks x adapted
sub-layers per block (Houlsby and placement=both: 2, the others: 1).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftlab.methods.adapters.config import AdapterConfig
from peftlab.methods.adapters.layer import AdaptedSublayer, BottleneckAdapter
from peftlab.methods.base import PeftMethod, freeze_all
from peftlab.models.arch import input_embeddings, sublayer_names

ADAPTER_ATTR = "adapter"  # trainable keys: ``<sub-layer path>.adapter.{down,up}.{weight,bias}``


class AdapterMethod(PeftMethod):
    """Bottleneck adapters applied to one model; ``layers`` maps sub-layer path -> its :class:`AdaptedSublayer`."""

    def __init__(self, model: nn.Module, config: AdapterConfig, layers: dict[str, AdaptedSublayer],
                 bottleneck_size: int) -> None:
        self.model = model
        self.config = config
        self.layers = layers
        self.bottleneck_size = bottleneck_size

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """``<sub-layer>.adapter.down.weight`` (b, d), ``.down.bias`` (b), ``.up.weight`` (d, b), ``.up.bias`` (d);
        the keys are the parameters' names in the model."""
        return {f"{name}.{ADAPTER_ATTR}.{key}": p
                for name, layer in self.layers.items() for key, p in layer.adapter.named_parameters()}

    def describe(self) -> dict[str, Any]:
        """Style, placement, bottleneck width, scaling, activation and the number of adapters."""
        return {"style": "parallel" if self.config.PARALLEL else "sequential", "placement": self.config.placement,
                "bottleneck_size": self.bottleneck_size, "scaling": float(self.config.scaling),
                "non_linearity": self.config.non_linearity, "n_adapters": len(self.layers)}


def apply_adapters(model: nn.Module, config: AdapterConfig) -> AdapterMethod:
    """Freeze ``model`` and wrap the chosen sub-layers of every block (in place).

    Args:
        model: a GPT-2 or Llama-family causal LM.
        config: the adapter options; its class decides sequential vs parallel (see :mod:`.config`).

    Returns:
        The :class:`AdapterMethod`; at this point the model's outputs equal the base model's (up = 0).

    Raises:
        ConfigError: ``reduction_factor`` leaves no bottleneck for this model's width.
        ValueError: adapters are already applied to ``model``.
    """
    if any(isinstance(m, AdaptedSublayer) for m in model.modules()):
        raise ValueError("adapters are already applied to this model; apply them to a fresh base model")
    hidden = input_embeddings(model).embedding_dim
    bottleneck = config.bottleneck(hidden)
    freeze_all(model)
    names = sorted((name for kind in config.sublayers for name in sublayer_names(model, kind)),
                   key={n: i for i, (n, _) in enumerate(model.named_modules())}.__getitem__)
    layers: dict[str, AdaptedSublayer] = {}
    for name in names:
        base = model.get_submodule(name)
        weight = next(base.parameters())
        # Half-precision bases get float32 adapters (as LoRA here and PEFT do): small updates survive.
        dtype = weight.dtype if weight.dtype not in (torch.float16, torch.bfloat16) else torch.float32
        adapter = BottleneckAdapter(hidden, bottleneck, config.non_linearity, float(config.scaling), config.dropout,
                                    device=weight.device, dtype=dtype)
        layer = AdaptedSublayer(base, adapter, parallel=config.PARALLEL)
        layer.train(model.training)  # a new nn.Dropout starts in training mode even inside an eval() model
        model.set_submodule(name, layer)
        layers[name] = layer
    return AdapterMethod(model, config, layers, bottleneck)
