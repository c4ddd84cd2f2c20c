"""Intrinsic-dimension training's trainable count from the model config: theta_d (d,), + one SAID scale per
target matrix (a whole layer, or one GPT-2 q/k/v slice of ``c_attn``)."""

from __future__ import annotations

from peftlab.methods.intrinsic_dim.config import IntrinsicDimConfig
from peftlab.models.shape import ModelShape, TargetShape, resolve_target_shapes


def _targets(shape: ModelShape, config: IntrinsicDimConfig) -> list[TargetShape]:
    return resolve_target_shapes(shape, config.target_modules, key="method.target_modules")


def count_intrinsic_dim(shape: ModelShape, config: IntrinsicDimConfig) -> int:
    """d (+ the number of target matrices with SAID).

    Raises:
        ConfigError: ``method.target_modules`` matches nothing (as ``apply`` would).
    """
    n_matrices = len(_targets(shape, config))
    return config.d + (n_matrices if config.said else 0)


def subspace_size(shape: ModelShape, config: IntrinsicDimConfig) -> int:
    """D, the number of weights that move: d beyond D adds no freedom, so the budget solver stops there."""
    return sum(t.in_features * t.out_size for t in _targets(shape, config))


def intrinsic_dim_note(shape: ModelShape, config: IntrinsicDimConfig) -> str:
    """D, and the SAID scales when on."""
    said = f"theta_d + {len(_targets(shape, config))} SAID scales" if config.said else "theta_d"
    return f"{said}; D = {subspace_size(shape, config):,} weights move in the subspace"
