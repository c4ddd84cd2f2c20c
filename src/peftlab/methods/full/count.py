"""Full fine-tuning's trainable count from the model config: every parameter (a tied matrix once)."""

from __future__ import annotations

from peftlab.methods.full.config import FullConfig
from peftlab.models.shape import ModelShape


def count_full(shape: ModelShape, config: FullConfig) -> int:
    """All parameters of the model."""
    return shape.total_params
