"""LoKr's trainable count from the model config: sum over targets of each Kronecker factor's count (in full, or
r (rows + columns) when factored), by the rule of :func:`.factors.kron_shape`. Not monotone in r: W2 switches from
factored r (k + n) to full k n at r = max(k, n) / 2, which can be fewer numbers, so LoKr has no size knob."""

from __future__ import annotations

from peftlab.methods.lokr.config import LokrConfig
from peftlab.methods.lokr.factors import kron_shape
from peftlab.models.shape import ModelShape, resolve_target_shapes


def count_lokr(shape: ModelShape, config: LokrConfig) -> int:
    """Parameters :func:`peftlab.methods.lokr.apply_lokr` trains on a model of this shape.

    Raises:
        ConfigError: ``method.target_modules`` matches nothing (as ``apply`` would).
    """
    targets = resolve_target_shapes(shape, config.target_modules, key="method.target_modules")
    return sum(kron_shape(t.out_size, t.in_features, config.r, config.decompose_factor, config.decompose_both)
               .count(config.r) for t in targets)
