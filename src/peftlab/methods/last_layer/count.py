"""Last-layer tuning's trainable count from the model config: the head weight (V, d), tied or untied alike (untied
trains a copy of the embedding matrix, tied the shared matrix; neither family's head has a bias)."""

from __future__ import annotations

from peftlab.methods.last_layer.config import LastLayerConfig
from peftlab.models.shape import ModelShape


def count_last_layer(shape: ModelShape, config: LastLayerConfig) -> int:
    """V * d: the parameters :func:`peftlab.methods.last_layer.apply_last_layer` trains."""
    return shape.head_params


def last_layer_note(shape: ModelShape, config: LastLayerConfig) -> str:
    """Whether the trained head is a copy of tied embeddings or the shared matrix."""
    if not shape.tied:
        return "head is untied in the base model"
    return "untied copy of the tied embeddings" if config.head == "untied" else "trains the shared (tied) matrix"
