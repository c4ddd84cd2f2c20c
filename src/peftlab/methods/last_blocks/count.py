"""Last-N-blocks tuning's trainable count from the model config: every parameter of the top n_blocks blocks,
+ the final norm (final_norm), + the head weight V * d (head untied or tied; a tied matrix counts once)."""

from __future__ import annotations

from peftlab.config import ConfigError
from peftlab.methods.last_blocks.config import LastBlocksConfig
from peftlab.models.shape import ModelShape


def count_last_blocks(shape: ModelShape, config: LastBlocksConfig) -> int:
    """Parameters :func:`peftlab.methods.last_blocks.apply_last_blocks` trains on a model of this shape.

    Raises:
        ConfigError: ``n_blocks`` exceeds the number of blocks (as ``apply`` would).
    """
    layers = shape.num_layers
    if config.n_blocks > layers:
        raise ConfigError(f"method.n_blocks: {config.n_blocks} is outside 1..{layers}; this {shape.model_type} "
                          f"model has {layers} transformer blocks")
    total = sum(shape.block_params(i) for i in range(layers - config.n_blocks, layers))
    if config.final_norm:
        total += shape.params_under(shape.final_norm_prefix)
    if config.head != "none":
        total += shape.head_params
    return total


def max_blocks(shape: ModelShape, config: LastBlocksConfig) -> int:
    """Every block: n_blocks ranges over 1..num_layers."""
    return shape.num_layers
