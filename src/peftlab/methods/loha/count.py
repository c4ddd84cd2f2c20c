"""LoHa's trainable count from the model config: sum over targets of 2 r (d_out_slice + d_in)."""

from __future__ import annotations

from peftlab.methods.loha.config import LohaConfig
from peftlab.models.shape import ModelShape, resolve_target_shapes


def count_loha(shape: ModelShape, config: LohaConfig) -> int:
    """Parameters :func:`peftlab.methods.loha.apply_loha` trains on a model of this shape.

    Raises:
        ConfigError: ``method.target_modules`` matches nothing (as ``apply`` would).
    """
    targets = resolve_target_shapes(shape, config.target_modules, key="method.target_modules")
    return 2 * config.r * sum(t.out_size + t.in_features for t in targets)
