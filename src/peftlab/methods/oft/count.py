"""OFT's trainable count from the model config: sum over targets of n b(b-1)/2 (b(b-1)/2 with ``block_share``),
(n, b) the target's block layout (:func:`.blocks.block_layout`); GPT-2 q/k/v slices each have their own blocks."""

from __future__ import annotations

from peftlab.methods.oft.blocks import block_layout, n_elements
from peftlab.methods.oft.config import OftConfig
from peftlab.models.shape import ModelShape, resolve_target_shapes


def count_oft(shape: ModelShape, config: OftConfig) -> int:
    """Parameters :func:`peftlab.methods.oft.apply_oft` trains on a model of this shape.

    Raises:
        ConfigError: ``method.target_modules`` matches nothing (as ``apply`` would).
    """
    total = 0
    for target in resolve_target_shapes(shape, config.target_modules, key="method.target_modules"):
        n, b = block_layout(target.in_features, config.r, config.oft_block_size)
        total += (1 if config.block_share else n) * n_elements(b)
    return total


def max_block_size(shape: ModelShape, config: OftConfig) -> int:
    """The size knob's top: the widest target input (a larger block size becomes d_in, one block per layer)."""
    return max(t.in_features for t in resolve_target_shapes(shape, config.target_modules, key="method.target_modules"))
