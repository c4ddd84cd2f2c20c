"""Soft prompt tuning's trainable count from the model config: the prompt P (n_tokens, d)."""

from __future__ import annotations

from peftlab.methods.prompt_tuning.config import PromptTuningConfig
from peftlab.models.shape import ModelShape


def count_prompt_tuning(shape: ModelShape, config: PromptTuningConfig) -> int:
    """n_tokens * d: the parameters :func:`peftlab.methods.prompt_tuning.apply_prompt_tuning` trains."""
    return config.n_tokens * shape.hidden_size


def max_prompt_tokens(shape: ModelShape, config: PromptTuningConfig) -> int:
    """The virtual tokens share the position embeddings with the input: at most ``max_positions`` of them."""
    return shape.max_positions
