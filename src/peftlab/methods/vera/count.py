"""VeRA's trainable count from the model config: per adapted module r (lambda_d, shared by its slices) + the
targeted output width (lambda_b); the shared projections are frozen and not counted."""

from __future__ import annotations

from peftlab.methods.vera.config import VeraConfig
from peftlab.models.shape import ModelShape, resolve_target_shapes


def count_vera(shape: ModelShape, config: VeraConfig) -> int:
    """Parameters :func:`peftlab.methods.vera.apply_vera` trains on a model of this shape.

    Raises:
        ConfigError: ``method.target_modules`` matches nothing (as ``apply`` would).
    """
    targets = resolve_target_shapes(shape, config.target_modules, key="method.target_modules")
    return config.r * len({t.name for t in targets}) + sum(t.out_size for t in targets)
