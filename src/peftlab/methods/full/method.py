"""Full fine-tuning: every parameter trains; the reference the PEFT methods are measured against.

    theta <- theta - lr * AdamW(grad L(theta))     for all theta (tied weights are one parameter, updated once)

The adapter is the whole state dict with tied weights stored once (``named_parameters`` drops the duplicate).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftlab.methods.base import PeftMethod
from peftlab.methods.full.config import FullConfig
from peftlab.models.arch import is_tied


class FullMethod(PeftMethod):
    """Every parameter of the model trains."""

    def __init__(self, model: nn.Module, config: FullConfig) -> None:
        self.model = model
        self.config = config

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """All parameters by their model names; a tied matrix appears once, under its first name."""
        return dict(self.model.named_parameters())

    def describe(self) -> dict[str, Any]:
        return {"tied": is_tied(self.model)}


def apply_full(model: nn.Module, config: FullConfig) -> FullMethod:
    """Unfreeze every parameter of ``model``.

    Args:
        model: any model.
        config: no options.

    Returns:
        The :class:`FullMethod`; the model's outputs are unchanged.
    """
    for p in model.parameters():
        p.requires_grad_(True)
    return FullMethod(model, config)
